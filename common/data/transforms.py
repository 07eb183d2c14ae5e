"""MONAI dictionary transforms that validate data right after loading, naming the file and the fix.

Why: `common.data.datalist.load_datalist(validate=True)` checks files before training starts, but data also arrives
through paths that skip it (CLI overrides of ``#data``, generated datasets, inference lists). Placed right after
``LoadImaged`` (and ``EnsureChannelFirstd``), before any resampling or ``EnsureTyped(track_meta=False)``, these
transforms catch the same problems at transform time. Each raises
`common.data.validate.DataValidationError`; MONAI wraps transform errors in a ``RuntimeError("applying transform
...")`` whose ``__cause__`` is that error, so the message (file, problem, fix) stays in the traceback.

The file name comes from the MetaTensor meta ``filename_or_obj`` (or ``<key>_meta_dict`` when meta is kept apart).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.data.validate import NIFTI_SUFFIXES, DataValidationError, load_nifti

__all__ = ["ValidateFilesd", "ValidateImaged", "ValidateLabeld", "ValidateGeometryd", "source_name"]


def source_name(data: Mapping[Hashable, Any], key: Hashable) -> str:
    """File the item ``data[key]`` was loaded from (MetaTensor meta, then ``<key>_meta_dict``), else a key label."""
    value = data[key]
    meta = value.meta if isinstance(value, MetaTensor) else data.get(f"{key}_meta_dict", {})
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(name, (list, tuple)):  # collated meta
        name = name[0] if name else None
    return str(name) if name else f"<{key!r}: file unknown>"


def _fail(data: Mapping, key: Hashable, problem: str, fix: str) -> DataValidationError:
    return DataValidationError(f"{source_name(data, key)}: {key!r} {problem}. Fix: {fix}")


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.as_tensor() if isinstance(value, MetaTensor) else value
    return torch.as_tensor(np.asarray(value))


def _spatial_rank(value: Any) -> int | None:
    """Spatial dimensionality as read from the file header (LoadImaged meta ``spatial_shape``); None if unknown."""
    if isinstance(value, MetaTensor) and "spatial_shape" in value.meta:
        return len(np.atleast_1d(np.asarray(value.meta["spatial_shape"])))
    return None


def _spatial_shape(value: Any) -> tuple[int, ...]:
    """Current spatial shape: the trailing axes after the channel axis (or ``spatial_shape`` many when known)."""
    shape = tuple(int(s) for s in value.shape)
    rank = _spatial_rank(value)
    return shape[-rank:] if rank is not None else shape[1:]


class ValidateImaged(MapTransform):
    """Check images: spatial dimensionality, channel count, finite values and (unless allowed) not constant.

    Args:
        keys: image keys.
        ndim: expected spatial dimensionality (2 or 3), None to skip. Taken from the header's ``spatial_shape`` when
            LoadImaged recorded it (so a 2D NIfTI given to a 3D bundle fails even after EnsureChannelFirstd).
        channels: expected channel count for channel-first data (data with ``ndim + 1`` axes); a 4D NIfTI (e.g. a
            cine series) loaded channel-first into a single-channel bundle fails here. None to skip.
        allow_constant: accept constant images (all-zero masks, blank test inputs).
    """

    def __init__(
        self,
        keys: KeysCollection,
        ndim: int | None = None,
        channels: int | None = 1,
        allow_constant: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ndim = ndim
        self.channels = channels
        self.allow_constant = allow_constant

    def _check_shape(self, d: Mapping, key: Hashable, value: Any) -> None:
        if self.ndim is None:
            return
        rank = _spatial_rank(value)
        axes = value.ndim
        if rank is not None and rank != self.ndim:
            raise _fail(
                d,
                key,
                f"is a {rank}D image (shape {tuple(value.shape)}) but this bundle expects {self.ndim}D volumes",
                f"provide {self.ndim}D NIfTI volumes"
                + (" (stack the 2D slices into one volume)" if rank < self.ndim else " (split or select the volume)"),
            )
        if axes not in (self.ndim, self.ndim + 1):
            raise _fail(
                d,
                key,
                f"has {axes} axes (shape {tuple(value.shape)}); expected {self.ndim} spatial axes"
                f"{' plus a channel axis' if axes > self.ndim else ''}",
                f"provide {self.ndim}D volumes",
            )
        if self.channels is not None and axes == self.ndim + 1 and value.shape[0] != self.channels:
            raise _fail(
                d,
                key,
                f"has {value.shape[0]} channels (shape {tuple(value.shape)}) but {self.channels} expected; "
                "a 4D file (time series or stacked modalities) was probably given",
                f"give one {self.ndim}D volume per entry (e.g. select one frame)",
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            self._check_shape(d, key, value)
            t = _as_tensor(value)
            if t.numel() == 0:
                raise _fail(d, key, f"is empty (shape {tuple(t.shape)})", "re-export the volume")
            if t.is_floating_point() or t.is_complex():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise _fail(
                        d,
                        key,
                        f"contains {bad} NaN/Inf voxels",
                        "repair or re-export the volume (e.g. numpy.nan_to_num) before training or inference",
                    )
            if not self.allow_constant:
                lo, hi = t.min().item(), t.max().item()
                if lo == hi:
                    raise _fail(
                        d,
                        key,
                        f"is constant (every voxel is {lo})",
                        "the export failed or the file is blank; replace it with the real volume",
                    )
        return d


class ValidateFilesd(MapTransform):
    """Before ``LoadImaged``: the paths under ``keys`` exist, are readable NIfTI files with a parseable header.

    Why: LoadImaged reports a missing or foreign file as a reader error without a fix. ``read_data=True`` also
    decompresses the data block (catches truncated downloads; costs a second read of the file).
    """

    def __init__(self, keys: KeysCollection, read_data: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.read_data = read_data

    def _check(self, path: Path) -> None:
        if self.read_data:
            load_nifti(path)
            return
        if not path.is_file():
            problem = "does not exist" if not path.exists() else "is not a regular file"
            raise DataValidationError(
                f"{path}: {problem}. Fix: check the path (datalist paths are relative to the datalist's folder)"
            )
        if not os.access(path, os.R_OK):
            raise DataValidationError(f"{path}: file is not readable (permission denied). Fix: fix the permissions")
        if not path.name.lower().endswith(NIFTI_SUFFIXES):
            raise DataValidationError(
                f"{path}: is not a NIfTI file name (expected .nii or .nii.gz). Fix: convert the volume to NIfTI"
            )
        try:
            nib.load(str(path))
        except Exception as err:  # nibabel raises several unrelated types for bad headers
            raise DataValidationError(
                f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err}). Fix: re-export or re-download it"
            ) from err

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, (str, os.PathLike)):
                    self._check(Path(item))
        return d


def _allowed_set(allowed_labels: int | Iterable[int] | Mapping[Any, Any]) -> set[int]:
    if isinstance(allowed_labels, (int, np.integer)):
        return set(range(int(allowed_labels)))
    if isinstance(allowed_labels, Mapping):
        return {int(k) for k in allowed_labels}
    return {int(v) for v in allowed_labels}


class ValidateLabeld(MapTransform):
    """Check label maps: finite, integer-valued, and every value within the declared label set.

    Args:
        keys: label keys.
        allowed_labels: the declared set: an int ``n`` (labels ``0..n-1``), an iterable of ints, or a datalist
            ``labels`` dict (``{"0": "background", ...}``; keys are used).
    """

    def __init__(
        self,
        keys: KeysCollection,
        allowed_labels: int | Sequence[int] | Mapping[Any, Any],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.allowed = _allowed_set(allowed_labels)
        if not self.allowed:
            raise ValueError("ValidateLabeld: allowed_labels is empty")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        shown = _format_set(self.allowed)
        for key in self.key_iterator(d):
            t = _as_tensor(d[key])
            if t.is_floating_point():
                if not torch.isfinite(t).all():
                    raise _fail(d, key, "label map contains NaN/Inf", "re-export the label map with an integer dtype")
                if not torch.equal(t, torch.round(t)):
                    raise _fail(
                        d,
                        key,
                        "label map has non-integer values (was it resampled with linear interpolation?)",
                        "re-export it with nearest-neighbour resampling as an integer type (uint8)",
                    )
            values = {int(v) for v in torch.unique(t).tolist()}
            extra = sorted(values - self.allowed)
            if extra:
                raise _fail(
                    d,
                    key,
                    f"label values {extra} are outside the declared set {shown} ({len(values)} distinct values "
                    "found)",
                    "map the labels onto this bundle's classes (e.g. merge or drop structures) or declare them in "
                    "the datalist 'labels' and the bundle's class-count ids",
                )
        return d


def _format_set(values: set[int]) -> str:
    ordered = sorted(values)
    if len(ordered) > 3 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{{{ordered[0]}..{ordered[-1]}}}"
    return "{" + ", ".join(str(v) for v in ordered) + "}"


class ValidateGeometryd(MapTransform):
    """Check that every key shares the first key's spatial shape and affine (image and label of one subject).

    Args:
        keys: the reference key first (e.g. ``["image", "label"]``).
        atol: absolute tolerance on affine entries (mm).
    """

    def __init__(self, keys: KeysCollection, atol: float = 1e-3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.atol = atol

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        present = list(self.key_iterator(d))
        if len(present) < 2:
            return d
        ref_key, ref = present[0], d[present[0]]
        ref_shape = _spatial_shape(ref)
        for key in present[1:]:
            value = d[key]
            shape = _spatial_shape(value)
            if shape != ref_shape:
                raise _fail(
                    d,
                    key,
                    f"spatial shape {shape} differs from {ref_key!r} shape {ref_shape} ({source_name(d, ref_key)})",
                    "pair each label with its own image, or resample it onto the image grid (nearest neighbour)",
                )
            if isinstance(ref, MetaTensor) and isinstance(value, MetaTensor):
                a, b = ref.affine.double().cpu(), value.affine.double().cpu()
                if a.shape != b.shape or not torch.allclose(a, b, rtol=0.0, atol=self.atol):
                    raise _fail(
                        d,
                        key,
                        f"affine differs from {ref_key!r} ({source_name(d, ref_key)}):\n{b.numpy()}\nvs\n{a.numpy()}",
                        "copy the image header/affine into the label, or resample the label onto the image grid",
                    )
        return d
