"""Feature extractor ``g`` of cyclical self-training (Bigalke et al., MICCAI 2023) and its fixed second feature head.

``g`` is an ``nn.Sequential`` of 16 modules in the reference layer order (state-dict keys ``0.*`` ... ``15.*``), so the
authors' released weights load with ``strict=True`` once converted from their pickled module
(:func:`load_reference_weights`). Five 3x3x3 conv + BatchNorm + ReLU blocks (32, 64, 128, 128, 128 channels, stride 2
on the first, third and fifth: a factor 8) and a 1x1x1 conv to 16 channels. PyTorch default initialisation is kept on
purpose: the stage-0 pseudo labels come from a randomly initialised ``g`` and depend on that feature scale.

The Adam instance optimisation uses ``g[0:6]`` (64 channels at half resolution) projected by a random, never trained
1x1x1 conv to 32 channels (:func:`random_projection`); a new projection is drawn per pair, from an explicit generator so
that pseudo-label refreshes are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["CSTFeatureNet", "random_projection", "load_reference_weights", "ADAM_FEATURE_LAYERS"]

# g[0:6] = the first two conv blocks: the second-level features used by the Adam instance optimisation
ADAM_FEATURE_LAYERS = 6


class CSTFeatureNet(nn.Sequential):
    """``g``: image ``[B, in_channels, *spatial]`` -> features ``[B, out_channels, *spatial / 8]`` (spatial % 8 == 0).

    Fixed and moving images go through separate calls in training, so BatchNorm batch statistics are per stream.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 128, 128),
        strides: Sequence[int] = (2, 1, 2, 1, 2),
        out_channels: int = 16,
    ) -> None:
        if len(channels) != len(strides):
            raise ValueError(f"channels {tuple(channels)} and strides {tuple(strides)} need the same length")
        layers: list[nn.Module] = []
        previous = in_channels
        for width, stride in zip(channels, strides):
            layers += [nn.Conv3d(previous, width, 3, stride=stride, padding=1), nn.BatchNorm3d(width), nn.ReLU()]
            previous = width
        layers.append(nn.Conv3d(previous, out_channels, 1))
        super().__init__(*layers)
        self.downsample_factor = math.prod(strides)

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for module in list(self)[start:stop]:
            x = module(x)
        return x

    def adam_features(self, image: torch.Tensor) -> torch.Tensor:
        """Second-level features ``g[0:6](image)`` (64 channels at half resolution) for the instance optimisation."""
        return self._run(image, 0, ADAM_FEATURE_LAYERS)

    def features_and_adam_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g(image), g[0:6](image))`` in one pass: the Adam features are an intermediate of ``g``."""
        early = self.adam_features(image)
        return self._run(early, ADAM_FEATURE_LAYERS, len(self)), early


def random_projection(
    features: torch.Tensor, out_channels: int = 32, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Weight ``[out, in, 1, 1, 1]`` of a bias-free 1x1x1 conv with PyTorch's default init, U(-1/sqrt(in), 1/sqrt(in)).

    ``nn.Conv3d``'s default (Kaiming-uniform with a = sqrt(5)) reduces to that bound; drawing it here from ``generator``
    keeps the pseudo labels deterministic for a given seed (the reference re-draws it from the global RNG).
    """
    in_channels = features.shape[1]
    bound = 1.0 / math.sqrt(in_channels)
    weight = torch.rand(out_channels, in_channels, 1, 1, 1, generator=generator, dtype=torch.float32)
    return ((weight * 2.0 - 1.0) * bound).to(device=features.device, dtype=features.dtype)


def load_reference_weights(network: CSTFeatureNet, path: str | Path) -> CSTFeatureNet:
    """Load a reference checkpoint (pickled ``nn.Sequential`` or a state dict with keys ``0.*``) with ``strict=True``.

    The authors released the whole pickled module; unpickling needs ``weights_only=False``, so only load trusted files.
    """
    loaded = torch.load(Path(path), map_location="cpu", weights_only=False)
    state = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    network.load_state_dict(state, strict=True)
    return network
