"""Displacement-field conventions, fixed once for every bundle.

* Tensors are ``[B, C, *spatial]`` with 2 or 3 spatial axes in the array order of the loaded image.
* A displacement field (``*_ddf``) has one channel per spatial axis, **in voxels**: channel ``i`` moves along axis ``i``
  (MONAI ``Warp``'s convention). A stationary velocity field (``*_svf``) uses the same units.
* Warping samples the moving image at the displaced position: ``warped(p) = moving(p + u(p))``.
* Sampling uses ``align_corners=True``: voxel centre ``0`` maps to ``-1`` and voxel ``n - 1`` to ``+1``, so one voxel is
  ``2 / (n - 1)`` normalised units. Normalised ``grid_sample`` units appear only in this module.
* Images are interpolated (tri)linearly, label maps with nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Warp

__all__ = [
    "identity_grid",
    "warp",
    "warp_labels",
    "voxel_to_normalized",
    "normalized_to_voxel",
    "to_sampling_grid",
    "compose",
    "resize_ddf",
    "integrate_svf",
    "jacobian_determinant",
]


def _spatial_dims(field: torch.Tensor) -> int:
    dims = field.ndim - 2
    if dims not in (2, 3) or field.shape[1] != dims:
        raise ValueError(
            "expected a displacement field [B, D, *spatial] with D = 2 or 3 spatial channels, "
            f"got shape {tuple(field.shape)}"
        )
    return dims


def _voxel_scale(spatial_shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Per-axis factor from voxels to normalised units, shaped to broadcast over ``[B, D, *spatial]``."""
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in spatial_shape], dtype=like.dtype, device=like.device)
    return scale.view(1, -1, *([1] * len(spatial_shape)))


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel coordinates ``[1, D, *shape]``: channel ``i`` holds the index along axis ``i``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """Warp ``image`` ``[B, C, *spatial]`` with the voxel displacement ``ddf``: ``out(p) = image(p + ddf(p))``."""
    _spatial_dims(ddf)
    if image.shape[0] != ddf.shape[0] and image.shape[0] == 1:
        image = image.expand(ddf.shape[0], *image.shape[1:])
    return Warp(mode=mode, padding_mode=padding_mode)(image, ddf.to(image.dtype) if image.is_floating_point() else ddf)


def warp_labels(labels: torch.Tensor, ddf: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Nearest-neighbour warp of a label map; the result keeps the input dtype (outside the image becomes 0)."""
    warped = warp(labels.to(ddf.dtype), ddf, mode="nearest", padding_mode=padding_mode)
    return warped.round().to(labels.dtype)


def voxel_to_normalized(ddf: torch.Tensor) -> torch.Tensor:
    """Voxel displacement -> normalised (``align_corners=True``) displacement, channel order unchanged."""
    _spatial_dims(ddf)
    return ddf * _voxel_scale(ddf.shape[2:], ddf)


def normalized_to_voxel(ddf: torch.Tensor) -> torch.Tensor:
    """Normalised (``align_corners=True``) displacement -> voxel displacement, channel order unchanged."""
    _spatial_dims(ddf)
    return ddf / _voxel_scale(ddf.shape[2:], ddf)


def to_sampling_grid(ddf: torch.Tensor) -> torch.Tensor:
    """Absolute sampling grid ``[B, *spatial, D]`` for ``F.grid_sample(..., align_corners=True)``.

    ``grid_sample`` wants the last axis ordered ``(x, y[, z])`` = reversed array axes, hence the flip.
    """
    dims = _spatial_dims(ddf)
    identity = identity_grid(ddf.shape[2:], device=ddf.device, dtype=ddf.dtype)
    normalised = voxel_to_normalized(identity + ddf) - 1.0
    return normalised.permute(0, *range(2, 2 + dims), 1).flip(-1)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Field ``c`` with ``warp(warp(m, first), second) == warp(m, c)``.

    Sequential warping samples ``first`` where ``second`` points: ``c(p) = second(p) + first(p + second(p))``.
    """
    return second + warp(first, second, mode="bilinear", padding_mode="border")


def resize_ddf(ddf: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linearly resample a voxel displacement field to ``size``, rescaling each channel to the new voxel size.

    With ``align_corners=True`` the end voxels stay fixed, so axis ``i`` scales by ``(n_new - 1) / (n_old - 1)``.
    """
    dims = _spatial_dims(ddf)
    size = tuple(int(s) for s in size)
    if len(size) != dims:
        raise ValueError(f"size {size} has {len(size)} axes but the field has {dims}")
    mode = "trilinear" if dims == 3 else "bilinear"
    resized = F.interpolate(ddf, size=size, mode=mode, align_corners=True)
    factors = [(new - 1) / max(old - 1, 1) for new, old in zip(size, ddf.shape[2:])]
    scale = torch.tensor(factors, dtype=ddf.dtype, device=ddf.device).view(1, -1, *([1] * dims))
    return resized * scale


def integrate_svf(svf: torch.Tensor, num_steps: int = 7) -> torch.Tensor:
    """Integrate a stationary velocity field into a displacement by scaling and squaring (MONAI ``DVF2DDF``)."""
    _spatial_dims(svf)
    if num_steps == 0:
        return svf
    return DVF2DDF(num_steps=num_steps, mode="bilinear", padding_mode="border")(svf)


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant ``[B, *spatial]`` of the Jacobian of ``p -> p + ddf(p)`` (central differences, one-sided at edges).

    Derivatives are per voxel, so the result is unit-free; values ``<= 0`` mark folding.
    """
    dims = _spatial_dims(ddf)
    # gradients[i][:, j] = d u_j / d x_i
    gradients = torch.gradient(ddf, dim=list(range(2, 2 + dims)))
    eye = torch.eye(dims, dtype=ddf.dtype, device=ddf.device)
    jac = torch.stack([torch.stack([gradients[i][:, j] for i in range(dims)], dim=-1) for j in range(dims)], dim=-2)
    jac = jac + eye  # jac[..., j, i] = d(p_j + u_j)/d x_i
    return torch.linalg.det(jac)
