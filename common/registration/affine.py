"""Affine pre-alignment by instance optimisation (no training): moving image -> fixed image.

Conventions (those of :mod:`common.registration.fields`):

* An affine ``matrix`` is ``[B, D, D + 1]`` (3x4 in 3D, 2x3 in 2D) in **voxel coordinates** and maps a fixed-image voxel
  ``p`` to the moving-image voxel it samples: ``q = matrix[:, :, :D] @ p + matrix[:, :, D]``. Its dense field is
  ``affine_ddf(matrix, shape)(p) = q - p``, so ``fields.warp(moving, affine_ddf(matrix, shape))`` is the aligned image.
* Moving and fixed images share one voxel grid ``[B, C, *shape]`` (resample to a common grid first).
* ``invert_affine`` maps back: labels of the fixed image (e.g. an atlas) reach the moving image's grid through
  ``fields.warp_labels(labels, affine_ddf(invert_affine(matrix), shape))``.

Optimisation: Adam on the transform parameters, coarse to fine over an image pyramid, in a centred and normalised
physical frame (origin at the image centre, unit = half the largest physical extent). Why: rotations and scalings then
act about the centre and every parameter has the same order of magnitude at every pyramid level, so one learning
rate fits all. Parametrisations: ``translation`` (D), ``rigid`` (rotation = exp of a skew matrix, D(D-1)/2 + D),
``similarity`` (rigid + one log-scale), ``affine`` (identity + free D x D matrix, + D: 12 in 3D, 6 in 2D).
``frozen_axes`` removes every motion along or across the listed axes (e.g. ``(2,)``: in-plane motion of a short-axis
stack, the same 2D transform for every slice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.registration import fields
from common.registration.similarity import SIMILARITIES

__all__ = [
    "MODES",
    "AffineResult",
    "num_parameters",
    "affine_ddf",
    "invert_affine",
    "compose_affine",
    "compose_with_affine",
    "fit_affine",
    "parameters_to_matrix",
    "prealign",
]

MODES = ("translation", "rigid", "similarity", "affine")
INITS = ("identity", "com", "moments", "search")
SEARCH_RANGE = 0.2  # init="search": translations up to this fraction of the field of view along each free axis
SEARCH_ANGLES = (-60.0, -30.0, 0.0, 30.0, 60.0)  # init="search": in-plane rotations tried (two free axes only)


@dataclass
class AffineResult:
    """Output of :func:`prealign`: ``matrix`` ``[B, D, D+1]`` (fixed voxel -> moving voxel), ``ddf`` ``[B, D, *shape]``
    (voxels, for ``fields.warp``), ``warped`` = moving resampled on the fixed grid, ``loss`` ``[B]`` final similarity
    loss at the finest pyramid level."""

    matrix: torch.Tensor
    ddf: torch.Tensor
    warped: torch.Tensor
    loss: torch.Tensor


def num_parameters(mode: str, spatial_dims: int) -> int:
    """Degrees of freedom of a transform ``mode`` (e.g. affine: 12 in 3D, 6 in 2D; rigid: 6 / 3)."""
    d = spatial_dims
    counts = {"translation": d, "rigid": d + d * (d - 1) // 2, "similarity": d + d * (d - 1) // 2 + 1}
    counts["affine"] = d * d + d
    return counts[_check_mode(mode)]


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    """``[..., D, D+1]`` -> ``[..., D+1, D+1]`` with last row ``(0, ..., 0, 1)``."""
    dims = matrix.shape[-2]
    if matrix.shape[-1] != dims + 1 or dims not in (2, 3):
        raise ValueError(f"expected an affine matrix [..., D, D+1] with D = 2 or 3, got shape {tuple(matrix.shape)}")
    bottom = torch.zeros(*matrix.shape[:-2], 1, dims + 1, dtype=matrix.dtype, device=matrix.device)
    bottom[..., 0, dims] = 1.0
    return torch.cat([matrix, bottom], dim=-2)


def invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse ``[..., D, D+1]``: maps moving voxels back to fixed voxels (e.g. atlas labels -> subject grid)."""
    dims = matrix.shape[-2]
    return torch.linalg.inv(_homogeneous(matrix))[..., :dims, :]


def compose_affine(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Matrix ``c`` with ``warp(warp(m, ddf(first)), ddf(second)) == warp(m, ddf(c))``, i.e. ``c = first @ second``.

    Same argument order as ``fields.compose``: ``first`` is applied to the image first.
    """
    dims = first.shape[-2]
    return (_homogeneous(first) @ _homogeneous(second))[..., :dims, :]


def _apply(matrix: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Displacement of ``matrix`` ``[B, D, D+1]`` at voxel coordinates ``grid`` ``[1 or B, D, *shape]``."""
    dims = matrix.shape[-2]
    flat = grid.flatten(2)
    moved = matrix[:, :, :dims] @ flat + matrix[:, :, dims:]
    return (moved - flat).view(moved.shape[0], dims, *grid.shape[2:])


def affine_ddf(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Dense voxel displacement ``[B, D, *shape]`` of ``matrix`` ``[B, D, D+1]`` or ``[D, D+1]``."""
    if matrix.ndim == 2:
        matrix = matrix.unsqueeze(0)
    if len(shape) != matrix.shape[-2]:
        raise ValueError(f"shape {tuple(shape)} has {len(shape)} axes but the matrix is {tuple(matrix.shape[-2:])}")
    grid = fields.identity_grid(shape, device=matrix.device, dtype=matrix.dtype)
    return _apply(matrix, grid)


def compose_with_affine(matrix: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Affine first, then the deformable ``ddf``, as one field ``c``.

    ``warp(m, c) == warp(warp(m, affine_ddf(matrix)), ddf)``.

    Closed form of ``fields.compose(affine_ddf(matrix), ddf)``: ``c(p) = A(p + u(p)) - p``. Why: the affine field is
    known everywhere, so unlike resampling it this stays exact where ``p + u(p)`` leaves the image.
    """
    if matrix.ndim == 2:
        matrix = matrix.unsqueeze(0)
    if matrix.shape[-2] != ddf.shape[1]:
        raise ValueError(f"matrix {tuple(matrix.shape)} does not match the {ddf.shape[1]}D field {tuple(ddf.shape)}")
    grid = fields.identity_grid(ddf.shape[2:], device=ddf.device, dtype=ddf.dtype)
    return _apply(matrix.to(ddf), grid + ddf) + ddf


def fit_affine(ddf: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares affine ``[B, D, D+1]`` of a voxel field ``ddf`` (weighted by ``weights`` ``[B or 1, 1, *shape]``).

    Exact for affine fields (e.g. a GlobalNet output); for a deformable field it gives its best affine part.
    """
    batch = ddf.shape[0]
    grid = fields.identity_grid(ddf.shape[2:], device=ddf.device, dtype=torch.float64).flatten(2)  # [1, D, N]
    ones = torch.ones_like(grid[:, :1])
    source = torch.cat([grid, ones], 1).expand(batch, -1, -1)  # [B, D+1, N]
    target = grid + ddf.to(torch.float64).flatten(2)  # [B, D, N]
    w = torch.ones_like(source[:, :1]) if weights is None else weights.to(source).flatten(2).expand(batch, 1, -1)
    normal = (source * w) @ source.transpose(1, 2)  # [B, D+1, D+1]
    rhs = (source * w) @ target.transpose(1, 2)  # [B, D+1, D]
    return torch.linalg.solve(normal, rhs).transpose(1, 2).to(ddf.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# centred, normalised frame


def _normaliser(
    shape: Sequence[int], full_shape: Sequence[int], spacing: Sequence[float], device, dtype
) -> torch.Tensor:
    """Homogeneous ``[D+1, D+1]`` map voxel -> normalised physical coordinates for a grid of ``shape`` voxels.

    A coarser level covers the same field of view (``align_corners=True``), so its spacing grows by
    ``(n_full - 1) / (n - 1)`` and the normalised frame is identical at every level.
    """
    dims = len(shape)
    level_spacing = [s * max(nf - 1, 1) / max(n - 1, 1) for s, n, nf in zip(spacing, shape, full_shape)]
    radius = max(s * max(n - 1, 1) for s, n in zip(level_spacing, shape)) / 2.0
    out = torch.eye(dims + 1, dtype=dtype, device=device)
    for i in range(dims):
        out[i, i] = level_spacing[i] / radius
        out[i, dims] = -level_spacing[i] * (shape[i] - 1) / 2.0 / radius
    return out


def _to_voxel(normalised: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """Normalised homogeneous transform ``[B, D+1, D+1]`` -> voxel matrix ``[B, D, D+1]``."""
    dims = normaliser.shape[0] - 1
    return (torch.linalg.inv(normaliser) @ normalised @ normaliser)[:, :dims, :]


def _to_normalised(matrix: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    return normaliser @ _homogeneous(matrix) @ torch.linalg.inv(normaliser)


def _check_axes(frozen_axes: Sequence[int], dims: int) -> tuple[int, ...]:
    """Frozen axes as non-negative spatial indices (negative ones count from the last axis)."""
    for axis in frozen_axes:
        if not -dims <= axis < dims:
            raise ValueError(f"frozen axis {axis} is not a spatial axis of a {dims}D image")
    return tuple(sorted({int(axis) % dims for axis in frozen_axes}))


def _free_axes(dims: int, frozen_axes: Sequence[int], device, dtype) -> torch.Tensor:
    """1 for axes that may move, 0 for frozen ones."""
    free = torch.ones(dims, dtype=dtype, device=device)
    for axis in _check_axes(frozen_axes, dims):
        free[axis] = 0.0
    return free


def _parameters_to_normalised(params: torch.Tensor, mode: str, free: torch.Tensor) -> torch.Tensor:
    """Homogeneous ``[B, D+1, D+1]`` transform in the normalised frame from ``params`` ``[B, num_parameters]``.

    Order: translation (D), then rotation angles (upper triangle of a skew generator, row-major) and a log-scale, or
    the D x D increment of the linear part (row-major). Zeros give the identity; frozen axes are masked out.
    """
    batch, dims = params.shape[0], free.numel()
    if params.shape[1] != num_parameters(mode, dims):
        raise ValueError(f"{mode} in {dims}D takes {num_parameters(mode, dims)} parameters, got {params.shape[1]}")
    pairs = free[:, None] * free[None, :]
    eye = torch.eye(dims, dtype=params.dtype, device=params.device).expand(batch, dims, dims)
    if mode in ("rigid", "similarity"):
        rows, cols = torch.triu_indices(dims, dims, offset=1, device=params.device)
        generator = params.new_zeros(batch, dims, dims)
        generator[:, rows, cols] = params[:, dims : dims + rows.numel()]
        generator = generator * pairs
        linear = torch.linalg.matrix_exp(generator - generator.transpose(1, 2))
        if mode == "similarity":
            linear = torch.diag_embed(torch.exp(params[:, -1:] * free)) @ linear
    elif mode == "affine":
        linear = eye + params[:, dims:].reshape(batch, dims, dims) * pairs
    else:
        linear = eye
    top = torch.cat([linear, (params[:, :dims] * free).unsqueeze(-1)], dim=2)
    return _homogeneous(top)


def parameters_to_matrix(
    params: torch.Tensor,
    mode: str,
    shape: Sequence[int],
    frozen_axes: Sequence[int] = (),
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """Voxel matrix ``[B, D, D+1]`` of ``mode`` parameters ``[B, num_parameters(mode, D)]`` (zeros = identity).

    Parameters live in the centred normalised frame of a ``shape`` grid (origin at the centre, unit = half the largest
    physical extent; translation first): the parametrisation of :func:`prealign` and of the learned ``AffineNet``.
    """
    dims = len(shape)
    spacing = tuple(float(s) for s in (spacing or [1.0] * dims))
    free = _free_axes(dims, frozen_axes, params.device, params.dtype)
    normaliser = _normaliser(shape, shape, spacing, params.device, params.dtype)
    return _to_voxel(_parameters_to_normalised(params, _check_mode(mode), free), normaliser)


# ---------------------------------------------------------------------------------------------------------------------
# pyramid and initialisation


def _level_shape(shape: Sequence[int], factor: int, frozen_axes: Sequence[int], min_size: int) -> tuple[int, ...]:
    return tuple(
        n if axis in frozen_axes or factor == 1 else max(round(n / factor), min(n, min_size))
        for axis, n in enumerate(shape)
    )


def _downsample(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Box-smooth then sample at the coarse voxel centres of the same field of view (``align_corners=True``)."""
    if tuple(size) == tuple(image.shape[2:]):
        return image
    dims = image.ndim - 2
    kernel = []
    for n, m in zip(image.shape[2:], size):
        k = max(1, round((n - 1) / max(m - 1, 1)))
        kernel.append(k + 1 - k % 2)  # odd, so the filter is centred
    pool = F.avg_pool3d if dims == 3 else F.avg_pool2d
    smooth = pool(image, tuple(kernel), stride=1, padding=tuple(k // 2 for k in kernel), count_include_pad=False)
    return F.interpolate(smooth, size=tuple(size), mode="trilinear" if dims == 3 else "bilinear", align_corners=True)


def _rescale_intensity(image: torch.Tensor) -> torch.Tensor:
    """Per-item min-max to ``[0, 1]``: MI needs this range, MSE/MIND comparable scales. Min-max, not quantiles, so that
    the mapping does not depend on how much of the object lies in the field of view (window CT beforehand)."""
    flat = image.flatten(1)
    low = flat.amin(1).view(-1, *([1] * (image.ndim - 1)))
    high = flat.amax(1).view(-1, *([1] * (image.ndim - 1)))
    return (image - low) / (high - low).clamp_min(1e-8)


def _moments(image: torch.Tensor, weight: torch.Tensor | None, normaliser: torch.Tensor):
    """Mass centre ``[B, D]`` and covariance ``[B, D, D]`` in the normalised frame (mass = intensity x weight)."""
    dims = image.ndim - 2
    grid = fields.identity_grid(image.shape[2:], device=image.device, dtype=image.dtype).flatten(2)
    coords = normaliser[:dims, :dims] @ grid[0] + normaliser[:dims, dims:]  # [D, N]
    mass = image.mean(1).flatten(1)
    if weight is not None:
        mass = mass * weight.to(image.dtype).mean(1).flatten(1).expand_as(mass)
    mass = mass / mass.sum(1, keepdim=True).clamp_min(1e-12)
    centre = mass @ coords.T
    centred = coords.unsqueeze(0) - centre.unsqueeze(-1)  # [B, D, N]
    covariance = (centred * mass.unsqueeze(1)) @ centred.transpose(1, 2)
    return centre, covariance


def _moment_candidates(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    mask: torch.Tensor | None,
    normaliser: torch.Tensor,
    mode: str,
    frozen_axes: Sequence[int],
    with_axes: bool,
) -> list[torch.Tensor]:
    """Normalised initial transforms ``[B, D+1, D+1]``: centre-of-mass translation, then (``with_axes``) the
    principal-axes alignments for every sign choice giving a proper rotation (their order is ambiguous)."""
    dims = fixed.ndim - 2
    free = [i for i in range(dims) if i not in frozen_axes]
    centre_f, cov_f = _moments(fixed, mask, normaliser)
    centre_m, cov_m = _moments(moving, None, normaliser)
    batch = centre_f.shape[0]
    base = torch.eye(dims + 1, dtype=fixed.dtype, device=fixed.device).repeat(batch, 1, 1)
    base[:, free, dims] = (centre_m - centre_f)[:, free]
    candidates = [base]
    if not with_axes or mode == "translation" or len(free) < 2:
        return candidates
    index = torch.tensor(free, device=fixed.device)
    sub_f = cov_f.index_select(1, index).index_select(2, index)
    sub_m = cov_m.index_select(1, index).index_select(2, index)
    val_f, vec_f = torch.linalg.eigh(sub_f)
    val_m, vec_m = torch.linalg.eigh(sub_m)
    val_f, val_m = val_f.clamp_min(1e-12), val_m.clamp_min(1e-12)
    if mode == "affine":
        scale = torch.diag_embed((val_m / val_f).sqrt())
    elif mode == "similarity":
        ratio = (val_m.log().sum(1) - val_f.log().sum(1)).div(2 * len(free)).exp()
        scale = ratio.view(-1, 1, 1) * torch.eye(len(free), dtype=fixed.dtype, device=fixed.device)
    else:
        scale = torch.eye(len(free), dtype=fixed.dtype, device=fixed.device).expand(batch, -1, -1)
    for signs in range(2 ** len(free)):
        flip = torch.tensor([1.0 - 2.0 * ((signs >> k) & 1) for k in range(len(free))], dtype=fixed.dtype)
        flip = torch.diag(flip).to(fixed.device)
        linear = vec_m @ flip @ scale @ vec_f.transpose(1, 2)  # fixed axis k -> moving axis k, per sign choice
        proper = torch.linalg.det(vec_m @ flip @ vec_f.transpose(1, 2)) > 0
        candidate = base.clone()
        candidate[:, index.view(-1, 1), index.view(1, -1)] = linear
        # the mass centre of the fixed image must land on that of the moving image
        shift = centre_m - (candidate[:, :dims, :dims] @ centre_f.unsqueeze(-1)).squeeze(-1)
        candidate[:, free, dims] = shift[:, free]
        # improper sign choices (reflections) fall back to the centre-of-mass transform
        candidates.append(torch.where(proper.view(-1, 1, 1), candidate, base))
    return candidates


def _search_candidates(
    centre: torch.Tensor, free: Sequence[int], normaliser: torch.Tensor, mode: str
) -> list[torch.Tensor]:
    """Normalised starts on a grid: translations over +-``SEARCH_RANGE`` of the field of view (5 steps per free axis)
    and, for planar motion (two free axes, mode other than translation), rotations by ``SEARCH_ANGLES`` degrees about
    ``centre`` ``[B, D]`` (normalised frame; the fixed mask's centroid, so that a focused organ turns in place)."""
    batch = centre.shape[0]
    dims = normaliser.shape[0] - 1
    free = list(free)
    offsets = torch.linspace(-SEARCH_RANGE, SEARCH_RANGE, 5, dtype=normaliser.dtype, device=normaliser.device)
    field_of_view = -2.0 * normaliser[:dims, dims]  # the normaliser maps voxel 0 to -field_of_view / 2
    angles = SEARCH_ANGLES if len(free) == 2 and mode != "translation" else (0.0,)
    candidates = []
    for angle in angles:
        rotation = torch.eye(dims + 1, dtype=normaliser.dtype, device=normaliser.device)
        cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        if len(free) == 2:
            i, j = free
            rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = cos, -sin, sin, cos
        # x -> R (x - c) + c + shift
        turned = rotation.repeat(batch, 1, 1)
        turned[:, :dims, dims] = centre - (rotation[:dims, :dims] @ centre.unsqueeze(-1)).squeeze(-1)
        for shift in torch.cartesian_prod(*[offsets] * len(free)).reshape(-1, len(free)):
            candidate = turned.clone()
            candidate[:, free, dims] += shift * field_of_view[free]
            candidates.append(candidate)
    return candidates


# ---------------------------------------------------------------------------------------------------------------------
# instance optimisation


def prealign(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    mode: str = "affine",
    similarity: str = "lncc",
    fixed_mask: torch.Tensor | None = None,
    init: str = "identity",
    init_matrix: torch.Tensor | None = None,
    frozen_axes: Sequence[int] = (),
    levels: Sequence[int] = (4, 2, 1),
    iterations: Sequence[int] = (100, 50, 25),
    learning_rate: float = 0.01,
    spacing: Sequence[float] | None = None,
    min_level_size: int = 8,
    similarity_kwargs: dict | None = None,
) -> AffineResult:
    """Affine (or rigid / similarity / translation) registration of ``moving`` to ``fixed`` by instance optimisation.

    Args:
        moving, fixed: images ``[B, C, *shape]`` on one voxel grid (2D or 3D, any device); ``moving`` may have B = 1.
        mode: ``"affine"`` (12 / 6 parameters), ``"similarity"``, ``"rigid"`` or ``"translation"``.
        similarity: ``"lncc"`` (same modality), ``"mi"`` or ``"mind"`` (across contrasts), ``"ncc"``, ``"mse"``.
        fixed_mask: weights ``[B or 1, 1, *shape]`` on the fixed grid restricting the similarity (e.g. a dilated atlas
            organ label) and, for ``init``, the fixed image's moments.
        init: ``"identity"``, ``"com"`` (align intensity centres of mass) or ``"moments"`` (centre of mass plus
            principal axes; the best of the sign choices and of the plain centre-of-mass start is kept per pair) or
            ``"search"`` (the best start of a grid of translations over +-20% of the field of view and, for planar
            motion, rotations over +-60 degrees, scored at the coarsest level).
        init_matrix: a voxel matrix ``[B or 1, D, D+1]`` to start from instead (e.g. ``AffineNet.last_matrix()``);
            the result is this matrix composed with the optimised ``mode`` transform.
        frozen_axes: axes without any motion, e.g. ``(2,)`` for in-plane alignment of short-axis stacks.
        levels: pyramid down-sampling factors, coarse to fine; ``iterations``: Adam steps per level.
        spacing: voxel size (defines which motions are rigid); ``None`` = isotropic voxels.
        similarity_kwargs: extra arguments of the similarity (e.g. ``{"kernel_size": 9}`` for LNCC).

    Returns:
        :class:`AffineResult` on the input device; ``warped`` is ``moving`` resampled linearly.
    """
    _check_mode(mode)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {tuple(SIMILARITIES)}, got {similarity!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if len(levels) != len(iterations):
        raise ValueError(f"levels {tuple(levels)} and iterations {tuple(iterations)} need the same length")
    dims = fixed.ndim - 2
    shape = tuple(fixed.shape[2:])
    if dims not in (2, 3) or tuple(moving.shape[2:]) != shape:
        raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must be [B, C, *shape] alike")
    batch = max(moving.shape[0], fixed.shape[0])
    frozen_axes = _check_axes(frozen_axes, dims)
    spacing = tuple(float(s) for s in (spacing or [1.0] * dims))
    device = fixed.device
    dtype = fixed.dtype if fixed.is_floating_point() else torch.float32
    features, loss_fn = SIMILARITIES[similarity]
    kwargs = dict(similarity_kwargs or {})

    fixed_n = _rescale_intensity(fixed.to(dtype)).expand(batch, *fixed.shape[1:])
    moving_n = _rescale_intensity(moving.to(dtype)).expand(batch, *moving.shape[1:])
    mask = None if fixed_mask is None else fixed_mask.to(device=device, dtype=dtype)

    pyramid = []
    for factor in levels:
        size = _level_shape(shape, int(factor), frozen_axes, min_level_size)
        f_level, m_level = _downsample(fixed_n, size), _downsample(moving_n, size)
        if features is not None:
            f_level, m_level = features(f_level), features(m_level)
        mask_level = None if mask is None else _downsample(mask, size)
        grid = fields.identity_grid(size, device=device, dtype=dtype)
        pyramid.append((grid, f_level, m_level, mask_level, _normaliser(size, shape, spacing, device, dtype)))

    def level_loss(normalised: torch.Tensor, level) -> torch.Tensor:
        grid, f_level, m_level, mask_level, normaliser = level
        warped = fields.warp(m_level, _apply(_to_voxel(normalised, normaliser), grid))
        return loss_fn(warped, f_level, mask_level, **kwargs)

    start = _initial_transform(
        init, init_matrix, pyramid, mask, fixed_n, moving_n, shape, spacing, mode, frozen_axes, level_loss, batch
    )
    free = _free_axes(dims, frozen_axes, device, dtype)
    params = torch.zeros(batch, num_parameters(mode, dims), device=device, dtype=dtype, requires_grad=True)
    optimiser = torch.optim.Adam([params], lr=learning_rate)
    for level, steps in zip(pyramid, iterations):
        for _ in range(int(steps)):
            optimiser.zero_grad(set_to_none=True)
            level_loss(start @ _parameters_to_normalised(params, mode, free), level).sum().backward()
            optimiser.step()

    with torch.no_grad():
        normalised = start @ _parameters_to_normalised(params, mode, free)
        full = _normaliser(shape, shape, spacing, device, dtype)
        matrix = _to_voxel(normalised, full)
        ddf = affine_ddf(matrix, shape)
        final_loss = level_loss(normalised, pyramid[-1])
        warped = fields.warp(moving.to(dtype).expand(batch, *moving.shape[1:]), ddf)
    return AffineResult(matrix=matrix, ddf=ddf, warped=warped, loss=final_loss)


def _initial_transform(
    init, init_matrix, pyramid, mask, fixed_n, moving_n, shape, spacing, mode, frozen_axes, level_loss, batch
) -> torch.Tensor:
    """Normalised homogeneous start ``[B, D+1, D+1]`` (identity, user matrix, or best moment-based candidate)."""
    dims = len(shape)
    full = _normaliser(shape, shape, spacing, fixed_n.device, fixed_n.dtype)
    if init_matrix is not None:
        matrix = init_matrix.to(full).reshape(-1, dims, dims + 1).expand(batch, dims, dims + 1)
        return _to_normalised(matrix, full)
    if init == "identity":
        return torch.eye(dims + 1, dtype=full.dtype, device=full.device).repeat(batch, 1, 1)
    if init == "search":
        free = [axis for axis in range(dims) if axis not in frozen_axes]
        if mask is None:
            centre = torch.zeros(batch, dims, dtype=full.dtype, device=full.device)
        else:
            centre = _moments(mask.expand(batch, *mask.shape[1:]), None, full)[0]
        candidates = _search_candidates(centre, free, full, mode)
    else:
        candidates = _moment_candidates(fixed_n, moving_n, mask, full, mode, frozen_axes, with_axes=init == "moments")
    if len(candidates) == 1:
        return candidates[0]
    with torch.no_grad():
        losses = torch.stack([level_loss(c, pyramid[0]) for c in candidates])  # [K, B]
    best = losses.argmin(0)
    return torch.stack(candidates)[best, torch.arange(batch, device=best.device)]
