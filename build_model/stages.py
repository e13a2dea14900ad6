"""The pipeline stages after training. Each reads and writes files in the work folder.

    train -> best.pt
    export -> model.fp32.onnx, export.json
    quantize -> model.fp32.prep.onnx, [model.adaround*.onnx,] candidates/*.onnx, quantize.json, model.int8.onnx
    validate -> validate.json (gate verdict, fallbacks, temperature, thresholds)
    bundle -> the bundle folder (manifest.json written last)
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from edge_agent.preprocess import Preprocessing, flatten_views, mean_over_views, preprocess

from .errors import BuildError
from . import gate as gate_mod
from .calibrate import apply_thresholds, calibration_report, choose_thresholds, fit_temperature
from .data import Dataset
from .export import export_onnx, load_checkpoint, parity, run_onnx, session
from .metrics import ece, softmax, summarize
from .quantize import ADAROUND_IMAGES, ADAROUND_ITERS, CALIB_SIZE, FP32_FIRST_CONVS, Candidate, METHODS, calibration_indices, input_bound, preprocess_model, quantize, sensitive_nodes

Log = Callable[[str], None]
HIGH_RISK = ["mel", "bcc", "akiec"]
LOW_CONFIDENCE = 0.5


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# Which stage writes each work file: a stage run before its inputs exist says which to run first.
PRODUCER = {"best.pt": "train", "model.fp32.onnx": "export", "export.json": "export", "quantize.json": "quantize",
            "model.int8.onnx": "quantize", "logits.fp32.val.npy": "quantize", "validate.json": "validate"}


def need(work: Path, stage: str, *names: str) -> None:
    """Refuse to run `stage` when a file an earlier stage writes is missing, naming that stage.

    Why: `export` before `train` used to die in torch.load with a FileNotFoundError traceback.
    """
    for name in names:
        if not (work / name).exists():
            before = PRODUCER[name]
            raise BuildError(f"`build-model {stage}` needs {work / name}, which `build-model {before}` writes: run "
                             f"`{before}` first with the same --out and --workdir (or `build-model all`)")


def tensors(ds: Dataset, idx: np.ndarray, pre: Preprocessing) -> np.ndarray:
    return np.stack([preprocess(ds.image(int(i), 4 * pre.input_size), pre) for i in idx]).astype(np.float32)


def checkpoint_pre(work: Path) -> tuple[Preprocessing, dict]:
    import torch

    ck = torch.load(work / "best.pt", map_location="cpu", weights_only=False)
    return Preprocessing.from_dict(ck["preprocessing"]), ck


def export(ds: Dataset, split: np.ndarray, work: Path, log: Log, parity_images: int = 64) -> dict:
    need(work, "export", "best.pt")
    model, ck = load_checkpoint(work / "best.pt")
    pre = Preprocessing.from_dict(ck["preprocessing"])
    onnx_path = work / "model.fp32.onnx"
    export_onnx(model, pre.input_size, onnx_path)
    va = np.flatnonzero(split == "val")[:parity_images]
    result = parity(model, onnx_path, [ds.image(int(i)) for i in va], pre)
    _write(work / "export.json", result)
    log(f"export: {onnx_path} parity max|diff| {result['max_abs_diff']:.2e}, top-1 identical at batch 1/2/8: {result['top1_identical_all']}")
    if not result["passed"]:
        raise BuildError(f"ONNX parity check failed ({result}); the export does not match PyTorch - do not ship it")
    return result


def _val_metrics(logits: np.ndarray, ref: np.ndarray, y: np.ndarray, labels: list[str]) -> dict:
    s = summarize(y, softmax(logits), labels)
    return {"balanced_accuracy": s["balanced_accuracy"], "accuracy": s["accuracy"], "macro_auc": s["macro_auc"],
            "agreement": float((logits.argmax(1) == ref.argmax(1)).mean()),
            "mel_sensitivity": s["per_class"].get("mel", {}).get("sensitivity")}


def quantize_stage(ds: Dataset, split: np.ndarray, work: Path, log: Log, calib_size: int = CALIB_SIZE, seed: int = 0,
                   methods: tuple[str, ...] = METHODS, adaround_iters: int = ADAROUND_ITERS,
                   adaround_images: int = ADAROUND_IMAGES, reproducible: bool = False) -> dict:
    need(work, "quantize", "best.pt", "model.fp32.onnx")
    pre, ck = checkpoint_pre(work)
    ranges = ck.get("qat_ranges") or None
    if ck["config"].get("qat"):
        # Trained for ORT's MinMax at full range (and these clipped ranges): other recipes are off-target.
        methods, reduce_ranges = ("MinMax",), (False,)
    else:
        reduce_ranges = (False, True)
    preprocess_model(work / "model.fp32.onnx", work / "model.fp32.prep.onnx")
    calib = tensors(ds, calibration_indices(ds.y, split, calib_size, seed), pre)
    bound = input_bound(pre.mean, pre.std)
    va = np.flatnonzero(split == "val")
    xv, yv = tensors(ds, va, pre), ds.y[va]
    ref = run_onnx(session(work / "model.fp32.onnx"), xv)
    np.save(work / "logits.fp32.val.npy", ref)
    cand_dir = work / "candidates"
    cand_dir.mkdir(exist_ok=True)

    def evaluate(c: Candidate, t0: float) -> dict:
        path = quantize(c.source(work), cand_dir / f"{c.name}.onnx", calib, c, ranges, bound)
        logits = run_onnx(session(path), xv)
        np.save(cand_dir / f"{c.name}.val.npy", logits)
        row = {"name": c.name, "method": c.method, "reduce_range": c.reduce_range, "adaround": c.adaround,
               "reproducible": c.reproducible,
               "seconds": time.time() - t0, **_val_metrics(logits, ref, yv, ds.labels)}
        log(f"quantize {c.name}: val bal-acc {row['balanced_accuracy']:.4f} agreement {row['agreement']:.4f} "
            f"mel-sens {row['mel_sensitivity']:.4f} ({row['seconds']:.0f}s)")
        return row

    rows = [evaluate(Candidate(method, rr, reproducible=reproducible), time.time())
            for method in methods for rr in reduce_ranges]
    ada = None
    if adaround_iters > 0 and ranges:
        log("quantize: AdaRound skipped: this QAT model clips its ranges, which the rounding simulation does not model")
    elif adaround_iters > 0:
        t0 = time.time()
        ada = _adaround(ds, split, work, log, pre, calib, adaround_iters, adaround_images, seed)
        rows.append(evaluate(Candidate("MinMax", False, adaround=True, reproducible=reproducible), t0))
    fp = _val_metrics(ref, ref, yv, ds.labels)
    # Rank by agreement with FP32, then by balanced accuracy: the gate asks "as good as FP32", not "lucky on val".
    rows.sort(key=lambda r: (round(r["agreement"], 3), r["balanced_accuracy"]), reverse=True)
    chosen = rows[0]["name"]
    shutil.copyfile(cand_dir / f"{chosen}.onnx", work / "model.int8.onnx")
    result = {"candidates": rows, "chosen": chosen, "calibration_images": int(len(calib)), "qat_ranges": ranges or {},
              "fp32_val_balanced_accuracy": fp["balanced_accuracy"], "seed": seed, "adaround": ada}
    _write(work / "quantize.json", result)
    log(f"quantize: chose {chosen}")
    return result


def _adaround(ds: Dataset, split: np.ndarray, work: Path, log: Log, pre: Preprocessing, calib: np.ndarray,
              iters: int, images: int, seed: int) -> dict:
    """Fit the weights' rounding (build_model/adaround.py) and export that model for quantization."""
    import torch

    from .adaround import AdaRoundConfig, adaround

    model, _ = load_checkpoint(work / "best.pt")
    more = tensors(ds, calibration_indices(ds.y, split, max(0, images - len(calib)), seed + 1), pre)
    fit = torch.from_numpy(np.concatenate([calib, more])[:images])
    t0 = time.time()
    state, layers = adaround(model, FP32_FIRST_CONVS, torch.from_numpy(calib), fit,
                             AdaRoundConfig(iters=iters, seed=seed), log)
    model.load_state_dict(state)
    export_onnx(model, pre.input_size, work / "model.adaround.onnx")
    preprocess_model(work / "model.adaround.onnx", work / "model.adaround.prep.onnx")
    return {"iters": iters, "images": int(len(fit)), "seconds": round(time.time() - t0, 1), "layers": layers}


def with_views(pre: Preprocessing, views: tuple[str, ...] | list[str]) -> Preprocessing:
    """`pre` screening several views (edge_agent.preprocess), checked as the agent checks a manifest."""
    if not views:
        return pre
    try:
        return Preprocessing.from_dict(pre.to_dict() | {"views": list(views)})
    except ValueError as e:
        raise BuildError(f"--views {','.join(views)}: {e}") from None


def validate(ds: Dataset, split: np.ndarray, work: Path, log: Log, seed: int = 0, tta: str = "none",
             views: tuple[str, ...] = ()) -> dict:
    """Gate on the test split with fallbacks; then fit temperature and thresholds for the primary variant.

    With `tta="hflip"` every model is judged, calibrated and thresholded on the mean of the image's
    and its mirror image's logits, which is what the agent computes for such a bundle; with `views`
    (resize rules, the first the checkpoint's) on the mean over those views of each image.
    """
    plain = tta == "none" and not views
    need(work, "validate", "best.pt", "model.fp32.onnx", "quantize.json", "model.int8.onnx",
         *(("logits.fp32.val.npy",) if plain else ()))
    pre, _ = checkpoint_pre(work)
    pre = with_views(pre, views)
    quant = _read(work / "quantize.json")
    te, va = np.flatnonzero(split == "test"), np.flatnonzero(split == "val")
    xt, yt, yv = tensors(ds, te, pre), ds.y[te], ds.y[va]

    def run_onnx(sess, x: np.ndarray) -> np.ndarray:
        return run_tta(sess, x, tta)

    f_test = run_onnx(session(work / "model.fp32.onnx"), xt)
    f_val = np.load(work / "logits.fp32.val.npy") if plain else \
        run_onnx(session(work / "model.fp32.onnx"), tensors(ds, va, pre))
    labels = ds.labels
    tried: list[str] = []

    def judge(name: str, path: Path) -> tuple[bool, str, dict, np.ndarray]:
        q_test = run_onnx(session(path), xt)
        cmp = gate_mod.compare(f_test, q_test, yt, labels)
        ok, why = gate_mod.verdict(cmp)
        tried.append(name)
        log(f"gate {name}: {'APPROVED' if ok else 'rejected'} - {why}")
        return ok, why, cmp, q_test

    order = [c["name"] for c in quant["candidates"]]
    approved, why, cmp, q_test = judge(quant["chosen"], work / "model.int8.onnx")
    int8_name = quant["chosen"]
    # Fallback 1: the other calibration methods, best first (by validation ranking).
    for name in order[1:]:
        if approved:
            break
        ok, w, c, q = judge(name, work / "candidates" / f"{name}.onnx")
        if ok:
            approved, why, cmp, q_test, int8_name = ok, w, c, q, name
            shutil.copyfile(work / "candidates" / f"{name}.onnx", work / "model.int8.onnx")
    # Fallback 2: keep more layers in FP32 (NNCF accuracy-control style), cheapest first:
    # the early high-resolution convolutions (measured: most of the disagreement
    # starts at the input), then the tensors with the worst quantization noise.
    if not approved:
        best = next(c for c in quant["candidates"] if c["name"] == quant["chosen"])
        calib = flatten_views(tensors(ds, calibration_indices(ds.y, split, quant["calibration_images"], seed), pre))
        base = Candidate(best["method"], best["reduce_range"], adaround=best.get("adaround", False),
                         reproducible=best.get("reproducible", False))
        convs = conv_names(base.source(work))
        ranked = sensitive_nodes(base.source(work), work / "candidates" / f"{best['name']}.onnx", calib[:32], work)
        plans = [tuple(convs[:k]) for k in (6, 9, 12)]
        plans += [tuple(sorted(set(convs[:9]) | {n for g in ranked[:k] for n in g})) for k in (4, 8, 16)]
        for exclude in plans:
            if approved:
                break
            c = replace(base, exclude=exclude)
            path = quantize(c.source(work), work / "candidates" / f"{c.name}.onnx", calib, c,
                            quant.get("qat_ranges"), input_bound(pre.mean, pre.std))
            ok, w, cm, q = judge(c.name, path)
            if ok:
                approved, why, cmp, q_test, int8_name = ok, w, cm, q, c.name
                shutil.copyfile(path, work / "model.int8.onnx")
    if not approved:
        why = f"INT8 rejected after {len(tried)} candidates ({why}); FP32 ships as primary"
        q_test = run_onnx(session(work / "model.int8.onnx"), xt)
    q_val = run_onnx(session(work / "model.int8.onnx"), tensors(ds, va, pre))

    def finalize(primary: str) -> dict:
        """Temperature and thresholds for the variant the agent will run, fitted on validation only."""
        v_logits, t_logits = (q_val, q_test) if primary == "int8" else (f_val, f_test)
        t = fit_temperature(v_logits, yv)
        calib = calibration_report(v_logits, yv, t)
        calib["test_ece_before"], calib["test_ece_after"] = ece(softmax(t_logits), yt), ece(softmax(t_logits, t), yt)
        thresholds = choose_thresholds(softmax(v_logits, t), yv, labels, [k for k in HIGH_RISK if k in labels],
                                       sources=[ds.source_of[i] for i in va])
        apply_thresholds(thresholds, softmax(t_logits, t), yt, labels, "test", sources=[ds.source_of[i] for i in te])
        thresholds["low_confidence"] = {"top1_probability": LOW_CONFIDENCE}
        # Side by side with the shipped temperature; the melanoma drop is also judged at the review threshold.
        cmp = gate_mod.compare(f_test, q_test, yt, labels, t, thresholds.get("melanoma", {}).get("probability"))
        return {"temperature": t, "calibration": calib, "thresholds": thresholds, "comparison": cmp}

    fin = finalize("int8" if approved else "fp32")
    if approved:
        approved, why = gate_mod.verdict(fin["comparison"])
        if not approved:
            why = f"INT8 rejected at the review threshold ({why}); FP32 ships as primary"
            fin = finalize("fp32")
    primary = "int8" if approved else "fp32"
    cmp = fin["comparison"]
    import onnx

    from .reproducible import not_reproducible

    left = not_reproducible(onnx.load(str(work / "model.int8.onnx")))
    gate = {"approved": approved, "reason": why, "limits": gate_mod.LIMITS, "int8_candidate": int8_name,
            # the same answers on every CPU (build_model/reproducible.py); a fallback may give that up
            "int8_reproducible": not left, "int8_not_reproducible": left,
            "tried": tried, "agreement": cmp["agreement"], "balanced_accuracy_drop": cmp["balanced_accuracy_drop"],
            "mel_sensitivity_drop": cmp.get("mel_sensitivity_drop"),
            "mel_sensitivity_at_threshold": cmp.get("mel_sensitivity_at_threshold"),
            "test": {v: {k: cmp[v][k] for k in ("n", "accuracy", "balanced_accuracy", "macro_auc")} |
                     {"mel_sensitivity": cmp[v]["per_class"].get("mel", {}).get("sensitivity")} for v in ("fp32", "int8")}}
    result = {"gate": gate, "primary": primary, "tta": tta, **({"views": list(views)} if views else {}), **fin}
    if len(ds.sources) > 1:  # the report's "other sources": each source's own test split, shipped variant
        from .evaluate import evaluate_source

        t_logits = q_test if primary == "int8" else f_test
        probs = softmax(t_logits, fin["temperature"])
        src = np.array([ds.source_of[i] for i in te])
        rules = {k: v for k, v in fin["thresholds"].items() if "labels" in v}
        result["sources"] = {}
        for name in ds.sources:
            m = src == name
            if m.any():
                r = evaluate_source(probs[m], yt[m], labels, ds.source_labels[name], rules, reps=1000, seed=seed)
                result["sources"][name] = {k: r[k] for k in ("n", "classes", "mel_auc", "mel_auc_ci", "balanced_accuracy",
                                                             "balanced_accuracy_ci", "macro_auc", "ece", "flag_rules",
                                                             "benign_unflagged", "benign_unflagged_ci", "flag_rate", "per_class")
                                           if k in r}
    _write(work / "validate.json", result)
    log(f"validate: primary {primary}; T={fin['temperature']:.3f}; thresholds " +
        ", ".join(f"{k} {v['probability']:.4f} (test sens {v.get('test_sensitivity', 0):.3f} spec {v.get('test_specificity', 0):.3f})"
                  for k, v in fin["thresholds"].items() if "labels" in v))
    return result


def screening(pre: Preprocessing, tta: str) -> str:
    """How the agent screens an image with this bundle, in words, for report.md ('' for one plain view)."""
    parts = []
    if pre.views:
        parts.append("the mean of the logits of " + " and ".join(f"the `{v}` square" for v in pre.views))
    if tta == "hflip":
        parts.append("the mean with the mirror image's logits (flip TTA)")
    return "; ".join(parts)


def run_tta(sess, x: np.ndarray, tta: str = "none") -> np.ndarray:
    """`export.run_onnx`, averaged with the mirror image's logits for a flip-TTA bundle and over the views of a
    multi-view one (an N x V x 3 x S x S batch), as edge_agent.infer does."""
    from .export import run_onnx as plain

    if x.ndim == 5:
        return mean_over_views(run_tta(sess, np.ascontiguousarray(flatten_views(x)), tta), x.shape[1])
    if tta == "none":
        return plain(sess, x)
    if tta != "hflip":
        raise ValueError(f"unknown test-time augmentation {tta!r}: none or hflip")
    return (plain(sess, x) + plain(sess, np.ascontiguousarray(x[..., ::-1]))) / 2


def license_and_citation(ds: Dataset) -> tuple[str, str]:
    """Every training source's licence terms and citation; unknown sources are named, not guessed."""
    from .bundle import CITATIONS, HAM_LICENSE

    if len(ds.sources) == 1 and (ds.layout == "ham10000" or "derma" in Path(ds.source).name.lower()):
        return HAM_LICENSE, CITATIONS["ham10000"]
    if set(ds.sources) <= set(CITATIONS):
        lic = ("CC BY-NC 4.0 (Creative Commons Attribution-NonCommercial 4.0 International), inherited from the "
               "training data: " + ", ".join(ds.sources) + " (non-commercial use only)")
        return lic, " | ".join(CITATIONS[s] for s in ds.sources)
    return ("inherits the licenses of the training data: " + ", ".join(ds.source_info[s]["path"] for s in ds.sources),
            "see the training data's own citations")


def training_summary(ds: Dataset, split: np.ndarray, ck: dict, work: Path) -> dict:
    import torch

    last = torch.load(work / "last.pt", map_location="cpu", weights_only=False) if (work / "last.pt").exists() else {}
    state = last.get("state", {})
    return {
        "dataset_name": "ham10000" if ds.layout == "ham10000" else Path(ds.source).stem if len(ds.sources) == 1 else "+".join(ds.sources),
        "sources": {n: ds.source_info[n] | {"labels": ds.source_labels[n], "counts": {
            s: ds.class_counts(np.flatnonzero((split == s) & (np.array(ds.source_of) == n))) for s in ("train", "val", "test", "holdout")}}
            for n in ds.sources},
        "source": Path(ds.source).name, "layout": ds.layout, "images": len(ds),
        "groups": len(set(ds.groups)), "seed": ck["config"]["seed"],
        "counts": {s: ds.class_counts(np.flatnonzero(split == s)) for s in ("train", "val", "test")},
        "config": ck["config"], "best_epoch": ck.get("epoch"), "history": state.get("history", []),
        "padding_check": _read(work / "padding.json") if (work / "padding.json").exists() else {},
    }


def bundle(ds: Dataset, split: np.ndarray, work: Path, out: Path, build_command: str, log: Log,
           signing_key: Path | None = None, training_extra: dict | None = None) -> dict:
    """Write the bundle; `training_extra` (a recipe's record and its stages) joins the manifest's `training`."""
    from .bundle import write_bundle
    from .report import render

    need(work, "bundle", "best.pt", "model.fp32.onnx", "export.json", "quantize.json", "model.int8.onnx", "validate.json")
    pre, ck = checkpoint_pre(work)
    val, quant, par = _read(work / "validate.json"), _read(work / "quantize.json"), _read(work / "export.json")
    pre = with_views(pre, val.get("views", ()))  # validated, calibrated and shipped on the same views
    training = training_summary(ds, split, ck, work)
    training.update(training_extra or {})
    license_text, citation = license_and_citation(ds)
    arch = ck["config"].get("arch", "lite0")
    md = render(model_id_hint=f"{training['dataset_name']} EfficientNet-{arch.title()} {pre.input_size}px", labels=ds.labels,
                cmp=val["comparison"], gate=val["gate"], thresholds=val["thresholds"], calib=val["calibration"],
                quant=quant, parity=par, padding=training["padding_check"], training=training,
                primary=val["primary"], citation=citation, license_text=license_text, sources=val.get("sources"),
                screening=screening(pre, val.get("tta", "none")))
    split_csv = work / "split.csv"
    shutil.copyfile(out / "split.csv", split_csv) if (out / "split.csv").exists() else None
    from .explain import format3_for_build

    format3 = format3_for_build(ds, split, work, list(ds.labels), pre, val.get("tta", "none"), log=log)
    manifest = write_bundle(out, fp32=work / "model.fp32.onnx", int8=work / "model.int8.onnx", split_csv=split_csv,
                            report_md=md, labels=ds.labels, pre=pre, temperature=val["temperature"],
                            thresholds=val["thresholds"], gate=val["gate"] | {"calibration": val["calibration"]},
                            primary=val["primary"], training=training, build_command=build_command,
                            license_text=license_text, citation=citation, signing_key=signing_key,
                            tta=val.get("tta", "none"), arch=arch, format3=format3,
                            sources={n: {k: v for k, v in ds.source_info[n].items() if k != "path"} |
                                     {"labels": ds.source_labels[n]} for n in ds.sources} if len(ds.sources) > 1 else None)
    log(f"bundle: {out} ({manifest['model_id']}, primary {manifest['primary']}, "
        f"{'signed with ' + str(signing_key) if signing_key else 'UNSIGNED'})")
    return manifest


def conv_names(path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
