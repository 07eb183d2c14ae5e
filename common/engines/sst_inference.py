"""U-Net inference in the atlas's space, for SST runs with affine pre-alignment and ``unet_space="atlas"``.

With pre-alignment the pool is aligned to the atlas before the stages. With ``unet_space="atlas"`` the stored flows
are the residual ones (`common.engines.sst.extract_flows` with ``native_pose=False``), so every generated training
pair, and thus the U-Net, lives in the atlas's pose. A test image must then be seen in that pose too: it is aligned
to the atlas exactly as the pool was (`common.engines.sst_data.align_to_atlas`), segmented, and the class scores are
resampled back onto the image's own grid with the inverse affine. Without this step a U-Net trained on aligned pairs
meets hearts (or brains) at positions and scales it never saw.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer

from common.engines.sst_data import align_to_atlas
from common.registration import fields
from common.registration.affine import affine_ddf, invert_affine

__all__ = ["AtlasSpaceInferer", "UNET_SPACES", "check_unet_space", "segmentation_inferer"]


class AtlasSpaceInferer(Inferer):
    """Align each input ``[B, 1, *S]`` to the atlas, run ``inferer`` there, return the scores on the input's grid.

    Args:
        base_image, base_label: the atlas image ``[1, *S]`` in [0, 1] and its label map (the label only gives the
            similarity mask, as in the pool alignment).
        options: `common.registration.affine.prealign` arguments plus ``mask_margin`` (the pool's ``affine_options``).
        inferer: the inferer run in atlas space (default ``SimpleInferer``).
    """

    def __init__(
        self,
        base_image: torch.Tensor,
        base_label: torch.Tensor,
        options: Mapping[str, Any],
        inferer: Inferer | None = None,
    ) -> None:
        super().__init__()
        self.base_image, self.base_label = base_image.float(), base_label.long()
        self.options = dict(options)
        self.inferer = inferer if inferer is not None else SimpleInferer()

    @classmethod
    def load(cls, path: str | Path, inferer: Inferer | None = None) -> AtlasSpaceInferer:
        """From the file `common.engines.sst_data.prepare_sst_data` writes (``atlas_space_file``) with pre-alignment."""
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{path} not found: inference in the atlas's space (affine_prealign=True) needs the atlas file that "
                "the SST stages write when run with affine_prealign=True. Fix: train with --affine_prealign True, or "
                "infer with --affine_prealign False if the U-Net was trained without pre-alignment"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(state["base_image"], state["base_label"], state["options"], inferer)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        image = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        image = image.float()
        if tuple(image.shape[2:]) != tuple(self.base_image.shape[1:]):
            raise ValueError(
                f"input grid {tuple(image.shape[2:])} != atlas grid {tuple(self.base_image.shape[1:])}: the inference "
                "preprocessing must resample to the training spatial_size"
            )
        matrices = align_to_atlas(image[:, :1].cpu(), self.base_image, self.base_label, self.options).to(image.device)
        size = image.shape[2:]
        aligned = fields.warp(image, affine_ddf(matrices, size).to(image))
        scores = self.inferer(aligned, network, *args, **kwargs)
        back = affine_ddf(invert_affine(matrices), size).to(scores)
        scores = fields.warp(scores, back, padding_mode="border")
        if isinstance(inputs, MetaTensor):
            return MetaTensor(scores, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return scores


UNET_SPACES = ("native", "atlas")


def check_unet_space(unet_space: str, affine_prealign: bool) -> bool:
    """Fail before any stage runs on an unknown ``unet_space`` or on "atlas" without pre-alignment."""
    if unet_space not in UNET_SPACES:
        raise ValueError(f"unet_space must be one of {UNET_SPACES}, got {unet_space!r}")
    if unet_space == "atlas" and not affine_prealign:
        raise ValueError(
            "unet_space 'atlas' needs affine pre-alignment (there is no atlas space without it). Fix: add "
            "--affine_prealign True, or use --unet_space native"
        )
    return True


def segmentation_inferer(atlas_space_file: str | Path, affine_prealign: bool, unet_space: str = "native") -> Inferer:
    """The U-Net's inferer: in the atlas's space when the pool was pre-aligned (``affine_prealign``) and the generated
    pairs kept the atlas's pose (``unet_space="atlas"``), else plain (images segmented in their own pose)."""
    check_unet_space(unet_space, affine_prealign)
    if unet_space == "atlas":
        return AtlasSpaceInferer.load(atlas_space_file)
    return SimpleInferer()
