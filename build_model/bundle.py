"""Write the model bundle: the ONNX files, split, report, a manifest that checksums them all, and (given a
signing key) manifest.sig, the Ed25519 signature over the manifest (edge_agent/signing.py, the one definition
of the format that the agent verifies)."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

from edge_agent.bundle import required_format_version, screening_suffix
from edge_agent.preprocess import Preprocessing
from edge_agent.signing import SIG_FILE, load_private_key, sign_bundle

LABEL_NAMES = {
    "akiec": "actinic keratosis / intraepithelial carcinoma", "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion", "df": "dermatofibroma", "mel": "melanoma",
    "nv": "melanocytic nevus", "vasc": "vascular lesion",
}
HIGH_RISK = ["mel", "bcc", "akiec"]
HAM_LICENSE = "CC BY-NC 4.0 (Creative Commons Attribution-NonCommercial 4.0 International), inherited from the HAM10000 training data"
CITATIONS = {}  # per training source, filled below
HAM_CITATION = ("Tschandl, P., Rosendahl, C. & Kittler, H. The HAM10000 dataset, a large collection of multi-source "
                "dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018). doi:10.1038/sdata.2018.161")
CITATIONS.update({
    "ham10000": HAM_CITATION,
    "isic2017": "Codella N. et al. Skin lesion analysis toward melanoma detection: a challenge at the 2017 International "
                "Symposium on Biomedical Imaging (ISBI), hosted by the International Skin Imaging Collaboration (ISIC). "
                "ISBI 2018, arXiv:1710.05006.",
})


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(out: Path, *, fp32: Path, int8: Path, split_csv: Path, report_md: str, labels: list[str],
                 pre: Preprocessing, temperature: float, thresholds: dict, gate: dict, primary: str,
                 training: dict, build_command: str, license_text: str, citation: str,
                 signing_key: Path | None = None, tta: str = "none", arch: str = "lite0",
                 sources: dict | None = None, format3: tuple[dict, dict, dict] | None = None) -> dict:
    """Copy the artifacts into `out`, write manifest.json last (its presence means the bundle is complete) and,
    with `signing_key`, sign it. Without a key the bundle is unsigned: agents refuse it until it is signed
    (`build-model sign`) or they set allow_unsigned_bundle."""
    key = load_private_key(signing_key) if signing_key is not None else None  # fail before any work
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    (out / SIG_FILE).unlink(missing_ok=True)  # a signature over the previous manifest would not match
    manifest_path.unlink(missing_ok=True)
    files = {"model.fp32.onnx": fp32, "model.int8.onnx": int8, "split.csv": split_csv}
    if format3 is not None:  # (files, features block, ood block) from build_model.explain: the models with the
        files.update(format3[0])  # feature output replace the plain ones
    for name, src in files.items():
        if src.resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)
    (out / "report.md").write_text(report_md)
    for stray in out.iterdir():
        if stray.name not in files and stray.name not in ("report.md", "manifest.json"):
            raise RuntimeError(f"{stray} is not part of a bundle: the agent refuses unlisted files, remove it")
    digests = {p.name: sha256(p) for p in sorted(out.iterdir()) if p.name != "manifest.json"}
    created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    manifest = {
        "format_version": required_format_version({"tta": tta, "preprocessing": pre.to_dict()}
                                                  | ({"features": 1} if format3 else {})),
        "model_id": f"{training.get('dataset_name', 'model')}-{arch}-{pre.input_size}-{created:%Y%m%d}-{digests[f'model.{primary}.onnx'][:8]}"
                    + screening_suffix(pre.n_views, tta),
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "build_command": build_command,
        "labels": labels,
        "label_names": {k: LABEL_NAMES.get(k, k) for k in labels},
        "high_risk_labels": [k for k in HIGH_RISK if k in labels],
        "preprocessing": pre.to_dict(),
        "input": {"name": "input", "shape": ["batch", 3, pre.input_size, pre.input_size], "dtype": "float32"},
        "output": {"name": "logits", "kind": "logits"},
        "models": {"int8": {"file": "model.int8.onnx", "approved": bool(gate.get("approved"))},
                   "fp32": {"file": "model.fp32.onnx", "approved": True}},
        "primary": primary,
        "fallback": "fp32" if primary == "int8" else None,
        "temperature": temperature,
        **({"tta": tta} if tta != "none" else {}),
        **({"features": format3[1], "ood": format3[2]} if format3 else {}),
        "thresholds": thresholds,
        "gate": gate,
        "files": digests,
        "training": training,
        **({"sources": sources} if sources else {}),
        "license": license_text,
        "citation": citation,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    tmp.replace(manifest_path)
    if key is not None:
        sign_bundle(out, key)
    return manifest
