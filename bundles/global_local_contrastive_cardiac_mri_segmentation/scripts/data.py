"""Choice of the labelled fine-tuning volumes (|X_tr| = 1, 2 or 8 in the paper) from the datalist pool."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def volume_id(entry: dict) -> str:
    """The entry's ``subject`` or ``case`` if present, else its image file name without .nii/.nii.gz."""
    for key in ("subject", "case"):
        if key in entry:
            return str(entry[key])
    name = Path(entry["image"]).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def select_volumes(
    entries: Sequence[dict], ids: Sequence[str] | None = None, count: int | None = None, seed: int = 0
) -> list[dict]:
    """Labelled volumes for fine-tuning: the listed ``ids`` (in that order) or ``count`` drawn without replacement.

    ``ids`` match :func:`volume_id` exactly or else as a prefix of it (``"patient002"`` matches
    ``patient002_frame01`` when no other frame of that patient is in the pool); an id matching no entry, or several,
    is an error that lists the available ids. Without ids, ``count`` volumes are drawn with
    ``numpy.random.default_rng(seed)``, so the same seed gives the same draw for a given pool.
    """
    pool = list(entries)
    if ids:
        chosen = []
        for wanted in ids:
            hits = [e for e in pool if volume_id(e) == wanted] or [e for e in pool if volume_id(e).startswith(wanted)]
            if len(hits) != 1:
                found = [volume_id(e) for e in hits] or "nothing"
                raise ValueError(
                    f"train volume id {wanted!r} matched {found}; available: {[volume_id(e) for e in pool]}"
                )
            chosen.append(hits[0])
        return chosen
    if count is None or not 1 <= count <= len(pool):
        raise ValueError(f"need 1 <= num_train_volumes <= {len(pool)} (size of the pool), got {count}")
    order = np.random.default_rng(seed).permutation(len(pool))[:count]
    return [pool[i] for i in order]
