"""SST data: the one labelled atlas and the unlabelled pool on one grid, optional affine pre-alignment, and the random
pair / flow datasets of the training stages (Tomar et al., WACV 2022; spec sections 2-4).

Affine pre-alignment (``affine_prealign``): the paper's brains come affinely registered; other data (e.g. ACDC hearts)
do not, and the flow model then has to explain global pose with a smooth local field. With the switch on, every pool
image ``t`` is aligned to the atlas once (``common.registration.affine.prealign``, cached in a file) and the stages
train on the aligned images (residual, local anatomy). ``M_t`` maps an atlas voxel to the subject voxel it corresponds
to, so ``t_aligned = warp(t, affine_ddf(M_t))`` and a residual field ``u`` (atlas -> ``t_aligned``) becomes the
atlas -> native-``t`` field :func:`to_subject_grid` ``(u, M_t)``: atlas labels land in the subject's own grid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Randomizable
from torch.utils.data import Dataset

from common.data.atlas import select_atlas_closest_to_mean
from common.data.datalist import load_datalist, read_datalist_json
from common.data.validate import validate_image_label
from common.engines.progress import progress
from common.io import atomic_torch_save
from common.registration import fields
from common.registration.affine import affine_ddf, invert_affine, prealign
from common.registration.fields import resize_ddf

logger = logging.getLogger(__name__)

__all__ = [
    "SSTData",
    "prepare_sst_data",
    "align_to_atlas",
    "to_subject_grid",
    "RandomPairDataset",
    "FlowDataset",
    "color_jitter",
    "entry_name",
    "plain_tensor",
]


@dataclass
class SSTData:
    """The one labelled atlas ("base image") and the unlabelled pool, preprocessed to one grid, in [0, 1].

    With affine pre-alignment, ``images`` are the pool images aligned to the atlas, ``matrices[i]`` (``[D, D+1]``,
    atlas voxel -> voxel of pool image i) undoes it, and ``affine_options`` are the ``prealign`` arguments (reused for
    test images by the "Reg." evaluation).
    """

    base_image: torch.Tensor  # [1, *S] float
    base_label: torch.Tensor  # [1, *S] long
    base_name: str
    affine: np.ndarray  # affine of the preprocessed grid (for writing generated NIfTI)
    images: list[torch.Tensor] = field(default_factory=list)  # unlabelled pool, [1, *S] each (atlas excluded)
    names: list[str] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)  # {id: name} from the datalist, background excluded
    matrices: torch.Tensor | None = None  # [N, D, D+1] when pre-aligned
    affine_options: dict | None = None  # prealign arguments (incl. the atlas mask margin) when pre-aligned

    @property
    def spatial_size(self) -> tuple[int, ...]:
        return tuple(self.base_image.shape[1:])


def entry_name(entry: Mapping) -> str:
    if "subject" in entry:
        return str(entry["subject"])
    return Path(str(entry["image"])).name.split(".")[0]


def plain_tensor(x: Any) -> torch.Tensor:
    """A plain tensor (MetaTensor metadata dropped) so that stage files load with ``weights_only=True``."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def _affine_of(x: Any) -> np.ndarray:
    affine = getattr(x, "affine", None)
    if affine is None:
        return np.eye(4)
    return np.asarray(affine.detach().cpu().numpy() if torch.is_tensor(affine) else affine, dtype=np.float64)


# ------------------------------------------------------------------------------------------------- affine alignment
def _atlas_mask(base_label: torch.Tensor, margin: Sequence[int] | None) -> torch.Tensor | None:
    """Foreground of the atlas label dilated by ``margin`` voxels per axis (focuses the similarity on the organ)."""
    if margin is None:
        return None
    kernel = tuple(2 * int(m) + 1 for m in margin)
    foreground = (base_label[None] > 0).float()
    return F.max_pool3d(foreground, kernel, stride=1, padding=tuple(int(m) for m in margin))


def align_to_atlas(
    images: Sequence[torch.Tensor] | torch.Tensor,
    base_image: torch.Tensor,
    base_label: torch.Tensor,
    options: Mapping[str, Any],
    batch_size: int = 32,
) -> torch.Tensor:
    """Matrices ``[N, D, D+1]`` (atlas voxel -> image voxel) aligning each ``[1, *S]`` image to the atlas.

    ``options`` are ``prealign`` keyword arguments plus ``mask_margin`` (voxels per axis around the atlas foreground
    used as the fixed mask; None: the whole image).
    """
    options = dict(options)
    mask = _atlas_mask(base_label, options.pop("mask_margin", None))
    stack = torch.stack(list(images)) if not torch.is_tensor(images) else images
    out = []
    for start in progress(range(0, stack.shape[0], batch_size), "affine pre-alignment (batches)"):
        moving = stack[start : start + batch_size].float()
        with torch.enable_grad():  # instance optimisation, also when called from no_grad inference code
            result = prealign(moving, base_image[None].float(), fixed_mask=mask, **options)
        out.append(result.matrix.detach().cpu())
    return torch.cat(out)


def to_subject_grid(ddf: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Field atlas -> native subject from ``ddf`` (atlas -> affinely aligned subject, ``[B, D, *S]``) and ``matrix``
    (``[B or 1, D, D+1]`` or ``[D, D+1]``, atlas voxel -> subject voxel): ``warp(warp(atlas, ddf), affine_ddf(M^-1))``
    as one field."""
    back = affine_ddf(invert_affine(matrix.to(ddf)), ddf.shape[2:])
    return fields.compose(ddf, back.expand_as(ddf))


def _aligned(images: Sequence[torch.Tensor], matrices: torch.Tensor) -> list[torch.Tensor]:
    size = images[0].shape[1:]
    return [fields.warp(img[None].float(), affine_ddf(m, size))[0] for img, m in zip(images, matrices, strict=True)]


def _cached_matrices(
    cache: str | Path | None, key: dict, compute: Callable[[], torch.Tensor], label: str
) -> torch.Tensor:
    """Matrices from ``cache`` when it was written for the same atlas, pool and options; else computed and written."""
    path = Path(cache) if cache else None
    if path is not None and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            logger.info("affine pre-alignment of %s read from %s", label, path)
            return stored["matrices"]
        logger.info("%s was written for another atlas, pool or options: recomputed", path)
    matrices = compute()
    if path is not None:
        atomic_torch_save({"key": key, "matrices": matrices}, path)
    return matrices


# ------------------------------------------------------------------------------------------------------ preparation
def prepare_sst_data(
    datalist: str | Path,
    transform: Callable,
    atlas: int | str | None = None,
    section: str = "training",
    max_images: int | None = None,
    affine_prealign: bool = False,
    affine_options: Mapping[str, Any] | None = None,
    affine_cache: str | Path | None = None,
    atlas_space_file: str | Path | None = None,
) -> SSTData:
    """Load the unlabelled pool and the atlas from the ``section`` of ``datalist`` through ``transform``.

    ``transform`` maps ``{"image": path[, "label": path]}`` to tensors ``[1, *S]`` in [0, 1] on one grid (the bundle's
    ``volume_preprocessing``, which also validates each file). ``atlas``: None picks the image closest (MSE) to the
    pool average (the paper's "most similar image to the anatomical average"), an int is an index into the section, a
    str a subject name. Only the atlas's label is read; the other images are used without labels. Validation and test
    sections are never touched. ``affine_prealign`` aligns the pool to the atlas (module docstring), with
    ``affine_options`` (``prealign`` arguments + ``mask_margin``), cached in ``affine_cache``; the atlas and those
    options are also written to ``atlas_space_file`` for inference in the atlas's space
    (`common.engines.sst_inference.AtlasSpaceInferer`).
    """
    entries = load_datalist(datalist, section, require_label=False, validate=False)  # the transform checks each file
    if max_images is not None:
        entries = entries[: int(max_images)]
    names = [entry_name(e) for e in entries]
    if isinstance(atlas, str):
        if atlas not in names:
            raise ValueError(f"atlas {atlas!r} is not a subject of section '{section}' of {datalist}: {names[:10]}...")
    elif atlas is not None and not 0 <= int(atlas) < len(entries):
        raise ValueError(
            f"atlas index {atlas} is out of range: section '{section}' of {datalist} has {len(entries)} images. "
            f"Fix: pass --atlas between 0 and {len(entries) - 1}, a subject name, or None (closest to the mean)"
        )
    images = [transform({"image": e["image"]})["image"] for e in progress(entries, f"loading {section} images")]
    if atlas is None:
        index = select_atlas_closest_to_mean([img[0] for img in images])
    elif isinstance(atlas, str):
        index = names.index(atlas)
    else:
        index = int(atlas)
    if "label" not in entries[index]:
        raise ValueError(f"the atlas {names[index]} ({entries[index]['image']}) has no label in {datalist}")
    raw = read_datalist_json(datalist)
    allowed = [int(k) for k in raw.get("labels", {})] or None
    validate_image_label(entries[index]["image"], entries[index]["label"], allowed_labels=allowed)
    loaded = transform({"image": entries[index]["image"], "label": entries[index]["label"]})
    labels = {int(k): str(v) for k, v in raw.get("labels", {}).items() if int(k) != 0}
    pool = [(plain_tensor(img).float(), n) for i, (img, n) in enumerate(zip(images, names, strict=True)) if i != index]
    if not pool:
        raise ValueError(f"{datalist}: section '{section}' needs at least one unlabelled image besides the atlas")
    data = SSTData(
        base_image=plain_tensor(loaded["image"]).float(),
        base_label=plain_tensor(loaded["label"]).long(),
        base_name=names[index],
        affine=_affine_of(loaded["image"]),
        images=[img for img, _ in pool],
        names=[n for _, n in pool],
        labels=labels,
    )
    if affine_prealign:
        options = dict(affine_options or {})
        key = {"atlas": data.base_name, "names": data.names, "options": repr(sorted(options.items()))}
        data.matrices = _cached_matrices(
            affine_cache,
            key,
            lambda: align_to_atlas(data.images, data.base_image, data.base_label, options),
            f"{len(data.images)} pool images",
        )
        data.images = _aligned(data.images, data.matrices)
        data.affine_options = options
        if atlas_space_file is not None:
            state = {"base_image": data.base_image, "base_label": data.base_label, "options": options}
            atomic_torch_save(state, atlas_space_file)
    return data


def color_jitter(x: torch.Tensor, brightness: float, contrast: float) -> torch.Tensor:
    """torchvision-style jitter of a [0, 1] volume: x <- clip(b x); x <- clip(c x + (1 - c) mean(x))."""
    x = (x * brightness).clamp(0.0, 1.0)
    return (contrast * x + (1.0 - contrast) * x.mean()).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------------ datasets
class _SeededDataset(Randomizable, Dataset):
    """A dataset drawing from its own ``numpy.random.RandomState`` ``R``.

    Why a MONAI ``Randomizable``: ``ResumableCheckpointHandler`` saves and restores the state of ``R`` when the
    stage's DataLoader is in its ``save_dict`` - restored after it replays the batches of an interrupted epoch, so a
    resumed stage draws exactly the pairs (or flow mixes) of an uninterrupted run. ``state_dict``/``load_state_dict``
    expose the same state for direct use.

    Distributed (process group initialised when the dataset is built): ``R`` is seeded from ``[seed, rank]`` so each
    rank draws its own pairs or mixes, otherwise every rank would train on the same samples.
    """

    def __init__(self, seed: int) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
            entropy = np.random.SeedSequence([int(seed), int(rank)]).generate_state(4)
            self.set_random_state(state=np.random.RandomState(entropy))
        else:
            self.set_random_state(seed=int(seed))

    def randomize(self, data: Any = None) -> None:  # draws happen in __getitem__; required by the interface
        return None

    def state_dict(self) -> dict:
        name, keys, pos, has_gauss, cached = self.R.get_state()
        return {"rng": [str(name), np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]}

    def load_state_dict(self, state: Mapping) -> None:
        name, keys, pos, has_gauss, cached = state["rng"]
        self.R.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))


class RandomPairDataset(_SeededDataset):
    """``length`` random ordered pairs {"source", "target"} of in-memory [0, 1] volumes, returned in [-1, 1].

    Intensity jitter (spec 2.3): brightness and contrast factors ~ U(jitter_range); with ``shared_jitter`` both
    images of a pair get the same factors (S0/S1: the pair differs only in anatomy), otherwise independent ones (S2).
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor],
        length: int,
        shared_jitter: bool = True,
        jitter_range: Sequence[float] = (0.7, 1.3),
        seed: int = 0,
    ) -> None:
        if len(images) < 1:
            raise ValueError("RandomPairDataset needs at least one image")
        super().__init__(seed)
        self.images = list(images)
        self.length = int(length)
        self.shared_jitter = shared_jitter
        self.low, self.high = float(jitter_range[0]), float(jitter_range[1])

    def __len__(self) -> int:
        return self.length

    def _factors(self) -> tuple[float, float]:
        return float(self.R.uniform(self.low, self.high)), float(self.R.uniform(self.low, self.high))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i, j = (int(v) for v in self.R.randint(0, len(self.images), size=2))
        f_s = self._factors()
        f_t = f_s if self.shared_jitter else self._factors()
        source = color_jitter(self.images[i], *f_s)
        target = color_jitter(self.images[j], *f_t)
        return {"source": source * 2.0 - 1.0, "target": target * 2.0 - 1.0}


class FlowDataset(_SeededDataset):
    """Flows for the AAE (S4), each a random convex-like mix (phi1 + a phi2 + b phi3) / (1 + a + b), a, b ~ U(0, mix).

    Flows are resampled to ``field_size`` (voxel units rescaled) when it differs from their own size.
    """

    def __init__(
        self,
        flows: Sequence[torch.Tensor],
        length: int | None = None,
        mix: float = 0.3,
        field_size: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        if len(flows) < 1:
            raise ValueError("FlowDataset needs at least one flow")
        super().__init__(seed)
        if field_size is not None and tuple(field_size) != tuple(flows[0].shape[1:]):
            flows = [resize_ddf(f[None], field_size)[0] for f in flows]
        self.flows = list(flows)
        self.length = int(length) if length is not None else len(self.flows)
        self.mix = float(mix)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.flows)
        first = self.flows[index % n]
        if self.mix <= 0 or n < 2:
            return {"flow": first}
        j, k = (int(v) for v in self.R.randint(0, n, size=2))
        a, b = (float(v) for v in self.R.uniform(0.0, self.mix, size=2))
        return {"flow": (first + a * self.flows[j] + b * self.flows[k]) / (1.0 + a + b)}
