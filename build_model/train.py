"""Fine-tune EfficientNet-Lite0 on CPU with checkpoints that survive a kill.

State (model, optimizer, step, history, RNG seeds) is written atomically every
`ckpt_every` steps and at every epoch end, so `--resume` continues a stopped
run at the step it reached. The sampling order of an epoch is a pure function
of (seed, epoch), which is what makes a mid-epoch resume exact.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from edge_agent.preprocess import Preprocessing, preprocess, to_tensor

from .augment import augment
from .data import Dataset, load_images
from .metrics import softmax, summarize
from .model import build_model


@dataclass
class TrainConfig:
    image_size: int = 160
    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    sampling_power: float = 0.5   # sample weight ~ class_freq**-power (0: natural, 1: balanced)
    loss_power: float = 0.5       # loss weight   ~ class_freq**-power
    patience: int = 4
    seed: int = 0
    threads: int = 0              # 0: all cores
    ckpt_every: int = 50
    max_source_side: int = 320    # images are cached in RAM at most this short side
    init_from: str = ""           # start from this checkpoint's weights instead of ImageNet (fine-tune stage)
    qat: bool = False             # quantization-aware fine-tune (needs init_from): round like the INT8 model does
    qat_percentile: float = 100.0  # QAT: clip the residual stream's range at this percentile (100: ORT's MinMax)
    qat_consistency: float = 1.0   # QAT: weight of KL(float output || rounded output) in the loss
    qat_margin: float = 0.0        # QAT: hinge on the rounded logits: the float model's top class ahead by this much


# Settings that do not change the training trajectory: a resume may change them.
OPERATIONAL = {"patience", "threads", "ckpt_every"}


def class_weights(y: np.ndarray, n: int, power: float) -> np.ndarray:
    counts = np.bincount(y, minlength=n).astype(np.float64)
    w = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
    return w / (w * counts).sum() * counts.sum()


def epoch_order(y: np.ndarray, n_cls: int, cfg: TrainConfig, epoch: int) -> np.ndarray:
    per_class = class_weights(y, n_cls, cfg.sampling_power)
    p = per_class[y]
    p = p / p.sum()
    rng = np.random.default_rng(cfg.seed * 1000 + epoch)
    return rng.choice(len(y), size=len(y), replace=True, p=p)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: list[np.ndarray], pre: Preprocessing,
                   batch: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack([preprocess(im, pre) for im in images[i:i + batch]]))
        out.append(model(x.contiguous(memory_format=torch.channels_last)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def train(ds: Dataset, split: np.ndarray, workdir: Path, cfg: TrainConfig, pre: Preprocessing,
          resume: bool = True, log=print) -> Path:
    """Train into `workdir` (last.pt, best.pt, history.json); return the best checkpoint's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tr = np.flatnonzero(split == "train"); va = np.flatnonzero(split == "val")
    n_cls = len(ds.labels)
    log(f"train {len(tr)} images, val {len(va)} images, classes {ds.class_counts(tr)}")
    tr_imgs = load_images(ds, tr, cfg.max_source_side)
    va_imgs = load_images(ds, va, cfg.max_source_side)
    ytr, yva = ds.y[tr], ds.y[va]

    model = build_model(n_cls, cfg.image_size, pretrained=not cfg.init_from)
    if cfg.init_from:
        init = torch.load(cfg.init_from, map_location="cpu", weights_only=False)
        if init["labels"] != ds.labels:
            raise SystemExit(f"--init-from {cfg.init_from} has labels {init['labels']}, the data has {ds.labels}")
        model.load_state_dict(init["model"])  # padding amounts are not parameters: any input size works
        log(f"initialised from {cfg.init_from} (epoch {init.get('epoch')})")
    cal_x = None
    if cfg.qat:
        if not cfg.init_from:
            raise SystemExit("--qat fine-tunes a trained model for INT8; give --init-from <workdir>/best.pt of a float run")
        from .qat import calibrate, float_pass, onnx_ranges, prepare
        from .quantize import CALIB_SIZE, FP32_FIRST_CONVS, calibration_indices

        rounded = prepare(model, FP32_FIRST_CONVS, cfg.qat_percentile if cfg.qat_percentile < 100 else None)
        pos = {int(g): i for i, g in enumerate(tr)}
        cal = calibration_indices(ds.y, split, CALIB_SIZE, cfg.seed)
        cal_x = torch.from_numpy(np.stack([preprocess(tr_imgs[pos[int(g)]], pre) for g in cal]))
        log(f"QAT: {len(rounded)} convolutions round their weights; activation ranges from {len(cal)} calibration images")
    model = model.to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    loss_w = torch.tensor(class_weights(ytr, n_cls, cfg.loss_power), dtype=torch.float32)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(steps_per_epoch * cfg.warmup_epochs)

    state = {"step": 0, "best": -1.0, "best_epoch": -1, "history": [], "bad_epochs": 0}
    last = workdir / "last.pt"
    if resume and last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        saved = {**asdict(TrainConfig()), **ck["config"]}  # fields added since the checkpoint: defaults
        same = {k: v for k, v in saved.items() if k not in OPERATIONAL} == \
            {k: v for k, v in asdict(cfg).items() if k not in OPERATIONAL}
        if not same or ck["labels"] != ds.labels:
            raise SystemExit(f"{last} was made with other settings or labels; use another --workdir or delete it to start over")
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["optimizer"]); state = ck["state"]
        log(f"resumed at step {state['step']} (epoch {state['step'] // steps_per_epoch + 1})")

    def checkpoint() -> None:
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state,
                     "config": asdict(cfg), "labels": ds.labels, "preprocessing": pre.to_dict()}, last)

    while state["step"] < total and state["bad_epochs"] < cfg.patience:
        epoch = state["step"] // steps_per_epoch
        order = epoch_order(ytr, n_cls, cfg, epoch)
        rng = np.random.default_rng(cfg.seed * 7919 + state["step"])
        if cal_x is not None:  # weights moved: re-measure the ranges ORT's calibrator would see now
            calibrate(model, cal_x.contiguous(memory_format=torch.channels_last))
        model.train(not cfg.qat)  # QAT: BatchNorm frozen and no dropout, see qat.py
        start_in_epoch = state["step"] - epoch * steps_per_epoch
        bar = tqdm(range(start_in_epoch, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", mininterval=5, initial=start_in_epoch, total=steps_per_epoch)
        run_loss, run_acc, seen, t0 = 0.0, 0.0, 0, time.time()
        for b in bar:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = torch.from_numpy(np.stack([to_tensor(augment(tr_imgs[i], cfg.image_size, rng), pre) for i in idx]))
            x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(ytr[idx]).long()
            for g in opt.param_groups:
                g["lr"] = lr_at(state["step"], total, warmup, cfg.lr)
            logits = model(x)
            loss = F.cross_entropy(logits, y, weight=loss_w, label_smoothing=cfg.label_smoothing)
            if cfg.qat:
                with torch.no_grad(), float_pass(model):
                    float_logits = model(x)
                loss = loss + cfg.qat_consistency * F.kl_div(F.log_softmax(logits, 1), F.softmax(float_logits, 1),
                                                             reduction="batchmean")
                if cfg.qat_margin > 0:  # the gate counts top-1 flips: keep the float decision ahead after rounding
                    top = float_logits.argmax(1, keepdim=True)
                    rival = logits.scatter(1, top, float("-inf")).amax(1)
                    loss = loss + F.relu(cfg.qat_margin - (logits.gather(1, top).squeeze(1) - rival)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["step"] += 1
            run_loss += float(loss) * len(idx); run_acc += float((logits.argmax(1) == y).sum()); seen += len(idx)
            bar.set_postfix(loss=f"{run_loss / seen:.3f}", acc=f"{run_acc / seen:.3f}",
                            ips=f"{seen / (time.time() - t0):.1f}")
            if state["step"] % cfg.ckpt_every == 0:
                checkpoint()
        bar.close()
        if cal_x is not None:  # the ranges that go with these weights (and into best.pt)
            calibrate(model, cal_x.contiguous(memory_format=torch.channels_last))
        val_logits = predict_logits(model, va_imgs, pre)
        val = summarize(yva, softmax(val_logits), ds.labels)
        if cfg.qat:  # the gate's measure, simulated: rounded vs float top-1 on val
            with float_pass(model):
                val["qat_agreement"] = float((predict_logits(model, va_imgs, pre).argmax(1) == val_logits.argmax(1)).mean())
        score = val["balanced_accuracy"] + val["macro_auc"]  # pick on both: BA alone is noisy on rare classes
        rec = {"epoch": epoch + 1, "step": state["step"], "train_loss": run_loss / max(seen, 1),
               "train_acc": run_acc / max(seen, 1), "val_accuracy": val["accuracy"],
               "val_balanced_accuracy": val["balanced_accuracy"], "val_macro_auc": val["macro_auc"],
               "val_mel_sensitivity": val["per_class"].get("mel", {}).get("sensitivity"),
               "qat_agreement": val.get("qat_agreement"), "lr": opt.param_groups[0]["lr"],
               "seconds": time.time() - t0}
        state["history"].append(rec)
        if score > state["best"]:
            state["best"], state["best_epoch"], state["bad_epochs"] = score, epoch + 1, 0
            save_atomic({"model": model.state_dict(), "config": asdict(cfg), "labels": ds.labels,
                         "preprocessing": pre.to_dict(), "epoch": epoch + 1, "val": val,
                         "qat_ranges": onnx_ranges(model) if cfg.qat else {}}, workdir / "best.pt")
        else:
            state["bad_epochs"] += 1
        checkpoint()
        (workdir / "history.json").write_text(json.dumps(state["history"], indent=2))
        log(f"epoch {epoch + 1}: loss {rec['train_loss']:.3f} val acc {val['accuracy']:.3f} "
            f"bal-acc {val['balanced_accuracy']:.3f} AUC {val['macro_auc']:.3f} "
            f"mel-sens {rec['val_mel_sensitivity']:.3f}"
            + (f" int8-sim agreement {rec['qat_agreement']:.4f}" if cfg.qat else "") + f" ({rec['seconds']:.0f}s)"
            + (" *best*" if state["best_epoch"] == epoch + 1 else ""))
    if state["bad_epochs"] >= cfg.patience:
        log(f"early stop: no validation improvement for {cfg.patience} epochs (best epoch {state['best_epoch']})")
    return workdir / "best.pt"
