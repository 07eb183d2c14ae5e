"""SST flow model F and pre-trained spatial transformer T: a light VoxelMorph (spec section 3.4).

Both are the same network: MONAI's ``VoxelMorphUNet`` with 5x5x5 kernels and strided-conv downsampling, predicting a
dense displacement in voxels (channel i moves along spatial axis i; no velocity integration, as in the authors'
code). The output conv starts near zero so a fresh model is close to the identity transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import VoxelMorphUNet
from torch import nn

from common.registration.fields import warp

__all__ = ["FlowNet"]


class FlowNet(nn.Module):
    """Displacement predictor ``ddf = F([moving, fixed])``.

    ``forward`` takes the moving and fixed images as one 2-channel tensor (channel 0 moving, channel 1 fixed), the
    bundle convention that lets ``verify_net_in_out``/export build an input, and returns the voxel DDF
    ``[B, spatial_dims, *spatial]``. :meth:`register` returns ``(warped moving, ddf)``. Spatial sizes must be
    divisible by ``2 ** (number of downsampling levels)`` = ``2 ** (len(channels) // 2)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        channels: Sequence[int] = (16, 32, 32, 32, 32, 32, 32, 16),
        final_channels: Sequence[int] = (16,),
        kernel_size: int = 5,
        output_init_std: float = 1e-5,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.backbone = VoxelMorphUNet(
            spatial_dims=spatial_dims,
            in_channels=2,
            unet_out_channels=final_channels[0],
            channels=tuple(channels),
            final_conv_channels=tuple(final_channels),
            kernel_size=kernel_size,
            up_kernel_size=kernel_size,
            use_maxpool=False,
        )
        out_conv = self.backbone.net[-1].final_conv_out.conv
        nn.init.normal_(out_conv.weight, std=output_init_std)
        nn.init.zeros_(out_conv.bias)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        if pair.shape[1] != 2:
            raise ValueError(f"FlowNet expects [B, 2 (moving, fixed), *spatial], got {tuple(pair.shape)}.")
        return self.backbone(pair)

    def register(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(moving warped onto fixed, ddf); images are warped trilinearly with border padding."""
        ddf = self(torch.cat([moving, fixed], dim=1))
        return warp(moving, ddf), ddf
