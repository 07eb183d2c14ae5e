"""Adam instance optimisation of a dense displacement field on fixed feature maps (the pseudo-label refinement).

For a pair of (non-learned) feature maps ``G_f``, ``G_m`` ``[B, C, *grid]`` on a grid coarser than the field (half
resolution in the paper), the parameters ``theta`` (voxels of the feature grid) are initialised from the input field
and updated with Adam to minimise, per pair,

    data_weight * mean_{p,c} (G_m(p + phi(p)) - G_f(p))^2
    + reg_fac * lambda_reg * sum_axis mean (phi(p + e_axis) - phi(p))^2

with ``phi = Box3^3(theta)`` (a B-spline-like smoothing; Bigalke et al. 2023 / convexAdam defaults: lr 1, 50 iterations,
weights 12 and 0.65). The result is upsampled to the field's grid and smoothed again with Box3^3.

Speed (the hot spot of the pseudo-label stream): everything constant is prepared once (moving features in channels-last
layout, which halves the trilinear sampling time on CPU); Box3^3 is separable and its backward is itself (symmetric
operator); the step is otherwise the plain Adam update. Gradients flow only to ``theta``; the output is detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.registration import fields
from common.registration.convex import box_filter, rescale_field

__all__ = ["adam_refine", "diffusion_regulariser"]


def diffusion_regulariser(field: torch.Tensor) -> torch.Tensor:
    """Per-pair ``sum_axis mean((phi(p + e_axis) - phi(p))^2)`` over all forward differences and channels, ``[B]``."""
    total = field.new_zeros(field.shape[0])
    for dim in range(2, field.ndim):
        total = total + torch.diff(field, dim=dim).pow(2).flatten(1).mean(1)
    return total


class _MeanSquaredError(torch.autograd.Function):
    """Per-pair ``mean((a - b)^2)`` ``[B]``, gradient for ``a`` only. ``a`` is overwritten by the residual (the
    sampled features are not needed again), the sum of squares is one dot product per pair, and the backward scales
    the stored residual in place: no full-size temporaries beyond the residual itself."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        residual = a.sub_(b).view(a.shape[0], -1)
        ctx.save_for_backward(residual)
        ctx.shape = a.shape
        return torch.stack([torch.dot(r, r) for r in residual]) / residual.shape[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (residual,) = ctx.saved_tensors
        return residual.mul_(grad.view(-1, 1) * (2.0 / residual.shape[1])).view(ctx.shape), None


def adam_refine(
    feat_fixed: torch.Tensor,
    feat_moving: torch.Tensor,
    ddf: torch.Tensor,
    reg_fac: float = 1.0,
    iterations: int = 50,
    learning_rate: float = 1.0,
    lambda_reg: float = 0.65,
    data_weight: float = 12.0,
    smoothing_passes: int = 3,
    return_prestep: bool = True,
) -> torch.Tensor:
    """Refine the voxel field ``ddf`` ``[B, D, *shape]`` with Adam on features ``[B, C, *grid]`` (half resolution).

    Fields move between the two grids with ``convex.rescale_field`` (cell-centred, values scaled by the size ratio).
    ``return_prestep=True`` reproduces the reference, which returns the smoothed field of its last iteration computed
    before that iteration's update (quirk Q7: ``iterations - 1`` effective updates); ``False`` returns the field after
    the last update. Runs in fp32 whatever the autocast state.
    """
    if feat_fixed.shape != feat_moving.shape:
        raise ValueError(f"feature maps differ: {tuple(feat_fixed.shape)} vs {tuple(feat_moving.shape)}")
    shape = tuple(ddf.shape[2:])
    grid = tuple(feat_fixed.shape[2:])
    memory_format = torch.channels_last_3d if ddf.ndim == 5 else torch.channels_last
    with torch.enable_grad(), torch.autocast(device_type=ddf.device.type, enabled=False):
        fixed = feat_fixed.detach().float().contiguous()
        moving = feat_moving.detach().float().contiguous(memory_format=memory_format)
        theta = rescale_field(ddf.detach().float(), grid).requires_grad_(True)
        optimiser = torch.optim.Adam([theta], lr=learning_rate)
        phi = box_filter(theta, smoothing_passes)
        for _ in range(int(iterations)):
            optimiser.zero_grad(set_to_none=True)
            phi = box_filter(theta, smoothing_passes)
            sampled = F.grid_sample(
                moving, fields.to_sampling_grid(phi), mode="bilinear", padding_mode="zeros", align_corners=True
            )
            data = _MeanSquaredError.apply(sampled, fixed)
            loss = data_weight * data + (reg_fac * lambda_reg) * diffusion_regulariser(phi)
            loss.sum().backward()
            optimiser.step()
        if not return_prestep:
            phi = box_filter(theta, smoothing_passes)
        refined = phi.detach()
    return box_filter(rescale_field(refined, shape), smoothing_passes).to(ddf.dtype)
