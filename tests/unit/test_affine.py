"""Affine pre-alignment (common.registration.affine): conventions against scipy, recovery of known transforms.

Known transforms are applied with ``scipy.ndimage.affine_transform`` (an implementation independent of
common.registration), which samples ``out[o] = in[matrix @ o + offset]`` - the same pull convention as ours.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from common.data.synthetic import generate_subject
from common.registration import fields
from common.registration.affine import (
    affine_ddf,
    compose_affine,
    compose_with_affine,
    fit_affine,
    invert_affine,
    num_parameters,
    parameters_to_matrix,
    prealign,
)

SIZE = 32


def _rotation(angles_deg) -> np.ndarray:
    """Product of planar rotations; one angle in 2D, three (axes 01, 02, 12) in 3D."""
    dims = 2 if len(angles_deg) == 1 else 3
    out = np.eye(dims)
    for angle, (i, j) in zip(angles_deg, [(0, 1), (0, 2), (1, 2)]):
        r, a = np.eye(dims), math.radians(angle)
        r[i, i] = r[j, j] = math.cos(a)
        r[i, j], r[j, i] = -math.sin(a), math.sin(a)
        out = out @ r
    return out


def _random_affine(rng: np.random.Generator, dims: int, kind: str = "affine") -> np.ndarray:
    """Matrix ``[D, D+1]`` about the image centre: rotation <= 20 deg in total, scales 0.8-1.2, shift <= 15% FOV."""
    angles = rng.uniform(-1, 1, 1 if dims == 2 else 3)
    angles = angles / max(np.abs(angles).sum(), 1e-6) * rng.uniform(8, 20)  # sum of |angles| bounds the rotation
    linear = _rotation(angles)
    if kind == "affine":
        linear = linear @ np.diag(rng.uniform(0.8, 1.2, dims))
    elif kind == "similarity":
        linear = linear * rng.uniform(0.8, 1.2)
    centre = np.full(dims, (SIZE - 1) / 2)
    shift = rng.uniform(-0.15, 0.15, dims) * SIZE
    return np.concatenate([linear, (centre + shift - linear @ centre)[:, None]], 1)


def _apply_scipy(volume: np.ndarray, matrix: np.ndarray, order: int) -> np.ndarray:
    """``out(p) = volume(matrix @ [p, 1])``."""
    dims = matrix.shape[0]
    return ndimage.affine_transform(volume, matrix[:, :dims], matrix[:, dims], order=order, mode="nearest")


def _moving_for(fixed: np.ndarray, true_matrix: np.ndarray, order: int = 1) -> np.ndarray:
    """Moving image such that ``moving(true_matrix p) = fixed(p)``: fixed resampled with the inverse matrix."""
    dims = true_matrix.shape[0]
    full = np.eye(dims + 1)
    full[:dims] = true_matrix
    return _apply_scipy(fixed, np.linalg.inv(full)[:dims], order)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).float()[None, None]


def _displacement_error(found: torch.Tensor, true_matrix: np.ndarray) -> torch.Tensor:
    shape = (SIZE,) * true_matrix.shape[0]
    true_ddf = affine_ddf(torch.from_numpy(true_matrix).float(), shape)
    return (affine_ddf(found, shape) - true_ddf).norm(dim=1)


@pytest.fixture(scope="module")
def brain():
    image, label = generate_subject("brain", shape=(SIZE,) * 3, rng=0)
    return image.astype(np.float32), label


@pytest.fixture(scope="module")
def recovered_3d(brain):
    """One full 3D affine registration of a known random affine, shared by two tests."""
    image, label = brain
    true = _random_affine(np.random.default_rng(3), 3)
    moving = _moving_for(image, true)
    result = prealign(_t(moving), _t(image), mode="affine", similarity="lncc")
    return true, moving, result


# ------------------------------------------------------------------------------------------------- conventions


def test_affine_ddf_matches_hand_values_and_scipy(brain):
    matrix = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.5, 0.0, -1.0], [0.0, 0.1, 1.0, 0.0]])
    ddf = affine_ddf(matrix, (4, 5, 6))
    assert ddf.shape == (1, 3, 4, 5, 6)
    # voxel p = (1, 4, 2) samples q = (1 + 2, 0.5 * 4 - 1, 0.1 * 4 + 2) = (3, 1, 2.4): displacement (2, -3, 0.4)
    torch.testing.assert_close(ddf[0, :, 1, 4, 2], torch.tensor([2.0, -3.0, 0.4]))
    # warping with the dense field resamples exactly like scipy (interior, where no padding is involved)
    image = brain[0]
    true = _random_affine(np.random.default_rng(0), 3)
    ours = fields.warp(_t(image), affine_ddf(torch.from_numpy(true).float(), image.shape))[0, 0].numpy()
    reference = _apply_scipy(image, true, order=1)
    inside = (slice(6, -6),) * 3
    np.testing.assert_allclose(ours[inside], reference[inside], atol=2e-4)


def test_invert_and_compose_matrices():
    rng = np.random.default_rng(1)
    a, b = (torch.from_numpy(_random_affine(rng, 3)).float() for _ in range(2))
    eye = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)
    torch.testing.assert_close(compose_affine(a, invert_affine(a)), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(compose_affine(invert_affine(a), a), eye, atol=1e-5, rtol=0)
    # compose_affine(a, b) is the field of "warp with a, then with b": p -> a(b(p))
    p = torch.tensor([3.0, 7.0, 11.0])
    expected = a[:, :3] @ (b[:, :3] @ p + b[:, 3]) + a[:, 3]
    c = compose_affine(a, b)
    torch.testing.assert_close(c[:, :3] @ p + c[:, 3], expected)
    assert (num_parameters("affine", 3), num_parameters("affine", 2)) == (12, 6)
    assert (num_parameters("rigid", 3), num_parameters("similarity", 3), num_parameters("rigid", 2)) == (6, 7, 3)


def test_parameters_are_centred_and_normalised():
    """2D rigid on 11 x 11: centre 5, unit 5 voxels; params (0.2, 0, 90 deg) = turn about the centre, then shift 1."""
    matrix = parameters_to_matrix(torch.tensor([[0.2, 0.0, math.pi / 2]]), "rigid", (11, 11))[0]
    for p, q in [((5.0, 5.0), (6.0, 5.0)), ((5.0, 7.0), (8.0, 5.0)), ((2.0, 5.0), (6.0, 8.0))]:
        torch.testing.assert_close(matrix[:, :2] @ torch.tensor(p) + matrix[:, 2], torch.tensor(q), atol=1e-5, rtol=0)
    # a start matrix survives the round trip through the normalised frame unchanged (no steps taken)
    start = torch.from_numpy(_random_affine(np.random.default_rng(11), 2)).float()[None]
    image = torch.rand(1, 1, SIZE, SIZE)
    kept = prealign(image, image, init_matrix=start, levels=(1,), iterations=(0,)).matrix
    torch.testing.assert_close(kept, start, atol=1e-4, rtol=0)


def test_fit_affine_recovers_matrix_of_a_field():
    matrix = torch.from_numpy(_random_affine(np.random.default_rng(2), 2)).float()[None]
    torch.testing.assert_close(fit_affine(affine_ddf(matrix, (12, 9))), matrix, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------- recovery


def test_recovers_random_affine_3d(recovered_3d):
    true, _, result = recovered_3d
    assert result.matrix.shape == (1, 3, 4) and result.ddf.shape == (1, 3, SIZE, SIZE, SIZE)
    error = _displacement_error(result.matrix, true)
    assert float(error.mean()) < 0.5 and float(error.max()) < 1.2, (float(error.mean()), float(error.max()))
    linear_error = (result.matrix[0, :, :3] - torch.from_numpy(true[:, :3]).float()).abs().max()
    assert float(linear_error) < 0.03
    torch.testing.assert_close(result.ddf, affine_ddf(result.matrix, (SIZE,) * 3))


def test_label_transfer_through_inverse_lands_on_moving_labels(brain, recovered_3d):
    """Fixed (atlas) labels reach the moving (subject) grid through the inverse of the recovered matrix."""
    _, label = brain
    true, _, result = recovered_3d
    moving_label = _moving_for(label, true, order=0)  # ground truth on the moving grid (scipy, nearest)
    transferred = fields.warp_labels(
        torch.from_numpy(label)[None, None], affine_ddf(invert_affine(result.matrix), label.shape)
    )
    assert transferred.dtype == torch.uint8
    transferred = transferred[0, 0].numpy()
    in_view = ndimage.binary_erosion(np.ones_like(label, dtype=bool), iterations=2)  # away from padding
    agreement = (transferred == moving_label)[in_view].mean()
    assert agreement > 0.95, agreement
    for value in (2, 3):  # white matter, left ventricle: large enough for a stable Dice at 32^3
        a, b = transferred == value, moving_label == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8
    # and back: moving labels warped with the forward matrix return to the fixed labels
    back = fields.warp_labels(torch.from_numpy(moving_label)[None, None], result.ddf)[0, 0].numpy()
    assert (back == label)[in_view].mean() > 0.93


def test_rigid_and_similarity_keep_their_constraints(brain):
    image = brain[0]
    rng = np.random.default_rng(4)
    true_rigid = _random_affine(rng, 3, kind="rigid")
    rigid = prealign(_t(_moving_for(image, true_rigid)), _t(image), mode="rigid", iterations=(60, 30, 10))
    linear = rigid.matrix[0, :, :3].double()
    torch.testing.assert_close(linear.T @ linear, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(torch.linalg.det(linear)) == pytest.approx(1.0, abs=1e-5)
    assert float(_displacement_error(rigid.matrix, true_rigid).mean()) < 0.6

    slice_2d = image[:, :, SIZE // 2]
    true_similarity = _random_affine(rng, 2, kind="similarity")
    moving = _moving_for(slice_2d, true_similarity)
    similarity = prealign(_t(moving), _t(slice_2d), mode="similarity", iterations=(80, 40, 20))
    linear = similarity.matrix[0, :, :2].double()
    scale = float(torch.linalg.det(linear)) ** 0.5
    torch.testing.assert_close(linear.T @ linear, scale**2 * torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)
    true_scale = float(np.linalg.det(true_similarity[:, :2])) ** 0.5
    assert scale == pytest.approx(true_scale, abs=0.03)


def test_rigid_with_anisotropic_spacing_is_rigid_in_millimetres():
    image = np.random.default_rng(5).random((12, 10, 6)).astype(np.float32)
    spacing = (1.0, 1.5, 4.0)
    result = prealign(
        _t(image), _t(np.roll(image, 1, axis=0)), mode="rigid", spacing=spacing, iterations=(3,), levels=(1,)
    )
    s = torch.tensor(spacing, dtype=torch.float64)
    physical = torch.diag(s) @ result.matrix[0, :, :3].double() @ torch.diag(1 / s)
    torch.testing.assert_close(physical.T @ physical, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)


def test_recovers_random_affine_2d(brain):
    image = brain[0][:, :, SIZE // 2 + 2]
    true = _random_affine(np.random.default_rng(6), 2)
    result = prealign(_t(_moving_for(image, true)), _t(image), mode="affine")
    assert result.matrix.shape == (1, 2, 3) and result.warped.shape == (1, 1, SIZE, SIZE)
    error = _displacement_error(result.matrix, true)
    assert float(error.mean()) < 0.5 and float(error.max()) < 1.2, (float(error.mean()), float(error.max()))


def test_frozen_axis_keeps_through_plane_identity(brain):
    image = brain[0]
    in_plane = _random_affine(np.random.default_rng(7), 2)
    true = np.eye(3, 4)
    true[:2, :2], true[:2, 3] = in_plane[:, :2], in_plane[:, 2]
    result = prealign(_t(_moving_for(image, true)), _t(image), mode="affine", frozen_axes=(2,), iterations=(60, 30, 10))
    m = result.matrix[0]
    assert torch.equal(m[2], torch.tensor([0.0, 0.0, 1.0, 0.0])) and torch.equal(m[:2, 2], torch.zeros(2))
    assert float(_displacement_error(result.matrix, true).mean()) < 0.6


# ------------------------------------------------------------------------------------------------- options


def _blob_2d(centre, radii, size=SIZE) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 2, indexing="ij")).astype(np.float32)
    d = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(2))
    return np.exp(-2.0 * d).astype(np.float32)


def test_centre_of_mass_init_is_the_mass_centre_shift():
    fixed = _blob_2d((12, 14), (3, 5)) + 0.5 * _blob_2d((16, 9), (2, 2))
    moving = np.roll(fixed, (4, -3), axis=(0, 1))  # moving(q) = fixed(q - s): the answer is the shift s
    result = prealign(_t(moving), _t(fixed), mode="translation", init="com", levels=(1,), iterations=(0,))
    torch.testing.assert_close(result.matrix[0, :, 2], torch.tensor([4.0, -3.0]), atol=1e-3, rtol=0)


def test_moments_init_resolves_large_rotation():
    """50 degrees is beyond the gradient's reach from identity; principal axes (best sign choice) get it."""
    fixed = _blob_2d((15.5, 15.5), (3, 9)) + 0.6 * _blob_2d((13, 21), (2, 2))  # elongated, asymmetric
    true = np.concatenate([_rotation([50.0]), np.zeros((2, 1))], 1)
    centre = np.full(2, (SIZE - 1) / 2)
    true[:, 2] = centre + np.array([2.0, -1.0]) - true[:, :2] @ centre
    moving = _moving_for(fixed, true)
    start = prealign(_t(moving), _t(fixed), mode="rigid", init="moments", levels=(1,), iterations=(0,))
    angle = math.degrees(math.atan2(float(start.matrix[0, 1, 0]), float(start.matrix[0, 0, 0])))
    assert angle == pytest.approx(50.0, abs=6.0)
    refined = prealign(_t(moving), _t(fixed), mode="rigid", init="moments", iterations=(60, 30, 10))
    assert float(_displacement_error(refined.matrix, true).mean()) < 0.5


def test_search_init_finds_a_shift_beyond_the_gradient_reach():
    fixed = _blob_2d((15, 14), (1.5, 2)) + 0.5 * _blob_2d((18, 10), (1, 1))
    moving = np.roll(fixed, (7, -6), axis=(0, 1))  # about 20% of the field of view; blobs do not overlap
    kwargs = {"mode": "translation", "levels": (2, 1), "iterations": (30, 10)}
    searched = prealign(_t(moving), _t(fixed), init="search", **kwargs).matrix[0, :, 2]
    torch.testing.assert_close(searched, torch.tensor([7.0, -6.0]), atol=0.3, rtol=0)
    plain = prealign(_t(moving), _t(fixed), **kwargs).matrix[0, :, 2]
    assert float((plain - torch.tensor([7.0, -6.0])).abs().max()) > 2.0  # why the search exists
    # planar rotations are searched too (every 30 degrees): 55 degrees starts from the 60-degree candidate
    elongated = _blob_2d((15.5, 15.5), (3, 9)) + 0.6 * _blob_2d((13, 21), (2, 2))
    true = np.concatenate([_rotation([55.0]), np.zeros((2, 1))], 1)
    true[:, 2] = np.full(2, 15.5) - true[:, :2] @ np.full(2, 15.5)
    start = prealign(_t(_moving_for(elongated, true)), _t(elongated), mode="rigid", init="search", iterations=(0, 0, 0))
    assert math.degrees(math.atan2(float(start.matrix[0, 1, 0]), float(start.matrix[0, 0, 0]))) == pytest.approx(60.0)


def test_fixed_mask_focuses_on_the_masked_object():
    """Two objects move in opposite directions; the mask on one decides which motion is recovered."""
    left, right = _blob_2d((9, 10), (3, 4)), _blob_2d((22, 20), (4, 3))
    fixed = left + right
    moving = np.roll(left, 3, axis=0) + np.roll(right, -3, axis=0)
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., :16, :] = 1.0
    kwargs = {"mode": "translation", "levels": (2, 1), "iterations": (60, 30)}
    on_left = prealign(_t(moving), _t(fixed), fixed_mask=mask, **kwargs).matrix[0, :, 2]
    on_right = prealign(_t(moving), _t(fixed), fixed_mask=1.0 - mask, **kwargs).matrix[0, :, 2]
    torch.testing.assert_close(on_left, torch.tensor([3.0, 0.0]), atol=0.3, rtol=0)
    torch.testing.assert_close(on_right, torch.tensor([-3.0, 0.0]), atol=0.3, rtol=0)


def test_batch_items_are_independent(brain):
    image = brain[0][:, :, SIZE // 2]
    rng = np.random.default_rng(8)
    movings = [_moving_for(image, _random_affine(rng, 2)) for _ in range(2)]
    kwargs = {"mode": "affine", "levels": (2, 1), "iterations": (15, 5)}
    batched = prealign(torch.cat([_t(m) for m in movings]), _t(image), **kwargs).matrix
    single = torch.cat([prealign(_t(m), _t(image), **kwargs).matrix for m in movings])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------- composition


def test_affine_then_deformable_is_one_field(brain):
    image, label = brain
    shape = image.shape
    matrix = torch.from_numpy(_random_affine(np.random.default_rng(9), 3)).float()[None]
    g = torch.Generator().manual_seed(0)
    deformable = torch.nn.functional.interpolate(
        torch.randn(1, 3, 4, 4, 4, generator=g) * 1.5, size=shape, mode="trilinear", align_corners=True
    )
    smooth = _t(ndimage.gaussian_filter(image, 1.0))
    sequential = fields.warp(fields.warp(smooth, affine_ddf(matrix, shape)), deformable)
    combined = compose_with_affine(matrix, deformable)
    generic = fields.compose(affine_ddf(matrix, shape), deformable)
    inside = (..., slice(6, -6), slice(6, -6), slice(6, -6))
    # closed form == generic composition where the generic one does not clamp at the border
    torch.testing.assert_close(combined[inside], generic[inside], atol=1e-3, rtol=0)
    # one resampling == two resamplings, within interpolation error (a few % of the intensity range)
    difference = (fields.warp(smooth, combined) - sequential)[inside].abs()
    assert float(difference.mean()) < 0.01 * float(smooth.max()), float(difference.mean())
    labels = torch.from_numpy(label)[None, None]
    once = fields.warp_labels(labels, combined)
    twice = fields.warp_labels(fields.warp_labels(labels, affine_ddf(matrix, shape)), deformable)
    assert float((once == twice)[inside].float().mean()) > 0.9  # nearest twice vs once: boundary voxels differ


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(brain):
    image = brain[0][:, :, SIZE // 2]
    moving = _moving_for(image, _random_affine(np.random.default_rng(10), 2))
    kwargs = {"levels": (2, 1), "iterations": (20, 10)}
    cpu = prealign(_t(moving), _t(image), **kwargs).matrix
    gpu = prealign(_t(moving).cuda(), _t(image).cuda(), **kwargs).matrix
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)
