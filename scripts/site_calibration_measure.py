#!/usr/bin/env python3
"""Simulated new site: does `edge-agent calibrate` bring the melanoma flag back to >= 0.90 sensitivity?

The default bundle was trained on the HAM10000 images and the ISIC 2017 images of its `train` split
(edge_agent/bundle/split.csv). The ISIC 2017 images of its `val` and `test` splits played no part in the
weights (val chose the temperature and thresholds, with HAM10000's val); they stand in for a new site.
They are split by lesion group (seeded): a random 40% of the groups are the site's labelled cases
for `edge-agent calibrate` (site_calibration.fit, the command's own code), the other 60% are screened with
the bundle's policy and with the calibrated one. Reported, with percentile bootstrap 95% intervals (2,000
resamples of the 60%): sensitivity of the melanoma rule and of any high-risk flag for melanomas, and the share
of benign cases (nv, bkl) left without a high-risk flag.

    python scripts/site_calibration_measure.py [--data ../shared/data/isic2017-train] [--seed 0] [--out FILE.md]
                                               [--shift none|device]

--shift device also simulates a different dermatoscope on every image (both the 40% and the 60%): a
softer lens (Gaussian blur, sigma 1.5 px), a washed-out lamp (contrast x0.6, +20 brightness) and strong
JPEG compression (quality 30), written to a temporary folder and screened like the originals.

Images are read, decoded and preprocessed by the agent's own code and run through the bundle's primary
(INT8) model on the CPU (site_calibration.screen), exactly as `edge-agent calibrate --csv` does.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.bundle import default_bundle_path, load_bundle  # noqa: E402
from edge_agent.calibration_math import bootstrap_ci, risk_score, softmax  # noqa: E402
from edge_agent.config import load_settings  # noqa: E402
from edge_agent.decode import QualityLimits  # noqa: E402
from edge_agent.site_calibration import fit, screen  # noqa: E402


def device_shift(files: list[tuple[Path, str]], dest: Path) -> list[tuple[Path, str]]:
    """Copies as another dermatoscope would take them: softer lens, washed-out lamp, strong JPEG compression."""
    import cv2

    out = []
    for path, label in files:
        img = cv2.GaussianBlur(cv2.imread(str(path)), (0, 0), 1.5)
        img = np.clip((img.astype(np.float32) - 128) * 0.6 + 148, 0, 255).astype(np.uint8)
        p = dest / path.name
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 30])
        out.append((p, label))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/isic2017-train")
    ap.add_argument("--bundle", type=Path, default=default_bundle_path())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=0.4)
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--shift", choices=("none", "device"), default="none",
                    help="device: simulate another dermatoscope (blur, washed-out lamp, JPEG q30) on every image")
    a = ap.parse_args()

    bundle = load_bundle(a.bundle)
    s = load_settings({}, environ={})
    limits = QualityLimits(s.min_sharpness, s.min_brightness, s.max_brightness, s.max_clipped_fraction)
    labels_csv = {r["image_id"]: r["dx"] for r in csv.DictReader(open(a.data / "labels.csv"))}
    rows = [r for r in csv.DictReader(open(a.bundle / "split.csv"))
            if r["source"] == "isic2017" and r["split"] in ("val", "test")]
    for r in rows:  # the bundle's split and the data's labels must agree
        assert labels_csv[r["image_id"]] == r["label"], r
    groups = sorted({r["group"] for r in rows})
    rng = np.random.default_rng(a.seed)
    chosen = set(rng.permutation(groups)[: int(round(a.fraction * len(groups)))].tolist())
    cal = [(a.data / "images" / f"{r['image_id']}.jpg", r["label"]) for r in rows if r["group"] in chosen]
    ev = [(a.data / "images" / f"{r['image_id']}.jpg", r["label"]) for r in rows if r["group"] not in chosen]
    if a.shift == "device":
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="site-shift-"))
        cal, ev = device_shift(cal, tmp), device_shift(ev, tmp)
    kw = dict(max_pixels=s.max_pixels, max_file_mb=s.max_file_mb, limits=limits, threads=2)
    c_cases, e_cases = screen(cal, bundle, **kw), screen(ev, bundle, **kw)
    result = fit(c_cases, bundle, reps=1000, seed=a.seed)
    labels = list(bundle.labels)
    mel = labels.index("mel")
    y = e_cases.y
    pos = y == mel
    benign = np.isin(y, [labels.index(x) for x in ("nv", "bkl")])
    rules = {n: sp for n, sp in bundle.thresholds.items() if isinstance(sp, dict) and "labels" in sp}

    def policy(temperature: float, th: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        p = softmax(e_cases.logits, temperature)
        hits = {n: risk_score(p, labels, sp["labels"]) >= th[n] for n, sp in rules.items()}
        return hits["melanoma"], np.logical_or.reduce(list(hits.values()))

    bundle_th = {n: float(sp["probability"]) for n, sp in rules.items()}
    cal_th = {n: float(v["probability"]) for n, v in result["thresholds"].items()}
    t_cal = float(result["temperature"]["value"])
    n = len(y)
    strata = pos.astype(int) * 2 + benign.astype(int)

    def cell(flag: np.ndarray, of: np.ndarray, want: bool = True, seed: int = 0) -> str:
        v = float((flag[of] == want).mean())
        lo, hi = bootstrap_ci(lambda i: float((flag[i][of[i]] == want).mean()) if of[i].any() else float("nan"),
                              n, 2000, seed, strata)
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    def exact(flag: np.ndarray) -> str:
        """Clopper-Pearson 95% interval of the melanoma-rule sensitivity (the bootstrap collapses to a point
        when no melanoma is missed)."""
        from scipy.stats import beta

        k, m = int(flag[pos].sum()), int(pos.sum())
        lo = 0.0 if k == 0 else float(beta.ppf(0.025, k, m - k + 1))
        hi = 1.0 if k == m else float(beta.ppf(0.975, k + 1, m - k))
        return f"{k}/{m} [{lo:.3f}, {hi:.3f}]"

    out = []
    out.append(f"Shift: {a.shift}.  ")
    out.append(f"Simulated new site: ISIC 2017 images of the default bundle's val+test splits ({len(rows)} images, "
               f"{len(groups)} lesion groups); calibrate on {len(c_cases.y)} ({int((c_cases.y == mel).sum())} "
               f"melanomas, {int(round(a.fraction * 100))}% of the groups, seed {a.seed}), evaluate on {n} "
               f"({int(pos.sum())} melanomas, {int(benign.sum())} benign). Excluded (would be quarantined): "
               f"{len(c_cases.excluded) + len(e_cases.excluded)}.")
    out.append("")
    out.append(f"Temperature: bundle {bundle.temperature:.4f}; calibrated {t_cal:.4f} "
               f"[{result['temperature']['ci95'][0]}, {result['temperature']['ci95'][1]}].  ")
    out.append("Thresholds: " + "; ".join(
        f"{k} bundle {bundle_th[k]:g} -> calibrated {cal_th[k]:g} [{v['ci95'][0]}, {v['ci95'][1]}]"
        for k, v in result["thresholds"].items()))
    out.append("")
    out.append("| policy (on the 60% evaluation cases) | melanoma-rule sensitivity [bootstrap 95% CI] | same, "
               "caught/melanomas [exact 95% CI] | any high-risk flag, melanomas [95% CI] | benign left unflagged "
               "[95% CI] |")
    out.append("|---|---|---|---|---|")
    for name, (t, th) in (("bundle (uncalibrated)", (bundle.temperature, bundle_th)),
                          ("site-calibrated", (t_cal, cal_th))):
        mel_flag, any_flag = policy(t, th)
        out.append(f"| {name} | {cell(mel_flag, pos, seed=1)} | {exact(mel_flag)} | {cell(any_flag, pos, seed=2)} | "
                   f"{cell(any_flag, benign, want=False, seed=3)} |")
    text = "\n".join(out)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
