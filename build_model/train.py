"""Fine-tune EfficientNet-Lite on CPU (or a CUDA GPU) with checkpoints that survive a kill.

State (model, optimizer, step, history, RNG seeds) is written atomically every
`ckpt_every` steps and at every epoch end, so `--resume` continues a stopped
run at the step it reached. The sampling order of an epoch is a pure function
of (seed, epoch) and each sample's augmentation of (seed, epoch, position),
which is what makes a mid-epoch resume exact and lets `workers` processes
augment in parallel without changing what is trained on.

Several sources: a source that labels only some classes (ISIC 2017: mel, nv,
bkl) is trained with a loss over the classes it labels (`masked_loss`), so an
ISIC image never teaches "this camera means no carcinoma"; `source_power`
balances how often each source is sampled. Validation is scored per source on
the classes that source labels, and the best epoch is the one with the best
mean over sources.
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

from edge_agent.lesion import lesion_region
from edge_agent.preprocess import Preprocessing, flatten_views, mean_over_views, preprocess, to_tensor

from .errors import BuildError
from .augment import AugmentConfig, augment, augment_v2
from .data import Dataset, load_images
from .metrics import softmax, summarize, summarize_restricted
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
    arch: str = "lite0"           # lite0 | lite1 | lite2 (EfficientNet-Lite backbone)
    augment: str = "legacy"       # legacy (the first recipe) or a comma list of artefacts,zoom,aspect,strong_color,wide_field ("" = base)
    masked_loss: bool = True      # a source's images are scored only on the classes that source labels
    source_power: float = 0.0     # sample weight ~ source_size**-power (0: natural, 1: sources equally often)
    device: str = "cpu"           # cpu | cuda | auto
    workers: int = 0              # augmentation processes (0: in the training process)
    resize: str = "shorter_side_center_crop"  # the bundle's resize rule; lesion_crop: the square around the lesion (edge_agent/lesion.py)


def preprocessing_for(cfg: TrainConfig) -> Preprocessing:
    """The preprocessing a model trained with `cfg` is scored and shipped with."""
    return Preprocessing(input_size=cfg.image_size, resize=cfg.resize)


# Settings that do not change the training trajectory: a resume may change them.
OPERATIONAL = {"patience", "threads", "ckpt_every", "workers", "device"}


def class_weights(y: np.ndarray, n: int, power: float) -> np.ndarray:
    counts = np.bincount(y, minlength=n).astype(np.float64)
    w = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
    return w / (w * counts).sum() * counts.sum()


def epoch_order(y: np.ndarray, n_cls: int, cfg: TrainConfig, epoch: int,
                source: np.ndarray | None = None) -> np.ndarray:
    per_class = class_weights(y, n_cls, cfg.sampling_power)
    p = per_class[y]
    if source is not None and cfg.source_power:
        names, inv, counts = np.unique(source, return_inverse=True, return_counts=True)
        p = p * counts[inv].astype(np.float64) ** -cfg.source_power
    p = p / p.sum()
    rng = np.random.default_rng(cfg.seed * 1000 + epoch)
    return rng.choice(len(y), size=len(y), replace=True, p=p)


def masked_cross_entropy(logits: "torch.Tensor", y: "torch.Tensor", allowed: "torch.Tensor",
                         weight: "torch.Tensor | None" = None, label_smoothing: float = 0.0) -> "torch.Tensor":
    """Cross-entropy over each sample's `allowed` classes only (label smoothing spread over those).

    With every class allowed it equals `F.cross_entropy(logits, y, weight, label_smoothing=...)`.
    A class a source does not label gets neither pushed down nor up by that source's images.
    """
    logits = logits.float().masked_fill(~allowed, -1e4)
    logp = F.log_softmax(logits, dim=1)
    w = weight if weight is not None else torch.ones(logits.shape[1], device=logits.device)
    wy = w[y]
    nll = -(logp.gather(1, y[:, None]).squeeze(1)) * wy
    loss = nll.sum() / wy.sum()
    if label_smoothing:  # PyTorch's definition, with the class count and sum restricted to the allowed classes
        smooth = -(logp * w * allowed).sum(1) / allowed.sum(1).clamp(min=1)
        loss = (1 - label_smoothing) * loss + label_smoothing * smooth.sum() / wy.sum()
    return loss


class Augmented(torch.utils.data.Dataset):
    """Sample `pos` of the schedule: (epoch, slot) -> the image at that slot of the epoch's order,
    augmented with a generator seeded by (seed, epoch, slot)."""

    def __init__(self, images: list[np.ndarray], y: np.ndarray, mask: np.ndarray, source: np.ndarray | None,
                 cfg: "TrainConfig", pre: Preprocessing, n_cls: int, per_epoch: int) -> None:
        self.images, self.y, self.mask, self.source = images, y, mask, source
        self.cfg, self.pre, self.n_cls, self.per_epoch = cfg, pre, n_cls, per_epoch
        self.aug = None if cfg.augment == "legacy" else AugmentConfig.from_names(cfg.augment)
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.y, self.n_cls, self.cfg, epoch, self.source)}
        return self._orders[epoch]

    def __len__(self) -> int:
        return self.per_epoch * self.cfg.epochs

    def __getitem__(self, pos: int):
        epoch, slot = divmod(int(pos), self.per_epoch)
        i = int(self.order(epoch)[slot])
        rng = np.random.default_rng([self.cfg.seed, epoch, slot])
        img = augment(self.images[i], self.cfg.image_size, rng) if self.aug is None \
            else augment_v2(self.images[i], self.cfg.image_size, rng, self.aug)
        return torch.from_numpy(to_tensor(img, self.pre)), int(self.y[i]), torch.from_numpy(self.mask[i])


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BuildError("--device cuda: no CUDA GPU is visible to PyTorch here; use --device cpu")
    return torch.device(name)


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
def predict_logits(model: torch.nn.Module, images: list[np.ndarray] | np.ndarray, pre: Preprocessing,
                   batch: int = 64, tta: str = "none") -> np.ndarray:
    """Logits for raw images (preprocessed here) or for an already preprocessed NxCxHxW array.

    `tta="hflip"` averages the logits of the image and its mirror, as the agent does for a bundle
    that asks for it.
    """
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        x = chunk if isinstance(chunk, np.ndarray) else np.stack([preprocess(im, pre) for im in chunk])
        views = x.shape[1] if x.ndim == 5 else 1  # a multi-view preprocessing: the mean over its views
        x = torch.from_numpy(np.ascontiguousarray(flatten_views(x)))
        x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(x).float()
            if tta == "hflip":
                logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
        out.append(mean_over_views(logits.cpu().numpy(), views))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def validation_score(y: np.ndarray, logits: np.ndarray, labels: list[str], source: list[str],
                     source_labels: dict[str, list[str]]) -> tuple[float, dict]:
    """Mean over sources of (balanced accuracy + macro AUC), each on the classes that source labels."""
    src = np.array(source)
    per, scores = {}, []
    for name, allowed in source_labels.items():
        m = src == name
        if not m.any():
            continue
        r = summarize_restricted(y[m], softmax(logits[m]), labels, allowed)
        per[name] = r
        scores.append(r["balanced_accuracy"] + (0 if np.isnan(r["macro_auc"]) else r["macro_auc"]))
    return float(np.mean(scores)) if scores else float("nan"), per


def train(ds: Dataset, split: np.ndarray, workdir: Path, cfg: TrainConfig, pre: Preprocessing,
          resume: bool = True, log=print) -> Path:
    """Train into `workdir` (last.pt, best.pt, history.json); return the best checkpoint's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dev = pick_device(cfg.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    tr = np.flatnonzero(split == "train"); va = np.flatnonzero(split == "val")
    n_cls = len(ds.labels)
    log(f"train {len(tr)} images, val {len(va)} images, classes {ds.class_counts(tr)}"
        + (f", sources {ds.source_counts(tr)}" if len(ds.sources) > 1 else "")
        + f", device {dev}")
    tr_raw = tr_imgs = load_images(ds, tr, cfg.max_source_side)
    if pre.resize == "lesion_crop":
        # Augment what the agent will crop, so random resized crops vary the scale around the lesion's.
        tr_imgs = [np.ascontiguousarray(lesion_region(im, pre.lesion_margin)) for im in tr_raw]
    va_imgs = load_images(ds, va, cfg.max_source_side)
    ytr, yva = ds.y[tr], ds.y[va]
    mask_all = ds.label_mask() if cfg.masked_loss else np.ones((len(ds), n_cls), bool)
    src_all = np.array(ds.source_of)
    va_x = np.stack([preprocess(im, pre) for im in va_imgs]) if len(va_imgs) else np.zeros((0, 3, pre.input_size, pre.input_size), np.float32)

    model = build_model(n_cls, cfg.image_size, pretrained=not cfg.init_from, arch=cfg.arch)
    if cfg.init_from:
        if not Path(cfg.init_from).is_file():
            raise BuildError(f"--init-from {cfg.init_from}: no such checkpoint; give the best.pt of a finished training run")
        init = torch.load(cfg.init_from, map_location="cpu", weights_only=False)
        if init["labels"] != ds.labels:
            raise BuildError(f"--init-from {cfg.init_from} has labels {init['labels']}, the data has {ds.labels}")
        if init["config"].get("arch", "lite0") != cfg.arch:
            raise BuildError(f"--init-from {cfg.init_from} is {init['config'].get('arch', 'lite0')}, this run asks for --arch {cfg.arch}")
        model.load_state_dict(init["model"])  # padding amounts are not parameters: any input size works
        log(f"initialised from {cfg.init_from} (epoch {init.get('epoch')})")
    cal_x = None
    if cfg.qat:
        if not cfg.init_from:
            raise BuildError("--qat fine-tunes a trained model for INT8; give --init-from <workdir>/best.pt of a float run")
        if dev.type != "cpu":
            raise BuildError("--qat simulates ONNX Runtime's CPU INT8 arithmetic: run it with --device cpu")
        from .qat import calibrate, float_pass, onnx_ranges, prepare
        from .quantize import CALIB_SIZE, FP32_FIRST_CONVS, calibration_indices

        rounded = prepare(model, FP32_FIRST_CONVS, cfg.qat_percentile if cfg.qat_percentile < 100 else None)
        pos = {int(g): i for i, g in enumerate(tr)}
        cal = calibration_indices(ds.y, split, CALIB_SIZE, cfg.seed)
        cal_x = torch.from_numpy(flatten_views(np.stack([preprocess(tr_raw[pos[int(g)]], pre) for g in cal])))
        log(f"QAT: {len(rounded)} convolutions round their weights; activation ranges from {len(cal)} calibration images")
    model = model.to(dev).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    loss_w = torch.tensor(class_weights(ytr, n_cls, cfg.loss_power), dtype=torch.float32, device=dev)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(steps_per_epoch * cfg.warmup_epochs)

    state = {"step": 0, "best": -1.0, "best_epoch": -1, "history": [], "bad_epochs": 0}
    last = workdir / "last.pt"
    if resume and last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        saved = {**asdict(TrainConfig()), **ck["config"]}  # fields added since the checkpoint: defaults
        if "arch" not in ck["config"]:  # checkpoints from before these fields trained the first recipe
            saved.update(augment="legacy", masked_loss=cfg.masked_loss)
        same = {k: v for k, v in saved.items() if k not in OPERATIONAL} == \
            {k: v for k, v in asdict(cfg).items() if k not in OPERATIONAL}
        if not same or ck["labels"] != ds.labels:
            raise BuildError(f"{last} was made with other settings or labels; use another --workdir or delete it to start over")
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["optimizer"]); state = ck["state"]
        log(f"resumed at step {state['step']} (epoch {state['step'] // steps_per_epoch + 1})")

    def checkpoint() -> None:
        save_atomic({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
                     "state": state, "config": asdict(cfg), "labels": ds.labels, "preprocessing": pre.to_dict()}, last)

    # One loader for the rest of the schedule: sample position p is (epoch, slot) = divmod(p, per_epoch).
    per_epoch = steps_per_epoch * cfg.batch_size
    data = Augmented(tr_imgs, ytr, mask_all[tr], src_all[tr] if len(ds.sources) > 1 else None, cfg, pre, n_cls, per_epoch)

    def batches(start_step: int):
        for st in range(start_step, total):
            e, b = divmod(st, steps_per_epoch)
            lo = e * per_epoch + b * cfg.batch_size
            yield list(range(lo, min(lo + cfg.batch_size, e * per_epoch + len(tr))))

    loader = torch.utils.data.DataLoader(data, batch_sampler=list(batches(state["step"])), num_workers=cfg.workers,
                                         worker_init_fn=_worker_init if cfg.workers else None,
                                         pin_memory=dev.type == "cuda", prefetch_factor=4 if cfg.workers else None,
                                         persistent_workers=False)
    stream = iter(loader)
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    while state["bad_epochs"] < cfg.patience:
        if len(state["history"]) < state["step"] // steps_per_epoch:
            # Killed between an epoch's last step (checkpointed) and its validation: validate it now.
            epoch, start_in_epoch = len(state["history"]), steps_per_epoch
        elif state["step"] < total:
            epoch = state["step"] // steps_per_epoch
            start_in_epoch = state["step"] - epoch * steps_per_epoch
        else:
            break
        if cal_x is not None:  # weights moved: re-measure the ranges ORT's calibrator would see now
            calibrate(model, cal_x.contiguous(memory_format=torch.channels_last))
        model.train(not cfg.qat)  # QAT: BatchNorm frozen and no dropout, see qat.py
        bar = tqdm(range(start_in_epoch, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", mininterval=5, initial=start_in_epoch, total=steps_per_epoch,
                   disable=dev.type == "cuda")
        run_loss, run_acc, seen, t0 = torch.zeros((), device=dev), torch.zeros((), device=dev), 0, time.time()
        for b in bar:
            x, y, allowed = next(stream)
            x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y, allowed = y.to(dev, non_blocking=True).long(), allowed.to(dev, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(state["step"], total, warmup, cfg.lr)
            with torch.autocast(**amp):
                logits = model(x)
            loss = masked_cross_entropy(logits, y, allowed, loss_w, cfg.label_smoothing)
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
            run_loss += loss.detach() * len(y); run_acc += (logits.argmax(1) == y).sum(); seen += len(y)
            if dev.type == "cpu":
                bar.set_postfix(loss=f"{float(run_loss) / seen:.3f}", acc=f"{float(run_acc) / seen:.3f}",
                                ips=f"{seen / (time.time() - t0):.1f}")
            if state["step"] % cfg.ckpt_every == 0:
                checkpoint()
        bar.close()
        if cal_x is not None:  # the ranges that go with these weights (and into best.pt)
            calibrate(model, cal_x.contiguous(memory_format=torch.channels_last))
        val_logits = predict_logits(model, va_x, pre, batch=256 if dev.type == "cuda" else 64)
        val = summarize(yva, softmax(val_logits), ds.labels)
        score, per_source = validation_score(yva, val_logits, ds.labels, [ds.source_of[i] for i in va], ds.source_labels)
        if cfg.qat:  # the gate's measure, simulated: rounded vs float top-1 on val
            with float_pass(model):
                val["qat_agreement"] = float((predict_logits(model, va_x, pre).argmax(1) == val_logits.argmax(1)).mean())
        rec = {"epoch": epoch + 1, "step": state["step"], "train_loss": float(run_loss) / seen if seen else float("nan"),
               "train_acc": float(run_acc) / max(seen, 1), "val_accuracy": val["accuracy"],
               "val_balanced_accuracy": val["balanced_accuracy"], "val_macro_auc": val["macro_auc"],
               "val_mel_sensitivity": val["per_class"].get("mel", {}).get("sensitivity"),
               "val_score": score, "val_sources": {k: {m: v[m] for m in ("balanced_accuracy", "macro_auc", "mel_auc")}
                                                    for k, v in per_source.items()} if len(per_source) > 1 else {},
               "qat_agreement": val.get("qat_agreement"), "lr": opt.param_groups[0]["lr"],
               "seconds": time.time() - t0, "images_per_s": seen / max(time.time() - t0, 1e-9)}
        state["history"].append(rec)
        if score > state["best"]:
            state["best"], state["best_epoch"], state["bad_epochs"] = score, epoch + 1, 0
            save_atomic({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "config": asdict(cfg),
                         "labels": ds.labels, "preprocessing": pre.to_dict(), "epoch": epoch + 1, "val": val,
                         "val_sources": per_source, "qat_ranges": onnx_ranges(model) if cfg.qat else {}},
                        workdir / "best.pt")
        else:
            state["bad_epochs"] += 1
        checkpoint()
        (workdir / "history.json").write_text(json.dumps(state["history"], indent=2))
        log(f"epoch {epoch + 1}: loss {rec['train_loss']:.3f} val acc {val['accuracy']:.3f} "
            f"bal-acc {val['balanced_accuracy']:.3f} AUC {val['macro_auc']:.3f} "
            f"mel-sens {rec['val_mel_sensitivity']:.3f}"
            + "".join(f" | {k}: bal-acc {v['balanced_accuracy']:.3f} mel-AUC {v['mel_auc']:.3f}" for k, v in rec["val_sources"].items())
            + (f" int8-sim agreement {rec['qat_agreement']:.4f}" if cfg.qat else "")
            + f" ({rec['seconds']:.0f}s, {rec['images_per_s']:.0f} img/s)"
            + (" *best*" if state["best_epoch"] == epoch + 1 else ""))
    del stream, loader
    if state["bad_epochs"] >= cfg.patience:
        log(f"early stop: no validation improvement for {cfg.patience} epochs (best epoch {state['best_epoch']})")
    return workdir / "best.pt"
