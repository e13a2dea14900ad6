"""Dataset layouts and the lesion-grouped split."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from build_model.data import grouped_split, load_dataset, read_split, write_split
from tests.build_fixtures import LABELS, make_folder, make_ham, make_npz


def test_ham_layout_and_grouped_split_never_splits_a_lesion(tmp_path: Path) -> None:
    ds = load_dataset(make_ham(tmp_path / "ham", lesions_per_class=6, images_per_lesion=3))
    assert ds.labels == LABELS and len(ds) == 7 * 6 * 3
    split = grouped_split(ds, seed=1)
    by_lesion: dict[str, set[str]] = {}
    for g, s in zip(ds.groups, split):
        by_lesion.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in by_lesion.values()), "a lesion straddles two splits"
    for s in ("train", "val", "test"):  # stratified: every class in every split
        assert set(ds.y[split == s]) == set(range(7)), s


def test_split_is_seeded_and_round_trips_through_csv(tmp_path: Path) -> None:
    ds = load_dataset(make_ham(tmp_path / "ham"))
    a, b, c = grouped_split(ds, seed=3), grouped_split(ds, seed=3), grouped_split(ds, seed=4)
    assert (a == b).all() and not (a == c).all()
    write_split(tmp_path / "split.csv", ds, a)
    assert (read_split(tmp_path / "split.csv", ds) == a).all()


def test_read_split_refuses_a_split_of_other_data(tmp_path: Path) -> None:
    ds = load_dataset(make_ham(tmp_path / "ham"))
    write_split(tmp_path / "split.csv", ds, grouped_split(ds))
    other = load_dataset(make_ham(tmp_path / "ham2", lesions_per_class=5))
    with pytest.raises(ValueError, match="does not cover"):
        read_split(tmp_path / "split.csv", other)


def test_folder_layout(tmp_path: Path) -> None:
    ds = load_dataset(make_folder(tmp_path / "f"))
    assert ds.labels == LABELS[:3] and len(ds) == 12
    assert ds.image(0).shape == (60, 80, 3)


def test_medmnist_npz_keeps_its_own_split(tmp_path: Path) -> None:
    ds = load_dataset(make_npz(tmp_path / "dermamnist.npz"))
    assert ds.labels == LABELS
    split = grouped_split(ds)
    assert (split == "train").sum() == 14 and (split == "test").sum() == 14
    assert ds.image(0).shape == (28, 28, 3) and ds.image(0).dtype == np.uint8


def test_missing_data_path_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--data"):
        load_dataset(tmp_path / "nope")
