"""Atlas-based segmentation by registration: atlas choice, label propagation, multi-atlas fusion, uncertainty.

Any registration network with the bundle interface plugs in: ``network(pair) -> ddf`` where ``pair`` is
``[B, 2, *spatial]`` = (moving, fixed) and ``warped(p) = moving(p + ddf(p))``. Label transfer therefore registers the
**atlas as moving** and the **subject as fixed**: the atlas label map warped by that ddf (nearest neighbour) lies in
the subject's space. The paper-literal alternative (``direction="inverse"``) registers subject -> atlas and warps the
atlas labels with exp(-z), which needs a network with ``inverse_ddf`` (CLMorphNet).

Probabilistic networks (``network(pair, sample=True)`` draws z ~ q) give per-voxel label frequencies over samples,
from which the inferer derives a Monte-Carlo segmentation and an entropy map.

`AtlasLabelTransfer` holds the one implementation of "register the atlases to the subject, warp their labels, fuse";
`AtlasRegistrationInferer` (the registration network as the inferer's ``network``) and
`common.registration.atlas_segmenter.AtlasSegmentationNet` (a segmentation ``nn.Module``) both run it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer

from common.data.atlas import rank_by_closeness_to_mean as closest_to_mean
from common.registration.affine import affine_ddf, compose_with_affine, invert_affine, prealign
from common.registration.fields import warp, warp_labels

__all__ = [
    "AtlasLabelTransfer",
    "AtlasRegistrationInferer",
    "PairRegistrationInferer",
    "atlas_onto_subject_affine",
    "fuse_labels",
    "global_ncc",
    "label_entropy",
    "load_atlases",
    "local_similarity_weights",
    "rank_by_closeness_to_mean",
    "SaveOverlayPNGd",
    "select_atlas",
    "select_atlases",
    "TransferResult",
]

FUSIONS = ("majority", "global", "local")


# ---------------------------------------------------------------------------------------------------------------------
# atlas choice
# ---------------------------------------------------------------------------------------------------------------------


def _zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / max(float(x.std()), 1e-8)


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def rank_by_closeness_to_mean(
    entries: Sequence[Mapping[str, Any]], image_key: str = "image", size: Sequence[int] | None = None
) -> list[int]:
    """Indices of ``entries`` sorted by NCC (best first) of each z-scored image with the group average.

    The spec's rule, computed by the shared `common.data.atlas.rank_by_closeness_to_mean` (``similarity="ncc"``).
    Images are resampled (trilinear) to ``size``, default the first image's shape, so groups of mixed shapes work.
    """
    if not entries:
        raise ValueError("rank_by_closeness_to_mean: no entries")
    paths = [str(e[image_key]) for e in entries]
    grid = tuple(size) if size is not None else tuple(nib.load(paths[0]).shape[:3])

    def standardise(array: np.ndarray) -> np.ndarray:
        data = torch.from_numpy(_zscore(array.astype(np.float32)))
        if tuple(data.shape) != grid:
            data = F.interpolate(data[None, None], size=grid, mode="trilinear", align_corners=True)[0, 0]
        return data.numpy()

    return closest_to_mean(paths, similarity="ncc", preprocess=standardise)


def _index_of(entries: Sequence[Mapping[str, Any]], atlas_id: int | str, image_key: str) -> int:
    if isinstance(atlas_id, int | np.integer) and not isinstance(atlas_id, bool):
        if not -len(entries) <= atlas_id < len(entries):
            raise ValueError(f"atlas id {atlas_id} is out of range for {len(entries)} entries")
        return int(atlas_id) % len(entries)
    if isinstance(atlas_id, str):
        matches = [
            i for i, e in enumerate(entries) if atlas_id in (str(e.get("subject", "")), _stem(str(e[image_key])))
        ]
        if len(matches) != 1:
            raise ValueError(f"atlas id {atlas_id!r} matches {len(matches)} entries (by 'subject' or file stem)")
        return matches[0]
    raise TypeError(f"an atlas id must be an int (0-based index) or a str (subject / file stem), got {atlas_id!r}")


def select_atlases(
    entries: Sequence[Mapping[str, Any]],
    atlas_ids: int | str | Sequence[int | str] | None = None,
    num_atlases: int = 1,
    image_key: str = "image",
    label_key: str = "label",
    size: Sequence[int] | None = None,
) -> list[dict]:
    """Atlas entries (copies with ``atlas_index`` added) chosen among ``entries``.

    ``atlas_ids``: one id or a list; an int is a 0-based index, a str matches the entry's "subject" or image file
    stem. None applies the paper's rule: the labelled image(s) closest to the group average of all z-scored images
    (`rank_by_closeness_to_mean`), ``num_atlases`` of them. The paper's choices were LPBA40 #30 (1-based, i.e.
    ``atlas_ids=29`` over S01..S40) and MindBoggle101 #39 (indexing not stated).
    """
    if not entries:
        raise ValueError("select_atlases: no entries to choose an atlas from")
    if atlas_ids is None:
        if num_atlases < 1:
            raise ValueError(f"num_atlases must be >= 1, got {num_atlases}")
        ranked = [i for i in rank_by_closeness_to_mean(entries, image_key, size) if label_key in entries[i]]
        if len(ranked) < num_atlases:
            raise ValueError(f"{num_atlases} atlas(es) requested but only {len(ranked)} entries have a {label_key!r}")
        indices = ranked[:num_atlases]
    else:
        ids = [atlas_ids] if isinstance(atlas_ids, int | str | np.integer) else list(atlas_ids)
        indices = [_index_of(entries, i, image_key) for i in ids]
    for i in indices:
        if label_key not in entries[i]:
            raise ValueError(f"the chosen atlas {entries[i][image_key]} has no {label_key!r}: an atlas needs labels")
    return [{**entries[i], "atlas_index": i} for i in indices]


def select_atlas(entries: Sequence[Mapping[str, Any]], atlas_id: int | str | None = None, **kwargs) -> dict:
    """The single atlas entry (see `select_atlases`)."""
    return select_atlases(entries, atlas_id, 1, **kwargs)[0]


# ---------------------------------------------------------------------------------------------------------------------
# similarity, fusion and uncertainty
# ---------------------------------------------------------------------------------------------------------------------


def global_ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalised cross-correlation per batch item of ``[B, C, *spatial]`` tensors -> ``[B]``."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)).float()


def local_similarity_weights(warped: torch.Tensor, target: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Per-voxel atlas weights exp(-G_sigma * (warped - target)^2 / h), h = mean local error (locally weighted voting).

    ``warped`` ``[K, B, 1, *S]`` (K registered atlas images), ``target`` ``[B, 1, *S]`` -> weights ``[K, B, 1, *S]``.
    """
    k, b = warped.shape[:2]
    err = (warped - target.unsqueeze(0)).pow(2).flatten(0, 1)
    radius = max(1, int(round(2 * sigma)))
    grid = torch.arange(-radius, radius + 1, dtype=err.dtype, device=err.device)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = kernel / kernel.sum()
    dims = err.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    for axis in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = kernel.numel()
        padding = [0] * dims
        padding[axis] = radius
        err = conv(err, kernel.view(shape), padding=tuple(padding))
    err = err.view(k, b, *err.shape[1:])
    h = err.mean(dim=0, keepdim=True).clamp_min(1e-6)
    return torch.exp(-err / h)


def fuse_labels(
    label_maps: torch.Tensor, values: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Weighted) voting of K label maps ``[K, B, 1, *S]`` over the label ``values`` -> (labels, probabilities).

    ``weights`` broadcasts to ``[K, B, 1, *S]`` (None = majority vote). Ties go to the lower label value. Returns the
    fused label map ``[B, 1, *S]`` (same dtype as ``values``) and the normalised votes ``[B, len(values), *S]``.
    """
    grid = values.view(1, 1, -1, *([1] * (label_maps.ndim - 3)))
    votes = (label_maps == grid).to(torch.float32)  # [K, B, V, *S]: one comparison, no loop over values (traceable)
    if weights is not None:
        votes = votes * weights.to(votes)
    votes = votes.sum(0)
    probs = votes / votes.sum(1, keepdim=True).clamp_min(1e-12)
    return values[probs.argmax(1, keepdim=True)], probs


def label_entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Shannon entropy (nats) over the label axis of ``[B, V, *S]`` probabilities -> ``[B, 1, *S]``."""
    return -(probs * torch.log(probs.clamp_min(eps))).sum(1, keepdim=True)


def _like(reference: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Wrap ``data`` with ``reference``'s meta so MONAI ``Invertd``/``SaveImaged`` treat it as on the same grid."""
    if isinstance(reference, MetaTensor):
        return MetaTensor(data, meta=reference.meta, applied_operations=reference.applied_operations)
    return data


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def atlas_onto_subject_affine(
    atlas: torch.Tensor, subject: torch.Tensor, affine_kwargs: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """Affine matrix ``[B, D, D+1]`` (subject voxel -> atlas voxel) that warps the atlas onto each subject.

    The step of the CLMorph ACDC benchmark (``tests/benchmarks/bench_clmorph_acdc.py``): the z-scored subject is
    aligned to the atlas (`common.registration.affine.prealign`, centre-of-mass start unless ``init`` is given) and
    the matrix inverted. Runs with gradients enabled for its own parameters, also inside ``no_grad`` inference.
    """
    kwargs = {"init": "com", **{k: (tuple(v) if isinstance(v, list) else v) for k, v in (affine_kwargs or {}).items()}}
    with torch.enable_grad():
        result = prealign(subject.detach(), atlas.detach().expand_as(subject), **kwargs)
    return invert_affine(result.matrix.detach())


# ---------------------------------------------------------------------------------------------------------------------
# label transfer, shared by the inferer and the segmentation network
# ---------------------------------------------------------------------------------------------------------------------


def load_atlases(
    atlases: Sequence[Mapping[str, Any]],
    transform: Callable[[dict], dict] | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Atlas images ``[K, 1, *S]`` (float32) and label maps ``[K, 1, *S]`` (int64) of ``atlases`` after ``transform``.

    Each atlas is ``{image_key: path or array, label_key: path or array}``; the transform gives all of them one grid.
    """
    if not atlases:
        raise ValueError("no atlas given: atlas segmentation needs at least one labelled atlas")
    images, labels = [], []
    for atlas in atlases:
        item = {image_key: atlas[image_key], label_key: atlas[label_key]}
        item = transform(item) if transform is not None else item
        images.append(torch.as_tensor(_plain(item[image_key]), dtype=torch.float32))
        labels.append(torch.as_tensor(_plain(item[label_key])))
    shapes = {tuple(t.shape) for t in images + labels}
    if len(shapes) != 1:
        raise ValueError(f"atlas images/labels differ in shape after the transform: {sorted(shapes)}")
    return torch.stack(images), torch.stack(labels).round().to(torch.int64)


class TransferResult(NamedTuple):
    """Fused labels ``seg`` ``[B, 1, *S]``, normalised votes ``probs`` ``[B, V, *S]``, the first atlas's field ``ddf``
    (atlas -> subject) and its warped image ``warped`` (None unless computed)."""

    seg: torch.Tensor
    probs: torch.Tensor
    ddf: torch.Tensor
    warped: torch.Tensor | None


class AtlasLabelTransfer:
    """Register K atlases to a subject with a registration network, warp the atlas labels, fuse them.

    ``network(pair) -> ddf`` with ``pair = [B, 2, *S]`` = (moving, fixed); atlases are ``images``/``labels``
    ``[K, 1, *S]`` on the subject's grid (see `load_atlases`).

    Args:
        direction: "atlas_to_subject" (atlas moving, subject fixed, labels warped by the ddf) or "inverse"
            (subject moving, atlas fixed, labels warped by exp(-z); needs ``network.inverse_ddf``).
        fusion: "majority", "global" (weights = max(NCC, 0) of warped atlas vs subject) or "local" (locally weighted
            voting, `local_similarity_weights`).
        local_sigma: Gaussian sigma (voxels) of the local weights.
        affine_prealign: align each atlas affinely onto the subject first (`atlas_onto_subject_affine`), run the
            network on the aligned atlas and warp the labels once with affine + deformable composed into one field
            (`common.registration.affine.compose_with_affine`). For data that is not pre-aligned.
        affine_kwargs: keyword arguments of `common.registration.affine.prealign` (``mode``, ``similarity``,
            ``frozen_axes``, ``levels``, ``iterations``, ...).
    """

    def __init__(
        self,
        direction: str = "atlas_to_subject",
        fusion: str = "majority",
        local_sigma: float = 2.0,
        affine_prealign: bool = False,
        affine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if direction not in ("atlas_to_subject", "inverse"):
            raise ValueError(f"direction must be 'atlas_to_subject' or 'inverse', got {direction!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.direction, self.fusion, self.local_sigma = direction, fusion, float(local_sigma)
        self.affine_prealign, self.affine_kwargs = bool(affine_prealign), dict(affine_kwargs or {})

    def matrices(self, images: torch.Tensor, subject: torch.Tensor) -> list[torch.Tensor | None]:
        """Per atlas, the affine matrix onto ``subject`` (None without ``affine_prealign``)."""
        if not self.affine_prealign:
            return [None] * images.shape[0]
        return [atlas_onto_subject_affine(images[k : k + 1], subject, self.affine_kwargs) for k in range(len(images))]

    def _network_field(
        self, network: Callable, atlas: torch.Tensor, subject: torch.Tensor, sample: bool
    ) -> torch.Tensor:
        if self.direction == "atlas_to_subject":
            pair = torch.cat([atlas.expand_as(subject), subject], 1)
            return network(pair, sample=True) if sample else network(pair)
        inverse = getattr(network, "inverse_ddf", None)
        if inverse is None:
            raise ValueError("direction='inverse' needs a network with inverse_ddf (e.g. CLMorphNet)")
        pair = torch.cat([subject, atlas.expand_as(subject)], 1)
        return inverse(pair, sample=True) if sample else inverse(pair)

    def field(
        self,
        network: Callable,
        atlas: torch.Tensor,
        subject: torch.Tensor,
        matrix: torch.Tensor | None = None,
        sample: bool = False,
    ) -> torch.Tensor:
        """Atlas -> subject field ``[B, D, *S]``: the network's alone, or affine (``matrix``) then network as one."""
        if matrix is None:
            return self._network_field(network, atlas, subject, sample)
        aligned = warp(atlas.expand_as(subject), affine_ddf(matrix, subject.shape[2:]).to(subject.dtype))
        return compose_with_affine(matrix, self._network_field(network, aligned, subject, sample))

    def _warp_atlas(
        self,
        network: Callable,
        image: torch.Tensor,
        label: torch.Tensor,
        subject: torch.Tensor,
        matrix: torch.Tensor | None,
        sample: bool,
        with_image: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One atlas (``[1, 1, *S]``) onto ``subject``: its field, warped labels and (``with_image``) warped image."""
        ddf = self.field(network, image, subject, matrix, sample)
        warped_label = warp_labels(label.expand(subject.shape[0], -1, *label.shape[2:]), ddf)
        return ddf, warped_label, warp(image.expand_as(subject), ddf) if with_image else None

    def sample_labels(
        self,
        network: Callable,
        images: torch.Tensor,
        labels: torch.Tensor,
        subject: torch.Tensor,
        matrices: Sequence[torch.Tensor | None],
    ) -> torch.Tensor:
        """Every atlas's labels warped onto ``subject`` by a field sampled from the network: ``[K, B, 1, *S]``."""
        return torch.stack(
            [
                self._warp_atlas(network, images[k : k + 1], labels[k : k + 1], subject, matrices[k], True, False)[1]
                for k in range(images.shape[0])
            ]
        )

    def weights(self, warped_images: torch.Tensor, subject: torch.Tensor) -> torch.Tensor | None:
        """Fusion weights broadcasting to ``[K, B, 1, *S]`` from the warped atlas images (None = majority)."""
        if self.fusion == "global":
            weights = torch.stack([global_ncc(w, subject).clamp_min(0.0) + 1e-6 for w in warped_images])
            return weights.view(len(warped_images), subject.shape[0], *([1] * (subject.ndim - 1)))
        if self.fusion == "local":
            return local_similarity_weights(warped_images, subject, self.local_sigma)
        return None

    def __call__(
        self,
        network: Callable,
        images: torch.Tensor,
        labels: torch.Tensor,
        values: torch.Tensor,
        subject: torch.Tensor,
        matrices: Sequence[torch.Tensor | None] | None = None,
        keep_warped: bool = False,
    ) -> TransferResult:
        """Segment ``subject`` ``[B, 1, *S]`` with the atlases (mean fields); votes over the label ``values``.

        ``matrices``: the atlases' affine matrices when already computed (`matrices`); ``keep_warped``: also return
        the first warped atlas image.
        """
        matrices = self.matrices(images, subject) if matrices is None else matrices
        with_images = self.fusion != "majority" or keep_warped
        warped = [
            self._warp_atlas(network, images[k : k + 1], labels[k : k + 1], subject, matrices[k], False, with_images)
            for k in range(images.shape[0])
        ]
        warped_images = torch.stack([w[2] for w in warped]) if with_images else None
        weights = self.weights(warped_images, subject) if warped_images is not None else None
        seg, probs = fuse_labels(torch.stack([w[1] for w in warped]), values, weights)
        return TransferResult(seg, probs, warped[0][0], warped_images[0] if with_images else None)


# ---------------------------------------------------------------------------------------------------------------------
# inferers
# ---------------------------------------------------------------------------------------------------------------------


class AtlasRegistrationInferer(Inferer):
    """Segment each input by registering one or several labelled atlases to it (`AtlasLabelTransfer`).

    Returns a dict (flatten it in postprocessing with ``FlattenSubKeysd(keys="pred")``):
    ``seg`` fused atlas labels ``[B, 1, *S]``; ``ddf`` and ``warped`` (the first atlas's field, atlas -> subject, and
    the warped atlas image) when listed in ``outputs``; with ``num_samples > 0`` also ``seg_mc`` (majority over the
    sampled fields of all atlases) and ``entropy`` (nats). Tensors carry the input's meta, so ``Invertd`` maps them
    back to the input's original grid.

    Args:
        atlases: one or several ``{"image": path, "label": path}``.
        transform: applied to each atlas dict; must give the network's grid and intensity normalisation (normally
            the same spatial/intensity transforms as the subject's preprocessing).
        direction, fusion, local_sigma, affine_prealign, affine_kwargs: see `AtlasLabelTransfer` (with
            ``affine_prealign`` the ``ddf`` output is the composed affine + deformable field).
        num_samples: velocity samples per atlas for the uncertainty outputs (needs ``network(pair, sample=True)``).
        outputs: extra outputs among "ddf", "warped".
    """

    def __init__(
        self,
        atlases: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        transform: Callable[[dict], dict] | None = None,
        direction: str = "atlas_to_subject",
        fusion: str = "majority",
        num_samples: int = 0,
        outputs: Sequence[str] = (),
        image_key: str = "image",
        label_key: str = "label",
        local_sigma: float = 2.0,
        affine_prealign: bool = False,
        affine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.transfer = AtlasLabelTransfer(direction, fusion, local_sigma, affine_prealign, affine_kwargs)
        unknown = set(outputs) - {"ddf", "warped"}
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose among 'ddf', 'warped'")
        self.atlases = [atlases] if isinstance(atlases, Mapping) else list(atlases)
        if not self.atlases:
            raise ValueError("AtlasRegistrationInferer needs at least one atlas")
        self.transform, self.num_samples, self.outputs = transform, int(num_samples), tuple(outputs)
        self.image_key, self.label_key = image_key, label_key
        self._cache: tuple[torch.device, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _prepared(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Atlas images ``[K, 1, *S]``, labels ``[K, 1, *S]`` and the sorted label values (cached per device)."""
        if self._cache is None or self._cache[0] != device:
            images, labels = load_atlases(self.atlases, self.transform, self.image_key, self.label_key)
            images, labels = images.to(device), labels.to(device)
            self._cache = (device, images, labels, torch.unique(labels))
        return self._cache[1], self._cache[2], self._cache[3]

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        subject = _plain(inputs).float()
        images, labels, values = self._prepared(subject.device)
        if images.shape[2:] != subject.shape[2:]:
            raise ValueError(
                f"atlas grid {tuple(images.shape[2:])} != input grid {tuple(subject.shape[2:])}: resample both to the "
                "same size in the preprocessing (e.g. the bundle's image_size)"
            )
        matrices = self.transfer.matrices(images, subject)
        transfer = self.transfer(network, images, labels, values, subject, matrices, "warped" in self.outputs)
        result = {"seg": _like(inputs, transfer.seg.to(torch.float32))}
        if "ddf" in self.outputs:
            result["ddf"] = _like(inputs, transfer.ddf)
        if "warped" in self.outputs:
            result["warped"] = _like(inputs, transfer.warped)
        if self.num_samples > 0:
            samples = [
                self.transfer.sample_labels(network, images, labels, subject, matrices) for _ in range(self.num_samples)
            ]
            seg_mc, probs = fuse_labels(torch.cat(samples), values)
            result["seg_mc"] = _like(inputs, seg_mc.to(torch.float32))
            result["entropy"] = _like(inputs, label_entropy(probs))
        return result


class PairRegistrationInferer(Inferer):
    """Registration mode: ``inputs`` ``[B, 2, *S]`` (moving, fixed) -> ``{"ddf", "warped"}`` (moving on fixed)."""

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        pair = _plain(inputs).float()
        ddf = network(pair)
        return {"ddf": _like(inputs, ddf), "warped": _like(inputs, warp(pair[:, :1], ddf))}


class SaveOverlayPNGd:
    """Postprocessing transform: PNG of the image with label maps (e.g. prediction, atlas) for the first ``max_cases``.

    Writes ``<output_dir>/<case>_<postfix>.png`` with `common.evaluation.figures.save_overlay_png`; the case name is
    the image file stem from its meta. Items pass through unchanged.
    """

    def __init__(
        self,
        image_key: str,
        label_keys: Mapping[str, str],
        output_dir: str | Path,
        postfix: str = "overlay",
        max_cases: int | None = None,
    ) -> None:
        self.image_key, self.label_keys, self.output_dir = image_key, dict(label_keys), Path(output_dir)
        self.postfix, self.max_cases, self.count = postfix, max_cases, 0

    def __call__(self, data: Mapping[str, Any]) -> Mapping[str, Any]:
        from common.evaluation.figures import save_overlay_png

        if self.max_cases is not None and self.count >= self.max_cases:
            return data
        image = data[self.image_key]
        meta = getattr(image, "meta", {}) or {}
        case = _stem(str(meta.get("filename_or_obj", f"case{self.count:04d}")))
        maps = {name: _plain(data[key])[0] for name, key in self.label_keys.items() if key in data}
        save_overlay_png(_plain(image)[0], maps, self.output_dir / f"{case}_{self.postfix}.png", title=case)
        self.count += 1
        return data
