"""Coupled convex optimiser (common.registration.convex): spec pitfalls 1, 3, 4, 5, 6, 7, 8 and the gradient path."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.registration import fields
from common.registration.convex import (
    box_filter,
    compose_fields,
    convex_register,
    coupled_convex,
    displacement_table,
    feature_to_voxels,
    feature_voxel_scale,
    inverse_consistency,
    rescale_field,
    sad_cost_volume,
    upsample_field,
)


def smooth_features(shape=(24, 20, 32), channels=16, seed=0) -> torch.Tensor:
    """i.i.d. N(0, 1), Box3^3, standardised per channel (spec pitfall 1)."""
    g = torch.Generator().manual_seed(seed)
    x = box_filter(torch.randn(1, channels, *shape, generator=g), 3)
    return (x - x.mean((2, 3, 4), keepdim=True)) / x.std((2, 3, 4), keepdim=True)


def test_box_filter_equals_repeated_avg_pool_and_is_self_adjoint():
    x = torch.randn(2, 3, 7, 6, 9, dtype=torch.float64)
    expected = x
    for _ in range(3):
        expected = F.avg_pool3d(expected, 3, stride=1, padding=1)
    torch.testing.assert_close(box_filter(x, 3), expected)
    y = torch.randn_like(x)
    # <B x, y> == <x, B y>: the backward may reuse the forward
    assert torch.allclose((box_filter(x, 2) * y).sum(), (x * box_filter(y, 2)).sum())
    assert torch.autograd.gradcheck(lambda t: box_filter(t, 2), (x[:1, :1, :4, :4, :4].clone().requires_grad_(),))


def test_displacement_table_order():
    table = displacement_table(2)
    assert table.shape == (3, 125)
    for k in range(125):
        assert table[:, k].tolist() == [k % 5 - 2, (k // 5) % 5 - 2, k // 25 - 2]


def naive_cost(fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
    """Triple loop over the displacements and the voxels' shifted copies, zero outside, then Box3."""
    _, _, h, w, d = fixed.shape
    cost = torch.zeros(fixed.shape[0], (2 * radius + 1) ** 3, h, w, d, dtype=fixed.dtype)
    k = 0
    for dd in range(-radius, radius + 1):
        for dw in range(-radius, radius + 1):
            for dh in range(-radius, radius + 1):
                shifted = torch.zeros_like(moving)
                src = [slice(max(s, 0), n + min(s, 0)) for s, n in zip((dh, dw, dd), (h, w, d))]
                dst = [slice(max(-s, 0), n - max(s, 0)) for s, n in zip((dh, dw, dd), (h, w, d))]
                shifted[:, :, dst[0], dst[1], dst[2]] = moving[:, :, src[0], src[1], src[2]]
                cost[:, k] = (fixed - shifted).abs().sum(1)
                k += 1
    return F.avg_pool3d(cost, 3, stride=1, padding=1)


def test_cost_volume_equals_naive_loop_on_asymmetric_shapes():
    g = torch.Generator().manual_seed(1)
    fixed = torch.randn(2, 4, 5, 7, 6, generator=g, dtype=torch.float64)
    moving = torch.randn(2, 4, 5, 7, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sad_cost_volume(fixed, moving, 2), naive_cost(fixed, moving, 2))
    torch.testing.assert_close(sad_cost_volume(fixed, moving, 1), naive_cost(fixed, moving, 1))


def test_cost_volume_gradient_matches_autograd_of_naive_loop():
    g = torch.Generator().manual_seed(2)
    fixed = torch.randn(1, 3, 4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    moving = torch.randn(1, 3, 4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, 125, 4, 5, 3, generator=g, dtype=torch.float64)
    mine = torch.autograd.grad((sad_cost_volume(fixed, moving) * weights).sum(), (fixed, moving))
    naive = torch.autograd.grad((naive_cost(fixed, moving, 2) * weights).sum(), (fixed, moving))
    for a, b in zip(mine, naive):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_integer_shifts_recovered_exactly(axis):
    feats = smooth_features()
    for shift in (-2, -1, 1, 2):
        moving = torch.roll(feats, shift, dims=2 + axis)  # moving(p) = fixed(p - s): the field is +s
        field = coupled_convex(sad_cost_volume(5 * feats, 5 * moving))
        interior = field[:, :, 4:-4, 4:-4, 4:-4]
        expected = torch.zeros(3)
        expected[axis] = shift
        assert torch.equal(interior, expected.view(1, 3, 1, 1, 1).expand_as(interior))
        # the voxel field moves along the same axis only (interior: the rolled border is not a shift)
        voxels = feature_to_voxels(field, (48, 40, 64))[:, :, 16:-16, 16:-16, 16:-16]
        others = [c for c in range(3) if c != axis]
        assert voxels[:, others].abs().max() < 1e-6
        assert voxels[:, axis].sign().unique().tolist() == [math.copysign(1, shift)]


def test_sign_convention_warps_moving_onto_fixed():
    feats = smooth_features((16, 16, 16), channels=16)
    image = box_filter(torch.rand(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(3)), 4)
    moved = torch.roll(image, 8, dims=3)  # one feature voxel (8 voxels) along axis 1
    field = feature_to_voxels(
        coupled_convex(sad_cost_volume(5 * feats, 5 * torch.roll(feats, 1, dims=3))), (128, 128, 128), False
    )
    warped = fields.warp(moved, field)
    inner = (..., slice(40, -40), slice(40, -40), slice(40, -40))
    assert (warped - image)[inner].abs().max() < 1e-5
    assert (moved - image)[inner].abs().mean() > 1e-3


def test_identity_features_give_zero_field_with_and_without_ice():
    feats = smooth_features()
    for use_ice in (False, True):
        field = convex_register(feats, feats.clone(), (48, 40, 64), use_ice=use_ice)
        assert field.abs().max() < 1e-6


@pytest.mark.parametrize("shift", [1, 2])
def test_feature_to_voxel_scale_legacy_and_exact(shift):
    feats = smooth_features()
    interior = 40 if shift == 1 else 56
    for axis, legacy in ((0, 192 / 23), (1, 160 / 19), (2, 256 / 31)):
        field = coupled_convex(sad_cost_volume(5 * feats, 5 * torch.roll(feats, shift, dims=2 + axis)))
        inner = (0, axis, *[slice(interior, n - interior) for n in (192, 160, 256)])
        ref = feature_to_voxels(field, (192, 160, 256), legacy_norm_scale=True)[inner]
        assert torch.allclose(ref, torch.full_like(ref, shift * legacy), atol=1e-4)
        exact = feature_to_voxels(field, (192, 160, 256), legacy_norm_scale=False)[inner]
        assert torch.allclose(exact, torch.full_like(exact, 8.0 * shift), atol=1e-4)
    assert feature_voxel_scale((24, 20, 32), (96, 80, 128), False) == [4.0, 4.0, 4.0]


@pytest.mark.parametrize("shape", [(24, 20, 32), (48, 40, 64), (96, 80, 128)])
def test_voxel_normalised_round_trip_at_every_level(shape):
    field = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fields.normalized_to_voxel(fields.voxel_to_normalized(field)), field)


def test_rescale_field_keeps_a_constant_displacement_in_physical_units():
    field = torch.full((1, 3, 8, 6, 10), 2.0)
    half = rescale_field(field, (4, 3, 5))
    assert torch.allclose(half, torch.ones_like(half))


def test_box_padding_damps_the_border_of_the_upsampling_chain():
    constant = torch.full((1, 3, 24, 20, 32), 1.5)
    up = upsample_field(constant, (192, 160, 256))
    inner = up[(..., *[slice(48, n - 48) for n in (192, 160, 256)])]
    assert torch.allclose(inner, torch.full_like(inner, 1.5), atol=1e-6)
    assert up[0, 0, 0, 80, 128] < 1.5 - 1e-3  # zeros counted in the mean at the border


def test_inverse_consistency_constant_translations():
    shape = (48, 48, 48)
    t = 0.05 * 48 / 2  # 0.05 normalised (align_corners=False) = 1.2 voxels
    forward = torch.zeros(1, 3, *shape)
    forward[:, 0] = t
    f, b = inverse_consistency(forward, -forward, 15)
    inner = (..., slice(6, -6), slice(6, -6), slice(6, -6))
    # unchanged in the interior up to float rounding of the border damping that creeps in over 15 iterations
    assert (f - forward)[inner].abs().max() < 1e-5 and (b + forward)[inner].abs().max() < 1e-5
    assert 0 < f[0, 0, 0, 24, 24] < t - 1e-3 and 0 < f[0, 0, -1, 24, 24] < t - 1e-3  # border damped
    zero = torch.zeros(1, 3, *shape)
    assert inverse_consistency(zero, zero)[0].abs().max() == 0


def test_inverse_consistency_reduces_the_residual_of_a_noisy_pair():
    shape = (24, 20, 32)
    scale = torch.tensor([n / 2 for n in shape]).view(1, 3, 1, 1, 1)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        s = box_filter(torch.randn(1, 3, *shape, generator=g), 5)
        forward = 0.1 * s / s.abs().max() * scale
        backward = -forward + 0.01 * torch.randn(1, 3, *shape, generator=g) * scale

        def residual(f, b):
            return (f + fields.warp(b, f, padding_mode="zeros")).abs().mean()

        before = residual(forward, backward)
        f, b = inverse_consistency(forward, backward, 15)
        assert residual(f, b) * 5 < before


def test_inverse_consistency_blocks_gradients():
    forward = torch.zeros(1, 3, 8, 8, 8, requires_grad=True)
    f, b = inverse_consistency(forward, forward * 1.0)
    assert not f.requires_grad and not b.requires_grad


def sinusoid_fields():
    """The spec's composition construction (pitfall 8), converted from normalised (x, y, z) to voxel channels."""
    n = 32
    theta = fields.identity_grid((n, n, n))[0] * (2 * math.pi / n)  # theta(h), theta(w), theta(d)
    image = (torch.sin(theta[0]) * torch.cos(theta[1]) * torch.sin(theta[2]))[None, None]
    half = n / 2  # voxels per normalised unit (align_corners=False)
    # normalised x-channel moves along axis d, z along axis h: voxel channel c = normalised channel 2 - c
    d0 = 0.1 * half * torch.stack([torch.sin(theta[2]), torch.sin(theta[1]), torch.sin(theta[0])])[None]
    d1 = 0.1 * half * torch.stack([torch.cos(theta[0]), torch.cos(theta[2]), torch.cos(theta[1])])[None]
    return image, d0, d1


def test_composition_equals_sequential_warping():
    image, d0, d1 = sinusoid_fields()
    sequential = fields.warp(fields.warp(image, d0), d1)
    inner = (..., slice(6, -6), slice(6, -6), slice(6, -6))
    correct = (fields.warp(image, compose_fields(d0, d1)) - sequential)[inner].abs().mean()
    legacy = (fields.warp(image, compose_fields(d0, d1, legacy_order=True)) - sequential)[inner].abs().mean()
    assert correct < 5e-3
    assert legacy > 5 * correct


def test_gradients_reach_the_features_without_ice():
    g = torch.Generator().manual_seed(5)
    fixed = torch.randn(2, 16, 4, 4, 4, generator=g, requires_grad=True)
    moving = torch.randn(2, 16, 4, 4, 4, generator=g, requires_grad=True)
    field = convex_register(0.05 * fixed, 0.05 * moving, (16, 16, 16))
    field.pow(2).mean().backward()
    for grad in (fixed.grad, moving.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not convex_register(fixed, moving, (16, 16, 16), use_ice=True).requires_grad


def test_batch_items_are_independent():
    a, b = smooth_features((8, 8, 8), 16, 6), smooth_features((8, 8, 8), 16, 7)
    shifted = torch.roll(a, 1, dims=2)
    batch = convex_register(torch.cat([a, b]), torch.cat([shifted, b]), (32, 32, 32))
    single = convex_register(a, shifted, (32, 32, 32))
    torch.testing.assert_close(batch[:1], single)
    assert batch[1:].abs().max() < 1e-6
