"""Atlas segmentation as a network: ``image [B, 1, *S] -> [B, num_labels, *S]`` label votes of registered atlases.

Why a module and not only an inferer: segmentation front ends such as MONAI Label's ``monaibundle`` app instantiate
the bundle's ``network_def``, load ``models/model.pt`` into it and call it on one image with a plain inferer. A
registration bundle is servable there when its ``network_def`` is this wrapper: the trained registration network plus
the labelled atlas(es), registered to each input and fused by the one implementation the CLI inferer uses
(`common.registration.atlas.AtlasLabelTransfer`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.registration.atlas import AtlasLabelTransfer, _like, _plain, load_atlases

__all__ = ["AtlasSegmentationNet"]


def _move_prefix(mapping: dict, old: str, new: str) -> None:
    """Rename, in place and in order, every key ``old + rest`` of ``mapping`` to ``new + rest``."""
    for key in [k for k in mapping if k.startswith(old)]:
        mapping[new + key[len(old) :]] = mapping.pop(key)


class AtlasSegmentationNet(nn.Module):
    """A registration network and labelled atlases as one segmentation network.

    ``forward(image)`` registers every atlas to ``image`` ``[B, 1, *S]`` (an input of another grid than the atlases'
    gets the atlases resampled to it: images linearly, labels nearest neighbour), warps the atlas label maps and
    returns the fused, normalised votes ``[B, num_labels, *S]``: channel ``c`` is label value ``c``, so ``argmax`` over
    channels is the label map. The output carries the input's MONAI meta (``Invertd`` maps it back to the input grid).

    The atlases are loaded once, at construction, through ``transform`` and kept as non-persistent buffers: they move
    with ``.to(device)`` and a ``torch.jit.trace`` export contains them, but they are no weights.

    Weights: ``state_dict()`` / ``load_state_dict()`` read and write exactly the keys of the wrapped network's
    ``state_module`` (the network itself by default), without a prefix. Why: the bundle's training writes
    ``models/model.pt`` as that network's plain state_dict, and every loader that meets this module as
    ``network_def`` (MONAI Label's ``load_state_dict``, MONAI ``CheckpointLoader``,
    `common.engines.checkpoint.load_weights`, ``ckpt_export`` through ignite / ``copy_model_state``) must load that
    file unchanged. Hooks rename the keys, so the module also nests (e.g. under DDP's ``module.``).

    Args:
        network: registration network, ``network(pair [B, 2, *S]) -> ddf`` with ``pair`` = (moving, fixed) and
            ``warped(p) = moving(p + ddf(p))`` (`common.registration.fields`).
        atlases: one or several ``{"image": ..., "label": ...}`` (paths for ``transform``, or arrays).
        num_labels: output channels; every atlas label value must be in ``[0, num_labels)``.
        transform: applied to each atlas dict at construction; gives the network's grid and intensity normalisation.
        direction, fusion, local_sigma, affine_prealign, affine_kwargs: see `AtlasLabelTransfer` ("inverse" for
            CLMorph's paper-literal transfer, which uses ``network.inverse_ddf``). ``affine_prealign`` optimises inside
            ``forward``, which a trace cannot record.
        state_module: dotted name of the submodule of ``network`` whose keys the state_dict holds ("" = ``network``;
            e.g. "feature_net" when ``models/model.pt`` holds only the feature network). It must hold all of
            ``network``'s state, or the rest could not be restored from the file.
        image_key, label_key: keys of the atlas dicts.
    """

    def __init__(
        self,
        network: nn.Module,
        atlases: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        num_labels: int,
        transform: Callable[[dict], dict] | None = None,
        direction: str = "atlas_to_subject",
        fusion: str = "majority",
        local_sigma: float = 2.0,
        affine_prealign: bool = False,
        affine_kwargs: Mapping[str, Any] | None = None,
        state_module: str = "",
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        super().__init__()
        if int(num_labels) < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.network = network
        self.transfer = AtlasLabelTransfer(direction, fusion, local_sigma, affine_prealign, affine_kwargs)
        if direction == "inverse" and not hasattr(network, "inverse_ddf"):
            raise ValueError(f"direction='inverse' needs a network with inverse_ddf, {type(network).__name__} has none")
        atlases = [atlases] if isinstance(atlases, Mapping) else list(atlases)
        images, labels = load_atlases(atlases, transform, image_key, label_key)
        for i, (atlas, label) in enumerate(zip(atlases, labels, strict=True)):
            wrong = sorted({int(v) for v in torch.unique(label) if not 0 <= int(v) < int(num_labels)})
            if wrong:
                name = atlas[label_key] if isinstance(atlas[label_key], str) else f"of atlas {i}"
                raise ValueError(
                    f"atlas label map {name} has label value(s) {wrong} outside [0, num_labels={num_labels}): output "
                    f"channel c is label value c, so set num_labels to at least {wrong[-1] + 1} (and the metadata's "
                    "output channels to match)"
                )
        self.register_buffer("atlas_images", images, persistent=False)
        self.register_buffer("atlas_labels", labels, persistent=False)
        self.register_buffer("label_values", torch.arange(int(num_labels)), persistent=False)
        if state_module:
            network.get_submodule(state_module)  # a clear AttributeError for a wrong name
        self._state_prefix = "network." + (f"{state_module}." if state_module else "")
        outside = [k for k in network.state_dict() if not f"network.{k}".startswith(self._state_prefix)]
        if outside:
            raise ValueError(f"state_module {state_module!r} leaves network state out of the state_dict: {outside[:5]}")
        self.register_state_dict_post_hook(self._strip_state_prefix)
        self.register_load_state_dict_pre_hook(self._add_state_prefix)

    @staticmethod
    def _strip_state_prefix(module: AtlasSegmentationNet, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        """``network.<state_module>.<key>`` -> ``<key>``; per-module metadata (versions, e.g. BatchNorm's) follows."""
        inner = prefix + module._state_prefix
        _move_prefix(state_dict, inner, prefix)
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            path = module._state_prefix[:-1].split(".")
            for depth in range(1, len(path) + 1):  # entries of the modules on the way would clash with this one's
                metadata.pop(prefix + ".".join(path[:depth]), None)
            _move_prefix(metadata, inner, prefix)

    @staticmethod
    def _add_state_prefix(module: AtlasSegmentationNet, state_dict: dict, prefix: str, *args: Any) -> None:
        """``<key>`` -> ``network.<state_module>.<key>`` before loading (the inverse of `_strip_state_prefix`)."""
        _move_prefix(state_dict, prefix, prefix + module._state_prefix)
        metadata = getattr(state_dict, "_metadata", None)  # only the top-level call sees it
        if metadata is not None:
            own = metadata.pop(prefix[:-1], None)
            _move_prefix(metadata, prefix, prefix + module._state_prefix)
            if own is not None:
                metadata[prefix[:-1]] = own

    def _atlases_on(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Atlas images and labels on the input grid ``shape`` (resampled when it differs from the atlases')."""
        if tuple(self.atlas_images.shape[2:]) == tuple(shape):
            return self.atlas_images, self.atlas_labels
        mode = "trilinear" if len(shape) == 3 else "bilinear"
        images = F.interpolate(self.atlas_images, size=tuple(shape), mode=mode, align_corners=False)
        labels = F.interpolate(self.atlas_labels.float(), size=tuple(shape), mode="nearest").to(torch.int64)
        return images, labels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        subject = _plain(image).float()
        if subject.shape[1] != 1:
            raise ValueError(f"expected a single-channel image [B, 1, *S], got shape {tuple(subject.shape)}")
        images, labels = self._atlases_on(subject.shape[2:])
        probs = self.transfer(self.network, images, labels, self.label_values, subject).probs
        return _like(image, probs)
