"""Atlas choice shared by CLMorph and SST: the training image closest (MSE) to the group average."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from common.data.validate import load_nifti

__all__ = ["select_atlas_closest_to_mean"]


def _as_array(item: np.ndarray | torch.Tensor | str | os.PathLike) -> np.ndarray:
    if isinstance(item, torch.Tensor):
        return item.detach().cpu().numpy().astype(np.float64)
    if isinstance(item, str | os.PathLike):
        return load_nifti(item)[0].astype(np.float64)
    return np.asarray(item, dtype=np.float64)


def select_atlas_closest_to_mean(images: Sequence[np.ndarray | torch.Tensor | str | os.PathLike]) -> int:
    """Index of the image with the smallest mean squared error to the voxel-wise mean of all images.

    Images must share one grid (already aligned, same intensity normalisation). Items may be arrays, tensors or
    NIfTI paths; paths are streamed (two passes, one volume in memory at a time) so large cohorts fit in memory.
    Ties go to the lowest index.
    """
    if len(images) == 0:
        raise ValueError("select_atlas_closest_to_mean needs at least one image")
    mean = None
    for item in images:
        array = _as_array(item)
        if mean is not None and array.shape != mean.shape:
            raise ValueError(f"all images must share one shape: {array.shape} != {mean.shape} ({item!r:.200})")
        mean = array.copy() if mean is None else mean + array
    mean /= len(images)
    errors = [float(np.mean((_as_array(item) - mean) ** 2)) for item in images]
    return int(np.argmin(errors))
