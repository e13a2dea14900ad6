"""Several training sources: loading, label mapping, per-source splits, the masked loss."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from build_model.data import HOLDOUT, load_sources, parse_label_maps, read_split, split_sources, write_split
from build_model.train import TrainConfig, epoch_order, masked_cross_entropy
from tests.build_fixtures import LABELS, make_ham, make_isic_like


def two_sources(tmp_path: Path, **kw) -> list[str]:
    ham = make_ham(tmp_path / "ham", lesions_per_class=4, images_per_lesion=2)
    isic = make_isic_like(tmp_path / "isic", **kw)
    return [f"ham10000={ham}", f"isic2017={isic}"]


def test_sources_merge_onto_one_label_list_and_remember_what_each_labels(tmp_path: Path) -> None:
    ds = load_sources(two_sources(tmp_path))
    assert ds.labels == LABELS and ds.sources == ["ham10000", "isic2017"]
    assert ds.source_labels["isic2017"] == ["bkl", "mel", "nv"]  # no carcinomas there
    assert ds.source_counts() == {"ham10000": 56, "isic2017": 18}
    mask = ds.label_mask()
    isic_row = mask[ds.source_of.index("isic2017")]
    assert isic_row.tolist() == [lab in ("bkl", "mel", "nv") for lab in LABELS]
    assert mask[0].all()
    assert all(g.startswith(("ham10000/", "isic2017/")) for g in ds.groups)


def test_label_map_renames_and_an_unmapped_label_names_the_file_and_label(tmp_path: Path) -> None:
    specs = two_sources(tmp_path, rename={"mel": "melanoma", "bkl": "seborrheic_keratosis"})
    with pytest.raises(ValueError) as e:
        load_sources(specs)
    msg = str(e.value)
    assert "labels.csv" in msg and ("'melanoma'" in msg or "'seborrheic_keratosis'" in msg) and "--label-map" in msg
    ds = load_sources(specs, parse_label_maps(["isic2017:melanoma=mel,seborrheic_keratosis=bkl"]))
    assert ds.source_labels["isic2017"] == ["bkl", "mel", "nv"]
    with pytest.raises(ValueError, match="FROM=TO"):
        parse_label_maps(["isic2017:melanoma"])
    with pytest.raises(ValueError, match="names source"):
        load_sources(specs, parse_label_maps(["nosuch:a=b"]))


def test_each_source_is_split_on_its_own_and_a_holdout_source_is_never_trained_on(tmp_path: Path) -> None:
    ds = load_sources(two_sources(tmp_path))
    split = split_sources(ds, seed=0)
    src = np.array(ds.source_of)
    for name in ds.sources:
        assert {"train", "val", "test"} <= set(split[src == name])
    held = split_sources(ds, seed=0, holdout="isic2017")
    assert set(held[src == "isic2017"]) == {HOLDOUT} and (held[src == "ham10000"] == split[src == "ham10000"]).all()
    write_split(tmp_path / "split.csv", ds, held)
    rows = list(csv.DictReader(open(tmp_path / "split.csv")))
    assert rows[0].keys() >= {"image_id", "source", "label", "group", "split"}
    assert (read_split(tmp_path / "split.csv", ds) == held).all()
    with pytest.raises(ValueError, match="not one of the sources"):
        split_sources(ds, holdout="nope")


def test_masked_loss_equals_cross_entropy_with_every_class_and_ignores_unlabelled_classes() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 7, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 4, 5, 2, 4])
    w = torch.rand(7, generator=g) + 0.5
    everything = torch.ones(6, 7, dtype=torch.bool)
    ours = masked_cross_entropy(logits, y, everything, w, 0.1)
    ref = F.cross_entropy(logits, y, weight=w, label_smoothing=0.1)
    assert torch.allclose(ours, ref, atol=1e-5)
    allowed = torch.zeros(6, 7, dtype=torch.bool)
    allowed[:, [2, 4, 5]] = True  # a source that labels only bkl, mel, nv
    allowed[:2] = True
    y2 = torch.tensor([0, 1, 4, 5, 2, 4])
    loss = masked_cross_entropy(logits, y2, allowed, w, 0.1)
    loss.backward()
    grad = logits.grad
    assert torch.all(grad[2:][:, [0, 1, 3, 6]] == 0)  # unlabelled classes are neither pushed up nor down
    assert torch.any(grad[2:][:, [2, 4, 5]] != 0)


def test_source_power_balances_how_often_each_source_is_drawn() -> None:
    y = np.array([5] * 900 + [5] * 100)
    src = np.array(["big"] * 900 + ["small"] * 100)
    natural = epoch_order(y, 7, TrainConfig(source_power=0.0, sampling_power=0.0), 0, src)
    balanced = epoch_order(y, 7, TrainConfig(source_power=1.0, sampling_power=0.0), 0, src)
    assert (natural >= 900).mean() < 0.15
    assert 0.4 < (balanced >= 900).mean() < 0.6


def test_thresholds_hold_their_sensitivity_in_each_source() -> None:
    """Pooled, the big source sets the threshold and the small one misses positives; per source, both reach it."""
    from build_model.calibrate import choose_thresholds

    rng = np.random.default_rng(0)
    labels = ["mel", "nv"]
    # big source: melanomas score high; small source: melanomas score lower (another camera)
    big_pos, big_neg = rng.uniform(0.5, 1.0, 200), rng.uniform(0.0, 0.5, 800)
    small_pos, small_neg = rng.uniform(0.2, 0.6, 40), rng.uniform(0.0, 0.3, 160)
    p_mel = np.concatenate([big_pos, big_neg, small_pos, small_neg])
    prob = np.stack([p_mel, 1 - p_mel], 1)
    y = np.array([0] * 200 + [1] * 800 + [0] * 40 + [1] * 160)
    src = ["big"] * 1000 + ["small"] * 200
    pooled = choose_thresholds(prob, y, labels, ["mel"])["melanoma"]
    per = choose_thresholds(prob, y, labels, ["mel"], sources=src)["melanoma"]
    small = slice(1000, 1040)
    assert (p_mel[small] >= pooled["probability"]).mean() < 0.9
    assert (p_mel[small] >= per["probability"]).mean() >= 0.95 and (p_mel[:200] >= per["probability"]).mean() >= 0.95
    assert per["val_by_source"]["small"]["sensitivity"] >= 0.95 and set(per["per_source_thresholds"]) == {"big", "small"}
