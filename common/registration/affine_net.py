"""Learned affine pre-alignment: MONAI ``GlobalNet`` predicting the transform of a pair in one forward pass.

Why: instance optimisation (``affine.prealign``) needs a few hundred steps per pair; once a model is trained on a
cohort, one forward pass gives the affine (optionally refined by ``prealign(..., init_matrix=net.last_matrix())``).

The encoder is MONAI's GlobalNet; its head is replaced. MONAI's head regresses the voxel matrix about voxel 0, where a
unit change of a linear entry moves far voxels by tens of voxels while a translation entry moves them by one, so a
single Adam step of the fully connected layer can throw the image out of view. Here the head regresses the parameters
of :func:`common.registration.affine.parameters_to_matrix` (centred, normalised frame; zeros = identity), which also
gives rigid / similarity / in-plane variants. The output is the dense voxel ddf of that matrix (MONAI ``Warp``
convention, ``fields.warp(moving, ddf)`` aligns ``moving`` to ``fixed``). Train it with any similarity of
:mod:`common.registration.similarity` between the warped moving image and the fixed image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import GlobalNet

from common.registration import fields
from common.registration.affine import AffineResult, num_parameters, parameters_to_matrix

__all__ = ["AffineNet"]


class _CentredAffineHead(torch.nn.Module):
    """Fully connected layer on the flattened bottom features -> transform parameters -> voxel ddf."""

    def __init__(
        self, in_features: int, image_size: Sequence[int], mode: str, frozen_axes: Sequence[int], output_scale: float
    ) -> None:
        super().__init__()
        self.image_size, self.mode, self.frozen_axes = tuple(image_size), mode, tuple(frozen_axes)
        self.output_scale = output_scale
        self.fc = torch.nn.Linear(in_features, num_parameters(mode, len(image_size)))
        torch.nn.init.zeros_(self.fc.weight)  # identity at start, like MONAI's head
        torch.nn.init.zeros_(self.fc.bias)
        self.matrix = torch.empty(0)

    def forward(self, x: list[torch.Tensor], image_size: Sequence[int]) -> torch.Tensor:
        if tuple(image_size) != self.image_size:
            raise ValueError(f"AffineNet was built for images of size {self.image_size}, got {tuple(image_size)}")
        params = self.fc(x[0].flatten(1)) * self.output_scale
        matrix = parameters_to_matrix(params, self.mode, self.image_size, self.frozen_axes)
        self.matrix = matrix.detach()
        grid = fields.identity_grid(self.image_size, device=matrix.device, dtype=matrix.dtype).flatten(2)
        dims = len(self.image_size)
        moved = matrix[:, :, :dims] @ grid + matrix[:, :, dims:]
        return (moved - grid).view(-1, dims, *self.image_size)


class AffineNet(GlobalNet):
    """``cat([moving, fixed], dim=1)`` ``[B, 2C, *image_size]`` -> affine voxel ddf ``[B, D, *image_size]``.

    ``mode`` / ``frozen_axes`` as in ``prealign``; starts at the identity; ``image_size`` divisible by ``2 ** depth``.
    ``output_scale`` multiplies the regressed parameters (smaller = gentler first steps).
    """

    def __init__(
        self,
        image_size: Sequence[int],
        mode: str = "affine",
        frozen_axes: Sequence[int] = (),
        in_channels: int = 2,
        num_channel_initial: int = 16,
        depth: int = 3,
        output_scale: float = 0.1,
    ) -> None:
        self.mode, self.frozen_axes, self.output_scale = mode, tuple(frozen_axes), output_scale
        super().__init__(
            image_size=list(image_size),
            spatial_dims=len(image_size),
            in_channels=in_channels,
            num_channel_initial=num_channel_initial,
            depth=depth,
        )

    def build_output_block(self) -> torch.nn.Module:
        in_features = self.num_channels[-1] * int(torch.tensor(self.decode_size).prod())
        return _CentredAffineHead(in_features, self.image_size, self.mode, self.frozen_axes, self.output_scale)

    def last_matrix(self) -> torch.Tensor:
        """Voxel matrix ``[B, D, D+1]`` (fixed voxel -> moving voxel) of the last forward pass (detached)."""
        return self.output_block.matrix

    @torch.no_grad()
    def register(self, moving: torch.Tensor, fixed: torch.Tensor) -> AffineResult:
        """One forward pass as an :class:`~common.registration.affine.AffineResult` (``loss`` is NaN: not computed)."""
        ddf = self(torch.cat([moving, fixed], dim=1))
        return AffineResult(
            matrix=self.last_matrix(),
            ddf=ddf,
            warped=fields.warp(moving, ddf),
            loss=torch.full((ddf.shape[0],), torch.nan),
        )
