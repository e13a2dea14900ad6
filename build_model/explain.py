"""Bundle format 3 on the build side: the feature-map output, the classifier weights, the OOD statistics.

The ONNX graphs get a second output, `features`, an Identity of the tensor the
global average pool reads (the last convolutional feature map). Nothing on the
logits path changes, so the INT8 graph still computes exactly what the gate
approved (`add_feature_output` proves it on real images before a bundle is
written). The classifier's Gemm weights go to head.npz (heatmaps), and the
out-of-distribution statistics are fitted on the pooled features of the
training split, per variant, with the threshold at a quantile of the
validation split's scores (edge_agent/ood.py holds the arithmetic both sides
use).

`upgrade_bundle` turns an existing format-1/2 bundle into format 3 without
retraining: the default bundle was upgraded this way.
"""
from __future__ import annotations

import csv
import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from edge_agent import ood as ood_mod
from edge_agent.features import HEAD_FILE, pool
from edge_agent.preprocess import flatten_views, mean_over_views

FEATURES = "features"
OOD_FILE = "ood.npz"
OOD_QUANTILE = 0.98  # share of validation images left unflagged (in-distribution test images flagged must stay <= 2%)
# Ledoit-Wolf's estimate (~0.003 for 4000 x 1280 features) leaves tiny within-class directions that noise
# pictures happen to fill too; a floor of 0.05 separated non-dermoscopy pictures better on the probe set the
# choice was made on (build_model/oodsets.py, seed 0; AUROC 0.9909 -> 0.9924, flagged 88% -> 92% at the same
# in-distribution rate). docs/ood.md reports it on a fresh probe set (seed 1).
MIN_SHRINKAGE = 0.05
MAX_FIT_IMAGES = 4000  # per fit; more changes the covariance little and costs minutes on 2 cores
Log = Callable[[str], None]


class ExplainError(RuntimeError):
    """The model's graph has no recognisable pooled feature map, or an upgraded model computes other logits."""


def _producers(g) -> dict:
    return {o: n for n in g.node for o in n.output}


def feature_tensor(m) -> tuple[str, object]:
    """(name of the 4-D tensor the classifier pools, the classifier's Gemm node)."""
    g = m.graph
    prod = _producers(g)
    out = g.output[0].name
    gemm = prod.get(out)
    if gemm is None or gemm.op_type not in ("Gemm", "MatMul"):
        raise ExplainError(f"the graph's output {out!r} is not produced by a linear layer (Gemm); cannot locate the "
                           "feature map for heatmaps/OOD")
    t = gemm.input[0]
    for _ in range(6):  # Flatten / Reshape / Squeeze / ReduceMean / GlobalAveragePool, in some order
        n = prod.get(t)
        if n is None:
            break
        if n.op_type in ("ReduceMean", "GlobalAveragePool"):
            return n.input[0], gemm
        if n.op_type not in ("Flatten", "Reshape", "Squeeze", "DequantizeLinear", "QuantizeLinear", "Identity"):
            break
        t = n.input[0]
    raise ExplainError("the classifier's input is not a global average pool of a feature map; heatmaps and OOD "
                       "statistics need that architecture (EfficientNet-Lite has it)")


def head_weights(m) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's (K x C) weight and (K,) bias as the graph computes logits = W pooled + b."""
    from onnx import helper, numpy_helper

    _, gemm = feature_tensor(m)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    if gemm.input[1] not in inits:
        raise ExplainError("the classifier's weights are not constants in the graph (quantized head?)")
    w = inits[gemm.input[1]].astype(np.float32)
    b = inits[gemm.input[2]].astype(np.float32) if len(gemm.input) > 2 and gemm.input[2] in inits else None
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    if gemm.op_type == "MatMul" or not attrs.get("transB", 0):
        w = w.T
    w = w * float(attrs.get("alpha", 1.0))
    b = np.zeros(w.shape[0], np.float32) if b is None else b * float(attrs.get("beta", 1.0))
    return np.ascontiguousarray(w), b


def add_feature_output(src: Path, dst: Path) -> None:
    """Copy an ONNX model, adding the output `features` (batch x C x h x w) = the pooled feature map."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(src))
    if any(o.name == FEATURES for o in m.graph.output):
        onnx.save(m, str(dst))
        return
    name, _ = feature_tensor(m)
    m.graph.node.append(helper.make_node("Identity", [name], [FEATURES], name="features_output"))
    m.graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", None, None, None]))
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_with_features(sess, x: np.ndarray, tta: str = "none", batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Logits and pooled features, as edge_agent.infer computes them (TTA: mean of both views; a multi-view
    bundle's N x V x 3 x S x S batch: mean over its views)."""
    if x.ndim == 5:
        lo, fe = run_with_features(sess, np.ascontiguousarray(flatten_views(x)), tta, batch)
        return mean_over_views(lo, x.shape[1]), mean_over_views(fe, x.shape[1])

    def once(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, fm = sess.run(["logits", FEATURES], {"input": xb})
        return lo, pool(fm)

    outs = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        lo, fe = once(xb)
        if tta == "hflip":
            lo2, fe2 = once(np.ascontiguousarray(xb[..., ::-1]))
            lo, fe = (lo + lo2) / 2, (fe + fe2) / 2
        outs.append((lo, fe))
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def decode_tensors(paths: list[Path], pre, threads: int = 2) -> tuple[np.ndarray, list[int]]:
    """The agent's decoder and preprocessing for each file; indices of files it would quarantine are skipped."""
    from edge_agent.decode import QualityLimits, Rejected, decode_image

    def one(p: Path):
        try:
            return decode_image(Path(p).read_bytes(), pre, 64_000_000, QualityLimits()).tensor
        except Rejected:
            return None

    with ThreadPoolExecutor(max(1, threads)) as ex:
        got = list(ex.map(one, paths))
    keep = [i for i, t in enumerate(got) if t is not None]
    shape = (0, *((pre.n_views,) if pre.views else ()), 3, pre.input_size, pre.input_size)
    return (np.stack([got[i] for i in keep]).astype(np.float32) if keep else np.zeros(shape, np.float32)), keep


def fit_ood(models: dict[str, Path], train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, tta: str,
            quantile: float = OOD_QUANTILE, threads: int = 2, log: Log = print) -> tuple[dict, dict]:
    """Per variant: whitening + class centres from the training features, threshold at `quantile` of the validation
    scores. Returns ({variant: (whiten, means)}, the manifest's `ood` block without `file`)."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    stats, thresholds, summary = {}, {}, {}
    for variant, path in models.items():
        sess = _session(path, threads)
        _, f_train = run_with_features(sess, train_x, tta)
        _, f_val = run_with_features(sess, val_x, tta)
        classes = np.unique(train_y)
        resid = f_train - np.stack([f_train[train_y == k].mean(0) for k in classes])[np.searchsorted(classes, train_y)]
        shrink = max(float(ledoit_wolf_shrinkage(resid, assume_centered=True)), MIN_SHRINKAGE)
        w, means = ood_mod.fit(f_train, train_y, shrink)
        w_run = ood_mod.stored(w).astype(np.float32)  # score with exactly what the agent will load
        s_train = ood_mod.score(f_train, w_run, means)
        s_val = ood_mod.score(f_val, w_run, means)
        t = float(np.quantile(s_val, quantile))
        if not np.isfinite(t) or t <= 0:  # degenerate features (e.g. a model trained for one epoch on toy data)
            log(f"ood {variant}: the validation scores give no usable threshold ({t}); using 1e-6, so nearly "
                "every image will be flagged out_of_distribution: the model's features do not separate images")
            t = 1e-6
        stats[variant], thresholds[variant] = (w, means), round(t, 6)
        summary[variant] = {k: (round(v, 6) if np.isfinite(v) else None) for k, v in (
            ("shrinkage", shrink), ("train_median", float(np.median(s_train))),
            ("val_median", float(np.median(s_val))), ("val_flagged", float((s_val > t).mean())))}
        log(f"ood {variant}: shrinkage {shrink:.4f}, validation median {np.median(s_val):.3f}, threshold {t:.3f} "
            f"(flags {(s_val > t).mean():.1%} of validation images)")
    block = {"method": ood_mod.METHOD, "thresholds": thresholds, "quantile": quantile,
             "fit": {"train_images": int(len(train_x)), "val_images": int(len(val_x)),
                     "classes": int(len(np.unique(train_y))), "variants": summary},
             "score": "min over classes of the squared Mahalanobis distance (tied, Ledoit-Wolf shrunk covariance) "
                      "of the pooled features, divided by their dimension"}
    return stats, block


def split_images(split_csv: Path, specs: list[str], labels: list[str], max_fit: int, seed: int = 0,
                 log: Log = print) -> dict[str, tuple[list[Path], np.ndarray]]:
    """The bundle's train and val images (paths, class index in the bundle's labels), train subsampled to max_fit."""
    from .data import load_sources

    ds = load_sources(specs)
    rows = {(r.get("source") or "", r["image_id"]): r["split"] for r in csv.DictReader(open(split_csv, newline=""))}
    by_id = {iid: s for (_, iid), s in rows.items()}
    out: dict[str, tuple[list[Path], np.ndarray]] = {}
    rng = np.random.default_rng(seed)
    for part in ("train", "val"):
        idx = [i for i in range(len(ds)) if rows.get((ds.source_of[i], ds.ids[i]), by_id.get(ds.ids[i])) == part]
        if part == "train" and len(idx) > max_fit:
            idx = sorted(rng.choice(idx, max_fit, replace=False).tolist())
        if not idx:
            raise ExplainError(f"{split_csv} names no {part} images among the --data given; pass the sources the "
                               "bundle was trained on")
        y = np.array([labels.index(ds.labels[ds.y[i]]) for i in idx])
        out[part] = ([ds.paths[i] for i in idx], y)
        log(f"ood fit: {len(idx)} {part} images")
    return out


def format3_files(models: dict[str, Path], work: Path, split_csv: Path, specs: list[str], labels: list[str], pre,
                  tta: str, quantile: float = OOD_QUANTILE, max_fit: int = MAX_FIT_IMAGES, threads: int = 2,
                  log: Log = print) -> tuple[dict[str, Path], dict, dict]:
    """Format-3 files for a bundle whose images are named by its split.csv and the --data sources (upgrade)."""
    parts = split_images(split_csv, specs, labels, max_fit, log=log)
    xs = {}
    for part, (paths, y) in parts.items():
        x, keep = decode_tensors(paths, pre, threads)
        xs[part] = (x, y[keep])
    return format3_from_tensors(models, work, xs["train"][0], xs["train"][1], xs["val"][0], labels, tta, quantile,
                                threads, log)


def format3_from_tensors(models: dict[str, Path], work: Path, train_x: np.ndarray, train_y: np.ndarray,
                         val_x: np.ndarray, labels: list[str], tta: str, quantile: float = OOD_QUANTILE,
                         threads: int = 2, log: Log = print) -> tuple[dict[str, Path], dict, dict]:
    """Write the format-3 models, head.npz and ood.npz into `work`; return ({bundle name: path}, features block,
    ood block). `models`: {variant: original ONNX path}; the new graphs must give the same logits."""
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    new: dict[str, Path] = {}
    for variant, src in models.items():
        dst = work / f"model.{variant}.features.onnx"
        add_feature_output(src, dst)
        new[variant] = dst
    w, b = head_weights(onnx.load(str(new["fp32"] if "fp32" in new else next(iter(new.values())))))
    if w.shape[0] != len(labels):
        raise ExplainError(f"the classifier has {w.shape[0]} outputs but the bundle {len(labels)} labels")
    with open(work / HEAD_FILE, "wb") as f:
        np.savez(f, weight=w, bias=b)
    _check_same_logits(models, new, np.ascontiguousarray(flatten_views(val_x[:64])), threads)
    stats, block = fit_ood(new, train_x, train_y, val_x, tta, quantile, threads, log)
    ood_mod.save(work / OOD_FILE, stats)
    files = {f"model.{v}.onnx": p for v, p in new.items()} | {HEAD_FILE: work / HEAD_FILE, OOD_FILE: work / OOD_FILE}
    return files, {"output": FEATURES, "head": HEAD_FILE}, {"file": OOD_FILE, **block}


def format3_for_build(ds, split: np.ndarray, work: Path, labels: list[str], pre, tta: str,
                      max_fit: int = MAX_FIT_IMAGES, threads: int = 2, log: Log = print
                      ) -> tuple[dict[str, Path], dict, dict]:
    """format3_files for `build-model bundle`: the build's own dataset and split, decoded as the agent decodes
    files (images held in memory, e.g. MedMNIST, through the preprocessing alone)."""
    rng = np.random.default_rng(0)
    out = {}
    for part in ("train", "val"):
        idx = np.flatnonzero(split == part)
        if part == "train" and len(idx) > max_fit:
            idx = np.sort(rng.choice(idx, max_fit, replace=False))
        if not len(idx):
            raise ExplainError(f"the build has no {part} images to fit the OOD statistics on")
        if all(ds.paths[i] is not None for i in idx):
            x, keep = decode_tensors([ds.paths[i] for i in idx], pre, threads)
        else:
            from edge_agent.preprocess import preprocess

            x, keep = np.stack([preprocess(ds.image(int(i)), pre) for i in idx]).astype(np.float32), list(range(len(idx)))
        y = np.array([labels.index(ds.labels[ds.y[i]]) for i in idx])[keep]
        out[part] = (x, y)
    return format3_from_tensors({"fp32": work / "model.fp32.onnx", "int8": work / "model.int8.onnx"}, work / "format3",
                                out["train"][0], out["train"][1], out["val"][0], labels, tta, threads=threads, log=log)


def _check_same_logits(old: dict[str, Path], new: dict[str, Path], x: np.ndarray, threads: int) -> None:
    """The extra output must not change a single logit (the INT8 gate's verdict is about these numbers)."""
    for v in old:
        a = _session(old[v], threads).run(["logits"], {"input": x})[0]
        b = _session(new[v], threads).run(["logits"], {"input": x})[0]
        if not np.array_equal(a, b):
            raise ExplainError(f"the {v} model with the feature output computes other logits (max difference "
                               f"{np.abs(a - b).max():.3g}); not writing the bundle")


def upgrade_bundle(src: Path, out: Path, specs: list[str], signing_key: Path | None, quantile: float = OOD_QUANTILE,
                   max_fit: int = MAX_FIT_IMAGES, threads: int = 2, log: Log = print) -> dict:
    """A format-3 copy of bundle `src` in `out` (the same weights, thresholds and temperature; new model_id)."""
    import datetime as dt

    from edge_agent.bundle import load_bundle, required_format_version
    from edge_agent.signing import load_private_key, sign_bundle

    from .bundle import sha256

    key = load_private_key(signing_key) if signing_key is not None else None
    b = load_bundle(src)
    if out.exists() and any(out.iterdir()):
        raise ExplainError(f"{out} exists and is not empty; choose a new folder")
    m = dict(b.manifest)
    if "features" in m:
        raise ExplainError(f"{src} is already format {m['format_version']} with a feature output")
    with tempfile.TemporaryDirectory(prefix="upgrade-") as tmp:
        files, feats, ood = format3_files({v: src / s.file for v, s in b.variants.items()}, Path(tmp),
                                          src / "split.csv", specs, list(b.labels), b.preprocessing, b.tta,
                                          quantile, max_fit, threads, log)
        out.mkdir(parents=True, exist_ok=True)
        for name in m["files"]:
            if name not in files:
                shutil.copyfile(src / name, out / name)
        for name, p in files.items():
            shutil.copyfile(p, out / name)
    digests = {p.name: sha256(p) for p in sorted(out.iterdir())}
    m.update(features=feats, ood=ood, files=digests)
    m["format_version"] = required_format_version(m)
    primary_file = b.variants[b.primary].file
    m["upgraded_from"] = {"model_id": b.model_id, "manifest_sha256": b.manifest_sha256,
                          "at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
                          "what": "feature output, classifier head and OOD statistics added; weights, thresholds and "
                                  "temperature unchanged (logits identical)"}
    m["model_id"] = m["model_id"].rsplit("-", 1)[0] + "-" + digests[primary_file][:8]
    tmp_manifest = out / "manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(m, indent=2))
    tmp_manifest.replace(out / "manifest.json")
    if key is not None:
        sign_bundle(out, key)
    log(f"upgraded {b.model_id} -> {m['model_id']} in {out} ({'signed' if key else 'UNSIGNED'})")
    return m
