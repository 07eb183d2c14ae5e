"""Label transfer with the real CLMorphNet and a known smooth velocity field (demo regression, issue: Dice < baseline).

The subject is the atlas deformed by a known stationary velocity field. The expected subject labels come from an
independent integrator (forward Euler of the flow in numpy/scipy, not scaling and squaring), so the test checks that
inference warps image and labels with the same field, in the right direction, on the same grid, and that a perfect
field gives (nearly) perfect Dice in both transfer directions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from common.networks.clmorph import CLMorphNet
from common.registration.atlas import AtlasRegistrationInferer

SHAPE = (24, 24, 24)
SMALL = {"encoder_channels": (4, 8, 8, 8), "decoder_channels": (8, 8, 8, 8, 8, 4, 4), "projection_dim": 8}


def _atlas() -> tuple[np.ndarray, np.ndarray]:
    """Three blocks of different label/intensity, the smallest 3 voxels wide (like the phantoms' ventricles)."""
    label = np.zeros(SHAPE, dtype=np.int64)
    label[5:12, 6:18, 6:18] = 1
    label[13:19, 6:14, 8:16] = 2
    label[14:17, 15:19, 9:17] = 3
    image = np.choose(label, [0.0, 0.4, 0.8, 1.2]).astype(np.float32)
    return image, label


def _velocity() -> np.ndarray:
    """Smooth velocity ``[3, *SHAPE]`` in voxels, up to ~2.5 voxels, different along every axis."""
    grid = np.meshgrid(*[np.linspace(0.0, np.pi, n) for n in SHAPE], indexing="ij")
    return np.stack(
        [
            2.5 * np.sin(grid[1]) * np.sin(grid[2]),
            -2.0 * np.sin(grid[0]) * np.sin(grid[2]),
            1.5 * np.sin(grid[0]) * np.sin(grid[1]),
        ]
    )


def _flow_positions(velocity: np.ndarray, steps: int = 64) -> np.ndarray:
    """End points p(1) of dp/dt = velocity(p), p(0) = voxel grid (forward Euler; the exp map of ``velocity``)."""
    points = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"))
    for _ in range(steps):
        v = np.stack([ndimage.map_coordinates(c, points, order=1, mode="nearest") for c in velocity])
        points = points + v / steps
    return points


def _dice(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return float(2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum()))


class _KnownVelocity(CLMorphNet):
    """CLMorphNet whose velocity head is replaced by the known field: +v for (subject, atlas), -v for the reverse.

    registering the subject to the atlas needs exp(v) because subject(p) = atlas(p + exp(-v)(p)).
    """

    def __init__(self, velocity: torch.Tensor, atlas: torch.Tensor, **kwargs) -> None:
        super().__init__(**{**SMALL, **kwargs})
        self.known, self.atlas = velocity, atlas

    def velocity(self, moving, fixed):
        sign = 1.0 if torch.equal(fixed, self.atlas.expand_as(fixed)) else -1.0
        mean = sign * self.known.expand(moving.shape[0], -1, -1, -1, -1)
        return mean, torch.full_like(mean, -30.0), [], []


@pytest.mark.parametrize("int_downsize", [1, 2])
@pytest.mark.parametrize("direction", ["inverse", "atlas_to_subject"])
def test_known_velocity_transfers_labels(direction, int_downsize):
    atlas_image, atlas_label = _atlas()
    velocity = _velocity()
    # subject = atlas sampled at the end points of the flow of -v
    points = _flow_positions(-velocity)
    subject_label = ndimage.map_coordinates(atlas_label, points, order=0, mode="constant")
    subject_image = ndimage.map_coordinates(atlas_image, points, order=1, mode="nearest").astype(np.float32)
    atlas_t = torch.from_numpy(atlas_image)[None, None]
    net = _KnownVelocity(torch.from_numpy(velocity).float()[None], atlas_t, int_downsize=int_downsize).eval()
    inferer = AtlasRegistrationInferer(
        {"image": atlas_t[0], "label": torch.from_numpy(atlas_label)[None]},
        direction=direction,
        outputs=("ddf", "warped"),
    )
    out = inferer(torch.from_numpy(subject_image)[None, None], net)
    seg = out["seg"][0, 0].numpy().round().astype(np.int64)
    for k in (1, 2, 3):
        unregistered = _dice(atlas_label, subject_label, k)
        assert unregistered < 0.8, "the known field must move every structure"
        assert _dice(seg, subject_label, k) > 0.93, (k, _dice(seg, subject_label, k), unregistered)
    # the warped atlas image (same field as the labels) matches the subject image
    warped = out["warped"][0, 0].numpy()
    assert np.abs(warped - subject_image).mean() < 0.25 * np.abs(atlas_image - subject_image).mean()
    # the opposite field moves the labels the wrong way: the check can fail
    flipped = AtlasRegistrationInferer(
        {"image": atlas_t[0], "label": torch.from_numpy(atlas_label)[None]}, direction=direction
    )
    net.known = -net.known
    wrong = flipped(torch.from_numpy(subject_image)[None, None], net)["seg"][0, 0].numpy().round()
    assert np.mean([_dice(wrong, subject_label, k) for k in (1, 2, 3)]) < 0.6
