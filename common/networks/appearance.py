"""Style encoder, AdaIN appearance model and latent discriminator of SST (Tomar et al., WACV 2022, Secs. 3.1-3.2).

The appearance model changes intensities only: its spatial path is a small encoder-decoder without skips, and the
style code enters exclusively through the per-channel scale/shift of three AdaIN layers, so the code can restyle an
image but carries no spatial information. Shapes are ``[B, C, *spatial]``; images are in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm
from torch import nn

__all__ = ["AdaIN", "AppearanceModel", "StyleEncoder", "LatentDiscriminator"]


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2)


class AdaIN(nn.Module):
    """Adaptive instance normalisation driven by a style vector ``m`` (Huang and Belongie 2017).

    out_c = (1 + gamma_c(m)) * (h_c - mean_c) / sqrt(var_c + eps) + beta_c(m), where mean/var are the per-sample,
    per-channel spatial statistics (unbiased variance) and gamma, beta are linear maps of ``m``. The weights start at
    N(0, init_std^2) with zero bias, so a fresh block is plain instance normalisation.
    """

    def __init__(self, num_channels: int, style_dim: int = 128, eps: float = 1e-5, init_std: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Linear(style_dim, num_channels)
        self.beta = nn.Linear(style_dim, num_channels)
        for layer in (self.gamma, self.beta):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def scale_shift(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + gamma(m), beta(m)), each ``[B, C]``: the per-channel std and mean the output will have."""
        return 1.0 + self.gamma(m), self.beta(m)

    def forward(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        flat = h.flatten(2)
        view = (*h.shape[:2], *([1] * (h.ndim - 2)))
        mean = flat.mean(dim=2).view(view)
        var = flat.var(dim=2, unbiased=True).view(view)
        scale, shift = self.scale_shift(m)
        return scale.view(view) * (h - mean) / torch.sqrt(var + self.eps) + shift.view(view)


class _ResBlock(nn.Module):
    """x + [conv -> LReLU -> conv -> LReLU], no normalisation (keeps the content path style-free)."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.body = nn.Sequential(
            conv(channels, channels, 3, padding=1), _lrelu(), conv(channels, channels, 3, padding=1), _lrelu()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class AppearanceModel(nn.Module):
    """A(x, s): restyle image ``x`` with style code ``s`` (Sec. 3.2; spec section 3.3).

    conv k7 -> 2 x [IN -> conv k5 s2 -> LReLU] -> ``num_res_blocks`` residual blocks -> three
    [conv k3 -> AdaIN(m) -> LReLU] blocks separated by trilinear upsampling back to the input size -> conv k3 -> tanh.
    ``m = LReLU(W2 LReLU(W1 s + b1) + b2)`` is shared by the three AdaIN layers. Any input size is accepted:
    upsampling returns to the recorded sizes of the downsampling path. ``strides`` (2 = the paper's isotropic
    halving) may keep thin axes, e.g. ``((2, 2, 1), (2, 2, 1))`` for short-axis cardiac stacks of 8 slices.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        features: int = 16,
        style_dim: int = 128,
        num_res_blocks: int = 2,
        strides: Sequence[int | Sequence[int]] = (2, 2),
    ) -> None:
        super().__init__()
        if len(strides) != 2:
            raise ValueError(f"the appearance model downsamples twice; got strides {strides}")
        conv = Conv[Conv.CONV, spatial_dims]
        inorm = Norm[Norm.INSTANCE, spatial_dims]
        f, f2 = features, 2 * features
        s1, s2 = (tuple([s] * spatial_dims) if isinstance(s, int) else tuple(s) for s in strides)
        self.spatial_dims = spatial_dims
        self.style_mlp = nn.Sequential(
            nn.Linear(style_dim, style_dim), _lrelu(), nn.Linear(style_dim, style_dim), _lrelu()
        )
        self.stem = nn.Sequential(conv(in_channels, f, 7, padding=3), _lrelu())
        self.down = nn.ModuleList(
            [
                nn.Sequential(inorm(f), conv(f, f2, 5, stride=s1, padding=2), _lrelu()),
                nn.Sequential(inorm(f2), conv(f2, f2, 5, stride=s2, padding=2), _lrelu()),
            ]
        )
        self.res = nn.Sequential(*[_ResBlock(spatial_dims, f2) for _ in range(num_res_blocks)])
        self.style_convs = nn.ModuleList(
            [conv(f2, f2, 3, padding=1), conv(f2, f2, 3, padding=1), conv(f2, f, 3, padding=1)]
        )
        self.adains = nn.ModuleList([AdaIN(f2, style_dim), AdaIN(f2, style_dim), AdaIN(f, style_dim)])
        self.head = nn.Sequential(conv(f, in_channels, 3, padding=1), nn.Tanh())

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        m = self.style_mlp(style)
        h = self.stem(x)
        sizes = []
        for block in self.down:
            sizes.append(h.shape[2:])
            h = block(h)
        h = self.res(h)
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        for i, (conv, adain) in enumerate(zip(self.style_convs, self.adains, strict=True)):
            if i > 0:
                h = F.interpolate(h, size=sizes.pop(), mode=mode, align_corners=False)
            h = F.leaky_relu(adain(conv(h), m), 0.2)
        return self.head(h)


def _conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class StyleEncoder(nn.Module):
    """E(x): a unit-norm style code (spec section 3.1).

    [conv k7 s4 -> IN -> LReLU] then [conv k3 s2 -> IN -> LReLU] per further entry of ``channels``, a bias-free
    conv k3 to ``latent_channels``, flatten, MLP (Linear -> LReLU -> Linear -> LReLU -> Linear without bias), and L2
    normalisation. The flatten size follows from ``spatial_size``; ``strides`` (int or per-axis tuple per layer)
    keep anisotropic or small volumes at >= 2 voxels per axis so instance norm stays defined.
    """

    def __init__(
        self,
        spatial_size: Sequence[int],
        spatial_dims: int = 3,
        in_channels: int = 1,
        style_dim: int = 128,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int | Sequence[int]] = (4, 2, 2, 2),
        latent_channels: int = 64,
        hidden_dim: int = 128,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels {channels} and strides {strides} must have the same length.")
        conv = Conv[Conv.CONV, spatial_dims]
        inorm = Norm[Norm.INSTANCE, spatial_dims]
        layers: list[nn.Module] = []
        size = [int(s) for s in spatial_size]
        prev = in_channels
        for i, (ch, stride) in enumerate(zip(channels, strides, strict=True)):
            kernel = 7 if i == 0 else 3
            stride_t = tuple([stride] * spatial_dims) if isinstance(stride, int) else tuple(stride)
            layers += [conv(prev, ch, kernel, stride=stride_t, padding=kernel // 2), inorm(ch), _lrelu()]
            size = [_conv_out_size(n, kernel, s, kernel // 2) for n, s in zip(size, stride_t, strict=True)]
            prev = ch
        if min(size) < 1:
            raise ValueError(f"spatial_size {tuple(spatial_size)} is too small for strides {strides}.")
        layers.append(conv(prev, latent_channels, 3, padding=1, bias=False))
        self.backbone = nn.Sequential(*layers)
        self.latent_shape = (latent_channels, *size)
        flat = latent_channels * int(torch.tensor(size).prod())
        self.head = nn.Sequential(
            nn.Linear(flat, hidden_dim),
            _lrelu(),
            nn.Linear(hidden_dim, hidden_dim),
            _lrelu(),
            nn.Linear(hidden_dim, style_dim, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x).flatten(1)), dim=1, eps=1e-12)


class LatentDiscriminator(nn.Module):
    """MLP critic on latent codes: ``num_layers`` x [Linear -> LReLU] then Linear -> 1 (no activation, LS-GAN).

    Style prior: in 128, hidden 128, 5 layers (82 689 parameters). Flow AAE: in 6400, hidden 256, 2 layers.
    Inputs of any shape ``[B, ...]`` are flattened.
    """

    def __init__(self, in_features: int = 128, hidden_dim: int = 128, num_layers: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(prev, hidden_dim), _lrelu()]
            prev = hidden_dim
        layers.append(nn.Linear(prev, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.flatten(1))
