"""2D U-Net of Chaitanya et al. (NeurIPS 2020) with the projection heads used for contrastive pre-training.

Layout (channels ``[16, 32, 64, 128, 128, 128]`` by default):

* encoder e: 6 blocks of two 3x3 conv + BN + ReLU; blocks 1-5 keep their output as a skip and max-pool by 2, so a
  192 x 192 input gives a 128 x 6 x 6 bottleneck (input sides must be multiples of 32);
* decoder d: 5 blocks of nearest x2 upsampling -> 2x2 "up-conv" + BN + ReLU -> concat skip -> two 3x3 convs (one in
  the last block); d_3 outputs 64 channels at 1/4 of the input side;
* segmentation head: two 3x3 conv + BN + ReLU (16 ch) and a 3x3 conv to the classes (no bias, BN or activation);
* g1 (:class:`GlobalProjectionHead`): flatten -> Linear(hidden, ReLU, no bias) -> Linear(128, no bias);
* g2 (:class:`LocalProjectionHead`): 1x1 conv (no bias) + BN + ReLU -> 1x1 conv (no bias), optionally followed by a
  shared linear projection of each flattened K x K region (the authors' code, default with K = 3).

BatchNorm uses the TF defaults of the original code (momentum 0.01 in PyTorch terms, eps 1e-3) and weights are
He-normal. The heads are separate modules so that the inference network (``UNet2D``) holds only e, d and the head;
:func:`load_pretrained_parts` copies the encoder and the first ``l`` decoder blocks from a pre-training checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.engines.checkpoint import CheckpointMismatchError
from common.losses.contrastive import extract_regions, region_positions

__all__ = [
    "GlobalContrastiveModel",
    "GlobalProjectionHead",
    "LocalContrastiveModel",
    "LocalProjectionHead",
    "UNet2D",
    "load_pretrained_parts",
    "pretrained_prefixes",
]

BN_MOMENTUM = 0.01
BN_EPS = 1e-3


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int = 3) -> nn.Sequential:
    # TF "same" padding: for the even 2x2 up-conv the extra row/column goes to the bottom/right
    pad = (kernel_size - 1) // 2
    pad_layer = nn.ZeroPad2d((pad, kernel_size - 1 - pad, pad, kernel_size - 1 - pad))
    return nn.Sequential(
        pad_layer,
        nn.Conv2d(in_ch, out_ch, kernel_size),
        nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=True),
    )


def _he_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _DecoderBlock(nn.Module):
    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, num_convs: int) -> None:
        super().__init__()
        self.up_conv = _conv_bn_relu(in_ch, out_ch, kernel_size=2)
        convs = [_conv_bn_relu(out_ch + skip_ch, out_ch)] + [
            _conv_bn_relu(out_ch, out_ch) for _ in range(num_convs - 1)
        ]
        self.convs = nn.Sequential(*convs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.convs(torch.cat([x, skip], dim=1))


class UNet2D(nn.Module):
    """Segmentation U-Net: [B, in_channels, H, W] -> logits [B, out_channels, H, W] (H, W multiples of 32).

    ``encode`` and ``decode(..., num_blocks=l)`` expose the parts that the contrastive stages train.
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 4, channels: Sequence[int] = (16, 32, 64, 128, 128, 128)
    ) -> None:
        super().__init__()
        if len(channels) != 6:
            raise ValueError(f"UNet2D has 6 encoder blocks; got channels={list(channels)}")
        self.channels = tuple(channels)
        enc, prev = [], in_channels
        for ch in channels:
            enc.append(nn.Sequential(_conv_bn_relu(prev, ch), _conv_bn_relu(ch, ch)))
            prev = ch
        self.encoder = nn.ModuleList(enc)
        dec = []
        for i, skip_ch in enumerate(reversed(channels[:-1])):
            dec.append(_DecoderBlock(prev, skip_ch, skip_ch, num_convs=1 if i == len(channels) - 2 else 2))
            prev = skip_ch
        self.decoder = nn.ModuleList(dec)
        self.head = nn.Sequential(
            _conv_bn_relu(prev, channels[0]),
            _conv_bn_relu(channels[0], channels[0]),
            nn.Conv2d(channels[0], out_channels, 3, padding="same", bias=False),
        )
        _he_init(self)

    @property
    def num_decoder_blocks(self) -> int:
        return len(self.decoder)

    def decoder_channels(self, num_blocks: int) -> int:
        """Channels of the output of decoder block ``num_blocks`` (1-based)."""
        return tuple(reversed(self.channels[:-1]))[num_blocks - 1]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottleneck [B, C6, H/32, W/32] and the 5 skips (full resolution first)."""
        if x.shape[-1] % 32 != 0 or x.shape[-2] % 32 != 0:
            raise ValueError("UNet2D needs spatial sides divisible by 32, got " + str(x.shape[-2:]))
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.encoder):
            x = block(x)
            if i < len(self.encoder) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        return x, skips

    def decode(self, bottleneck: torch.Tensor, skips: list[torch.Tensor], num_blocks: int = -1) -> torch.Tensor:
        """Output of the first ``num_blocks`` decoder blocks (all when negative)."""
        x = bottleneck
        for i, block in enumerate(self.decoder):
            if num_blocks < 0 or i < num_blocks:
                x = block(x, skips[len(skips) - 1 - i])
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck, skips = self.encode(x)
        return self.head(self.decode(bottleneck, skips))


class GlobalProjectionHead(nn.Module):
    """g1: flattened bottleneck [B, C, h, w] -> [B, out_features]; ``in_features`` = C*h*w (4608 for 192^2 input)."""

    def __init__(self, in_features: int, hidden_features: int = 1024, out_features: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden_features, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, out_features, bias=False),
        )
        _he_init(self)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.net(bottleneck)


class LocalProjectionHead(nn.Module):
    """g2 on the d_l output [B, C, h, w] -> [B, C, h, w]; ``project_regions`` maps flattened K x K regions to vectors.

    With ``region_features`` set (the authors' default for K = 3), each region of K*K*C values goes through one
    shared Linear(K*K*C -> region_features, no bias); otherwise region vectors are used as extracted.
    """

    def __init__(self, channels: int, region_size: int = 3, region_features: int | None = 128) -> None:
        super().__init__()
        self.region_size = region_size
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
        )
        self.region_proj = (
            nn.Linear(region_size * region_size * channels, region_features, bias=False) if region_features else None
        )
        _he_init(self)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)

    def project_regions(self, regions: torch.Tensor) -> torch.Tensor:
        """[B, A, K*K*C] -> [B, A, F]."""
        return regions if self.region_proj is None else self.region_proj(regions)


class GlobalContrastiveModel(nn.Module):
    """Stage 1 network: z = g1(e(x)) [B, F]. Holds the U-Net so its state dict keys stay ``unet.*``."""

    def __init__(self, unet: UNet2D, head: GlobalProjectionHead) -> None:
        super().__init__()
        self.unet = unet
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unet.encode(x)[0])


class LocalContrastiveModel(nn.Module):
    """Stage 2 network: region embeddings [B, A, F] of f = g2(d_l(e(x))) at the 13 fixed region positions.

    With ``freeze_encoder`` the encoder weights get no gradient. ``encoder_bn_mode="eval"`` also keeps the
    encoder's BatchNorm in inference mode (running statistics from stage 1, untouched); ``"train"`` reproduces the
    authors' code, where batch statistics are used and the running averages keep updating.
    """

    def __init__(
        self,
        unet: UNet2D,
        head: LocalProjectionHead,
        num_decoder_blocks: int = 3,
        freeze_encoder: bool = True,
        encoder_bn_mode: str = "eval",
    ) -> None:
        super().__init__()
        if not 1 <= num_decoder_blocks <= unet.num_decoder_blocks:
            raise ValueError(f"num_decoder_blocks must be in [1, {unet.num_decoder_blocks}], got {num_decoder_blocks}")
        if encoder_bn_mode not in ("eval", "train"):
            raise ValueError(f"encoder_bn_mode must be 'eval' or 'train', got {encoder_bn_mode!r}")
        self.unet = unet
        self.head = head
        self.num_decoder_blocks = num_decoder_blocks
        self.freeze_encoder = freeze_encoder
        self.encoder_bn_mode = encoder_bn_mode
        if freeze_encoder:
            unet.encoder.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> LocalContrastiveModel:
        super().train(mode)
        if self.freeze_encoder and self.encoder_bn_mode == "eval":
            self.unet.encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters stage 2 optimises: decoder blocks 1..l and g2 (plus the encoder when not frozen)."""
        params = list(self.head.parameters())
        params += [p for block in self.unet.decoder[: self.num_decoder_blocks] for p in block.parameters()]
        if not self.freeze_encoder:
            params += list(self.unet.encoder.parameters())
        return params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            bottleneck, skips = self.unet.encode(x)
        f = self.head(self.unet.decode(bottleneck, skips, self.num_decoder_blocks))
        positions = region_positions(tuple(f.shape[-2:]), self.head.region_size)
        return self.head.project_regions(extract_regions(f, positions, self.head.region_size))


def pretrained_prefixes(num_decoder_blocks: int) -> tuple[str, ...]:
    """State-dict prefixes that fine-tuning copies: the encoder and the first ``num_decoder_blocks`` decoder blocks."""
    return ("encoder.",) + tuple(f"decoder.{i}." for i in range(num_decoder_blocks))


def load_pretrained_parts(
    network: UNet2D,
    checkpoint: str | Path | dict,
    num_decoder_blocks: int = 0,
    map_location: str | torch.device = "cpu",
) -> list[str]:
    """Copy encoder (+ first ``num_decoder_blocks`` decoder blocks) weights into ``network``; return the loaded keys.

    ``checkpoint`` is a ``UNet2D`` state dict, a path to one, or a dict holding it under ``"unet"`` or ``"model"``.
    Everything else (later decoder blocks, head, projection heads) keeps its current (random) initialisation.
    Missing or mis-shaped keys raise `CheckpointMismatchError` naming the file, so a checkpoint of another
    architecture is never half-loaded silently.
    """
    if not isinstance(checkpoint, dict) and not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"pre-trained checkpoint {checkpoint} not found: run the pre-training stage that writes it first, "
            "or fine-tune from random initialisation (load_pretrained False)"
        )
    source = "the given state dict" if isinstance(checkpoint, dict) else str(checkpoint)
    state = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location=map_location)
    for key in ("unet", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    prefixes = pretrained_prefixes(num_decoder_blocks)
    own = network.state_dict()
    wanted = [k for k in own if k.startswith(prefixes)]
    missing = [k for k in wanted if k not in state or state[k].shape != own[k].shape]
    if missing:
        raise CheckpointMismatchError(
            f"pre-trained checkpoint {source} lacks or mis-shapes {len(missing)} of the {len(wanted)} keys to load, "
            f"e.g. {missing[:3]}. Fix: pre-train with the same network settings (channels, image_size), or lower "
            "pretrained_decoder_blocks to the blocks that checkpoint holds"
        )
    network.load_state_dict({**own, **{k: state[k] for k in wanted}})
    return wanted
