"""Pair samplers for pairwise registration and a dict dataset of (moving, fixed) pairs.

Why: every registration bundle trains on pairs drawn from one list of subjects; the sampling rule (random pairs,
atlas-to-all, all ordered pairs) is a config choice, so it lives here once. A pair is ``(moving, fixed)``:
the moving image is warped onto the fixed one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from common.data.validate import load_nifti

__all__ = ["PAIR_KEYS", "PairedDataset", "all_ordered_pairs", "atlas_to_all", "random_pairs"]

PAIR_KEYS = ("image", "label")


def random_pairs(n: int, num_pairs: int, rng: np.random.Generator | int | None = None) -> list[tuple[int, int]]:
    """``num_pairs`` uniformly random ordered pairs (i, j) of distinct indices in [0, n) (with replacement)."""
    if n < 2:
        raise ValueError(f"random_pairs needs at least 2 subjects, got {n}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    moving = rng.integers(0, n, size=num_pairs)
    # draw fixed from the n-1 other indices: uniform over j != i without rejection.
    fixed = rng.integers(0, n - 1, size=num_pairs)
    fixed = fixed + (fixed >= moving)
    return [(int(i), int(j)) for i, j in zip(moving, fixed, strict=True)]


def atlas_to_all(n: int, atlas_index: int) -> list[tuple[int, int]]:
    """(atlas, i) for every other subject i: the atlas (moving) is warped onto each subject (fixed)."""
    if not 0 <= atlas_index < n:
        raise ValueError(f"atlas_index {atlas_index} outside [0, {n})")
    return [(atlas_index, i) for i in range(n) if i != atlas_index]


def all_ordered_pairs(n: int) -> list[tuple[int, int]]:
    """All n(n-1) ordered pairs (i, j), i != j, in row-major order."""
    return [(i, j) for i in range(n) for j in range(n) if i != j]


class PairedDataset(Dataset):
    """Dicts ``{"moving_image", "moving_label", "fixed_image", "fixed_label", ...}`` for a list of pairs.

    ``entries`` are datalist entries (e.g. from ``load_datalist``). With ``load=False`` (default) values are the
    file paths, ready for MONAI dict transforms such as ``LoadImaged(keys=["moving_image", "fixed_image", ...])``;
    with ``load=True`` they are numpy arrays (float32 images, int64 labels) read with nibabel. Keys missing from
    an entry (e.g. no label) are left out. Other entry fields are copied as ``moving_<key>``/``fixed_<key>``.
    ``transform`` (any callable on the dict, e.g. a MONAI ``Compose``) is applied last.
    """

    def __init__(
        self,
        entries: Sequence[Mapping],
        pairs: Sequence[tuple[int, int]],
        transform: Callable | None = None,
        load: bool = False,
    ):
        n = len(entries)
        bad = [p for p in pairs if not (0 <= p[0] < n and 0 <= p[1] < n)]
        if bad:
            raise ValueError(f"pairs {bad[:5]} index outside the {n} entries")
        self.entries, self.pairs, self.transform, self.load = list(entries), list(pairs), transform, load

    def __len__(self) -> int:
        return len(self.pairs)

    def _side(self, entry: Mapping, role: str) -> dict:
        out = {}
        for key, value in entry.items():
            if key in PAIR_KEYS and self.load:
                data = load_nifti(value)[0]
                value = data.astype(np.float32) if key == "image" else data.astype(np.int64)
            out[f"{role}_{key}"] = value
        return out

    def __getitem__(self, index: int) -> dict:
        moving, fixed = self.pairs[index]
        item = {**self._side(self.entries[moving], "moving"), **self._side(self.entries[fixed], "fixed")}
        item["moving_index"], item["fixed_index"] = moving, fixed
        return self.transform(item) if self.transform is not None else item
