"""Input checks that fail early with a message naming the file, the problem and the fix.

Why: a bad volume (truncated download, mismatched label export, NaNs) otherwise surfaces hours later as a cryptic
shape error or a NaN loss deep inside a training loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["DataValidationError", "check_output_dir", "load_nifti", "validate_image", "validate_image_label"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DataValidationError(ValueError):
    """A data file or datalist is unusable; the message names the file, the problem and how to fix it."""


def _fail(path: str | os.PathLike, problem: str, fix: str) -> DataValidationError:
    return DataValidationError(f"{path}: {problem}. Fix: {fix}")


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file fully: (array with scaling applied, affine). Raises DataValidationError if unusable."""
    p = Path(path)
    if not p.exists():
        raise _fail(
            p, "file does not exist", "check the path (relative paths are resolved against the datalist folder)"
        )
    if not p.is_file():
        raise _fail(p, "is not a regular file", "point the datalist entry at a .nii/.nii.gz file")
    if not os.access(p, os.R_OK):
        raise _fail(p, "file is not readable (permission denied)", "fix the file permissions")
    if not p.name.lower().endswith(NIFTI_SUFFIXES):
        raise _fail(p, "is not a NIfTI file name (expected .nii or .nii.gz)", "convert the volume to NIfTI")
    try:
        img = nib.load(str(p))
    except Exception as err:  # nibabel raises several unrelated types for bad headers
        raise _fail(p, f"cannot be read as NIfTI ({type(err).__name__}: {err})", "re-export or re-download it") from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise _fail(p, f"is a {type(img).__name__}, not NIfTI", "convert the volume to NIfTI")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated gzip streams fail here (EOFError, zlib.error, OSError)
        raise _fail(p, f"data block is corrupt or truncated ({type(err).__name__}: {err})", "re-download it") from err
    return data, img.affine


def _check_ndim(path: Path, data: np.ndarray, ndim: int | None) -> None:
    if ndim is not None and data.ndim != ndim:
        raise _fail(
            path,
            f"has {data.ndim} dimensions (shape {data.shape}) but {ndim}D volumes are expected",
            f"provide {ndim}D volumes (stack 2D slices into a volume, or drop extra axes)",
        )


def validate_image(image_path: str | os.PathLike, ndim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check one image (readable NIfTI, dimensionality, finite, not constant); return (data, affine)."""
    path = Path(image_path)
    data, affine = load_nifti(path)
    _check_ndim(path, data, ndim)
    if data.size == 0:
        raise _fail(path, f"image is empty (shape {data.shape})", "re-export the volume")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise _fail(path, f"image contains {bad} NaN/Inf voxels", "repair or re-export the volume (e.g. np.nan_to_num)")
    lo, hi = data.min(), data.max()
    if lo == hi:
        raise _fail(path, f"image is constant (every voxel is {lo})", "the export failed or the file is blank; redo it")
    return data, affine


def validate_image_label(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    allowed_labels: Iterable[int] | None = None,
    ndim: int | None = None,
    atol: float = 1e-3,
) -> dict:
    """Check an image (and its label map) before training; return {"shape", "spacing", "label_values"}.

    Checks: files exist and are readable NIfTI; dimensionality is ``ndim`` when given; image finite and not
    constant; label integer-valued, values within ``allowed_labels`` when given; image and label share shape and
    affine (allclose, ``atol`` in mm).
    """
    image, affine = validate_image(image_path, ndim)
    info = {
        "shape": tuple(int(n) for n in image.shape),
        "spacing": tuple(float(s) for s in nib.affines.voxel_sizes(affine)),
    }
    if label_path is None:
        info["label_values"] = None
        return info
    lpath = Path(label_path)
    label, label_affine = load_nifti(lpath)
    _check_ndim(lpath, label, ndim)
    if label.shape != image.shape:
        raise _fail(
            lpath,
            f"label shape {label.shape} differs from image shape {image.shape} ({image_path})",
            "pair the label with its own image, or resample the label onto the image grid (nearest neighbour)",
        )
    if not np.allclose(label_affine, affine, rtol=0.0, atol=atol):
        raise _fail(
            lpath,
            f"label affine differs from image affine ({image_path}):\n{label_affine}\nvs\n{affine}",
            "copy the image header/affine into the label, or resample the label onto the image grid",
        )
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            raise _fail(lpath, "label contains NaN/Inf", "re-export the label map with an integer dtype")
        if not np.array_equal(label, np.round(label)):
            raise _fail(lpath, "label has non-integer values", "re-export the label map (nearest-neighbour, uint8)")
    values = np.unique(label).astype(np.int64)
    if allowed_labels is not None:
        allowed = {int(v) for v in allowed_labels}
        extra = sorted(set(values.tolist()) - allowed)
        if extra:
            raise _fail(
                lpath,
                f"label values {extra} are outside the declared set {sorted(allowed)}",
                "relabel the map or add the values to the datalist 'labels' dict",
            )
    info["label_values"] = values.tolist()
    return info


def check_output_dir(output_dir: str | os.PathLike, input_paths: Iterable[str | os.PathLike]) -> Path:
    """Refuse an output folder that is an input folder (or an input file), so outputs never overwrite inputs.

    An input given as a file protects its parent folder; an input folder protects itself. Returns the resolved
    output folder.
    """
    out = Path(output_dir).expanduser().resolve()
    for item in input_paths:
        p = Path(item).expanduser().resolve()
        protected = p.parent if p.is_file() or p.name.lower().endswith(NIFTI_SUFFIXES + (".json",)) else p
        if out == protected or out == p:
            raise _fail(
                out,
                f"output folder is the input location {protected}; writing there could overwrite the input data",
                "choose a different output_dir",
            )
    return out
