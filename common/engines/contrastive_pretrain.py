"""Contrastive pre-training engine (Chaitanya et al., NeurIPS 2020) on top of MONAI's ``SupervisedTrainer``.

Data flow of one iteration::

    DataLoader of preprocessed volumes [1, H, W, Q]  --PartitionSliceCollate-->  n slices [n, 1, H, W] + tags
        --ContrastiveViews (x num_views, on device)-->  [num_views * n, 1, H, W] + tags (slice, view, partition, volume)
        --network (GlobalContrastiveModel or LocalContrastiveModel)-->  embeddings
        --GlobalContrastiveLoss / LocalContrastiveLoss (common.losses.contrastive)-->  scalar

The trainer is a ``SupervisedTrainer`` (so ``train#trainer`` checks, MLflow and every MONAI handler work unchanged);
only ``prepare_batch`` (views and tags) and the loss call differ. ``BatchNormRecalibration`` re-estimates BatchNorm
running statistics on un-augmented labelled slices before validation during fine-tuning (switchable): statistics
gathered on heavily augmented batches of one or two volumes do not match the test slices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.inferers import Inferer
from torch import nn

from common.losses.contrastive import partition_bounds

__all__ = [
    "BatchNormRecalibration",
    "ContrastivePretrainTrainer",
    "ContrastiveViews",
    "PartitionSliceCollate",
    "TAG_KEYS",
    "recalibrate_batchnorm",
]

TAG_KEYS = ("slice_index", "view_index", "partition_index", "volume_index")
logger = logging.getLogger(__name__)


def _as_tensor(x: Any) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class PartitionSliceCollate:
    """``collate_fn`` turning a list of m volume dicts (``image`` [C, H, W, Q]) into a batch of 2D slices with tags.

    * ``sampling="partition"`` (G^D-, G^D, L^D): one slice drawn uniformly inside each of the S partitions of every
      volume (:func:`common.losses.contrastive.partition_bounds`), giving m * S slices ordered volume-major.
    * ``sampling="random"`` (G^R, L^R): ``slices_per_volume`` slices drawn uniformly with replacement per volume;
      each drawn slice counts as its own source slice.

    The DataLoader's batch (m distinct volumes, e.g. ``shuffle=True``) decides which volumes meet in a batch.
    Returned keys: ``image`` [n, C, H, W] plus the long tensors ``slice_index``, ``partition_index`` (-1 for
    random sampling), ``volume_index`` (position in the batch) and ``source_slice`` (index along the slice axis).
    """

    def __init__(
        self,
        sampling: str = "partition",
        num_partitions: int = 4,
        partition_mode: str = "round",
        slices_per_volume: int | None = None,
        image_key: str = "image",
        generator: torch.Generator | None = None,
    ) -> None:
        if sampling not in ("partition", "random"):
            raise ValueError(f"sampling must be 'partition' or 'random', got {sampling!r}")
        self.sampling = sampling
        self.num_partitions = num_partitions
        self.partition_mode = partition_mode
        self.slices_per_volume = slices_per_volume or num_partitions
        self.image_key = image_key
        self.generator = generator

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.generator))

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        images, part, vol, src = [], [], [], []
        for v, item in enumerate(items):
            volume = _as_tensor(item[self.image_key])
            if volume.ndim != 4:
                raise ValueError(f"expected a volume [C, H, W, Q], got shape {tuple(volume.shape)}")
            q = volume.shape[-1]
            if self.sampling == "partition":
                picks = [
                    (s, self._randint(start, stop))
                    for s, (start, stop) in enumerate(partition_bounds(q, self.num_partitions, self.partition_mode))
                ]
            else:
                picks = [(-1, self._randint(0, q)) for _ in range(self.slices_per_volume)]
            for s, k in picks:
                images.append(volume[..., k])
                part.append(s)
                vol.append(v)
                src.append(k)
        n = len(images)
        return {
            self.image_key: torch.stack(images).float(),
            "slice_index": torch.arange(n),
            "partition_index": torch.tensor(part),
            "volume_index": torch.tensor(vol),
            "source_slice": torch.tensor(src),
        }


class ContrastiveViews:
    """Random view of a batch of 2D images [B, C, H, W], drawn per image, on the images' device.

    1. optional crop (global views): a box of ``crop_fraction`` of each side whose top-left corner is uniform in
       [``crop_offset_range``] (fractions of the side), truncated at the border, resized bilinearly to H x W
       (authors' code: 100 x 100 box, corner in 10..69, for 192 x 192 slices);
    2. brightness: add delta ~ U(-brightness, brightness);
    3. contrast: (x - mean) * c + mean with c ~ U(contrast_range), mean over the slice;
    4. clip to ``clip_range``.
    """

    def __init__(
        self,
        crop: bool = True,
        crop_fraction: float = 100 / 192,
        crop_offset_range: tuple[float, float] = (10 / 192, 69 / 192),
        brightness: float = 0.3,
        contrast_range: tuple[float, float] = (0.7, 1.3),
        clip_range: tuple[float, float] | None = (0.0, 1.5),
        generator: torch.Generator | None = None,
    ) -> None:
        self.crop = crop
        self.crop_fraction = crop_fraction
        self.crop_offset_range = crop_offset_range
        self.brightness = brightness
        self.contrast_range = contrast_range
        self.clip_range = clip_range
        self.generator = generator

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        return (torch.rand(n, generator=self.generator) * (high - low) + low).to(device)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        out = []
        for i in range(b):
            box = []
            for side in (h, w):
                size = max(1, round(self.crop_fraction * side))
                lo = round(self.crop_offset_range[0] * side)
                hi = max(lo, round(self.crop_offset_range[1] * side))
                start = int(torch.randint(lo, hi + 1, (1,), generator=self.generator))
                start = min(start, side - 1)
                box.append((start, min(side, start + size)))
            (r0, r1), (c0, c1) = box
            out.append(F.interpolate(x[i : i + 1, :, r0:r1, c0:c1], size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop:
            x = self._crop(x)
        b = x.shape[0]
        shape = (b,) + (1,) * (x.ndim - 1)
        delta = self._uniform(b, -self.brightness, self.brightness, x.device).view(shape)
        c = self._uniform(b, *self.contrast_range, x.device).view(shape)
        x = x + delta
        mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        x = (x - mean) * c + mean
        if self.clip_range is not None:
            x = x.clamp(*self.clip_range)
        return x


class _ContrastivePrepareBatch:
    """prepare_batch: moves the slices to the device and stacks ``num_views`` random views with their tags."""

    def __init__(self, view_transform: Callable[[torch.Tensor], torch.Tensor], num_views: int, image_key: str):
        self.view_transform = view_transform
        self.num_views = num_views
        self.image_key = image_key

    def __call__(self, batchdata: dict, device, non_blocking: bool = False, **kwargs) -> tuple[torch.Tensor, dict]:
        x = _as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        with torch.no_grad():
            views = torch.cat([self.view_transform(x) for _ in range(self.num_views)])
        n = x.shape[0]
        tags = {k: _as_tensor(batchdata[k]).to(device).repeat(self.num_views) for k in TAG_KEYS if k != "view_index"}
        tags["view_index"] = torch.arange(self.num_views, device=device).repeat_interleave(n)
        return views, tags


class ContrastivePretrainTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` for the global / local contrastive stages.

    Each batch from ``train_data_loader`` (see :class:`PartitionSliceCollate`) becomes ``num_views`` random views
    (``view_transform``, applied on ``device``); the network maps them to embeddings (global [V*n, F] or regional
    [V*n, A, F]); ``loss_function(embeddings, slice_index=..., view_index=..., partition_index=...,
    volume_index=...)`` gives the loss (``GlobalContrastiveLoss`` or ``LocalContrastiveLoss``). Views are stacked
    view-major. Everything else (AMP, handlers, key metrics, epoch_length) is the parent's behaviour.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: nn.Module,
        view_transform: Callable[[torch.Tensor], torch.Tensor],
        num_views: int = 2,
        image_key: str = "image",
        epoch_length: int | None = None,
        inferer: Inferer | None = None,
        train_handlers: Sequence | None = None,
        key_train_metric: dict | None = None,
        amp: bool = False,
        **kwargs: Any,
    ) -> None:
        if num_views < 2:
            raise ValueError(f"contrastive pre-training needs at least 2 views, got {num_views}")
        self.contrastive_loss = loss_function
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=self._tagged_loss,
            epoch_length=epoch_length,
            prepare_batch=_ContrastivePrepareBatch(view_transform, num_views, image_key),
            inferer=inferer,
            train_handlers=train_handlers,
            key_train_metric=key_train_metric,
            amp=amp and torch.device(device).type == "cuda",
            **kwargs,
        )

    def _tagged_loss(self, embeddings: torch.Tensor, tags: dict[str, torch.Tensor]) -> torch.Tensor:
        partition = tags["partition_index"]
        return self.contrastive_loss(
            embeddings,
            slice_index=tags["slice_index"],
            view_index=tags["view_index"],
            partition_index=partition if bool((partition >= 0).all()) else None,
            volume_index=tags["volume_index"],
        )


@torch.no_grad()
def recalibrate_batchnorm(
    network: nn.Module,
    data_loader: Iterable,
    device: str | torch.device,
    image_key: str = "image",
    slice_batch_size: int = 32,
    slice_axis: int = -1,
) -> int:
    """Replace every BatchNorm's running mean/var by the exact average over the given un-augmented data.

    ``data_loader`` yields dicts whose ``image`` is either 2D slices [B, C, H, W] or volumes [B, C, H, W, Q] (split
    into slices along ``slice_axis``). Uses cumulative averaging (momentum None) in train mode, then restores each
    module's momentum and mode. Returns the number of slices seen.
    """
    bns = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was_training = network.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    network.train()
    seen = 0
    for batch in data_loader:
        x = _as_tensor(batch[image_key] if isinstance(batch, dict) else batch[0])
        if x.ndim == 5:
            x = torch.movedim(x, slice_axis, 1).flatten(0, 1)
        for chunk in torch.split(x, slice_batch_size):
            network(chunk.to(device))
            seen += chunk.shape[0]
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    network.train(was_training)
    if seen == 0:
        raise ValueError("BatchNorm recalibration got no data")
    return seen


class BatchNormRecalibration:
    """Ignite handler: :func:`recalibrate_batchnorm` on ``data_loader`` at ``event`` (list it before the
    ``ValidationHandler`` so validation and the saved best checkpoint use the recalibrated statistics)."""

    def __init__(
        self,
        network: nn.Module,
        data_loader: Iterable,
        enabled: bool = True,
        event: str = "EPOCH_COMPLETED",
        image_key: str = "image",
        slice_batch_size: int = 32,
    ) -> None:
        self.network = network
        self.data_loader = data_loader
        self.enabled = enabled
        self.event = Events[event.upper()]
        self.image_key = image_key
        self.slice_batch_size = slice_batch_size

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(self.event, self)

    def __call__(self, engine: Engine) -> None:
        n = recalibrate_batchnorm(
            self.network, self.data_loader, engine.state.device, self.image_key, self.slice_batch_size
        )
        logger.debug("BatchNorm statistics re-estimated on %d un-augmented slices", n)
