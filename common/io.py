"""Atomic file writing: a kill mid-write never leaves a truncated file that a later run would load.

Every writer puts the content into a temporary file in the destination folder and renames it over the target with
``os.replace``, which is atomic on POSIX and Windows when both paths are on the same file system.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_json_dump",
    "atomic_torch_save",
    "save_nifti",
]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    ``suffix`` keeps the extension visible to writers that infer the format from it (e.g. nibabel's ``.nii.gz``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_with(path: str | os.PathLike, mode: str, write: Callable[[IO], Any]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, mode) as handle:
            write(handle)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _write_with(path, "wb", lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_json_dump(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    """Serialise ``obj`` as JSON (numpy scalars and arrays converted) and write it atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically, so an interrupted save keeps the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_nifti(
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor | Sequence[Sequence[float]],
    path: str | os.PathLike,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write ``array`` as NIfTI with ``affine`` atomically; ``dtype`` defaults to the array's own."""
    import nibabel as nib

    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if dtype is not None:
        data = data.astype(dtype)
    affine_np = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    image = nib.Nifti1Image(data, affine_np.astype(np.float64))
    image.header.set_data_dtype(data.dtype)
    suffix = "".join(Path(path).suffixes[-2:]) if str(path).endswith(".nii.gz") else Path(path).suffix
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, str(tmp))
    return Path(path)
