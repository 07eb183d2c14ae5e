"""Learned affine pre-alignment: MONAI ``GlobalNet`` predicting a voxel matrix from the pair in one forward pass.

Why: instance optimisation (``affine.prealign``) needs a few hundred steps per pair; once a model is trained on a
cohort, one forward pass gives the affine (optionally refined by ``prealign(..., init_matrix=...)``).

Convention check: GlobalNet's head computes ``theta @ [p; 1] - p`` on the voxel index grid of the input, with theta
reshaped to ``[B, D, D+1]`` and channel ``i`` = axis ``i``; that is exactly ``affine_ddf(theta, shape)`` of
:mod:`common.registration.affine`, so its output feeds ``fields.warp`` unchanged. Training: any similarity of
:mod:`common.registration.similarity` between ``fields.warp(moving, net(cat([moving, fixed], 1)))`` and ``fixed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import GlobalNet

from common.registration import fields
from common.registration.affine import AffineResult

__all__ = ["AffineNet"]


class AffineNet(GlobalNet):
    """``GlobalNet`` on ``cat([moving, fixed], dim=1)`` ``[B, 2C, *image_size]`` -> affine voxel ddf ``[B, D, *image_size]``.

    Starts at the identity (MONAI zero-initialises the head's weights and sets its bias to the identity matrix).
    ``image_size`` must be divisible by ``2 ** depth``.
    """

    def __init__(
        self,
        image_size: Sequence[int],
        in_channels: int = 2,
        num_channel_initial: int = 16,
        depth: int = 3,
        out_kernel_initializer: str | None = "kaiming_uniform",
    ) -> None:
        super().__init__(
            image_size=list(image_size),
            spatial_dims=len(image_size),
            in_channels=in_channels,
            num_channel_initial=num_channel_initial,
            depth=depth,
            out_kernel_initializer=out_kernel_initializer,
            save_theta=True,
        )

    def last_matrix(self) -> torch.Tensor:
        """Voxel matrix ``[B, D, D+1]`` (fixed voxel -> moving voxel) of the last forward pass (detached)."""
        dims = self.spatial_dims
        return self.output_block.theta.reshape(-1, dims, dims + 1)

    @torch.no_grad()
    def register(self, moving: torch.Tensor, fixed: torch.Tensor) -> AffineResult:
        """One forward pass as an :class:`~common.registration.affine.AffineResult` (``loss`` is NaN: not computed)."""
        ddf = self(torch.cat([moving, fixed], dim=1))
        warped = fields.warp(moving, ddf)
        return AffineResult(matrix=self.last_matrix(), ddf=ddf, warped=warped, loss=torch.full((ddf.shape[0],), torch.nan))
