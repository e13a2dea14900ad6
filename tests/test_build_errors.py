"""`build-model`'s expected failures are one clear line and exit status 1 or 2, never a traceback:
bad --data, a stage run before the stage it needs, unknown settings, a data set too small to split,
and a runtime-only install (no torch) that needs the build extra."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.build_fixtures import make_ham

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "48", "--batch-size", "8", "--threads", "2", "--max-source-side", "80", "--epochs", "1"]


def cli(*args: str, env: dict | None = None, python: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(python or [sys.executable]), "-m", "build_model", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def one_line_error(r: subprocess.CompletedProcess, code: int = 1) -> str:
    """The error's text; asserts the exit status, no traceback, and a single 'Error:' line."""
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def ham(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ham(tmp_path_factory.mktemp("data") / "ham", lesions_per_class=3, images_per_lesion=1)


def test_bad_data_paths_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("not data")
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimages" / "mel").mkdir(parents=True)
    (tmp_path / "broken.npz").write_bytes(b"PK not a zip")
    cases = {
        str(tmp_path / "labels.txt"): "is a file, not a data folder",
        "ham=": "the path after ham= is empty",
        str(tmp_path / "nope"): "does not exist",
        str(tmp_path / "empty"): "has no labels.csv",
        str(tmp_path / "noimages"): "holds no images",
        str(tmp_path / "broken.npz"): "is not a readable .npz",
    }
    for data, words in cases.items():
        line = one_line_error(cli("train", "--data", data, "--out", str(tmp_path / "o"), *TINY))
        assert words in line, (data, line)


def test_unknown_settings_fail_before_any_work(ham: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert "unknown augmentation ['sparkle']" in one_line_error(cli("train", "--data", str(ham), "--out", str(out), *TINY, "--augment", "sparkle"))
    assert "'lite9': choose one of" in one_line_error(cli("train", "--data", str(ham), "--out", str(out), *TINY, "--arch", "lite9"), 2)
    line = one_line_error(cli("train", "--data", str(ham), "--out", str(out), *TINY, "--init-from", str(tmp_path / "none.pt")))
    assert "no such checkpoint" in line
    assert not (out.with_name("o.work") / "last.pt").exists()


def test_each_stage_run_too_early_names_the_stage_to_run_first(ham: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    common = ["--data", str(ham), "--out", str(out)]
    line = one_line_error(cli("export", *common))
    assert "`build-model export` needs" in line and "best.pt, which `build-model train` writes" in line
    line = one_line_error(cli("bundle", *common))
    assert "best.pt, which `build-model train` writes" in line
    assert cli("train", *common, *TINY).returncode == 0
    line = one_line_error(cli("quantize", *common, "--adaround-iters", "0"))
    assert "model.fp32.onnx, which `build-model export` writes" in line
    r = cli("export", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    line = one_line_error(cli("validate", *common))
    assert "`build-model validate` needs" in line and "quantize.json, which `build-model quantize` writes" in line
    line = one_line_error(cli("bundle", *common))
    assert "which `build-model quantize` writes" in line


def test_a_data_set_too_small_to_split_is_refused_naming_each_short_class(tmp_path: Path) -> None:
    """The 12 example images 'trained' to val AUC 0.000 before; now: refused, or the short classes dropped."""
    examples = ROOT / "examples"
    line = one_line_error(cli("train", "--data", str(examples), "--out", str(tmp_path / "o"), *TINY))
    assert "too small to split: every class needs at least 3 lesions" in line
    assert "akiec 1 lesion (1 image)" in line and "bcc 2 lesions (2 images)" in line and "mel " not in line
    assert "--drop-small-classes" in line and not (tmp_path / "o.work" / "best.pt").exists()
    small = make_ham(tmp_path / "small", lesions_per_class=2, images_per_lesion=3)
    line = one_line_error(cli("train", "--data", str(small), "--out", str(tmp_path / "s"), *TINY))
    assert "df 2 lesions (6 images)" in line
    r = cli("train", "--data", str(examples), "--out", str(tmp_path / "d"), *TINY, "--drop-small-classes")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "left out akiec (1 lesions, 1 images), bcc (2 lesions, 2 images)" in r.stderr
    assert "classes {'mel': 1, 'nv': 1}" in r.stderr  # the model has only the classes that can be validated
    split = (tmp_path / "d" / "split.csv").read_text()
    assert "akiec" not in split and {"train", "val", "test"} <= {row.split(",")[-1] for row in split.split()[1:]}


BUILD_ONLY = ("torch", "functorch", "torchgen", "onnx", "onnx_ir", "onnxscript", "sklearn", "scikit_learn",
              "efficientnet", "tqdm")


def runtime_only_env(tmp_path: Path) -> tuple[list[str], dict]:
    """A real runtime-only install: this venv's site-packages without the build extra's packages (a folder of
    links to everything else), the interpreter started without site (-S) so the full site-packages is not seen."""
    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path / "site-packages"
    farm.mkdir()
    for entry in site.iterdir():
        top = re.split(r"[-.]", entry.name)[0]
        if top in BUILD_ONLY or top.startswith("efficientnet") or entry.suffix == ".pth" or top.startswith("__editable__"):
            continue
        (farm / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = f"{farm}{os.pathsep}{ROOT}"
    return [sys.executable, "-S"], env


def test_runtime_only_install_says_install_the_build_extra(tmp_path: Path) -> None:
    python, env = runtime_only_env(tmp_path)
    probe = subprocess.run([*python, "-c", "import importlib.util as u, json; import edge_agent.cli, onnxruntime; "
                            "print(json.dumps([u.find_spec(m) is None for m in ('torch', 'onnx', 'sklearn')]))"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert probe.returncode == 0 and json.loads(probe.stdout) == [True, True, True], probe.stderr  # runtime works, no torch
    for args in (["--help"], ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o")], ["verify", str(tmp_path)]):
        r = cli(*args, env=env, python=python)
        line = one_line_error(r, 2)
        assert "install the build extra: pip install 'edge-derm-screen[build]'" in line and "torch" in line
        assert "ModuleNotFoundError" not in r.stderr


def test_missing_files_given_to_bench_and_evaluate_are_one_line_errors(ham: Path, tmp_path: Path) -> None:
    line = one_line_error(cli("bench", str(ROOT / "edge_agent" / "bundle"), "--checkpoint", str(tmp_path / "best.pt")), 2)
    assert "'--checkpoint'" in line and "does not exist" in line
    r = cli("evaluate", "--bundle", str(tmp_path / "nobundle"), "--data", str(ham))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "is not a folder" in r.stderr
