"""SSIM-L1 image distance and the L1 flow-gradient regulariser (SST Eqs. 4 and 9)."""

from __future__ import annotations

import math

import pytest
import torch

from common.losses.image_similarity import SSIML1Loss, flow_gradient_l1


def test_ssim_l1_zero_for_identical_images():
    torch.manual_seed(0)
    u = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    assert float(SSIML1Loss()(u, u)) < 1e-6


def test_ssim_l1_constant_images_hand_value():
    """u = 0.5, v = -0.5 -> [0, 1] means 0.75, 0.25; SSIM = luminance term only (variances 0)."""
    u = torch.full((1, 1, 12, 12, 12), 0.5)
    v = torch.full((1, 1, 12, 12, 12), -0.5)
    c1 = 0.01**2
    ssim = (2 * 0.75 * 0.25 + c1) / (0.75**2 + 0.25**2 + c1)
    assert math.isclose(float(SSIML1Loss()(u, v)), 1.0 + (1 - ssim), rel_tol=1e-3)  # float32 window sums
    assert math.isclose(float(SSIML1Loss(l1_weight=0.5, ssim_weight=0.5)(u, v)), 0.5 + 0.5 * (1 - ssim), rel_tol=1e-3)


def test_ssim_l1_bounds_and_window_check():
    torch.manual_seed(1)
    u, v = torch.rand(1, 1, 16, 16, 16) * 2 - 1, torch.rand(1, 1, 16, 16, 16) * 2 - 1
    value = float(SSIML1Loss(l1_weight=0.5, ssim_weight=0.5)(u, v))
    assert 0.0 < value <= 0.5 * 2 + 0.5 * 2
    with pytest.raises(ValueError, match="window"):
        SSIML1Loss(win_size=7)(torch.zeros(1, 1, 16, 16, 4), torch.zeros(1, 1, 16, 16, 4))


def test_multiscale_needs_large_volumes():
    loss = SSIML1Loss(multiscale=True)
    with pytest.raises(Exception):  # noqa: B017 - MONAI raises its own error for sides <= (7 - 1) * 2**4
        loss(torch.zeros(1, 1, 64, 64, 64), torch.zeros(1, 1, 64, 64, 64))


@pytest.mark.parametrize("slope", [0.5, -2.0])
def test_flow_gradient_of_linear_field(slope):
    d = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1).expand(1, 3, 8, 6, 5)
    assert math.isclose(float(flow_gradient_l1(slope * d)), abs(slope) / 3, rel_tol=1e-6)
    assert float(flow_gradient_l1(torch.full((1, 3, 4, 4, 4), 7.0))) == 0.0
