"""Displacement conventions: units, axis order, warp direction, composition, resizing, integration, Jacobian."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.registration import fields


def _ramp(shape):
    """Image whose value encodes the voxel index, so a sample position can be read back from the value."""
    grid = fields.identity_grid(shape)[0]
    weights = [100.0, 10.0, 1.0][: len(shape)]
    return sum(w * g for w, g in zip(weights, grid)).unsqueeze(0).unsqueeze(0)


def test_identity_grid_holds_voxel_indices():
    grid = fields.identity_grid((3, 4, 5))
    assert grid.shape == (1, 3, 3, 4, 5)
    assert grid[0, :, 2, 1, 4].tolist() == [2.0, 1.0, 4.0]


def test_zero_field_is_identity_warp():
    image = torch.rand(2, 3, 6, 7, 8)
    assert torch.allclose(fields.warp(image, torch.zeros(2, 3, 6, 7, 8)), image, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_integer_shift_samples_at_p_plus_u_along_the_matching_axis(axis):
    shape = (6, 7, 8)
    image = _ramp(shape)
    ddf = torch.zeros(1, 3, *shape)
    ddf[:, axis] = 2.0
    warped = fields.warp(image, ddf)
    expected = image.roll(-2, dims=2 + axis)  # warped(p) = image(p + 2 e_axis)
    valid = [slice(None)] * 5
    valid[2 + axis] = slice(0, shape[axis] - 2)
    assert torch.allclose(warped[tuple(valid)], expected[tuple(valid)], atol=1e-4)


def test_sampling_grid_matches_hand_normalisation_and_xyz_order():
    shape = (3, 5, 7)
    ddf = torch.zeros(1, 3, *shape)
    ddf[0, 0, 1, 2, 3] = 1.0  # move from axis-0 index 1 to 2 = last index -> +1 normalised
    grid = fields.to_sampling_grid(ddf)
    assert grid.shape == (1, 3, 5, 7, 3)
    # grid_sample's last axis is (x, y, z) = (axis 2, axis 1, axis 0)
    assert torch.allclose(grid[0, 1, 2, 3], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(grid[0, 0, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.allclose(grid[0, 2, 4, 6], torch.tensor([1.0, 1.0, 1.0]))


def test_sampling_grid_agrees_with_monai_warp():
    torch.manual_seed(0)
    image = torch.rand(1, 2, 5, 6, 7)
    ddf = torch.randn(1, 3, 5, 6, 7)
    by_grid = F.grid_sample(image, fields.to_sampling_grid(ddf), align_corners=True, padding_mode="border")
    assert torch.allclose(by_grid, fields.warp(image, ddf), atol=1e-5)


def test_voxel_normalised_factor_and_round_trip():
    ddf = torch.ones(1, 2, 5, 9)
    norm = fields.voxel_to_normalized(ddf)
    assert torch.allclose(norm[:, 0], torch.full((1, 5, 9), 2 / 4))
    assert torch.allclose(norm[:, 1], torch.full((1, 5, 9), 2 / 8))
    assert torch.allclose(fields.normalized_to_voxel(norm), ddf)


def test_warp_labels_is_nearest_and_keeps_dtype():
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    labels[0, 0, 2:4, 2:4] = 3
    ddf = torch.zeros(1, 2, 8, 8)
    ddf[:, 1] = -1.4  # rounds to a one-voxel shift: out(p) = labels(p - 1 along axis 1)
    out = fields.warp_labels(labels, ddf)
    assert out.dtype == torch.uint8
    assert set(out.unique().tolist()) == {0, 3}
    assert torch.equal(out[0, 0, 2:4, 3:5], torch.full((2, 2), 3, dtype=torch.uint8))
    assert out.sum().item() == 3 * 4


def test_compose_equals_sequential_warping():
    torch.manual_seed(1)
    shape = (12, 13, 14)
    image = F.avg_pool3d(torch.rand(1, 1, *shape), 3, 1, 1)
    first = F.avg_pool3d(torch.randn(1, 3, *shape), 5, 1, 2) * 2
    second = F.avg_pool3d(torch.randn(1, 3, *shape), 5, 1, 2) * 2
    sequential = fields.warp(fields.warp(image, first), second)
    composed = fields.warp(image, fields.compose(first, second))
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert (sequential[inner] - composed[inner]).abs().mean() < 0.01


def test_compose_of_constant_shifts_adds_them():
    first = torch.zeros(1, 2, 6, 6)
    first[:, 0] = 1.0
    second = torch.zeros(1, 2, 6, 6)
    second[:, 1] = -2.0
    composed = fields.compose(first, second)
    assert torch.allclose(composed[:, 0], torch.ones(1, 6, 6))
    assert torch.allclose(composed[:, 1], torch.full((1, 6, 6), -2.0))


def test_resize_ddf_rescales_voxel_units():
    ddf = torch.zeros(1, 3, 5, 5, 3)
    ddf[:, 0] = 1.0
    ddf[:, 2] = 0.5
    big = fields.resize_ddf(ddf, (9, 5, 5))
    assert big.shape == (1, 3, 9, 5, 5)
    assert torch.allclose(big[:, 0], torch.full_like(big[:, 0], 2.0))  # (9-1)/(5-1)
    assert torch.allclose(big[:, 1], torch.zeros_like(big[:, 1]))
    assert torch.allclose(big[:, 2], torch.full_like(big[:, 2], 1.0))  # (5-1)/(3-1)


def test_resize_ddf_keeps_the_physical_mapping_of_a_linear_field():
    # u(p) = 0.1 * p0 maps voxel p0 to 1.1 p0; at twice the resolution (n-1 doubles) the same mapping holds
    small = fields.identity_grid((5, 4)) * torch.tensor([0.1, 0.0]).view(1, 2, 1, 1)
    big = fields.resize_ddf(small, (9, 4))
    expected = fields.identity_grid((9, 4)) * torch.tensor([0.1, 0.0]).view(1, 2, 1, 1)
    assert torch.allclose(big, expected, atol=1e-5)


def test_integrate_zero_and_constant_velocity():
    assert torch.allclose(fields.integrate_svf(torch.zeros(1, 3, 6, 6, 6)), torch.zeros(1, 3, 6, 6, 6))
    svf = torch.zeros(1, 3, 6, 6, 6)
    svf[:, 1] = 0.75
    assert torch.allclose(fields.integrate_svf(svf), svf, atol=1e-5)


def test_jacobian_of_affine_field_is_its_determinant():
    angle = math.radians(20)
    matrix = torch.tensor(
        [[1.1 * math.cos(angle), -math.sin(angle), 0.2], [math.sin(angle), 0.9 * math.cos(angle), 0.0], [0, 0.1, 1.2]]
    )
    grid = fields.identity_grid((7, 8, 9))
    ddf = torch.einsum("ij,bj...->bi...", matrix - torch.eye(3), grid)
    det = fields.jacobian_determinant(ddf)
    assert det.shape == (1, 7, 8, 9)
    assert torch.allclose(det, torch.full_like(det, torch.linalg.det(matrix).item()), atol=1e-5)


def test_jacobian_flags_folding():
    grid = fields.identity_grid((6, 6))
    ddf = torch.zeros(1, 2, 6, 6)
    ddf[:, 0] = -2 * grid[:, 0]  # p0 -> -p0: orientation reversed
    det = fields.jacobian_determinant(ddf)
    assert torch.allclose(det, torch.full_like(det, -1.0))


def test_bad_field_shape_is_rejected():
    with pytest.raises(ValueError, match="displacement field"):
        fields.jacobian_determinant(torch.zeros(1, 2, 4, 4, 4))
