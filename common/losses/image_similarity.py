"""Image distances and flow regularisers of the SST pipeline (Tomar et al., WACV 2022, Eqs. 4 and 9).

Images enter the SST networks in [-1, 1]; SSIM is computed on the same images mapped to [0, 1] (data range 1), as
the authors' code does, so that the SSIM constants K1, K2 keep their usual meaning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import SSIMLoss
from monai.metrics.regression import MultiScaleSSIMMetric
from torch import nn

__all__ = ["SSIML1Loss", "flow_gradient_l1", "FlowGradientL1Loss"]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


class SSIML1Loss(nn.Module):
    """L(u, v) = l1_weight * mean|u - v| + ssim_weight * (1 - SSIM((u+1)/2, (v+1)/2)) for images in [-1, 1].

    Single-scale SSIM uses MONAI's ``SSIMLoss`` (Gaussian window ``win_size``, sigma ``kernel_sigma``, 'valid'
    filtering). ``multiscale=True`` switches to MONAI's ``MultiScaleSSIMMetric`` with the five Wang et al. weights,
    which needs every side larger than (win_size - 1) * 2**4 (128x160x160 brains, not small test volumes).
    The paper weights the two terms 1:1; the authors' code uses 0.5:0.5.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        l1_weight: float = 1.0,
        ssim_weight: float = 1.0,
        win_size: int = 7,
        kernel_sigma: float = 1.5,
        multiscale: bool = False,
        ms_weights: Sequence[float] = MS_SSIM_WEIGHTS,
    ) -> None:
        super().__init__()
        self.l1_weight = float(l1_weight)
        self.ssim_weight = float(ssim_weight)
        self.win_size = int(win_size)
        self.multiscale = bool(multiscale)
        if self.multiscale:
            self.ssim = MultiScaleSSIMMetric(
                spatial_dims=spatial_dims,
                data_range=1.0,
                kernel_size=win_size,
                kernel_sigma=kernel_sigma,
                weights=tuple(ms_weights),
            )
        else:
            self.ssim = SSIMLoss(
                spatial_dims=spatial_dims, data_range=1.0, win_size=win_size, kernel_sigma=kernel_sigma
            )

    def ssim_distance(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """1 - SSIM of the [0, 1]-mapped images, averaged over the batch."""
        a, b = (u + 1.0) / 2.0, (v + 1.0) / 2.0
        if self.multiscale:
            return 1.0 - self.ssim._compute_tensor(a, b).mean()
        return self.ssim(a, b)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if u.shape != v.shape:
            raise ValueError(f"SSIM-L1 needs equal shapes, got {tuple(u.shape)} and {tuple(v.shape)}.")
        if min(u.shape[2:]) < self.win_size:
            raise ValueError(f"SSIM window {self.win_size} is larger than the smallest side of {tuple(u.shape[2:])}.")
        loss = u.new_zeros(())
        if self.l1_weight:
            loss = loss + self.l1_weight * (u - v).abs().mean()
        if self.ssim_weight:
            loss = loss + self.ssim_weight * self.ssim_distance(u, v)
        return loss


def flow_gradient_l1(ddf: torch.Tensor) -> torch.Tensor:
    """Eq. 9: mean over spatial axes of the mean absolute forward difference of every flow channel.

    For a field ``[B, D, *spatial]`` that is linear with slope ``a`` along one axis (all channels), the value is
    ``|a| / D``: one of the D axes contributes ``|a|``, the others 0.
    """
    spatial_dims = ddf.ndim - 2
    if spatial_dims < 1:
        raise ValueError(f"Expected a field [B, C, *spatial], got shape {tuple(ddf.shape)}.")
    terms = [torch.diff(ddf, dim=axis + 2).abs().mean() for axis in range(spatial_dims)]
    return torch.stack(terms).mean()


class FlowGradientL1Loss(nn.Module):
    """Module form of :func:`flow_gradient_l1` so that configs can instantiate it."""

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        return flow_gradient_l1(ddf)
