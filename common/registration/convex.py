"""Differentiable coupled convex optimisation on feature maps (the optimiser ``h`` of cyclical self-training).

Pipeline for feature maps ``F``, ``M`` ``[B, C, *grid]`` (Bigalke et al. 2023, after Siebert & Heinrich 2022):

1. SAD cost volume over ``(2r+1)^3`` integer displacements ``delta`` (feature voxels, channel order = axis order):
   ``C(p, delta) = Box3[ sum_c |F_c(p) - M_c(p + delta)| ]``, ``M`` zero-padded (:func:`sad_cost_volume`).
   Index ``k`` of ``delta`` runs with axis 0 fastest: ``delta = (k % 5 - 2, (k // 5) % 5 - 2, k // 25 - 2)`` for r = 2.
2. Soft-argmin ``SA(E)(p) = sum_delta delta * softmax_delta(-beta E(p, delta))`` and three coupling passes
   ``u <- Box3(SA(C + alpha |delta - u|^2))`` (:func:`coupled_convex`). No hard argmin: every step is differentiable.
3. Feature voxels -> voxels of the output grid and smooth upsampling (Up2 + Box3^2, Up2 + Box3^2, resize)
   (:func:`feature_to_voxels`).

Forward-backward inverse consistency (:func:`inverse_consistency`) runs without gradients, as in the reference.
All fields are voxel displacements (``common.registration.fields`` conventions); only the scale between the feature grid
and the output grid is a choice (``legacy_norm_scale``, see :func:`feature_voxel_scale`).
Box3 is a 3x3x3 mean with zero padding counted in the mean (``avg_pool3d(3, 1, 1)``), which damps values at the border.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from common.registration import fields

__all__ = [
    "box_filter",
    "displacement_table",
    "sad_cost_volume",
    "soft_argmin",
    "coupled_convex",
    "feature_voxel_scale",
    "upsample_field",
    "feature_to_voxels",
    "rescale_field",
    "inverse_consistency",
    "convex_register",
    "compose_fields",
]


def _box3_sum_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of each voxel and its two neighbours along ``dim``, zeros outside: a symmetric operator."""
    out = x.clone()
    n = x.shape[dim]
    if n > 1:
        out.narrow(dim, 1, n - 1).add_(x.narrow(dim, 0, n - 1))
        out.narrow(dim, 0, n - 1).add_(x.narrow(dim, 1, n - 1))
    return out


def _box3_repeated(x: torch.Tensor, times: int) -> torch.Tensor:
    spatial = range(2, x.ndim)
    for _ in range(times):
        for dim in spatial:
            x = _box3_sum_axis(x, dim)
        x = x.mul_(3.0 ** -len(spatial))  # once per full filter: values stay in range under fp16
    return x


class _BoxFilter(torch.autograd.Function):
    """Box3^n as separable 1D sums, scaled once per filter. The operator is symmetric: its backward is itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, times: int) -> torch.Tensor:
        ctx.times = times
        return _box3_repeated(x, times)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _box3_repeated(grad, ctx.times), None


def box_filter(x: torch.Tensor, times: int = 1) -> torch.Tensor:
    """``times`` successive 3^D mean filters over the spatial axes of ``[B, C, *spatial]`` (zero padding counted).

    Equals ``avg_pool3d(x, 3, stride=1, padding=1)`` applied ``times`` times, at a third of the cost (separable).
    """
    if times <= 0:
        return x
    if torch.jit.is_tracing():  # a custom autograd Function cannot be exported; the plain ops give the same values
        return _box3_repeated(x, int(times))
    return _BoxFilter.apply(x, int(times))


def displacement_table(
    radius: int = 2, spatial_dims: int = 3, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ``(2r+1)^D`` candidate displacements ``[D, K]`` in feature voxels; channel ``i`` = axis ``i``.

    Axis 0 varies fastest with ``k``: ``delta_i = (k // (2r+1)^i) % (2r+1) - r``.
    """
    steps = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    grids = torch.meshgrid(*([steps] * spatial_dims), indexing="ij")  # grids[j] varies along meshgrid axis j
    # meshgrid axis 0 is the slowest in the flattened order, so it carries the last spatial axis.
    return torch.stack([grids[spatial_dims - 1 - i].reshape(-1) for i in range(spatial_dims)], dim=0)


def _shifted_slices(shape: Sequence[int], radius: int) -> list[tuple[slice, ...]]:
    """Slices of the padded moving map giving ``M(p + delta_k)`` for every ``k`` of :func:`displacement_table`."""
    table = displacement_table(radius, len(shape), dtype=torch.int64).t().tolist()
    return [tuple(slice(radius + d, radius + d + n) for d, n in zip(delta, shape)) for delta in table]


def _sad_cost(fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
    shape = fixed.shape[2:]
    padded = F.pad(moving, [radius] * (2 * len(shape)))
    slices = _shifted_slices(shape, radius)
    cost = torch.empty(fixed.shape[0], len(slices), *shape, dtype=fixed.dtype, device=fixed.device)
    for k, window in enumerate(slices):
        cost[:, k] = (fixed - padded[(..., *window)]).abs_().sum(1)
    return cost


class _SADCost(torch.autograd.Function):
    """Sum of absolute differences per displacement; backward recomputes the signs instead of storing K copies."""

    @staticmethod
    def forward(ctx, fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
        ctx.radius = radius
        ctx.save_for_backward(fixed, moving)
        return _sad_cost(fixed, moving, radius)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        fixed, moving = ctx.saved_tensors
        radius = ctx.radius
        shape = fixed.shape[2:]
        padded = F.pad(moving, [radius] * (2 * len(shape)))
        grad_fixed = torch.zeros_like(fixed)
        grad_padded = torch.zeros_like(padded)
        for k, window in enumerate(_shifted_slices(shape, radius)):
            weighted = (fixed - padded[(..., *window)]).sign_().mul_(grad[:, k : k + 1])
            grad_fixed.add_(weighted)
            grad_padded[(..., *window)].sub_(weighted)
        crop = tuple(slice(radius, radius + n) for n in shape)
        return grad_fixed, grad_padded[(..., *crop)], None


def sad_cost_volume(fixed: torch.Tensor, moving: torch.Tensor, radius: int = 2, smooth: bool = True) -> torch.Tensor:
    """Cost ``[B, (2r+1)^D, *grid]``: SAD of ``fixed(p)`` and zero-padded ``moving(p + delta_k)``, then one Box3.

    Differentiable in both inputs; memory stays at one cost volume (the K shifted differences are never stored).
    """
    if fixed.shape != moving.shape:
        raise ValueError(f"feature maps differ in shape: {tuple(fixed.shape)} vs {tuple(moving.shape)}")
    # a custom autograd Function cannot be exported by a trace; the plain forward gives the same values
    cost = (
        _sad_cost(fixed, moving, int(radius)) if torch.jit.is_tracing() else _SADCost.apply(fixed, moving, int(radius))
    )
    return box_filter(cost) if smooth else cost


def soft_argmin(energy: torch.Tensor, table: torch.Tensor, beta: float) -> torch.Tensor:
    """Expected displacement ``[B, D, *grid]`` under ``softmax(-beta * energy)`` over the K candidates (fp32)."""
    weights = torch.softmax(-beta * energy.float(), dim=1)
    return torch.einsum("dk,bk...->bd...", table.float(), weights)


def coupled_convex(
    cost: torch.Tensor, radius: int = 2, beta: float = 20.0, alphas: Sequence[float] = (0.003, 0.03, 0.3)
) -> torch.Tensor:
    """Coupled convex optimisation with soft-argmin: cost ``[B, K, *grid]`` -> field ``[B, D, *grid]`` (feature voxels).

    ``u = SA(C)`` (not smoothed), then for each ``alpha``: ``u = Box3(SA(C + alpha |delta - u|^2))``. The per-voxel
    ``|u|^2`` term of the coupling is constant over the candidates and cancels in the softmax, so it is left out.
    """
    spatial_dims = cost.ndim - 2
    table = displacement_table(radius, spatial_dims, device=cost.device, dtype=torch.float32)
    if table.shape[1] != cost.shape[1]:
        raise ValueError(f"cost has {cost.shape[1]} candidates, radius {radius} gives {table.shape[1]}")
    cost = cost.float()
    squared_norm = (table**2).sum(0).view(1, -1, *([1] * spatial_dims))
    u = soft_argmin(cost, table, beta)
    for alpha in alphas:
        coupling = squared_norm - 2.0 * torch.einsum("dk,bd...->bk...", table, u)
        u = box_filter(soft_argmin(cost + alpha * coupling, table, beta))
    return u


def feature_voxel_scale(
    feature_shape: Sequence[int], output_shape: Sequence[int], legacy_norm_scale: bool = True
) -> list[float]:
    """Voxels of the output grid per feature voxel, per axis.

    ``legacy_norm_scale=False``: ``n_out / n_feat`` (8 for the 1/8 grid), the stride geometry of ``g``.
    ``legacy_norm_scale=True`` reproduces the reference (quirk Q1): it normalises with ``(n_feat - 1) / 2`` but reads
    the field with ``align_corners=False`` grids, i.e. ``n_out / (n_feat - 1)`` (8.348 / 8.421 / 8.258 on 24x20x32).
    """
    if legacy_norm_scale:
        return [n_out / max(n_feat - 1, 1) for n_feat, n_out in zip(feature_shape, output_shape)]
    return [n_out / n_feat for n_feat, n_out in zip(feature_shape, output_shape)]


def _resample(field: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    mode = "trilinear" if field.ndim == 5 else "bilinear"
    return F.interpolate(field, size=tuple(int(s) for s in size), mode=mode, align_corners=False)


def rescale_field(field: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a voxel field to ``size`` on cell-centred grids (``align_corners=False``), values times ``new/old``.

    The reference's convention for moving fields between resolution levels (half-res pseudo labels, the Adam grid);
    ``fields.resize_ddf`` is the ``align_corners=True`` counterpart.
    """
    factors = [new / old for new, old in zip(size, field.shape[2:])]
    scale = torch.tensor(factors, dtype=field.dtype, device=field.device).view(1, -1, *([1] * len(factors)))
    return _resample(field, size) * scale


def upsample_field(field: torch.Tensor, output_shape: Sequence[int]) -> torch.Tensor:
    """Smooth upsampling of the values (units unchanged): Up2 + Box3^2, Up2 + Box3^2, resize to ``output_shape``.

    Interpolation is linear with ``align_corners=False`` (cell-centred grids, as the strided convolutions of ``g``).
    """
    for _ in range(2):
        field = box_filter(_resample(field, [2 * n for n in field.shape[2:]]), times=2)
    if tuple(field.shape[2:]) != tuple(output_shape):
        field = _resample(field, output_shape)
    return field


def feature_to_voxels(field: torch.Tensor, output_shape: Sequence[int], legacy_norm_scale: bool = True) -> torch.Tensor:
    """Feature-voxel field ``[B, D, *grid]`` -> voxel field ``[B, D, *output_shape]`` (scaled, then upsampled)."""
    scale = feature_voxel_scale(field.shape[2:], output_shape, legacy_norm_scale)
    scale_t = torch.tensor(scale, dtype=field.dtype, device=field.device).view(1, -1, *([1] * (field.ndim - 2)))
    return upsample_field(field * scale_t, output_shape)


@torch.no_grad()
def inverse_consistency(
    forward: torch.Tensor, backward: torch.Tensor, iterations: int = 15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobi iterations ``f <- (f - b o (id + f)) / 2``, ``b <- (b - f o (id + b)) / 2`` on voxel fields of one grid.

    ``b o (id + f)`` samples ``b`` at ``p + f(p)`` linearly with zeros outside, so the border is damped. No gradients
    pass (the reference runs it under ``no_grad``); the result is detached.
    """
    f, b = forward.detach(), backward.detach()
    for _ in range(int(iterations)):
        f, b = (
            0.5 * (f - fields.warp(b, f, padding_mode="zeros")),
            0.5 * (b - fields.warp(f, b, padding_mode="zeros")),
        )
    return f, b


def convex_register(
    feat_fixed: torch.Tensor,
    feat_moving: torch.Tensor,
    output_shape: Sequence[int],
    use_ice: bool = False,
    radius: int = 2,
    beta: float = 20.0,
    alphas: Sequence[float] = (0.003, 0.03, 0.3),
    feature_scale: float = 5.0,
    ice_iterations: int = 15,
    legacy_norm_scale: bool = True,
) -> torch.Tensor:
    """Optimiser ``h``: features ``[B, C, *grid]`` of fixed and moving -> voxel field ``[B, D, *output_shape]``.

    Without ICE the whole path carries gradients to the features; with ICE the forward field is replaced by its
    inverse-consistent (detached) version before upsampling.
    """
    feat_fixed = feature_scale * feat_fixed
    feat_moving = feature_scale * feat_moving
    field = coupled_convex(sad_cost_volume(feat_fixed, feat_moving, radius), radius, beta, alphas)
    if use_ice:
        with torch.no_grad():
            backward = coupled_convex(sad_cost_volume(feat_moving, feat_fixed, radius), radius, beta, alphas)
        field = inverse_consistency(field, backward, ice_iterations)[0]
    return feature_to_voxels(field, output_shape, legacy_norm_scale)


def compose_fields(first: torch.Tensor, second: torch.Tensor, legacy_order: bool = False) -> torch.Tensor:
    """Field of warping with ``first`` and then with ``second``: ``second + first o (id + second)``.

    ``legacy_order=True`` reproduces the reference's reversed composite ``first + second o (id + first)`` (quirk Q2).
    """
    if legacy_order:
        return fields.compose(second, first)
    return fields.compose(first, second)
