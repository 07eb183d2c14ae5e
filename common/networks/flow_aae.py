"""Flow adversarial auto-encoder of SST (Sec. 3.3-3.4; spec section 3.6).

The encoder maps a displacement field (voxels) to a spatial latent ``[B, latent_channels, *spatial/2**L]``; the
generator maps such latents (or samples of N(0, I)) back to a field. A ``LatentDiscriminator``
(``common.networks.appearance``) on the flattened latent imposes the Gaussian prior. With
``L = len(encoder_channels) + 1`` halvings, the field size must be divisible by ``2 ** L`` (32 for the defaults); the
SST engine resamples flows to such a size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv, Norm
from torch import nn

__all__ = ["FlowEncoder", "FlowGenerator", "FlowAAE"]


class FlowEncoder(nn.Module):
    """[conv k5 s2 -> IN -> LReLU] per entry of ``channels``, then conv k4 s2 (no bias) to ``latent_channels``."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 3,
        channels: Sequence[int] = (32, 64, 128, 256),
        latent_channels: int = 64,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        inorm = Norm[Norm.INSTANCE, spatial_dims]
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            layers += [conv(prev, ch, 5, stride=2, padding=2), inorm(ch), nn.LeakyReLU(0.2)]
            prev = ch
        layers.append(conv(prev, latent_channels, 4, stride=2, padding=1, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        return self.net(ddf)


class FlowGenerator(nn.Module):
    """[transposed conv k4 s2 -> IN -> LReLU] per entry of ``channels``, then conv k3 to ``out_channels`` (no act)."""

    def __init__(
        self,
        spatial_dims: int = 3,
        latent_channels: int = 64,
        channels: Sequence[int] = (256, 128, 64, 32, 32),
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        convt = Conv[Conv.CONVTRANS, spatial_dims]
        conv = Conv[Conv.CONV, spatial_dims]
        inorm = Norm[Norm.INSTANCE, spatial_dims]
        layers: list[nn.Module] = []
        prev = latent_channels
        for ch in channels:
            layers += [convt(prev, ch, 4, stride=2, padding=1), inorm(ch), nn.LeakyReLU(0.2)]
            prev = ch
        layers.append(conv(prev, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class FlowAAE(nn.Module):
    """Encoder + generator pair; ``forward`` reconstructs a field, ``encode``/``decode`` expose the latent."""

    def __init__(
        self,
        spatial_dims: int = 3,
        encoder_channels: Sequence[int] = (32, 64, 128, 256),
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 32),
        latent_channels: int = 64,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != len(encoder_channels) + 1:
            raise ValueError(
                "the generator needs one upsampling block per encoder halving (len(encoder_channels) + 1)."
            )
        self.spatial_dims = spatial_dims
        self.num_halvings = len(encoder_channels) + 1
        self.latent_channels = latent_channels
        self.encoder = FlowEncoder(spatial_dims, spatial_dims, encoder_channels, latent_channels)
        self.generator = FlowGenerator(spatial_dims, latent_channels, decoder_channels, spatial_dims)

    def latent_shape(self, field_size: Sequence[int]) -> tuple[int, ...]:
        """Latent shape (without batch) for fields of ``field_size``; raises if the size is not divisible."""
        factor = 2**self.num_halvings
        if any(int(s) % factor for s in field_size):
            raise ValueError(f"flow AAE field size {tuple(field_size)} must be divisible by {factor}.")
        return (self.latent_channels, *[int(s) // factor for s in field_size])

    def encode(self, ddf: torch.Tensor) -> torch.Tensor:
        return self.encoder(ddf)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(ddf))
