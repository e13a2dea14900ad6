"""Leave-one-source-out ablation and the final trainings, in one run that keeps to a time budget.

Written for the few minutes of a lent GPU (and runnable on a CPU with small settings): every
model starts from the same ImageNet checkpoint, and each ablation step adds one piece to
the best recipe so far and keeps it only if the melanoma AUC on the held-out source
improves (greedy forward selection). The held-out source is split into a part that
selects (its lesion-grouped train+val images) and a part that chose nothing (its test
images); both are reported, and the "all" column is what the issue calls the honest
number for another clinic. Then:

- `loso`: the chosen recipe at full length on the training sources only, scored on all of
  the held-out source (the leave-one-source-out number for this recipe);
- two-source variants (naive union vs the masked loss with source-balanced sampling),
  short, scored in source (no third source exists here to score them out of source);
- `final`: the chosen recipe on both sources at full length, for the default bundle.

With `--seeds N` every ablation step (the base too) trains N times, seeds 0..N-1 on the same split, and
is judged on the mean of its runs: two seeds of one recipe from ImageNet differed by 0.048 melanoma AUC
out of source on a CPU (docs/generalisation.md, session 13), more than most single steps gain, so one
run per step lets noise choose the recipe. The finals train once.

Runs are skipped, and the final schedules shortened, when the measured speed says they
would not fit in `--budget` seconds; the JSON says which.

    python -m build_model.sweep --data ham10000=DIR --data isic2017=DIR --holdout isic2017 \\
        --out runs/sweep --device cuda --workers 14 --budget 500
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from edge_agent.preprocess import Preprocessing, preprocess

from .calibrate import choose_thresholds, fit_temperature
from .data import Dataset, cache_images, load_sources, split_sources
from .evaluate import evaluate_source
from .metrics import softmax
from .train import TrainConfig, pick_device, predict_logits, preprocessing_for, train

# Relative cost per image of the backbones and sizes (FLOPs, measured ratio replaces it once run).
COST = {("lite0", 192): 1.0, ("lite0", 224): 1.36, ("lite2", 192): 2.2, ("lite2", 224): 3.0, ("lite2", 260): 4.0}
STEPS = [  # (name, change to the current best recipe)
    ("+artefacts", {"augment": "+artefacts"}),
    ("+zoom", {"augment": "+zoom"}),
    ("+aspect", {"augment": "+aspect"}),
    ("+strong_color", {"augment": "+strong_color"}),
    ("+wide_field", {"augment": "+wide_field"}),  # CPU: +0.018 out of source, one seed; seed spread ~0.05 (docs/generalisation.md)
    ("lesion crop", {"resize": "lesion_crop"}),  # CPU test: +0.04 out of source without retraining (docs/generalisation.md)
    ("input 224", {"image_size": 224}),
    ("lite2", {"arch": "lite2"}),
]


def apply(cfg: TrainConfig, change: dict) -> TrainConfig:
    out = cfg
    for k, v in change.items():
        if k == "augment" and str(v).startswith("+"):
            have = [a for a in out.augment.split(",") if a and a != "legacy"]
            out = replace(out, augment=",".join(have + [v[1:]]))
        else:
            out = replace(out, **{k: v})
    return out


class Sweep:
    def __init__(self, ds: Dataset, holdout: str, out: Path, base: TrainConfig, budget: float, log,
                 export_dir: Path | None = None, seeds: int = 1) -> None:
        if seeds < 1:
            raise ValueError(f"seeds must be at least 1, not {seeds}")
        self.ds, self.holdout, self.out, self.base, self.log = ds, holdout, out, base, log
        self.seeds = seeds
        self.export_dir = export_dir
        self.t0, self.budget = time.time(), budget
        self.split_loso = split_sources(ds, base.seed, holdout)
        self.split_both = split_sources(ds, base.seed)
        src = np.array(ds.source_of)
        self.ho = np.flatnonzero(src == holdout)
        self.ho_select = self.ho[self.split_both[self.ho] != "test"]
        self.ho_clean = self.ho[self.split_both[self.ho] == "test"]
        self.speed: dict[tuple[str, int], float] = {}
        self.results: dict = {"runs": [], "holdout": holdout, "budget_s": budget, "seeds": seeds,
                              "holdout_images": {"all": len(self.ho), "select": len(self.ho_select), "clean": len(self.ho_clean)}}
        self._x: dict[tuple[int, str], np.ndarray] = {}

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def x(self, pre: Preprocessing, name: str, idx: np.ndarray) -> np.ndarray:
        key = (pre.input_size, pre.resize, pre.lesion_margin, name)
        if key not in self._x:
            self._x[key] = np.stack([preprocess(self.ds.image(int(i)), pre) for i in idx])
        return self._x[key]

    def estimate(self, cfg: TrainConfig, n_train: int) -> float:
        key = (cfg.arch, cfg.image_size)
        if key in self.speed:
            ips = self.speed[key]
        elif self.speed:
            (k0, s0), = list(self.speed.items())[:1]
            ips = s0 * COST.get(k0, 1.0) / COST.get(key, 3.0)
        else:
            ips = 2000.0
        return cfg.epochs * (n_train / ips + 1.5) + 10

    def run(self, name: str, cfg: TrainConfig, split: np.ndarray, thresholds_from: str) -> dict:
        work = self.out / "runs" / name.replace(" ", "_").replace("+", "p")
        if work.exists():
            shutil.rmtree(work)
        pre = preprocessing_for(cfg)
        t = time.time()
        best = train(self.ds, split, work, cfg, pre, resume=False, log=lambda m: self.log(f"[{name}] {m}"))
        import torch

        ck = torch.load(best, map_location="cpu", weights_only=False)
        hist = json.loads((work / "history.json").read_text())
        ips = [h["images_per_s"] for h in hist[1:]] or [hist[0]["images_per_s"]]
        self.speed[(cfg.arch, cfg.image_size)] = float(np.median(ips))
        from .model import build_model

        model = build_model(len(self.ds.labels), cfg.image_size, pretrained=False, arch=cfg.arch)
        model.load_state_dict(ck["model"])
        model = model.to(pick_device(cfg.device)).to(memory_format=torch.channels_last)
        row = {"name": name, "config": asdict(cfg), "best_epoch": ck["epoch"], "seconds": round(time.time() - t, 1),
               "images_per_s": self.speed[(cfg.arch, cfg.image_size)], "history": hist, "checkpoint": str(best)}
        labels = self.ds.labels
        va = np.flatnonzero(split == "val")
        for tta in ("none", "hflip"):
            lv = predict_logits(model, self.x(pre, f"val-{thresholds_from}", va), pre, 256, tta)
            T = fit_temperature(lv, self.ds.y[va])
            th = choose_thresholds(softmax(lv, T), self.ds.y[va], labels, [k for k in ("mel", "bcc", "akiec") if k in labels])
            ev = {"temperature": T, "thresholds": {k: v["probability"] for k, v in th.items()}}
            sets = {"val": va}
            if thresholds_from == "loso":
                sets |= {f"{self.holdout}-all": self.ho, f"{self.holdout}-select": self.ho_select,
                         f"{self.holdout}-clean": self.ho_clean}
            else:
                sets |= {f"{s}-test": np.flatnonzero((split == "test") & (np.array(self.ds.source_of) == s))
                         for s in self.ds.sources}
            for set_name, idx in sets.items():
                if not len(idx):
                    continue
                logits = predict_logits(model, self.x(pre, f"{set_name}-{thresholds_from}", idx), pre, 256, tta)
                src = self.ds.source_of[int(idx[0])]
                allowed = self.ds.source_labels[src] if set_name != "val" else labels
                r = evaluate_source(softmax(logits, T), self.ds.y[idx], labels, allowed, th, reps=500)
                ev[set_name] = {k: r.get(k) for k in ("n", "mel_auc", "mel_auc_ci", "balanced_accuracy", "balanced_accuracy_ci",
                                                       "macro_auc", "flag_rules", "benign_unflagged", "benign_unflagged_ci")}
            row[f"eval_{tta}"] = ev
        e = row["eval_none"]
        key = f"{self.holdout}-select"
        if key in e:
            self.log(f"[{name}] {self.holdout} all: mel AUC {e[f'{self.holdout}-all']['mel_auc']:.3f} "
                     f"bal-acc {e[f'{self.holdout}-all']['balanced_accuracy']:.3f}; select {e[key]['mel_auc']:.3f}; "
                     f"hflip all {row['eval_hflip'][f'{self.holdout}-all']['mel_auc']:.3f}; ({row['seconds']:.0f}s)")
        else:
            self.log(f"[{name}] " + "; ".join(f"{k}: mel AUC {v['mel_auc']:.3f} bal-acc {v['balanced_accuracy']:.3f}"
                                              for k, v in e.items() if isinstance(v, dict) and "mel_auc" in v))
        self.results["runs"].append(row)
        self.save()
        del model
        return row

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.time() - self.t0, 1)
        tmp = self.out / "sweep.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=float))
        os.replace(tmp, self.out / "sweep.json")
        if self.export_dir:  # as we go: a run stopped at its time limit still hands back what it finished
            self.export_dir.mkdir(parents=True, exist_ok=True)
            for name in ("sweep.json", "sweep.log"):
                if not (self.out / name).exists():  # a Sweep driven from Python has no log file
                    continue
                shutil.copyfile(self.out / name, self.export_dir / (name + ".tmp"))
                os.replace(self.export_dir / (name + ".tmp"), self.export_dir / name)

    def export_checkpoint(self, row: dict) -> None:
        if not self.export_dir:
            return
        import torch

        ck = torch.load(row["checkpoint"], map_location="cpu", weights_only=False)
        ck["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["model"].items()}
        ck["float16_copy"] = True
        torch.save(ck, self.export_dir / f"{row['name']}.pt.tmp")
        os.replace(self.export_dir / f"{row['name']}.pt.tmp", self.export_dir / f"{row['name']}.pt")

    def select_score(self, row: dict) -> float:
        return row["eval_none"][f"{self.holdout}-select"]["mel_auc"]

    def step(self, name: str, cfg: TrainConfig) -> tuple[list[dict], float]:
        """One ablation step at every seed (the first run keeps the step's name); its score is their mean."""
        rows = []
        for k in range(self.seeds):
            row = self.run(name if k == 0 else f"{name} s{k}", replace(cfg, seed=self.base.seed + k),
                           self.split_loso, "loso")
            row["step"] = name
            rows.append(row)
        scores = [self.select_score(r) for r in rows]
        score = float(np.mean(scores))
        for r in rows:
            r["select_mean"] = score
        if len(rows) > 1:
            self.log(f"[{name}] selecting part, mel AUC per seed {', '.join(f'{x:.3f}' for x in scores)}: "
                     f"mean {score:.3f}, spread {max(scores) - min(scores):.3f}")
        return rows, score

    def go(self, abl_epochs: int, final_epochs: int, min_final_epochs: int) -> None:
        n_loso = int((self.split_loso == "train").sum())
        n_both = int((self.split_both == "train").sum())
        cfg = replace(self.base, epochs=abl_epochs)
        base_rows, best = self.step("base", cfg)
        best_cfg = cfg
        for r in base_rows:
            r["kept"] = True

        def reserve() -> float:
            fin = replace(best_cfg, epochs=final_epochs)
            return self.estimate(fin, n_loso) + self.estimate(fin, n_both)

        for name, change in STEPS:
            cand = apply(best_cfg, change)
            need = self.estimate(cand, n_loso) * self.seeds
            if self.left() - reserve() - need < 0:
                self.log(f"[{name}] skipped: needs ~{need:.0f}s, {self.left():.0f}s left with {reserve():.0f}s reserved for the finals")
                self.results["runs"].append({"name": name, "skipped": True, "config": asdict(cand)})
                continue
            try:
                rows, score = self.step(name, cand)
            except Exception as e:  # one broken step must not cost the finals
                self.log(f"[{name}] FAILED: {type(e).__name__}: {e}")
                self.results["runs"].append({"name": name, "failed": f"{type(e).__name__}: {e}", "config": asdict(cand)})
                continue
            kept, delta = score > best, score - best
            for r in rows:
                r["kept"], r["delta_select"] = kept, delta
            if kept:
                best_cfg, best = cand, score
            self.log(f"[{name}] {'kept' if kept else 'dropped'} ({delta:+.3f} mel AUC on the selecting part"
                     f"{', mean of %d seeds' % self.seeds if self.seeds > 1 else ''})")
            self.save()
        self.results["chosen"] = asdict(best_cfg)
        # Two-source variants, short, if they fit besides the finals.
        variants = [("both naive", {"masked_loss": False, "source_power": 0.0}),
                    ("both masked+balanced", {"masked_loss": True, "source_power": 0.5})]
        two = {"masked_loss": True, "source_power": 0.5}
        vrows = []
        for name, change in variants:
            cand = replace(best_cfg, epochs=abl_epochs, **change)
            need = self.estimate(cand, n_both)
            if self.left() - reserve() - need < 0:
                self.log(f"[{name}] skipped (time)")
                self.results["runs"].append({"name": name, "skipped": True, "config": asdict(cand)})
                continue
            try:
                vrows.append((change, self.run(name, cand, self.split_both, "both")))
            except Exception as e:
                self.log(f"[{name}] FAILED: {type(e).__name__}: {e}")
        if len(vrows) == 2:
            def s(r: dict) -> float:  # in source: ISIC test melanoma AUC + HAM-val balanced accuracy
                e = r["eval_none"]
                return e[f"{self.holdout}-test"]["mel_auc"] + e["val"]["balanced_accuracy"]
            two = max(vrows, key=lambda cr: s(cr[1]))[0]
        self.results["two_source_choice"] = two
        # Finals: as long as the time allows, at least min_final_epochs.
        for name, split, n, extra in (("loso", self.split_loso, n_loso, {}), ("final", self.split_both, n_both, two)):
            fin = replace(best_cfg, epochs=final_epochs, **extra)
            per_epoch = self.estimate(replace(fin, epochs=1), n) - 10
            share = self.left() - 20 if name == "final" else (self.left() - 20) * n / (n + n_both)
            epochs = int(max(min_final_epochs, min(final_epochs, share // max(per_epoch, 1e-6))))
            fin = replace(fin, epochs=epochs, warmup_epochs=min(fin.warmup_epochs, max(epochs / 10, 0.5)))
            self.log(f"[{name}] {epochs} epochs (~{per_epoch:.1f}s each), {self.left():.0f}s left")
            try:
                row = self.run(name, fin, split, "loso" if name == "loso" else "both")
            except Exception as e:
                self.log(f"[{name}] FAILED: {type(e).__name__}: {e}")
                continue
            row["final"] = True
            self.save()
            self.export_checkpoint(row)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True, help="NAME=PATH, repeatable")
    ap.add_argument("--holdout", required=True, help="the source left out of training in the ablation")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=500, help="seconds for everything")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--abl-epochs", type=int, default=8)
    ap.add_argument("--final-epochs", type=int, default=30)
    ap.add_argument("--min-final-epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=1,
                    help="train each ablation step this many times (seeds 0..N-1) and judge it on the mean")
    ap.add_argument("--split-check", type=Path, default=None, help="a split.csv the split must reproduce")
    ap.add_argument("--export", type=Path, default=None, help="copy sweep.json, the log and the final checkpoints (float16) here")
    if argv and argv[0] == "table":  # python -m build_model.sweep table SWEEP.json [...]
        for path in argv[1:]:
            print(ablation_markdown(json.loads(Path(path).read_text())))
        return
    a = ap.parse_args(argv)
    if a.seeds < 1:
        ap.error(f"--seeds must be at least 1 (each step trains that many times), not {a.seeds}")
    a.out.mkdir(parents=True, exist_ok=True)
    logf = open(a.out / "sweep.log", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n"); logf.flush()

    ds = load_sources(a.data)
    t = time.time()
    cache_images(ds, threads=min(16, os.cpu_count() or 2))
    log(f"{len(ds)} images from {ds.sources} decoded in {time.time() - t:.1f}s")
    base = TrainConfig(image_size=a.image_size, epochs=a.abl_epochs, batch_size=a.batch_size, lr=a.lr, augment="",
                       device=a.device, workers=a.workers, ckpt_every=100000, patience=1000, masked_loss=True)
    sw = Sweep(ds, a.holdout, a.out, base, a.budget, log, a.export, seeds=a.seeds)
    if a.split_check:
        from .data import read_split

        ref = read_split(a.split_check, ds)
        same = float((ref == sw.split_both).mean())
        log(f"split check against {a.split_check}: {same:.4%} identical")
        sw.results["split_check"] = same
    try:
        sw.go(a.abl_epochs, a.final_epochs, a.min_final_epochs)
    finally:
        sw.save()


def _ci(v: dict, key: str) -> str:
    x, ci = v.get(key), v.get(key + "_ci")
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{x:.3f}"


def ablation_markdown(results: dict) -> str:
    """The sweep as tables: out-of-source steps, the two finals, each with bootstrap 95% intervals."""
    ho = results["holdout"]
    lines = [f"Held-out source: **{ho}** ({results['holdout_images']['all']} images; the steps were chosen on its "
             f"{results['holdout_images']['select']} train+val images, its {results['holdout_images']['clean']} test "
             "images chose nothing). Numbers are FP32 PyTorch, thresholds and temperature fitted on the training "
             "sources' validation split at 95% target sensitivity.", "",
             f"| step | kept | arch / px / epochs | {ho} melanoma AUC (all) | {ho} melanoma AUC (test part) | "
             f"{ho} balanced accuracy (3 classes) | {ho} melanoma flag sensitivity | {ho} benign unflagged | "
             "in-source val balanced accuracy | + flip TTA: melanoma AUC (all) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if r.get("skipped") or r.get("failed"):
            why = "skipped: did not fit the time budget" if r.get("skipped") else f"failed: {r['failed']}"
            lines.append(f"| {r['name']} | {why} | | | | | | | | |")
            continue
        e, t = r["eval_none"], r["eval_hflip"]
        if f"{ho}-all" not in e:
            continue
        a, c = e[f"{ho}-all"], e[f"{ho}-clean"]
        cfg = r["config"]
        kept = "final (full schedule)" if r.get("final") else ("yes" if r.get("kept") else "no")
        lines.append(f"| {r['name']} | {kept} | {cfg['arch']} / {cfg['image_size']} / {cfg['epochs']} | {_ci(a, 'mel_auc')} | "
                     f"{_ci(c, 'mel_auc')} | {_ci(a, 'balanced_accuracy')} | "
                     f"{a['flag_rules']['melanoma']['sensitivity']:.3f} | {_ci(a, 'benign_unflagged')} | "
                     f"{e['val']['balanced_accuracy']:.3f} | {t[f'{ho}-all']['mel_auc']:.3f} |")
    both = [r for r in results["runs"] if not r.get("skipped") and not r.get("failed") and f"{ho}-test" in r.get("eval_none", {})]
    if both:
        lines += ["", "Trained on both sources (in source: each source's own lesion-grouped test split):", "",
                  "| run | epochs | source | melanoma AUC | balanced accuracy | melanoma flag sensitivity | benign unflagged | + flip TTA: melanoma AUC / balanced accuracy |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in both:
            for key, v in r["eval_none"].items():
                if key.endswith("-test"):
                    t = r["eval_hflip"][key]
                    lines.append(f"| {r['name']} | {r['config']['epochs']} | {key[:-5]} | {_ci(v, 'mel_auc')} | {_ci(v, 'balanced_accuracy')} | "
                                 f"{v['flag_rules']['melanoma']['sensitivity']:.3f} | {_ci(v, 'benign_unflagged')} | "
                                 f"{t['mel_auc']:.3f} / {t['balanced_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
