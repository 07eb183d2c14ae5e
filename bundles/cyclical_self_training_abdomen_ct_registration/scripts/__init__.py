"""Bundle-only glue of the cyclical self-training bundle: the intensity normalisation chosen by modality."""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import ScaleIntensityRanged, ScaleIntensityRangePercentilesd

__all__ = ["intensity_transform"]


def intensity_transform(keys: Sequence[str], mode: str = "ct", a_min: float = 0.0, a_max: float = 500.0):
    """``"ct"``: ``(x - a_min) / (a_max - a_min)`` without clipping (HU / 500 with the defaults, as the paper);
    ``"percentile"``: the 0.5-99.5 percentile range of each volume to [0, 1], clipped (MR of arbitrary scale)."""
    if mode == "ct":
        return ScaleIntensityRanged(keys=keys, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=False)
    if mode == "percentile":
        return ScaleIntensityRangePercentilesd(keys=keys, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    raise ValueError(f"intensity mode must be 'ct' or 'percentile', got {mode!r}")
