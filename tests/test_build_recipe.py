"""`build-model all --recipe FILE`: the stages chain (a second train stage starts from the first's best
checkpoint), and the manifest records the recipe and every stage's full command and settings.
Also: the shipped recipe (recipes/default.toml) parses and says what the default bundle's manifest says."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from build_model.errors import ConfigError
from build_model.recipe import load_recipe
from edge_agent.bundle import load_bundle
from tests.build_fixtures import make_ham, make_isic_like
from tests.bundle_factory import TEST_PRIVATE_KEY

ROOT = Path(__file__).resolve().parents[1]

TWO_STAGES = """
name = "tiny-two-stage"
seed = 0
base = "."
[data]
ham10000 = "data/ham"
isic2017 = "data/isic"
[options]
drop_small_classes = false
[[stage]]
kind = "train"
name = "small"
image_size = 48
epochs = 1
batch_size = 8
lr = 1e-3
threads = 2
max_source_side = 80
augment = "artefacts,zoom,aspect"
source_power = 0.5
[[stage]]
kind = "train"
name = "large"
init_from = "@previous"
image_size = 64
epochs = 1
batch_size = 8
lr = 5e-4
threads = 2
max_source_side = 80
augment = "artefacts,zoom,aspect"
masked_loss = true
source_power = 0.5
[[stage]]
kind = "quantize"
adaround_iters = 0
calib_size = 14
[[stage]]
kind = "validate"
tta = "none"
[[stage]]
kind = "bundle"
"""


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "build_model", *args], capture_output=True, text=True, timeout=900,
                          cwd=cwd)


def test_two_stage_recipe_chains_the_stages_and_the_manifest_records_them(tmp_path: Path) -> None:
    make_ham(tmp_path / "data" / "ham", lesions_per_class=4, images_per_lesion=2)
    make_isic_like(tmp_path / "data" / "isic", lesions_per_class=4)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(TWO_STAGES)
    out, work = tmp_path / "bundle", tmp_path / "work"
    r = cli("all", "--recipe", str(recipe), "--out", str(out), "--workdir", str(work),
            "--signing-key", str(TEST_PRIVATE_KEY))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "stage small (train 48 px" in r.stderr and f"stage large (train 64 px, 1 epochs, from {work / 'small' / 'best.pt'})" in r.stderr
    assert f"initialised from {work / 'small' / 'best.pt'}" in r.stderr  # the second stage really started from the first
    m = load_bundle(out).manifest
    t = m["training"]
    assert t["recipe"]["text"] == TWO_STAGES and t["recipe"]["name"] == "tiny-two-stage"
    assert t["recipe"]["data"] == {"ham10000": str(tmp_path / "data" / "ham"), "isic2017": str(tmp_path / "data" / "isic")}
    assert [(s["kind"], s["name"]) for s in t["stages"]] == [
        ("train", "small"), ("train", "large"), ("export", "export"), ("quantize", "quantize"),
        ("validate", "validate"), ("bundle", "bundle")]
    small, large = t["stages"][0], t["stages"][1]
    assert small["settings"]["image_size"] == 48 and small["settings"]["init_from"] == ""
    assert large["settings"]["image_size"] == 64 and large["settings"]["init_from"] == str(work / "small" / "best.pt")
    assert large["settings"]["lr"] == 5e-4 and large["settings"]["label_smoothing"] == 0.1  # full settings, defaults too
    assert t["config"] == large["settings"] and m["preprocessing"]["input_size"] == 64  # the bundle is the last stage's
    assert small["best_epoch"] == 1 and large["best_epoch"] == 1
    # Every stage's command is a real stand-alone command line for that stage.
    cmd = shlex.split(large["command"])
    assert cmd[:2] == ["build-model", "train"] and cmd[cmd.index("--workdir") + 1] == str(work / "large")
    assert cmd[cmd.index("--init-from") + 1] == str(work / "small" / "best.pt")
    assert cmd[cmd.index("--image-size") + 1] == "64" and "--masked-loss" in cmd
    assert f"ham10000={tmp_path / 'data' / 'ham'}" in cmd
    q = shlex.split(t["stages"][3]["command"])
    assert q[1] == "quantize" and q[q.index("--adaround-iters") + 1] == "0" and q[q.index("--calib-size") + 1] == "14"
    assert m["build_command"].startswith("build-model all --recipe")
    # The recorded quantize command reruns that stage on its own (same split, same work folder).
    again = cli(*q[1:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "quantize: chose" in again.stderr


def test_data_override_and_recipe_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(TWO_STAGES)
    r = cli("all", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"recipe source ham10000: {tmp_path / 'data' / 'ham'} does not exist" in r.stderr and "--data ham10000=PATH" in r.stderr
    r = cli("all", "--recipe", str(recipe), "--data", "nope=/tmp", "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "the recipe has no source 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = cli("all", "--recipe", str(recipe), "--epochs", "3", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--epochs belong in the recipe file" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(TWO_STAGES.replace("lr = 5e-4", "learning_rate = 5e-4"))
    make_ham(tmp_path / "data" / "ham", lesions_per_class=3, images_per_lesion=1)
    make_isic_like(tmp_path / "data" / "isic", lesions_per_class=3)
    r = cli("all", "--recipe", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "unknown setting(s) ['learning_rate']" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ConfigError, match="names no earlier train stage"):
        bad.write_text(TWO_STAGES.replace('init_from = "@previous"', 'init_from = "@nosuch"'))
        load_recipe(bad)
    with pytest.raises(ConfigError, match="resize = 'zoom'; one of shorter_side_center_crop, stretch, lesion_crop"):
        bad.write_text(TWO_STAGES.replace("image_size = 64", 'image_size = 64\nresize = "zoom"'))
        load_recipe(bad)
    with pytest.raises(ConfigError, match="train stages come first"):
        bad.write_text(TWO_STAGES + '[[stage]]\nkind = "train"\nname = "late"\n')
        load_recipe(bad)


def test_the_shipped_recipe_describes_the_default_bundle() -> None:
    """recipes/default.toml's train stage is exactly the shipped bundle's recorded training config."""
    data = ROOT.parent / "shared" / "data"
    overrides = () if (data / "ham10000").exists() and (data / "isic2017-train").exists() else \
        ("ham10000=" + str(ROOT), "isic2017=" + str(ROOT))  # without the data: parse only (any existing folder)
    recipe = load_recipe(ROOT / "recipes" / "default.toml", overrides)
    shipped = json.loads((ROOT / "edge_agent" / "bundle" / "manifest.json").read_text())["training"]
    (train,) = recipe.train_stages()
    from build_model.recipe import train_config
    from dataclasses import asdict

    from build_model.train import TrainConfig

    cfg = asdict(train_config(train, recipe.seed, Path("/w")))
    recorded = {**asdict(TrainConfig()), **shipped["config"]}  # settings added since the bundle: their defaults
    operational = {"device", "workers", "threads", "ckpt_every"}  # where and how fast, not what is learnt
    assert {k: v for k, v in cfg.items() if k not in operational} == \
        {k: v for k, v in recorded.items() if k not in operational}
    assert set(recipe.data) == set(shipped["sources"]) and recipe.seed == shipped["seed"]
    if not overrides:
        # the shipped paths are where the data lay on the build machine: the same folders under shared/data
        assert {n: Path(p).parts[-3:] for n, p in recipe.data.items()} == \
            {n: Path(s["path"]).parts[-3:] for n, s in shipped["sources"].items()}


def test_a_plain_all_records_its_stages_and_an_equivalent_recipe(tmp_path: Path) -> None:
    """A bundle built from flags carries the recipe that rebuilds it: the recorded text parses and names the same
    settings and data."""
    ham = make_ham(tmp_path / "ham", lesions_per_class=3, images_per_lesion=1)
    out = tmp_path / "b"
    r = cli("all", "--data", f"ham10000={ham}", "--out", str(out), "--epochs", "1", "--image-size", "48",
            "--batch-size", "8", "--threads", "2", "--max-source-side", "80", "--calib-size", "7",
            "--adaround-iters", "0", "--signing-key", str(TEST_PRIVATE_KEY))
    assert r.returncode == 0, r.stderr[-3000:]
    t = load_bundle(out).manifest["training"]
    assert [s["kind"] for s in t["stages"]] == ["train", "export", "quantize", "validate", "bundle"]
    assert t["stages"][0]["settings"] == t["config"] and t["stages"][2]["settings"] == {"calib_size": 7, "adaround_iters": 0}
    assert shlex.split(t["stages"][0]["command"])[:2] == ["build-model", "train"]
    again = tmp_path / "again.toml"
    again.write_text(t["recipe"]["text"])
    rec = load_recipe(again)
    assert rec.data == {"ham10000": ham.resolve()}
    from build_model.recipe import train_config
    from dataclasses import asdict

    assert asdict(train_config(rec.train_stages()[0], rec.seed, tmp_path)) == t["config"]


def test_the_shipped_recipe_makes_the_shipped_bundles_split() -> None:
    """With the data at the recipe's paths, its sources and seed give exactly the default bundle's split.csv."""
    import csv

    from build_model.data import load_sources, parse_label_maps, split_sources

    data = ROOT.parent / "shared" / "data"
    if not ((data / "ham10000").exists() and (data / "isic2017-train").exists()):
        pytest.skip("HAM10000 and ISIC 2017 are not at ../shared/data (README 'Retraining' says where to get them)")
    recipe = load_recipe(ROOT / "recipes" / "default.toml")
    ds = load_sources(list(recipe.data_specs()), parse_label_maps(recipe.label_map))
    split = split_sources(ds, seed=recipe.seed, holdout=recipe.holdout)
    ours = {(ds.source_of[i], ds.ids[i]): split[i] for i in range(len(ds))}
    with open(ROOT / "edge_agent" / "bundle" / "split.csv", newline="") as f:
        shipped = {(r["source"], r["image_id"]): r["split"] for r in csv.DictReader(f)}
    assert len(ours) == len(shipped) == 11994 and ours == shipped

