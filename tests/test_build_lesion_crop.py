"""Training for a `lesion_crop` bundle: the setting reaches the checkpoint's preprocessing, and bad names fail early."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_build_errors import TINY, cli, one_line_error  # noqa: E402

from build_model.train import TrainConfig, preprocessing_for  # noqa: E402
from tests.build_fixtures import make_ham  # noqa: E402


def test_the_training_setting_is_the_bundle_preprocessing() -> None:
    assert preprocessing_for(TrainConfig(image_size=96)).resize == "shorter_side_center_crop"
    pre = preprocessing_for(TrainConfig(image_size=96, resize="lesion_crop"))
    assert pre.resize == "lesion_crop" and pre.input_size == 96 and pre.to_dict()["lesion_margin"] == 0.15


def test_train_with_lesion_crop_writes_it_into_the_checkpoint_and_unknown_rules_fail_first(tmp_path: Path) -> None:
    import torch

    ham = make_ham(tmp_path / "ham", lesions_per_class=3, images_per_lesion=1)
    out = tmp_path / "o"
    line = one_line_error(cli("train", "--data", str(ham), "--out", str(out), *TINY, "--resize", "zoom"), 2)
    assert "'zoom': choose one of shorter_side_center_crop, stretch, lesion_crop" in line
    assert not out.with_name("o.work").exists() or not (out.with_name("o.work") / "last.pt").exists()
    r = cli("train", "--data", str(ham), "--out", str(out), *TINY, "--resize", "lesion_crop")
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(out.with_name("o.work") / "best.pt", map_location="cpu", weights_only=False)
    assert ck["preprocessing"]["resize"] == "lesion_crop" and ck["config"]["resize"] == "lesion_crop"
