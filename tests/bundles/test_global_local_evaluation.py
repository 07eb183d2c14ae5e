"""Preprocessing and evaluation path of the global/local contrastive bundle, through its own config ids.

Spec checks 8 and 11: percentile normalisation maps the 1st/99th percentiles to 0/1 without clipping; feeding the
ground truth as the prediction scores Dice 1 when no resampling is needed, and a native -> r_f (nearest) -> native
(bilinear on one-hot, argmax) round trip keeps a high Dice.
"""

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from tests.bundles.harness import BUNDLES_DIR, bundle_context

ROOT = BUNDLES_DIR / "global_local_contrastive_cardiac_mri_segmentation"


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    from common.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("gl_eval"), preset="cardiac", num_subjects=5, shape=(64, 64, 8))


def _parser(datalist, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(ROOT), "datalist": str(datalist), **overrides})
    return parser


def _dice_of_ground_truth_prediction(datalist, spacing: float, image_size: int) -> float:
    with bundle_context(ROOT):
        parser = _parser(datalist, target_spacing=[spacing, spacing], image_size=image_size)
        entry = parser.get_parsed_content("val_datalist")[0]
        val_pre = parser.get_parsed_content("validate#preprocessing")
        train_pre = parser.get_parsed_content("train#deterministic_transforms", instantiate=True)
        post = parser.get_parsed_content("validate#postprocessing")
        item = val_pre(dict(entry))
        on_grid = dict(entry)
        for t in train_pre:
            on_grid = t(on_grid)
        # the label resampled (nearest) to the network grid, as one-hot scores, plays the prediction
        onehot = torch.nn.functional.one_hot(on_grid["label"][0].long(), 4).permute(3, 0, 1, 2).float()
        item["pred"] = onehot * 20.0
        out = post(item)
        pred, gt = out["pred"].argmax(0), out["label"].argmax(0)
        assert pred.shape == gt.shape == item["label"].shape[1:]
        dices = [2.0 * ((pred == c) & (gt == c)).sum() / ((pred == c).sum() + (gt == c).sum()) for c in (1, 2, 3)]
        return float(torch.stack(dices).mean())


def test_ground_truth_scores_one_without_resampling(datalist):
    assert _dice_of_ground_truth_prediction(datalist, 1.0, 64) == pytest.approx(1.0, abs=1e-6)


def test_resampling_round_trip_keeps_dice_high(datalist):
    assert _dice_of_ground_truth_prediction(datalist, 1.367, 64) >= 0.9


def test_percentile_normalisation_unclipped(datalist):
    with bundle_context(ROOT):
        parser = _parser(datalist)
        normalise = parser.get_parsed_content("image_transforms")[0]
    rng = np.random.default_rng(0)
    volume = torch.as_tensor(rng.gamma(2.0, 50.0, size=(1, 20, 20, 6)), dtype=torch.float32)
    out = normalise({"image": volume})["image"].numpy()
    assert np.percentile(out, 1) == pytest.approx(0.0, abs=1e-5)
    assert np.percentile(out, 99) == pytest.approx(1.0, abs=1e-5)
    assert out.min() < 0.0 or out.max() > 1.0  # not clipped
