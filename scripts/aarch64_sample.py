"""Decision-level comparison of aarch64 and x86-64 on real dermoscopy images (scripts/aarch64-e2e.sh, optional).

Why: a plain INT8 model puts float rounding in front of its quantizers, which differs by CPU, so its
probabilities differ across platforms by more than 1e-3; a reproducible one (the default bundle's,
build_model/reproducible.py) computes exactly (docs/aarch64.md). Beside the probabilities, what matters
clinically is whether the aarch64 INT8 model makes the same decisions - label, review flag and reasons,
high-risk rules, out-of-distribution flag - as the x86-64 INT8 model that the validation gate measured. This file is run on
both platforms with the agent's own code: decode_image (quality, preprocessing), Engine (INT8, and FP32 as
a second Engine whose primary is fp32), and pipeline.screen_batch (softmax with the bundle's temperature,
OOD score, triage with the bundle's Policy), the function the daemon itself calls.

    select  --split CSV --data DIR --out DIR --ham N --isic M   copy a fixed sample (host side, read-only source)
    screen  --images DIR --out FILE.json                        screen every image with INT8 and FP32 (each platform)
    compare ARM.json X86.json                                   the table; exit bit 1: INT8 probabilities > 1e-3 apart,
                                                                bit 2: INT8 decisions differ, bit 4: FP32 probabilities
                                                                > 1e-3 apart, bit 8: FP32 decisions differ

Pure standard library + numpy + edge_agent, so the same file runs in the arm64 root file system.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

BAR = 1e-3  # the probability bar
VARIANTS = ("int8", "fp32")


def _select(args: argparse.Namespace) -> int:
    """A fixed, reproducible sample: the test-split images of each source ordered by sha256(image_id), first N.
    Only those files are copied (the shared data folder is only read)."""
    from edge_agent.bundle import default_bundle_path

    manifest = json.loads((default_bundle_path() / "manifest.json").read_text())
    folders = {s: Path(v["path"]).name for s, v in manifest["training"]["sources"].items()}
    want = {"ham10000": args.ham, "isic2017": args.isic}
    rows: dict[str, list[str]] = {s: [] for s in want}
    with open(args.split, newline="") as f:
        for r in csv.DictReader(f):
            if r["split"] == "test" and r["source"] in rows:
                rows[r["source"]].append(r["image_id"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for source, n in want.items():
        ids = sorted(rows[source], key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:n]
        src = Path(args.data) / folders[source] / "images"
        missing = [i for i in ids if not (src / f"{i}.jpg").is_file()]
        if missing:
            print(f"{len(missing)} sampled images are not in {src} (first: {missing[0]}.jpg): point AARCH64_DATA at the "
                  "folder that holds the build's data sources", file=sys.stderr)
            return 1
        for i in ids:
            shutil.copyfile(src / f"{i}.jpg", out / f"{source}__{i}.jpg")
        print(f"  {source}: {len(ids)} of {len(rows[source])} test-split images from {src}")
    return 0


def _screen(args: argparse.Namespace) -> int:
    from edge_agent.bundle import default_bundle_path, load_bundle
    from edge_agent.config import Settings
    from edge_agent.decode import QualityLimits, decode_image
    from edge_agent.infer import Engine
    from edge_agent.pipeline import screen_batch
    from edge_agent.triage import Policy, softmax

    class Recording(Engine):
        """The agent's Engine, keeping the raw logits and pooled features of the last batch (no second run)."""

        last: tuple[Any, Any, str]

        def infer_features(self, x, pooled=True):  # type: ignore[no-untyped-def]
            self.last = super().infer_features(x, pooled)
            return self.last

    s = Settings()
    limits = QualityLimits(s.min_sharpness, s.min_brightness, s.max_brightness, s.max_clipped_fraction)
    bundle = load_bundle(default_bundle_path())
    policy = Policy.from_bundle(bundle)
    engines = {v: Recording(replace(bundle, primary=v, fallback=None)) for v in VARIANTS}
    files = sorted(Path(args.images).glob("*.jpg"))
    out: dict[str, Any] = {"machine": platform.machine(), "model_id": bundle.model_id, "images": {}}
    for k in range(0, len(files), s.batch_size):  # the daemon's batch size; decoded a batch at a time
        chunk = [(p, decode_image(p.read_bytes(), bundle.preprocessing, s.max_pixels, limits))
                 for p in files[k:k + s.batch_size]]
        for p, d in chunk:
            out["images"][p.name] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                     "poor_quality": d.quality.poor}
        for v, engine in engines.items():
            # sha256 None: no FP32 spot-check (its model_disagreement reason is what this file measures directly)
            rows = screen_batch(engine, engine.bundle, policy, policy.to_json(), [(None, d) for _, d in chunk], 0.0)
            logits, pooled, variant = engine.last
            if variant != v:
                raise SystemExit(f"the {v} engine ran {variant}")
            # unrounded probabilities and OOD scores (the row rounds them), from the same logits and features
            ood = bundle.ood.score(pooled, v) if bundle.ood is not None and pooled is not None else [None] * len(chunk)
            for (p, _), row, pr, o in zip(chunk, rows, softmax(logits, policy.temperature), ood, strict=True):
                out["images"][p.name][v] = {
                    "p": [float(x) for x in pr], "label": row["label"], "reasons": row["review_reasons"],
                    "rules": row["high_risk_rules"], "needs_review": row["needs_review"],
                    "ood_score": None if o is None else float(o)}
        if (k + len(chunk)) % 100 < s.batch_size:
            print(f"{platform.machine()}: {k + len(chunk)} of {len(files)} images", file=sys.stderr, flush=True)
    out["labels"] = list(bundle.labels)
    out["thresholds"] = policy.thresholds()
    out["rules"] = {r.name: list(r.labels) for r in policy.rules}
    out["ood_thresholds"] = bundle.ood.thresholds if bundle.ood is not None else {}
    out["gate"] = {k: bundle.manifest.get("gate", {}).get(k) for k in ("agreement", "limits")}
    Path(args.out).write_text(json.dumps(out))
    print(f"  {platform.machine()}: {len(files)} images screened with {', '.join(VARIANTS)} ({bundle.model_id})")
    return 0


def _decisions(r: dict[str, Any]) -> dict[str, Any]:
    return {"label": r["label"], "review flag": r["needs_review"], "review reasons": r["reasons"],
            "high-risk rules": r["rules"], "ood flag": "out_of_distribution" in r["reasons"].split(",")}


def _compare(args: argparse.Namespace) -> int:
    import numpy as np

    a, x = json.loads(Path(args.arm).read_text()), json.loads(Path(args.x86).read_text())
    names = sorted(x["images"])
    if sorted(a["images"]) != names or a["model_id"] != x["model_id"]:
        print("FAIL: the two platforms did not screen the same images with the same model")
        return 15
    shas = sum(a["images"][n]["sha256"] != x["images"][n]["sha256"] for n in names)
    print(f"{len(names)} images ({sum(n.startswith('ham10000') for n in names)} HAM10000 test split, "
          f"{sum(n.startswith('isic2017') for n in names)} ISIC 2017 test split), model {x['model_id']}, "
          f"{a['machine']} vs {x['machine']}; files differing: {shas}")
    rc = 0
    kinds = ("label", "review flag", "review reasons", "high-risk rules", "ood flag")
    summary: dict[str, dict[str, Any]] = {}
    for bit, v in ((1, "int8"), (4, "fp32")):
        pa = np.array([a["images"][n][v]["p"] for n in names])
        px = np.array([x["images"][n][v]["p"] for n in names])
        d = np.abs(pa - px).max(1)
        oa = np.array([a["images"][n][v]["ood_score"] or 0.0 for n in names])
        ox = np.array([x["images"][n][v]["ood_score"] or 0.0 for n in names])
        diff = {k: [n for n in names if _decisions(a["images"][n][v])[k] != _decisions(x["images"][n][v])[k]]
                for k in kinds}
        any_diff = sorted({n for k in kinds for n in diff[k]})
        summary[v] = dict(max=d.max(), p99=np.percentile(d, 99), median=np.median(d), over=int((d > BAR).sum()),
                          ood=np.abs(oa - ox).max(), diff=diff, any=any_diff)
        rc |= bit if d.max() > BAR else 0
        rc |= 2 * bit if any_diff else 0
    n = len(names)
    print()
    print(f"{'aarch64 vs x86-64, per image':<44} {'INT8':>12} {'FP32':>12}")
    for key, what in (("max", "max |dp| (any class)"), ("p99", "p99 of per-image max |dp|"),
                      ("median", "median of per-image max |dp|")):
        print(f"{what:<44} {summary['int8'][key]:>12.2e} {summary['fp32'][key]:>12.2e}")
    print(f"{'images with max |dp| > 1e-3':<44} {summary['int8']['over']:>12} {summary['fp32']['over']:>12}")
    print(f"{'max |d OOD score|':<44} {summary['int8']['ood']:>12.2e} {summary['fp32']['ood']:>12.2e}")
    for k in kinds:
        print(f"{'images whose ' + k + ' differs':<44} {len(summary['int8']['diff'][k]):>8} / {n} "
              f"{len(summary['fp32']['diff'][k]):>6} / {n}")
    print(f"{'images with any decision different':<44} {len(summary['int8']['any']):>8} / {n} "
          f"{len(summary['fp32']['any']):>6} / {n}")
    print()
    print(f"{'INT8 vs its own FP32 (the gate measure)':<44} {'aarch64':>12} {'x86-64':>12}")
    for what, key in (("label agreement", "label"), ("review flag agreement", "review flag"),
                      ("high-risk rules agreement", "high-risk rules")):
        vals = [sum(_decisions(r["int8"])[key] == _decisions(r["fp32"])[key] for r in (p["images"][m] for m in names))
                for p in (a, x)]
        print(f"{what:<44} {vals[0]:>5}/{n} {100 * vals[0] / n:5.1f}% {vals[1]:>5}/{n} {100 * vals[1] / n:5.1f}%")
    gate = x.get("gate") or {}
    if gate.get("agreement") is not None:
        print(f"(the build's gate: INT8/FP32 label agreement {100 * gate['agreement']:.2f}% on the x86-64 test split, "
              f"limit {100 * gate['limits']['min_agreement']:.0f}%)")
    # How close the reference (x86-64 INT8) sits to each decision boundary: a platform difference of up to
    # the measured max |dp| can only flip an image closer than that to a threshold.
    worst = summary["int8"]["max"]
    labels = x["labels"]
    near = 0
    for m in names:
        p = dict(zip(labels, x["images"][m]["int8"]["p"], strict=True))
        top = sorted(p.values(), reverse=True)
        close = top[0] - top[1] <= 2 * worst
        close |= any(abs(sum(p[l] for l in ls) - x["thresholds"][r]) <= worst for r, ls in x["rules"].items())
        close |= "low_confidence" in x["thresholds"] and abs(top[0] - x["thresholds"]["low_confidence"]) <= worst
        ood, th = x["images"][m]["int8"]["ood_score"], x["ood_thresholds"].get("int8")
        close |= ood is not None and th is not None and abs(ood - th) <= summary["int8"]["ood"]
        near += bool(close)
    print(f"\nimages whose x86-64 INT8 result lies within the measured INT8 max |dp| ({worst:.2e}) of a decision "
          f"boundary (top-2 margin, a rule or low_confidence threshold; or within the max |d OOD score| of the OOD "
          f"threshold): {near} / {n}")
    for v in VARIANTS:
        for m in summary[v]["any"]:
            ra, rx = a["images"][m][v], x["images"][m][v]
            print(f"  {v} differs: {m}: aarch64 {ra['label']} [{ra['reasons'] or '-'}] rules [{ra['rules'] or '-'}] "
                  f"ood {ra['ood_score']}; x86-64 {rx['label']} [{rx['reasons'] or '-'}] rules [{rx['rules'] or '-'}] "
                  f"ood {rx['ood_score']}")
    Path(args.summary).write_text(json.dumps({v: {"max": f"{summary[v]['max']:.2e}", "any": len(summary[v]["any"]),
                                                  "n": n} for v in VARIANTS})) if args.summary else None
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("select")
    s.add_argument("--split", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--ham", type=int, default=400)
    s.add_argument("--isic", type=int, default=200)
    s = sub.add_parser("screen")
    s.add_argument("--images", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("compare")
    s.add_argument("arm")
    s.add_argument("x86")
    s.add_argument("--summary")
    args = ap.parse_args(argv)
    return {"select": _select, "screen": _screen, "compare": _compare}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
