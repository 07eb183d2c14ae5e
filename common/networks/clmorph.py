"""CLMorph: contrastive probabilistic registration network (Liu, Aviles-Rivero, Schönlieb).

Siamese, weight-shared 3D CNN encoder ``f`` applied to the moving (unaligned) image x and the fixed (reference) image y
in two passes; a fully connected projection ``g`` on the global-average-pooled deepest feature for the contrastive
loss; one decoder over the concatenated same-resolution features of both passes; a probabilistic head giving the mean
and log-variance of a stationary velocity field z. z is sampled with the reparameterisation trick in training (the mean
at inference), integrated by scaling and squaring (MONAI ``DVF2DDF``) into a displacement in voxels (channel i moves
along spatial axis i) and applied with MONAI ``Warp``: ``warped(p) = x(p + ddf(p))``.

``forward`` takes one 2-channel tensor ``[B, 2, *spatial]`` (moving, fixed) and returns one tensor, the ddf, so that
``verify_net_in_out`` and ``ckpt_export --use_trace True`` work on it. The training engine calls ``forward_train``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import VoxelMorph, VoxelMorphUNet
from torch import nn

from common.registration.fields import integrate_svf, resize_ddf

__all__ = ["CLMorphNet", "MonaiVoxelMorph", "split_pair"]


def split_pair(pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, 2, *spatial]`` -> (moving ``[B, 1, ...]``, fixed ``[B, 1, ...]``)."""
    if pair.ndim < 4 or pair.shape[1] != 2:
        raise ValueError(f"expected a 2-channel (moving, fixed) tensor [B, 2, *spatial], got {tuple(pair.shape)}")
    return pair[:, :1], pair[:, 1:]


class _ConvBlock(nn.Sequential):
    """Conv k3 -> BatchNorm -> LeakyReLU(0.2); stride 2 halves every axis (ceil for odd sizes)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> None:
        conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
        norm = (nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 2]
        super().__init__(
            conv(in_channels, out_channels, 3, stride=stride, padding=1), norm(out_channels), nn.LeakyReLU(0.2)
        )


class _Encoder(nn.Module):
    """One branch of the siamese encoder; returns the features at scales 1/2, 1/4, ... (deepest last)."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        widths = [in_channels, *channels]
        self.levels = nn.ModuleList(
            _ConvBlock(spatial_dims, widths[i], widths[i + 1], stride=2) for i in range(len(channels))
        )

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        features, x = [], image
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class CLMorphNet(nn.Module):
    """Siamese-encoder probabilistic SVF registration network with a projection head (and optional BYOL parts).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each image (1 for MRI).
        encoder_channels: widths of the stride-2 encoder levels (scales 1/2, 1/4, ...); VoxelMorph's by default.
        decoder_channels: one width per encoder level (coarse to fine), then the full-resolution convolutions.
        projection_dim: output size of the linear projection g (the contrastive embedding).
        integration_steps: scaling-and-squaring steps (0 = use z as a displacement).
        int_downsize: integrate at 1/int_downsize resolution (voxelmorph's option); 1 = full resolution.
        bn_weight_std: BatchNorm weights ~ N(0, std) as the paper states; None keeps PyTorch's default (1).
        byol: build the BYOL predictor and the momentum (EMA) target encoder/projection.
        byol_hidden: hidden width of the BYOL predictor MLP.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        encoder_channels: Sequence[int] = (16, 32, 32, 32),
        decoder_channels: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        projection_dim: int = 128,
        integration_steps: int = 7,
        int_downsize: int = 1,
        bn_weight_std: float | None = 0.1,
        byol: bool = False,
        byol_hidden: int = 256,
    ) -> None:
        super().__init__()
        levels = len(encoder_channels)
        if len(decoder_channels) <= levels:
            raise ValueError(f"decoder_channels needs > {levels} entries (one per level + full-resolution convs)")
        self.spatial_dims, self.integration_steps, self.int_downsize = spatial_dims, integration_steps, int_downsize
        self.encoder = _Encoder(spatial_dims, in_channels, encoder_channels)
        self.projection = nn.Linear(encoder_channels[-1], projection_dim)

        skips = [2 * c for c in reversed(encoder_channels)] + [2 * in_channels]  # concatenated (x, y) features
        decoder, prev = [], 0
        for i, width in enumerate(decoder_channels[: levels + 1]):
            decoder.append(_ConvBlock(spatial_dims, prev + skips[i], width))
            prev = width
        self.decoder = nn.ModuleList(decoder)
        self.refine = nn.Sequential(
            *[
                _ConvBlock(spatial_dims, a, b)
                for a, b in zip(decoder_channels[levels:-1], decoder_channels[levels + 1 :], strict=True)
            ]
        )
        conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
        self.mean_head = conv(decoder_channels[-1], spatial_dims, 3, padding=1)
        self.log_var_head = conv(decoder_channels[-1], spatial_dims, 3, padding=1)
        self._init_weights(bn_weight_std)

        self.byol = byol
        if byol:
            self.predictor = nn.Sequential(
                nn.Linear(projection_dim, byol_hidden), nn.BatchNorm1d(byol_hidden), nn.ReLU(inplace=True),
                nn.Linear(byol_hidden, projection_dim),
            )  # fmt: skip
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.target_projection = copy.deepcopy(self.projection).requires_grad_(False)

    def _init_weights(self, bn_weight_std: float | None) -> None:
        """He init for convolutions, BN weights ~ N(0, std) with zero bias, near-zero flow head, log-var bias -10."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d) and bn_weight_std is not None:
                nn.init.normal_(m.weight, 0.0, bn_weight_std)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mean_head.weight, 0.0, 1e-5)
        nn.init.zeros_(self.mean_head.bias)
        nn.init.normal_(self.log_var_head.weight, 0.0, 1e-10)
        nn.init.constant_(self.log_var_head.bias, -10.0)

    # -- building blocks ----------------------------------------------------------------------------------------------

    def project(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Contrastive embedding: global average pool of the deepest feature -> linear projection."""
        return self.projection(features[-1].flatten(2).mean(-1))

    def velocity(
        self, moving: torch.Tensor, fixed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Mean and log-variance of q(z | x, y), plus the encoder features of both branches."""
        feats_m, feats_f = self.encoder(moving), self.encoder(fixed)
        skips = [torch.cat([a, b], 1) for a, b in zip(reversed(feats_m), reversed(feats_f), strict=True)]
        skips.append(torch.cat([moving, fixed], 1))
        x = self.decoder[0](skips[0])
        for block, skip in zip(self.decoder[1:], skips[1:], strict=True):
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = block(torch.cat([x, skip], 1))
        x = self.refine(x)
        return self.mean_head(x), self.log_var_head(x), feats_m, feats_f

    def integrate(self, svf: torch.Tensor) -> torch.Tensor:
        """exp(svf) as a voxel displacement (scaling and squaring, optionally at reduced resolution)."""
        if self.int_downsize <= 1:
            return integrate_svf(svf, self.integration_steps)
        full = svf.shape[2:]
        small = [max(2, math.ceil(n / self.int_downsize)) for n in full]
        return resize_ddf(integrate_svf(resize_ddf(svf, small), self.integration_steps), full)

    @staticmethod
    def sample(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """Reparameterised draw z = mean + exp(log_var / 2) * eps."""
        return mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)

    # -- public API ---------------------------------------------------------------------------------------------------

    def forward(self, pair: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        """ddf ``[B, D, *spatial]`` registering channel 0 (moving) to channel 1 (fixed).

        ``sample`` None samples z in training mode and uses the mean in eval mode; True/False forces it (True in eval
        mode draws from q for uncertainty estimates).
        """
        moving, fixed = split_pair(pair)
        mean, log_var, _, _ = self.velocity(moving, fixed)
        draw = self.training if sample is None else sample
        return self.integrate(self.sample(mean, log_var) if draw else mean)

    def inverse_ddf(self, pair: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """exp(-z): the inverse of the deformation (fixed -> moving), the paper-literal label transfer.

        z is the mean of q, or a draw from q when ``sample`` is True.
        """
        moving, fixed = split_pair(pair)
        mean, log_var, _, _ = self.velocity(moving, fixed)
        return self.integrate(-(self.sample(mean, log_var) if sample else mean))

    def forward_train(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the losses need: ddf (sampled z), svf mean/log-var, projections (and BYOL terms)."""
        mean, log_var, feats_m, feats_f = self.velocity(moving, fixed)
        z = self.sample(mean, log_var) if self.training else mean
        out = {
            "ddf": self.integrate(z),
            "svf_mean": mean,
            "svf_log_var": log_var,
            "proj_moving": self.project(feats_m),
            "proj_fixed": self.project(feats_f),
        }
        if self.byol:
            out["pred_moving"] = self.predictor(out["proj_moving"])
            out["pred_fixed"] = self.predictor(out["proj_fixed"])
            with torch.no_grad():
                out["target_moving"] = self.target_projection(self.target_encoder(moving)[-1].flatten(2).mean(-1))
                out["target_fixed"] = self.target_projection(self.target_encoder(fixed)[-1].flatten(2).mean(-1))
        return out

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """BYOL: target <- momentum * target + (1 - momentum) * online (no-op without BYOL)."""
        if not self.byol:
            return
        for online, target in ((self.encoder, self.target_encoder), (self.projection, self.target_projection)):
            for p_o, p_t in zip(online.parameters(), target.parameters(), strict=True):
                p_t.mul_(momentum).add_(p_o.detach(), alpha=1.0 - momentum)
            for b_o, b_t in zip(online.buffers(), target.buffers(), strict=True):
                b_t.copy_(b_o)


class MonaiVoxelMorph(nn.Module):
    """The plain MONAI ``VoxelMorph`` (early concatenation U-Net, diffeomorphic) behind the same interface.

    Widths default to MONAI's (and voxelmorph's) defaults; they are exposed to compare at equal network size.

    ``forward`` maps ``[B, 2, *spatial]`` to the ddf; ``forward_train`` returns only the ddf (no velocity
    distribution, no projections), so the loss uses its diffusion regulariser.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        integration_steps: int = 7,
        half_res: bool = False,
        channels: Sequence[int] = (16, 32, 32, 32, 32, 32),
        unet_out_channels: int = 32,
        final_conv_channels: Sequence[int] = (16, 16),
    ) -> None:
        super().__init__()
        backbone = VoxelMorphUNet(
            spatial_dims=spatial_dims,
            in_channels=2,
            unet_out_channels=unet_out_channels,
            channels=channels,
            final_conv_channels=final_conv_channels,
        )
        self.net = VoxelMorph(
            backbone, integration_steps=integration_steps, half_res=half_res, spatial_dims=spatial_dims
        )

    def forward(self, pair: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        moving, fixed = split_pair(pair)
        return self.net(moving, fixed)[1]

    def forward_train(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ddf": self.net(moving, fixed)[1]}
