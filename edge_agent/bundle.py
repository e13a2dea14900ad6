"""Load and verify a model bundle (docs/bundle-format.md).

The bundle is the only contract between the build and the agent, and the
agent screens patients with it, so verification is strict: every file must be
listed in the manifest with a matching SHA-256, nothing unlisted may sit next
to it, and a format newer than this agent understands is refused rather than
half-understood. A tampered or corrupted model must never run. The model bytes
handed to onnxruntime are the bytes that were hashed (no re-open between
check and use).

`verify_bundle(path)` never raises for a bad bundle: it returns a report, so
`build_model` and `edge-agent model verify` can list every problem at once.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: preprocess pulls in OpenCV, which `status`/`results` never need
    from .preprocess import Preprocessing

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
VARIANTS = ("int8", "fp32")


class BundleError(Exception):
    """The bundle cannot be used; the message lists every problem and what to do."""


def default_bundle_path() -> Path:
    """The bundle shipped inside the package (`edge_agent/bundle/`)."""
    return Path(__file__).resolve().parent / "bundle"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class BundleReport:
    """Outcome of verifying a bundle folder: ok only when `errors` is empty."""

    path: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)  # name -> "ok" | "mismatch" | "missing" | "unlisted"

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest or {}
        return {"path": str(self.path), "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "files": self.files, "model_id": m.get("model_id"), "format_version": m.get("format_version"),
                "primary": m.get("primary"), "fallback": m.get("fallback"), "gate": m.get("gate")}

    def raise_for_errors(self) -> None:
        if self.errors:
            raise BundleError(f"refusing to use the model bundle {self.path}:\n  - " + "\n  - ".join(self.errors))


def verify_bundle(path: str | Path) -> BundleReport:
    """Check a bundle folder against the format and its own checksums; never raises for bad content."""
    root = Path(path)
    rep = BundleReport(path=root)
    if not root.is_dir():
        rep.errors.append(f"{root} is not a folder: pass the path of a bundle built by `build-model` "
                          "(a folder containing manifest.json)")
        return rep
    mpath = root / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        rep.errors.append(f"{mpath} is missing: this folder is not a model bundle; rebuild it with `build-model`")
        return rep
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        rep.errors.append(f"{mpath} cannot be read as JSON ({e}): the bundle is damaged; rebuild or re-copy it")
        return rep
    if not isinstance(manifest, dict):
        rep.errors.append(f"{mpath} must hold a JSON object; the bundle is damaged; rebuild it")
        return rep
    rep.manifest = manifest

    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        rep.errors.append(f"format_version {version!r} is not a positive integer: the manifest is damaged; rebuild the bundle")
        return rep
    if version > FORMAT_VERSION:
        rep.errors.append(f"bundle format_version {version} is newer than this agent understands ({FORMAT_VERSION}): "
                          "upgrade edge-agent, or use a bundle built for format version "
                          f"{FORMAT_VERSION}")
        return rep

    _check_files(root, manifest, rep)
    _check_fields(manifest, rep)
    return rep


def _check_files(root: Path, manifest: dict[str, Any], rep: BundleReport) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        rep.errors.append("manifest 'files' must map every bundle file name to its sha256; rebuild the bundle")
        return
    for name, digest in sorted(files.items()):
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..", MANIFEST):
            rep.errors.append(f"manifest lists an invalid file name {name!r}; only plain file names in the bundle "
                              "folder are allowed; rebuild the bundle")
            continue
        p = root / name
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            rep.errors.append(f"manifest checksum for {name} is not a sha256 hex digest; rebuild the bundle")
            rep.files[name] = "mismatch"
        elif p.is_symlink() or not p.is_file():
            rep.errors.append(f"{name} is listed in the manifest but missing (or not a regular file) in {root}: "
                              "re-copy the complete bundle")
            rep.files[name] = "missing"
        elif sha256_file(p) != digest:
            rep.errors.append(f"{name} does not match its sha256 in the manifest: the file was modified or "
                              "corrupted; re-copy the bundle from its source and do not run this one")
            rep.files[name] = "mismatch"
        else:
            rep.files[name] = "ok"
    for p in sorted(root.iterdir()):
        if p.name != MANIFEST and p.name not in files:
            rep.errors.append(f"{p.name} is in the bundle folder but not listed in the manifest: remove it, or "
                              "re-copy the bundle; the agent only runs exactly what was built and checksummed")
            rep.files[p.name] = "unlisted"
    for name in ("report.md", "split.csv"):
        if name not in files:
            rep.warnings.append(f"{name} is not part of the bundle; the evaluation it documents cannot be checked")


def _check_fields(m: dict[str, Any], rep: BundleReport) -> None:
    err = rep.errors.append
    for key, typ in (("model_id", str), ("labels", list), ("high_risk_labels", list), ("preprocessing", dict),
                     ("input", dict), ("output", dict), ("models", dict), ("primary", str), ("thresholds", dict)):
        if not isinstance(m.get(key), typ):
            err(f"manifest key {key!r} is missing or not a {typ.__name__}; rebuild the bundle with a current build-model")
    if rep.errors:
        return
    labels = m["labels"]
    if not labels or len(set(labels)) != len(labels) or not all(isinstance(x, str) and LABEL_RE.match(x) for x in labels):
        err(f"manifest labels {labels!r} must be unique lower-case identifiers (letters, digits, _); rebuild the bundle")
        return
    bad = [x for x in m["high_risk_labels"] if x not in labels]
    if bad:
        err(f"high_risk_labels {bad} are not among the model labels {labels}; fix the manifest and rebuild")
    from .preprocess import Preprocessing

    try:
        pre = Preprocessing.from_dict(m["preprocessing"])
    except (ValueError, TypeError) as e:
        err(f"preprocessing block is invalid: {e}")
        pre = None
    shape = m["input"].get("shape")
    if not isinstance(m["input"].get("name"), str):
        err("manifest input.name must name the ONNX input tensor; rebuild the bundle")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3]):
        err(f"manifest input.shape {shape!r} must be [batch, 3, S, S]; rebuild the bundle")
    elif pre is not None and shape[2] != pre.input_size:
        err(f"manifest input.shape size {shape[2]} differs from preprocessing.input_size {pre.input_size}; rebuild the bundle")
    if m["input"].get("dtype", "float32") != "float32":
        err(f"manifest input.dtype {m['input'].get('dtype')!r} is not supported (float32); rebuild the bundle")
    if not isinstance(m["output"].get("name"), str) or m["output"].get("kind", "logits") != "logits":
        err("manifest output must be {'name': <tensor>, 'kind': 'logits'}; this agent applies softmax(logits / temperature)")
    t = m.get("temperature", 1.0)
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        err(f"temperature {t!r} must be a positive number; rebuild the bundle (calibration step)")

    models, files = m["models"], m.get("files") or {}
    for variant, spec in models.items():
        if variant not in VARIANTS or not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
            err(f"models.{variant} must be {{'file': name, 'approved': bool}} with variant int8 or fp32; rebuild the bundle")
        elif spec["file"] not in files:
            err(f"models.{variant}.file {spec['file']!r} is not listed (checksummed) in manifest files; rebuild the bundle")
    primary, fallback = m["primary"], m.get("fallback")
    if primary not in models:
        err(f"primary variant {primary!r} is not one of the bundle's models {sorted(models)}; rebuild the bundle")
    elif not models[primary].get("approved", False):
        err(f"primary variant {primary!r} was not approved by the validation gate; the build must choose an approved "
            "variant as primary (normally fp32 when int8 fails the gate)")
    if fallback is not None:
        if fallback not in models or fallback == primary:
            err(f"fallback {fallback!r} must be null or another variant of {sorted(models)}; rebuild the bundle")
        elif not models[fallback].get("approved", False):
            err(f"fallback variant {fallback!r} is not approved by the validation gate; set fallback to null or approve it")

    _check_thresholds(m["thresholds"], labels, rep)
    gate = m.get("gate")
    if not isinstance(gate, dict) or "approved" not in gate:
        rep.warnings.append("manifest has no gate verdict; the INT8 model's validation cannot be shown")
    primary_file = models.get(primary, {}).get("file") if isinstance(models.get(primary), dict) else None
    digest = files.get(primary_file, "") if primary_file else ""
    suffix = m["model_id"].rsplit("-", 1)[-1]
    if digest and not (len(suffix) >= 6 and digest.startswith(suffix)):
        rep.warnings.append(f"model_id {m['model_id']!r} does not end with the sha256 prefix of {primary_file}")


def _check_thresholds(th: dict[str, Any], labels: list[str], rep: BundleReport) -> None:
    rules = 0
    for name, spec in th.items():
        if not isinstance(spec, dict):
            rep.errors.append(f"thresholds.{name} must be an object; rebuild the bundle")
            continue
        if "labels" in spec:
            rules += 1
            ls, p = spec.get("labels"), spec.get("probability")
            if not isinstance(ls, list) or not ls or any(x not in labels for x in ls):
                rep.errors.append(f"thresholds.{name}.labels {ls!r} must be a non-empty subset of {labels}; rebuild the bundle")
            if not _is_prob(p) or p == 0:
                rep.errors.append(f"thresholds.{name}.probability {p!r} must be in (0, 1]; rebuild the bundle")
        elif name == "low_confidence":
            if not _is_prob(spec.get("top1_probability")):
                rep.errors.append(f"thresholds.low_confidence.top1_probability {spec.get('top1_probability')!r} "
                                  "must be in [0, 1]; rebuild the bundle")
    if not rules:
        rep.errors.append("thresholds define no high-risk rule (an entry with 'labels' and 'probability'): the agent "
                          "could never flag a malignant lesion; rebuild the bundle")


def _is_prob(p: Any) -> bool:
    return isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0


@dataclass(frozen=True)
class Variant:
    name: str
    file: str
    approved: bool


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: everything the agent needs from the manifest, typed."""

    path: Path
    manifest: dict[str, Any]
    model_id: str
    labels: tuple[str, ...]
    label_names: dict[str, str]
    high_risk_labels: tuple[str, ...]
    preprocessing: Preprocessing
    input_name: str
    output_name: str
    temperature: float
    thresholds: dict[str, Any]
    primary: str
    fallback: str | None
    variants: dict[str, Variant]
    file_hashes: dict[str, str]

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    def model_bytes(self, variant: str) -> bytes:
        """The variant's ONNX bytes, re-hashed now, so the bytes that run are the bytes that were verified."""
        spec = self.variants[variant]
        data = (self.path / spec.file).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.file_hashes[spec.file]:
            raise BundleError(f"{self.path / spec.file} changed after the bundle was verified (sha256 mismatch): "
                              "someone is modifying the bundle; re-copy it and restart the agent")
        return data


def load_bundle(path: str | Path) -> Bundle:
    """Verify and load a bundle, or raise BundleError listing what is wrong and what to do."""
    from .preprocess import Preprocessing

    rep = verify_bundle(path)
    rep.raise_for_errors()
    m = rep.manifest
    assert m is not None
    return Bundle(
        path=Path(path),
        manifest=m,
        model_id=m["model_id"],
        labels=tuple(m["labels"]),
        label_names={k: str(v) for k, v in (m.get("label_names") or {}).items()},
        high_risk_labels=tuple(m["high_risk_labels"]),
        preprocessing=Preprocessing.from_dict(m["preprocessing"]),
        input_name=m["input"]["name"],
        output_name=m["output"]["name"],
        temperature=float(m.get("temperature", 1.0)),
        thresholds=m["thresholds"],
        primary=m["primary"],
        fallback=m.get("fallback"),
        variants={k: Variant(k, v["file"], bool(v.get("approved", False))) for k, v in m["models"].items()},
        file_hashes=dict(m["files"]),
    )
