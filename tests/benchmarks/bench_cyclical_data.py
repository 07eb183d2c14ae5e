"""Real-data loading for the cyclical self-training benchmarks: ACDC end-diastole volumes on one fixed grid.

ACDC (non-commercial research use only; Bernard et al., IEEE TMI 2018): identity affines, spacing unknown, so every
number is in voxels of the resampled grid. Preprocessing is label-free: a centred in-plane crop (the heart sits near
the image centre in short-axis cine MRI), then trilinear resampling of the image (nearest for the label) to ``size``;
intensities are the copy's per-volume [0, 1] scaling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.data.validate import load_nifti

ACDC_DIR = Path(os.environ.get("ACDC_DIR", Path(__file__).resolve().parents[3] / "shared" / "data" / "acdc"))
ACDC_LABELS = {1: "RV", 2: "MYO", 3: "LV"}


def acdc_patients() -> list[str]:
    return sorted(p.name[:10] for p in ACDC_DIR.glob("patient[0-9][0-9][0-9]_frame01.nii.gz"))


def load_acdc_volume(patient: str, size: Sequence[int], crop_fraction: float = 0.6, frame: int = 1) -> dict:
    """``{"image": [1, *size] float32, "label": [1, *size] int64, "patient"}`` for one frame of one patient."""
    image, _ = load_nifti(ACDC_DIR / f"{patient}_frame{frame:02d}.nii.gz")
    label, _ = load_nifti(ACDC_DIR / f"{patient}_frame{frame:02d}_gt.nii.gz")
    window = []
    for n in image.shape[:2]:
        keep = int(round(n * crop_fraction))
        start = (n - keep) // 2
        window.append(slice(start, start + keep))
    image = torch.from_numpy(np.ascontiguousarray(image[window[0], window[1]], dtype=np.float32))[None, None]
    label = torch.from_numpy(np.ascontiguousarray(label[window[0], window[1]]).astype(np.float32))[None, None]
    image = F.interpolate(image, size=tuple(size), mode="trilinear", align_corners=False)[0]
    label = F.interpolate(label, size=tuple(size), mode="nearest")[0].round().long()
    return {"image": image, "label": label, "patient": patient}
