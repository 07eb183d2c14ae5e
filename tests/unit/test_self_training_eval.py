"""Learn2Reg-style registration evaluation (common.engines.registration_eval): pitfalls 13 (SDlogJ) and 14 (Dice)."""

import math

import numpy as np
import torch

from common.engines.registration_eval import NamePairOutputsd, l2r_sdlogj, pair_metrics
from common.registration import fields


def test_l2r_sdlogj_of_a_known_field_uses_channel_i_along_axis_i():
    shape, a = (16, 12, 20), 0.5
    d = fields.identity_grid(shape)[0, 2]
    ddf = torch.zeros(1, 3, *shape)
    ddf[0, 2] = a * torch.sin(2 * math.pi * d / shape[2])  # the d-displacement varies along d only
    # central difference: J = 1 + a sin(2 pi / D) cos(2 pi d / D) on the [2:-2] crop
    jac = 1 + a * math.sin(2 * math.pi / shape[2]) * torch.cos(2 * math.pi * d / shape[2])
    expected = torch.log(jac[2:-2, 2:-2, 2:-2].double() + 3).std(unbiased=False)
    result = l2r_sdlogj(ddf)
    assert math.isclose(result["sdlogj"], float(expected), rel_tol=1e-5)
    assert result["folding_percent"] == 0.0
    # transposed channels (the reference's mix-up) would see no variation along the differentiated axis
    swapped = l2r_sdlogj(ddf.flip(1))
    assert swapped["sdlogj"] < 0.5 * result["sdlogj"]


def test_folding_percent_counts_non_positive_determinants():
    ddf = torch.zeros(1, 3, 10, 10, 10)
    ddf[0, 0] = -1.5 * fields.identity_grid((10, 10, 10))[0, 0]  # x -> -0.5 x: J = -0.5 everywhere
    assert l2r_sdlogj(ddf)["folding_percent"] == 100.0


def test_dice_leaves_out_labels_missing_in_either_map_and_averages_per_pair():
    fixed = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    moving = torch.zeros_like(fixed)
    fixed[0, :4] = 1
    moving[0, :2] = 1  # label 1: Dice 2*2/(4+2) = 2/3
    fixed[0, 6:] = 2  # label 2 absent from moving: left out, not 0
    moving[0, 4:6] = 3  # label 3 absent from fixed: left out
    dice, summary = pair_metrics(fixed, moving, None, {1: "a", 2: "b", 3: "c"})
    assert set(dice) == {"a"} and math.isclose(dice["a"], 2 / 3, rel_tol=1e-6)
    assert math.isclose(summary["dice"], 2 / 3, rel_tol=1e-6)
    shift = torch.zeros(1, 3, 8, 8, 8)
    shift[:, 0] = -1.0  # warped(p) = moving(p - 1 along axis 0): label 1 covers rows 1..2
    dice, summary = pair_metrics(fixed, moving, shift, {1: "a", 2: "b", 3: "c"})
    assert math.isclose(dice["a"], 2 * 2 / (4 + 2), rel_tol=1e-6) and "sdlogj" in summary


def test_pair_output_names_and_fixed_affine():
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    fixed = MetaTensor(torch.zeros(1, 4, 4, 4), affine=affine, meta={"filename_or_obj": "/x/sub001.nii.gz"})
    moving = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "/x/sub002.nii.gz"})
    item = NamePairOutputsd(["ddf", "pred"])({"image": fixed, "moving_image": moving, "ddf": torch.ones(3, 4, 4, 4)})
    assert item["ddf"].meta["filename_or_obj"] == "sub002_to_sub001"
    assert np.allclose(np.asarray(item["ddf"].affine), np.asarray(affine)) and "pred" not in item
