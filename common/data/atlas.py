"""Atlas choice shared by CLMorph and SST: the training image closest to the group average.

One implementation, two similarity rules: ``"mse"`` (SST: smallest mean squared error to the voxel-wise mean) and
``"ncc"`` (CLMorph's spec: highest normalised cross-correlation with the mean, on z-scored images).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from common.data.validate import load_nifti

__all__ = ["rank_by_closeness_to_mean", "select_atlas_closest_to_mean"]

SIMILARITIES = ("mse", "ncc")


def _as_array(item: np.ndarray | torch.Tensor | str | os.PathLike) -> np.ndarray:
    if isinstance(item, torch.Tensor):
        return item.detach().cpu().numpy().astype(np.float64)
    if isinstance(item, str | os.PathLike):
        return load_nifti(item)[0].astype(np.float64)
    return np.asarray(item, dtype=np.float64)


def _ncc(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / max(float(np.linalg.norm(a) * np.linalg.norm(b)), eps))


def rank_by_closeness_to_mean(
    images: Sequence[np.ndarray | torch.Tensor | str | os.PathLike],
    similarity: str = "mse",
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[int]:
    """Indices of ``images`` sorted from the closest to the voxel-wise mean of all images to the farthest.

    ``similarity``: "mse" (smallest mean squared error first) or "ncc" (highest normalised cross-correlation
    first). ``preprocess`` maps each loaded array before averaging (e.g. z-scoring and resampling to one grid);
    without it the images must share one grid. Items may be arrays, tensors or NIfTI paths; paths are streamed (two
    passes, one volume in memory at a time) so large cohorts fit in memory. Ties keep the lower index first.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if len(images) == 0:
        raise ValueError("rank_by_closeness_to_mean needs at least one image")

    def load(item) -> np.ndarray:
        array = _as_array(item)
        return np.asarray(preprocess(array), dtype=np.float64) if preprocess is not None else array

    mean = None
    for item in images:
        array = load(item)
        if mean is not None and array.shape != mean.shape:
            raise ValueError(f"all images must share one shape: {array.shape} != {mean.shape} ({item!r:.200})")
        mean = array.copy() if mean is None else mean + array
    mean /= len(images)
    if similarity == "mse":
        scores = [float(np.mean((load(item) - mean) ** 2)) for item in images]
    else:
        scores = [-_ncc(load(item), mean) for item in images]
    return [int(i) for i in np.argsort(scores, kind="stable")]


def select_atlas_closest_to_mean(images: Sequence[np.ndarray | torch.Tensor | str | os.PathLike]) -> int:
    """Index of the image with the smallest mean squared error to the voxel-wise mean of all images (SST's rule).

    Images must share one grid (already aligned, same intensity normalisation); see `rank_by_closeness_to_mean`.
    Ties go to the lowest index.
    """
    return rank_by_closeness_to_mean(images, "mse")[0]
