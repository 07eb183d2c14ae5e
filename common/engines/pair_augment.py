"""Asymmetric random affine augmentation of a registration pair and the matching transform of its target field.

Cyclical self-training (Bigalke et al. 2023, §5.4 of our spec) augments only the learning stream: the fixed image is
resampled with a random affine ``A1`` and the moving image with ``A2 = A2' A1``, both drawn around the identity in the
normalised (``align_corners=False``, x = last axis) frame of ``F.affine_grid``:
``A1 = I + s1 Z1``, ``A2' = I + s2 Z2`` (4x4, Z ~ N(0, 1), bottom row's first three entries zeroed; the (4, 4) entry
keeps its noise, which only the reference label transform sees). Here each normalised affine is conjugated to a
voxel-space matrix (:func:`voxel_affine`) and applied through ``common.registration.fields`` (zero padding).

Target transform, for a target ``u`` with ``fixed(y) ~ moving(y + u(y))``:

* ``"exact"``: with ``F'(x) = F(A1 x)`` and ``M'(x) = M(A2 x)``, ``t(x) = A2^-1 (A1 x + u(A1 x)) - x`` makes
  ``M'(x + t(x)) = F'(x)``.
* ``"ref"``: the reference formula (quirk Q3, about 6 voxels off on AbdomenCTCT):
  ``A12 = expm(logm A1 - logm A2)``, ``t(x) = u~(A12 x) + A12 x - x`` with ``u~`` the target through a quarter-res
  round trip.

Everything is voxel units; the target is given and returned on a grid ``target_factor`` times coarser than the images
(2: half resolution, as the pseudo-label bank).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch

from common.registration import fields
from common.registration.affine import affine_ddf
from common.registration.convex import rescale_field

__all__ = ["random_affine_pair", "voxel_affine", "affine_pair_augment", "transform_target"]

LABEL_TRANSFORMS = ("exact", "ref")


def random_affine_pair(
    strengths: Sequence[float] = (0.075, 0.05), generator: torch.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(A1, A2)`` 4x4 float64 normalised-frame matrices: ``A1 = I + s1 Z1``, ``A2 = (I + s2 Z2) A1``."""
    noise = torch.randn(2, 4, 4, generator=generator, dtype=torch.float64).numpy()
    mats = []
    for strength, z in zip(strengths, noise):
        m = np.eye(4) + strength * z
        m[3, :3] = 0.0
        mats.append(m)
    return mats[0], mats[1] @ mats[0]


def _normalising_matrix(shape: Sequence[int]) -> np.ndarray:
    """4x4 map from voxel indices (axis order) to the normalised ``align_corners=False`` frame in (x, y, z) order."""
    dims = len(shape)
    out = np.zeros((dims + 1, dims + 1))
    for axis, n in enumerate(shape):
        row = dims - 1 - axis  # x is the last axis
        out[row, axis] = 2.0 / n
        out[row, dims] = 1.0 / n - 1.0
    out[dims, dims] = 1.0
    return out


def voxel_affine(matrix: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxel matrix ``[D, D+1]`` equivalent to sampling with ``F.affine_grid(matrix[:D], align_corners=False)``.

    Only the top ``D`` rows of ``matrix`` act on the grid (as in ``affine_grid``); the result maps an output voxel
    to the input voxel it samples, the convention of ``common.registration.affine.affine_ddf``.
    """
    dims = len(shape)
    top = np.eye(dims + 1)
    top[:dims] = np.asarray(matrix, dtype=np.float64)[:dims]
    norm = _normalising_matrix(shape)
    return (np.linalg.inv(norm) @ top @ norm)[:dims]


def _ddf(matrix: np.ndarray, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    mat = torch.as_tensor(matrix, dtype=torch.float32, device=like.device)[None]
    return affine_ddf(mat, shape).to(like.dtype)


def transform_target(
    target: torch.Tensor, a1: np.ndarray, a2: np.ndarray, image_shape: Sequence[int], mode: str = "exact"
) -> torch.Tensor:
    """Target ``[1, D, *coarse]`` (coarse-grid voxels) of the original pair -> target of the augmented pair."""
    if mode not in LABEL_TRANSFORMS:
        raise ValueError(f"mode must be one of {LABEL_TRANSFORMS}, got {mode!r}")
    image_shape = tuple(int(s) for s in image_shape)
    coarse = tuple(target.shape[2:])
    if mode == "ref":
        quarter = [max(n // 2, 1) for n in coarse]
        full_target = rescale_field(rescale_field(target, quarter), image_shape)
        a12 = scipy.linalg.expm(scipy.linalg.logm(a1) - scipy.linalg.logm(a2)).real
        step = _ddf(voxel_affine(a12, image_shape), image_shape, target)
        moved = fields.warp(full_target, step, mode="bilinear", padding_mode="zeros") + step
    else:
        full_target = rescale_field(target, image_shape)
        v1 = np.vstack([voxel_affine(a1, image_shape), np.eye(4)[3:]])
        v2 = np.vstack([voxel_affine(a2, image_shape), np.eye(4)[3:]])
        first = _ddf(v1[:3], image_shape, target)  # x -> A1 x
        grid = fields.identity_grid(image_shape, device=target.device, dtype=target.dtype)
        points = grid + first + fields.warp(full_target, first, mode="bilinear", padding_mode="zeros")
        inv = torch.as_tensor(np.linalg.inv(v2), dtype=target.dtype, device=target.device)
        mapped = torch.einsum("ij,bj...->bi...", inv[:3, :3], points) + inv[:3, 3].view(1, 3, 1, 1, 1)
        moved = mapped - grid
    return rescale_field(moved, coarse)


@torch.no_grad()
def affine_pair_augment(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    target: torch.Tensor | None,
    strengths: Sequence[float] = (0.075, 0.05),
    label_transform: str = "ref",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Augment a batch: ``fixed``/``moving`` ``[B, C, *S]``, ``target`` ``[B, D, *coarse]`` -> augmented copies.

    One pair of random matrices per item, drawn from ``generator``; images are resampled linearly, zeros outside.
    ``target=None`` augments the images only (metric supervision).
    """
    shape = tuple(fixed.shape[2:])
    out_f, out_m, out_t = [], [], []
    for b in range(fixed.shape[0]):
        a1, a2 = random_affine_pair(strengths, generator)
        out_f.append(fields.warp(fixed[b : b + 1], _ddf(voxel_affine(a1, shape), shape, fixed), padding_mode="zeros"))
        out_m.append(fields.warp(moving[b : b + 1], _ddf(voxel_affine(a2, shape), shape, moving), padding_mode="zeros"))
        if target is not None:
            out_t.append(transform_target(target[b : b + 1], a1, a2, shape, label_transform))
    return torch.cat(out_f), torch.cat(out_m), torch.cat(out_t) if out_t else None
