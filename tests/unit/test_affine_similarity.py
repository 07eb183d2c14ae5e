"""Similarity terms of common.registration.similarity against MONAI and closed-form values."""

from __future__ import annotations

import pytest
import torch
from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss

from common.registration.similarity import box_sum, lncc_loss, mi_loss, mind_descriptor, mse_loss, ncc_loss


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g)
    return a, 0.6 * a + 0.4 * torch.rand(shape, generator=g)


def test_box_sum_counts_cube_inside_image():
    ones = torch.ones(1, 1, 5, 6, 7)
    out = box_sum(ones, 3)
    assert out[0, 0, 2, 2, 2] == 27  # interior: full 3x3x3 cube
    assert out[0, 0, 0, 0, 0] == 8  # corner: 2x2x2 inside the image
    assert out[0, 0, 0, 3, 3] == 18  # face: 2x3x3


@pytest.mark.parametrize("shape", [(2, 1, 12, 11, 7), (2, 2, 13, 10)])
@pytest.mark.parametrize("kernel_size", [3, 7])
def test_lncc_matches_monai_rectangular(shape, kernel_size):
    a, b = _pair(shape)
    monai = LocalNormalizedCrossCorrelationLoss(
        spatial_dims=len(shape) - 2, kernel_size=kernel_size, kernel_type="rectangular", reduction="none"
    )(a, b)
    torch.testing.assert_close(lncc_loss(a, b, kernel_size=kernel_size), monai.flatten(1).mean(1))


def test_lncc_mask_selects_voxels():
    a, b = _pair((1, 1, 10, 10, 6))
    mask = torch.zeros(1, 1, 10, 10, 6)
    mask[..., 2:7, 3:9, :] = 1
    full = LocalNormalizedCrossCorrelationLoss(
        spatial_dims=3, kernel_size=3, kernel_type="rectangular", reduction="none"
    )
    expected = full(a, b)[..., 2:7, 3:9, :].mean()
    torch.testing.assert_close(lncc_loss(a, b, mask=mask, kernel_size=3)[0], expected)


def test_ncc_and_mse_closed_form():
    a, _ = _pair((2, 1, 8, 9))
    torch.testing.assert_close(ncc_loss(3.0 * a + 1.0, a), torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(ncc_loss(-a, a), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(mse_loss(a + 0.5, a), torch.tensor([0.25, 0.25]))


def test_mi_unmasked_is_monai_and_all_ones_mask_agrees():
    a, b = _pair((2, 1, 9, 8, 5))
    monai = GlobalMutualInformationLoss(num_bins=16, reduction="none")(a, b)
    torch.testing.assert_close(mi_loss(a, b, num_bins=16), monai)
    torch.testing.assert_close(mi_loss(a, b, mask=torch.ones(1, 1, 9, 8, 5), num_bins=16), monai, rtol=1e-4, atol=1e-5)


def test_mi_mask_equals_mi_of_the_masked_voxels():
    # weights 0/1: the histogram of the selected block alone (MONAI on the cropped block)
    a, b = _pair((1, 1, 12, 10))
    mask = torch.zeros(1, 1, 12, 10)
    mask[..., 3:9, 2:8] = 1
    expected = GlobalMutualInformationLoss(num_bins=12, reduction="none")(a[..., 3:9, 2:8], b[..., 3:9, 2:8])
    torch.testing.assert_close(mi_loss(a, b, mask=mask, num_bins=12), expected, rtol=1e-4, atol=1e-5)


def test_mind_is_contrast_invariant_and_shaped():
    a, _ = _pair((1, 1, 12, 11, 8))
    d3 = mind_descriptor(a)
    assert d3.shape == (1, 6, 12, 11, 8)
    torch.testing.assert_close(mind_descriptor(1.0 - 2.0 * a), mind_descriptor(a), rtol=1e-4, atol=1e-5)
    assert mind_descriptor(a[..., 0]).shape == (1, 4, 12, 11)
    assert float(d3.amax(1).min()) == pytest.approx(1.0)  # each voxel's largest entry is normalised to 1
