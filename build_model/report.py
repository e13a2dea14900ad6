"""report.md: the evaluation a person reads before trusting a bundle (and the model card)."""
from __future__ import annotations


def _pct(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def confusion_md(cm: list[list[int]], labels: list[str]) -> str:
    return _table(["true \\ predicted"] + labels, [[labels[i]] + [str(v) for v in row] for i, row in enumerate(cm)])


def render(*, model_id_hint: str, labels: list[str], cmp: dict, gate: dict, thresholds: dict, calib: dict,
           quant: dict, parity: dict, padding: dict, training: dict, primary: str, citation: str, license_text: str,
           sources: dict | None = None, screening: str = "") -> str:
    f, q = cmp["fp32"], cmp["int8"]
    out = [f"# Model report: {model_id_hint}", "",
           "Decision support for dermoscopy triage, **not a diagnostic device**. Every number below is measured on the "
           "lesion-grouped **test split** (no lesion of it was seen in training, validation, calibration or threshold "
           "choice) unless it says otherwise.", "",
           f"Shipped primary model: **{primary.upper()}**. Gate: **{'APPROVED' if gate['approved'] else 'REJECTED'}** - {gate['reason']}", "",
           *([f"Each image is screened as {screening}; every number below is of that arithmetic.", ""] if screening else []),
           "## FP32 vs INT8 (test split)", "",
           _table(["metric", "FP32", "INT8"], [
               ["accuracy", _pct(f["accuracy"]), _pct(q["accuracy"])],
               ["balanced accuracy", _pct(f["balanced_accuracy"]), _pct(q["balanced_accuracy"])],
               ["macro AUC (one-vs-rest)", f"{f['macro_auc']:.4f}", f"{q['macro_auc']:.4f}"],
               ["melanoma sensitivity (argmax)", _pct(f["per_class"]["mel"]["sensitivity"]) if "mel" in labels else "n/a",
                _pct(q["per_class"]["mel"]["sensitivity"]) if "mel" in labels else "n/a"],
               ["top-1 agreement FP32/INT8", "", _pct(cmp["agreement"])],
               ["images", str(f["n"]), str(q["n"])],
           ]), "",
           "Gate limits: balanced-accuracy drop <= 1.0 point, melanoma sensitivity drop <= 1.0 point "
           "(argmax and at the review threshold), top-1 agreement >= 99%.", "",
           "## Per class (test split)", "",
           _table(["class", "support", "FP32 sens", "FP32 spec", "FP32 AUC", "INT8 sens", "INT8 spec", "INT8 AUC"],
                  [[k, str(f["per_class"][k]["support"]), _pct(f["per_class"][k]["sensitivity"]),
                    _pct(f["per_class"][k]["specificity"]), f"{f['per_class'][k]['auc']:.3f}",
                    _pct(q["per_class"][k]["sensitivity"]), _pct(q["per_class"][k]["specificity"]),
                    f"{q['per_class'][k]['auc']:.3f}"] for k in labels]), "",
           "### Confusion matrix, FP32", "", confusion_md(f["confusion"], labels), "",
           "### Confusion matrix, INT8", "", confusion_md(q["confusion"], labels), "",
           "## Review thresholds", "",
           f"Calibrated probabilities: temperature scaling fitted on the validation split, T = {calib['temperature']:.3f} "
           f"(ECE {calib['ece_before']:.4f} before, {calib['ece_after']:.4f} after, validation split; "
           f"test split {calib.get('test_ece_before', float('nan')):.4f} -> {calib.get('test_ece_after', float('nan')):.4f}). "
           "Thresholds chosen on the validation split for >= 95% sensitivity; a case is flagged for review at or above them.", "",
           _table(["rule", "classes", "P >=", "val sens", "val spec", "test sens", "test spec", "test flag rate"],
                  [[n, "+".join(t["labels"]), f"{t['probability']:.4f}", _pct(t.get("val_sensitivity")),
                    _pct(t.get("val_specificity")), _pct(t.get("test_sensitivity")), _pct(t.get("test_specificity")),
                    _pct(t.get("test_flag_rate"))] for n, t in thresholds.items() if "labels" in t]), "",
           f"Low-confidence flag: top-1 calibrated probability below {thresholds['low_confidence']['top1_probability']:.2f}.", "",
           *(_sources_md(sources, primary) if sources else []),
           "## Quantization", "",
           "ONNX Runtime static quantization, QDQ format, per-channel symmetric INT8 weights, asymmetric UINT8 activations, "
           "after `quant_pre_process`; calibration images from the training split, stratified by class. Candidates "
           "compared on the validation split:", "",
           _table(["candidate", "val balanced acc", "val agreement", "val mel sens", "calib s"],
                  [[c["name"], _pct(c["balanced_accuracy"]), _pct(c["agreement"]), _pct(c.get("mel_sensitivity")),
                    f"{c.get('seconds', 0):.0f}"] for c in quant.get("candidates", [])]), "",
           *([f"`-ada` candidates quantize a copy whose weights were first rounded by AdaRound ({ada['iters']} steps per "
              f"convolution on {ada['images']} training-split images, {ada['seconds'] / 60:.0f} min): each convolution's "
              "up/down rounding was fitted to reproduce the float network's outputs from the quantized network's inputs; "
              "the FP32 model it is compared with is the original.", ""] if (ada := quant.get("adaround")) else []),
           f"Chosen: `{quant.get('chosen')}`. Fallbacks tried at the gate: {', '.join(gate.get('tried', [])) or 'none needed'}.",
           f"FP32 reference (val): balanced accuracy {_pct(quant.get('fp32_val_balanced_accuracy'))}.", "",
           "## Export checks", "",
           f"ONNX opset 17, dynamic batch, `onnx.checker` full check passed. Parity vs PyTorch on {parity.get('images')} "
           f"validation images: max |logit diff| {parity.get('max_abs_diff', float('nan')):.2e} (limit 1e-4), "
           f"identical top-1 at batch 1/2/8: {parity.get('top1_identical_all')}.", "",
           "Pretrained weights: every backbone key of the ImageNet EfficientNet-Lite0 state dict matched. Padding check "
           "(mean log-probability of the true ImageNet class on scikit-learn's two sample photos, 32 crops): " +
           ", ".join(f"{k}: {v['mean_logp_true']:.3f}" for k, v in padding.items()) +
           " - TF 'SAME' padding with (x-127)/128 input scaling is the rule the weights expect.", "",
           "## Training", "",
           f"Data: {training.get('source')} ({training.get('layout')}), {training.get('images')} images, "
           f"{training.get('groups')} lesions; split by lesion, stratified by class, seed {training.get('seed')}.", "",
           _table(["split"] + labels, [[s] + [str(training["counts"][s].get(k, 0)) for k in labels] for s in ("train", "val", "test")]), "",
           f"EfficientNet-{training['config'].get('arch', 'lite0').title()} (ImageNet init), {training['config']['image_size']} px, "
           f"augmentation `{training['config'].get('augment', 'legacy')}`, masked loss {training['config'].get('masked_loss', False)}, "
           f"source power {training['config'].get('source_power', 0.0)}, AdamW lr {training['config']['lr']}, "
           f"cosine schedule with warm-up, label smoothing {training['config']['label_smoothing']}, class-balanced sampling "
           f"(power {training['config']['sampling_power']}) and class-weighted loss (power {training['config']['loss_power']}), "
           f"best epoch {training.get('best_epoch')} of {len(training.get('history', []))} run.", "",
           _table(["epoch", "train loss", "val acc", "val bal acc", "val AUC", "val mel sens"],
                  [[str(h["epoch"]), f"{h['train_loss']:.3f}", _pct(h["val_accuracy"]), _pct(h["val_balanced_accuracy"]),
                    f"{h['val_macro_auc']:.3f}", _pct(h.get("val_mel_sensitivity"))] for h in training.get("history", [])]), "",
           "## Model card", "",
           "- **Intended use**: triage support on a clinic device - sort dermoscopy images so that a dermatologist reviews "
           "the flagged ones first. Not a diagnosis; a negative result does not rule out disease.",
           "- **Data**: " + citation,
           "- **License**: " + license_text + ". The model and this bundle may not be used commercially.",
           "- **Known limits**: HAM10000 comes from two sites (Vienna, Queensland) and mostly fair skin (Fitzpatrick I-III); "
           "performance on darker skin types, non-dermoscopic photos, mucosal/acral/nail lesions and other cameras is not "
           "established. Rare classes (df, vasc, akiec) have few test images, so their metrics are uncertain by several points. "
           "Trained at low resolution (200x150 sources), which limits fine dermoscopic structure.",
           ]
    return "\n".join(out) + "\n"


def _ci(v: float, ci) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def _sources_md(sources: dict, primary: str) -> list[str]:
    """Each source's own test split, on the classes it labels, with the shipped variant and thresholds."""
    rows = []
    for name, r in sources.items():
        mel = r.get("flag_rules", {}).get("melanoma", {})
        rows.append([name, str(r["n"]), ", ".join(r["classes"]), _ci(r["mel_auc"], r.get("mel_auc_ci")),
                     _ci(r["balanced_accuracy"], r.get("balanced_accuracy_ci")),
                     _ci(mel["sensitivity"], mel.get("sensitivity_ci")) if mel else "n/a",
                     _ci(r["benign_unflagged"], r.get("benign_unflagged_ci")) if "benign_unflagged" in r else "n/a",
                     _pct(r.get("flag_rate"))])
    return ["## Other sources (each source's own test split)", "",
            f"The shipped {primary.upper()} model with the bundle's temperature and thresholds, per training source, each "
            "scored only on the classes that source labels (balanced accuracy over those classes). Bootstrap 95% "
            "intervals. For a source the model was not trained on, run `build-model evaluate --bundle THIS --data "
            "NAME=PATH`.", "",
            _table(["source", "images", "classes", "melanoma AUC", "balanced accuracy", "melanoma flag sensitivity",
                    "benign lesions unflagged", "flag rate (any rule)"], rows), ""]
