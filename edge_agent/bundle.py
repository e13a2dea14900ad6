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

The manifest itself is signed (signing.py, docs/bundle-format.md): a bundle
whose manifest.sig is missing, from a key this device does not trust, or
does not match the manifest bytes is refused, unless the administrator set
allow_unsigned_bundle (missing or untrusted only). The manifest is read once,
bounded in size and JSON nesting, and the bytes that were signature-checked
are the bytes that were parsed; their SHA-256 goes into every result row.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: preprocess pulls in OpenCV and signing the cryptography library,
    # which `status`/`results` (they import LABEL_RE from here) never need
    from .features import Head
    from .ood import OodModel
    from .preprocess import Preprocessing
    from .signing import SignatureCheck, Trust

# Version 2 adds the optional `tta` (test-time augmentation) key; version 3 the optional `features`
# block (a second model output, the last feature map, and the classifier weights: heatmaps) and
# `ood` block (out-of-distribution statistics, ood.py). A bundle declares the lowest version whose
# features it uses (`required_format_version`), so bundles without them stay at 1 or 2 and keep
# running on older agents, and an older agent refuses a newer bundle instead of silently computing
# other numbers than the bundle's report (or silently skipping its OOD check).
# Version 4: the `lesion_crop` resize rule (preprocessing.resize; lesion.py): an older agent would
# refuse the rule by name anyway, but the version says it before any image is read.
# Version 5: preprocessing.views (several resize rules per image, logits averaged, preprocess.py):
# an older agent would silently screen the first view only - other numbers than the report's.
FORMAT_VERSION = 5
TTA_MODES = ("none", "hflip")
MANIFEST = "manifest.json"
LABEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
VARIANTS = ("int8", "fp32")
SIG_FILE = "manifest.sig"  # = signing.SIG_FILE (not imported here, see above)
MAX_MANIFEST_BYTES = 1 << 20  # the shipped manifest is ~8 KiB; a bigger one is not a manifest
MAX_JSON_DEPTH = 32  # the shipped manifest nests 5 deep; Python's json recurses per level
MAX_INPUT_SIZE = 2048  # model input side in pixels (the shipped model uses 192)


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
    manifest_sha256: str | None = None  # of the exact bytes that were parsed and signature-checked
    signature: SignatureCheck | None = None
    trust: Trust | None = None  # the keys it was checked against, so a later load_bundle applies the same

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest or {}
        return {"path": str(self.path), "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "files": self.files, "model_id": m.get("model_id"), "format_version": m.get("format_version"),
                "primary": m.get("primary"), "fallback": m.get("fallback"), "gate": m.get("gate"),
                "manifest_sha256": self.manifest_sha256,
                "signature": self.signature.to_dict() if self.signature else None}

    def raise_for_errors(self) -> None:
        if self.errors:
            raise BundleError(f"refusing to use the model bundle {self.path}:\n  - " + "\n  - ".join(self.errors))


class ManifestError(ValueError):
    """manifest.json cannot be parsed safely; the message says why."""


def _reject_constant(name: str) -> Any:
    raise ManifestError(f"it contains {name}, which is not a number in JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ManifestError(f"key {k!r} appears twice in one object (parsers disagree on which one counts)")
        out[k] = v
    return out


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in JSON text, counted without recursion (strings skipped)."""
    depth = deepest = 0
    for ch in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_manifest(data: bytes) -> Any:
    """Parse manifest bytes strictly: UTF-8, at most MAX_JSON_DEPTH levels deep (checked before parsing,
    so a hostile file cannot exhaust the parser's recursion), no NaN/Infinity, no duplicate keys."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"it is not UTF-8 text ({e})") from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ManifestError(f"it nests arrays/objects {depth} levels deep, more than the {MAX_JSON_DEPTH} a manifest "
                            "may use")
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:  # pragma: no cover - the depth check above comes first
        raise ManifestError("it nests too deeply to parse") from None
    except ValueError as e:  # JSONDecodeError, integers longer than Python's digit limit, ManifestError
        raise ManifestError(str(e)) from None


def verify_bundle(path: str | Path, trust: Trust | None = None) -> BundleReport:
    """Check a bundle folder against the format, its signature and its own checksums; never raises for bad
    content. `trust`: the keys to accept (signing.make_trust / trust_from_settings); None applies the
    project key plus the environment (signing.trust_from_environ), as the CLI would without a config file."""
    from .signing import SigningError, read_small, trust_from_environ

    if trust is None:
        trust = trust_from_environ()
    root = Path(path)
    rep = BundleReport(path=root, trust=trust)
    if not root.is_dir():
        rep.errors.append(f"{root} is not a folder: pass the path of a bundle built by `build-model` "
                          "(a folder containing manifest.json)")
        return rep
    mpath = root / MANIFEST
    try:
        data = read_small(mpath, MAX_MANIFEST_BYTES, "the manifest")
        manifest = parse_manifest(data)
    except FileNotFoundError:
        rep.errors.append(f"{mpath} is missing: this folder is not a model bundle; rebuild it with `build-model`")
        return rep
    except SigningError as e:
        rep.errors.append(f"{e}; the bundle is damaged or was tampered with: re-copy it from its source")
        return rep
    except ManifestError as e:
        rep.errors.append(f"{mpath} is not a valid manifest: {e}; the bundle is damaged or was tampered with: "
                          "rebuild or re-copy it")
        return rep
    rep.manifest_sha256 = hashlib.sha256(data).hexdigest()
    _check_signature(root, data, trust, rep)
    if not isinstance(manifest, dict):
        rep.errors.append(f"{mpath} must hold a JSON object, not a {type(manifest).__name__}; the bundle is damaged; "
                          "rebuild it")
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


def _check_signature(root: Path, data: bytes, trust: Trust, rep: BundleReport) -> None:
    """manifest.sig against the manifest bytes: an error, or a warning where allow_unsigned_bundle accepts it."""
    from .signing import MAX_SIG_BYTES, SignatureCheck, SigningError, check_signature, read_small

    try:
        sig: bytes | None = read_small(root / SIG_FILE, MAX_SIG_BYTES, "the signature file")
    except FileNotFoundError:
        sig = None
    except SigningError as e:
        rep.signature = SignatureCheck("invalid", str(e))
        rep.errors.append(f"signature: {e}")
        return
    rep.signature = check = check_signature(data, sig, trust)
    if check.valid:
        return
    if check.allowable and trust.allow_unsigned:
        rep.warnings.append(f"UNSIGNED BUNDLE ACCEPTED (allow_unsigned_bundle = true): {check.message}")
    else:
        rep.errors.append(f"signature: {check.message}")


def _check_files(root: Path, manifest: dict[str, Any], rep: BundleReport) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        rep.errors.append("manifest 'files' must map every bundle file name to its sha256; rebuild the bundle")
        return
    for name, digest in sorted(files.items()):
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..", MANIFEST, SIG_FILE):
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
        if p.name not in (MANIFEST, SIG_FILE) and p.name not in files:
            rep.errors.append(f"{p.name} is in the bundle folder but not listed in the manifest: remove it, or "
                              "re-copy the bundle; the agent only runs exactly what was built and checksummed")
            rep.files[p.name] = "unlisted"
    for name in ("report.md", "split.csv"):
        if name not in files:
            rep.warnings.append(f"{name} is not part of the bundle; the evaluation it documents cannot be checked")


def screening_suffix(n_views: int, tta: str) -> str:
    """What a builder appends to a model_id after the primary's sha256 prefix: the same weights screened
    another way (several views, flip TTA) give other numbers, so they are another model for the results
    table, the review app's heatmaps and drift."""
    return (f"-{n_views}views" if n_views > 1 else "") + ("-hflip" if tta == "hflip" else "")


SCREENING_SUFFIX_RE = re.compile(r"(-\d+views)?(-hflip)?$")


def required_format_version(manifest: dict[str, Any]) -> int:
    """The lowest format version that has every feature this manifest uses (the builder writes this)."""
    pre = manifest.get("preprocessing")
    if isinstance(pre, dict) and pre.get("views"):
        return 5
    if isinstance(pre, dict) and pre.get("resize") == "lesion_crop":
        return 4
    if "features" in manifest or "ood" in manifest:
        return 3
    return 2 if manifest.get("tta", "none") != "none" else 1


def _check_format3(m: dict[str, Any], rep: BundleReport) -> None:
    """The `features` and `ood` blocks: types, and files that the manifest checksums."""
    err = rep.errors.append
    files = m.get("files") or {}
    feats, ood = m.get("features"), m.get("ood")
    if feats is not None:
        if not (isinstance(feats, dict) and isinstance(feats.get("output"), str) and feats["output"]
                and isinstance(feats.get("head"), str)):
            err("manifest 'features' must be {'output': <tensor name>, 'head': <file>}; rebuild the bundle")
        elif feats["head"] not in files:
            err(f"features.head {feats['head']!r} is not listed (checksummed) in manifest files; rebuild the bundle")
        elif feats["output"] == m.get("output", {}).get("name"):
            err("features.output names the logits tensor; it must be the feature map; rebuild the bundle")
    if ood is not None:
        if not (isinstance(ood, dict) and isinstance(ood.get("file"), str) and isinstance(ood.get("method"), str)
                and isinstance(ood.get("thresholds"), dict)):
            err("manifest 'ood' must be {'file': <file>, 'method': <name>, 'thresholds': {variant: number}}; "
                "rebuild the bundle")
        elif ood["file"] not in files:
            err(f"ood.file {ood['file']!r} is not listed (checksummed) in manifest files; rebuild the bundle")
        elif feats is None:
            err("manifest has 'ood' statistics but no 'features' output to compute them from; rebuild the bundle")


def _check_fields(m: dict[str, Any], rep: BundleReport) -> None:
    """Every field the agent uses, with its type: a manifest is data from a file, and a wrong type must be a
    clear refusal here, never an exception later (in `model info`, at load, or mid-scan)."""
    err = rep.errors.append
    if "tta" in m and m["tta"] not in TTA_MODES:
        err(f"manifest key 'tta' is {m['tta']!r}; this agent knows {list(TTA_MODES)}: upgrade edge-agent or rebuild the bundle")
    elif m.get("format_version", 1) < required_format_version(m):
        used = [k for k in ("tta", "features", "ood") if k in m and m[k] != "none"]
        if required_format_version(m) == 4:
            used.append("the lesion_crop resize rule")
        if required_format_version(m) == 5:
            used.append("several preprocessing views")
        err(f"manifest uses {', '.join(used)} (format version {required_format_version(m)}) but declares "
            f"format_version {m.get('format_version')}; older agents would ignore it: rebuild the bundle with a "
            "current build-model")
    _check_format3(m, rep)
    for key, typ in (("model_id", str), ("labels", list), ("high_risk_labels", list), ("preprocessing", dict),
                     ("input", dict), ("output", dict), ("models", dict), ("primary", str), ("thresholds", dict)):
        if not isinstance(m.get(key), typ):
            err(f"manifest key {key!r} is missing or not a {typ.__name__}; rebuild the bundle with a current build-model")
    for key, typ in (("label_names", dict), ("gate", dict), ("training", dict), ("created_at", str),
                     ("build_command", str), ("license", str), ("citation", str)):
        if key in m and not isinstance(m[key], typ):
            err(f"manifest key {key!r} must be a {typ.__name__}, not {type(m[key]).__name__}; rebuild the bundle")
    if "fallback" in m and m["fallback"] is not None and not isinstance(m["fallback"], str):
        err(f"manifest fallback {m['fallback']!r} must be null or a variant name; rebuild the bundle")
    if rep.errors:
        return
    if not MODEL_ID_RE.match(m["model_id"]):
        err(f"model_id {m['model_id'][:80]!r} must be 1-128 letters, digits, '.', '_', '+' or '-' (it goes into "
            "every result row and log line); rebuild the bundle")
    labels = m["labels"]
    if not labels or not all(isinstance(x, str) and LABEL_RE.match(x) for x in labels) or len(set(labels)) != len(labels):
        err(f"manifest labels {labels!r} must be unique lower-case identifiers (letters, digits, _); rebuild the bundle")
        return
    bad = [x for x in m["high_risk_labels"] if x not in labels]
    if bad:
        err(f"high_risk_labels {bad} are not among the model labels {labels}; fix the manifest and rebuild")
    names = m.get("label_names") or {}
    if any(not isinstance(v, str) or len(v) > 200 for v in names.values()):
        err("label_names must map labels to short texts (at most 200 characters); rebuild the bundle")
    from .preprocess import Preprocessing

    pre = None
    pre_problem = _preprocessing_problem(m["preprocessing"])
    if pre_problem:
        err(f"preprocessing block is invalid: {pre_problem}; rebuild the bundle")
    else:
        try:
            pre = Preprocessing.from_dict(m["preprocessing"])
        except (ValueError, TypeError) as e:
            err(f"preprocessing block is invalid: {e}")
    shape = m["input"].get("shape")
    if not isinstance(m["input"].get("name"), str):
        err("manifest input.name must name the ONNX input tensor; rebuild the bundle")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3]
            and _is_int(shape[2])):
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
        if (variant not in VARIANTS or not isinstance(spec, dict) or not isinstance(spec.get("file"), str)
                or not isinstance(spec.get("approved", False), bool)):
            err(f"models.{variant} must be {{'file': name, 'approved': true|false}} with variant int8 or fp32; "
                "rebuild the bundle")
            return
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
    suffix = SCREENING_SUFFIX_RE.sub("", m["model_id"]).rsplit("-", 1)[-1]
    if digest and not (len(suffix) >= 6 and digest.startswith(suffix)):
        rep.warnings.append(f"model_id {m['model_id']!r} does not end with the sha256 prefix of {primary_file}")


def _check_thresholds(th: dict[str, Any], labels: list[str], rep: BundleReport) -> None:
    rules = 0
    for name, spec in th.items():
        if not LABEL_RE.match(name):
            rep.errors.append(f"threshold name {name[:40]!r} must be a lower-case identifier; rebuild the bundle")
            continue
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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _preprocessing_problem(p: dict[str, Any]) -> str | None:
    """Types and ranges of the preprocessing block (Preprocessing.from_dict checks the vocabulary): a
    string, float or huge input_size would otherwise fail (or allocate gigabytes) on the first image."""
    size = p.get("input_size")
    if not _is_int(size) or not 8 <= size <= MAX_INPUT_SIZE:
        return f"input_size {size!r} must be a whole number of pixels from 8 to {MAX_INPUT_SIZE}"
    for key in ("mean", "std"):
        v = p.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)):
            return f"{key} {v!r} must be a list of 3 numbers"
    if isinstance(p.get("std"), list) and any(x <= 0 for x in p["std"]):
        return f"std {p['std']!r} must be positive"
    for key in ("color_order", "resize", "interpolation", "color_constancy", "layout"):
        if key in p and not isinstance(p[key], str):
            return f"{key} {p[key]!r} must be text"
    if p.get("interpolation", "area") not in ("area", "linear", "cubic"):
        return f"interpolation {p.get('interpolation')!r} must be area, linear or cubic"
    lm = p.get("lesion_margin", 0.15)
    if not _is_number(lm) or not 0 <= lm <= 2:
        return f"lesion_margin {lm!r} must be a number from 0 to 2"
    gp = p.get("shades_of_gray_p", 6)
    if not _is_number(gp) or not 1 <= gp <= 64:
        return f"shades_of_gray_p {gp!r} must be a number from 1 to 64"
    return None


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
    manifest_sha256: str = ""  # sha256 of the manifest bytes that were verified and parsed (in every result row)
    signature: SignatureCheck | None = None  # how the manifest's signature was accepted (valid, or allowed unsigned)
    tta: str = "none"  # "hflip": logits are the mean over the image and its mirror image
    features_output: str | None = None  # format 3: name of the feature-map output (None: no heatmaps, no OOD)
    head: Head | None = field(default=None, compare=False)  # format 3: the classifier's weights, for class activation maps
    ood: OodModel | None = field(default=None, compare=False)  # format 3: out-of-distribution statistics (None: no OOD check)

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    def model_bytes(self, variant: str) -> bytes:
        """The variant's ONNX bytes, re-hashed now, so the bytes that run are the bytes that were verified."""
        return self.file_bytes(self.variants[variant].file)

    def file_bytes(self, name: str) -> bytes:
        """A listed file's bytes, re-hashed now (see model_bytes)."""
        data = (self.path / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.file_hashes[name]:
            raise BundleError(f"{self.path / name} changed after the bundle was verified (sha256 mismatch): "
                              "someone is modifying the bundle; re-copy it and restart the agent")
        return data

    @property
    def why_no_heatmap(self) -> str | None:
        """None when heatmaps can be computed, else the reason in words (for the review app)."""
        if self.head is not None and self.features_output:
            return None
        return (f"this model bundle (format version {self.manifest.get('format_version')}) has no feature output; "
                "heatmaps need a bundle of format 3 or later (`build-model upgrade-bundle`)")

    @property
    def why_no_ood(self) -> str | None:
        """None when images get an out-of-distribution score, else the reason in words (status, model info)."""
        if self.ood is not None:
            return None
        return (f"this model bundle (format version {self.manifest.get('format_version')}) carries no "
                "out-of-distribution statistics, so images unlike the training data are not flagged as such; "
                "use a bundle of format 3 (`build-model upgrade-bundle`)")


def load_bundle(path: str | Path, trust: Trust | None = None) -> Bundle:
    """Verify and load a bundle, or raise BundleError listing what is wrong and what to do (trust: as in
    verify_bundle)."""
    from .preprocess import Preprocessing

    rep = verify_bundle(path, trust)
    rep.raise_for_errors()
    m = rep.manifest
    assert m is not None
    b = Bundle(
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
        tta=str(m.get("tta", "none")),
        thresholds=m["thresholds"],
        primary=m["primary"],
        fallback=m.get("fallback"),
        variants={k: Variant(k, v["file"], bool(v.get("approved", False))) for k, v in m["models"].items()},
        file_hashes=dict(m["files"]),
        manifest_sha256=rep.manifest_sha256 or "",
        signature=rep.signature,
    )
    return _with_format3(b, m)


def _with_format3(b: Bundle, m: dict[str, Any]) -> Bundle:
    """Load the head weights and OOD statistics from their verified bytes (a bad file: BundleError)."""
    from dataclasses import replace

    from .features import FeatureError, load_head
    from .ood import OodError, load as load_ood

    feats, ood = m.get("features"), m.get("ood")
    if feats is None:
        return b
    try:
        head = load_head(b.file_bytes(feats["head"]), len(b.labels))
        stats = load_ood(b.file_bytes(ood["file"]), ood, sorted(b.variants)) if ood is not None else None
    except (FeatureError, OodError) as e:
        raise BundleError(f"refusing to use the model bundle {b.path}:\n  - {e}") from None
    if stats is not None and stats.feature_dim != head.feature_dim:
        raise BundleError(f"refusing to use the model bundle {b.path}:\n  - the OOD statistics have "
                          f"{stats.feature_dim} features but the classifier reads {head.feature_dim}; rebuild the bundle")
    return replace(b, features_output=feats["output"], head=head, ood=stats)
