"""The leave-one-source-out sweep (made for a lent GPU) on a CPU with tiny settings: the ablation steps, the
two finals, the time budget and the exported results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.build_fixtures import make_ham, make_isic_like


def _tiny_sweep(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """A sweep with tiny settings on tiny two-source fixtures, into tmp_path/sweep; 25 s of budget."""
    ham = make_ham(tmp_path / "ham", lesions_per_class=4, images_per_lesion=2)
    isic = make_isic_like(tmp_path / "isic", lesions_per_class=6)
    return subprocess.run([sys.executable, "-m", "build_model.sweep", "--data", f"ham10000={ham}", "--data",
                           f"isic2017={isic}", "--holdout", "isic2017", "--out", str(tmp_path / "sweep"), "--device",
                           "cpu", "--batch-size", "8", "--image-size", "48", "--abl-epochs", "1", "--final-epochs", "1",
                           "--min-final-epochs", "1", "--budget", "25", *extra], capture_output=True, text=True, timeout=600)


def test_sweep_runs_steps_and_finals_within_its_budget_and_exports_them(tmp_path: Path) -> None:
    export = tmp_path / "export"
    r = _tiny_sweep(tmp_path, "--export", str(export))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((export / "sweep.json").read_text())
    runs = {x["name"]: x for x in res["runs"]}
    assert runs["base"]["kept"] is True
    ho = runs["base"]["eval_none"]["isic2017-all"]
    assert ho["n"] == 18 and 0 <= ho["mel_auc"] <= 1 and len(ho["mel_auc_ci"]) == 2
    assert runs["loso"]["final"] and runs["final"]["final"]
    assert "isic2017-test" in runs["final"]["eval_none"] and "isic2017-all" in runs["loso"]["eval_hflip"]
    skipped = [x["name"] for x in res["runs"] if x.get("skipped")]
    assert skipped, "a 25 s budget cannot fit every step: the sweep must skip, not overrun"
    assert (export / "loso.pt").exists() and (export / "final.pt").exists()
    table = subprocess.run([sys.executable, "-m", "build_model.sweep", "table", str(export / "sweep.json")],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "| base | yes |" in table.stdout and "skipped" in table.stdout


def test_sweep_with_seeds_trains_each_step_at_every_seed_and_judges_the_mean(tmp_path: Path) -> None:
    """Two seeds of one recipe can differ more than a step gains (docs/generalisation.md, session 13): with
    --seeds 2 the base trains twice on the same split, and what the step is judged on is the mean."""
    r = _tiny_sweep(tmp_path, "--seeds", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    out, ham = tmp_path / "sweep", tmp_path / "ham"
    res = json.loads((out / "sweep.json").read_text())
    assert res["seeds"] == 2
    runs = {x["name"]: x for x in res["runs"]}
    a, b = runs["base"], runs["base s1"]
    assert (a["config"]["seed"], b["config"]["seed"]) == (0, 1) and a["kept"] and b["kept"]
    scores = [x["eval_none"]["isic2017-select"]["mel_auc"] for x in (a, b)]
    assert a["select_mean"] == b["select_mean"] == sum(scores) / 2
    assert runs["loso"]["config"]["seed"] == 0, "the finals train once, at the base seed"
    assert "mean" in (out / "sweep.log").read_text() and "spread" in (out / "sweep.log").read_text()
    bad = subprocess.run([sys.executable, "-m", "build_model.sweep", "--data", f"ham10000={ham}", "--holdout", "ham10000",
                          "--out", str(tmp_path / "bad"), "--seeds", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "seeds must be at least 1" in bad.stderr
