"""CLMorph atlas inference with affine pre-alignment: a phantom moved by a known affine is segmented correctly."""

from __future__ import annotations

import math

import torch

from common.registration.affine import affine_ddf
from common.registration.atlas import AtlasRegistrationInferer
from common.registration.fields import warp, warp_labels

SHAPE = (32, 32, 32)


def _phantom() -> tuple[torch.Tensor, torch.Tensor]:
    """Two ellipsoids of different intensity (labels 1, 2) off-centre, so translation and rotation are observable."""
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in SHAPE], indexing="ij")
    big = ((z - 14) / 8) ** 2 + ((y - 15) / 6) ** 2 + ((x - 16) / 9) ** 2 <= 1
    small = ((z - 15) / 3) ** 2 + ((y - 21) / 3) ** 2 + ((x - 11) / 3) ** 2 <= 1
    label = torch.zeros(SHAPE, dtype=torch.int64)
    label[big] = 1
    label[small] = 2
    image = torch.where(label == 1, 0.5, torch.where(label == 2, 1.0, 0.0))
    image = torch.nn.functional.avg_pool3d(image[None, None], 3, stride=1, padding=1)
    return image, label[None, None]


def _known_matrix() -> torch.Tensor:
    """Subject voxel -> atlas voxel: 8 degree rotation in-plane about the centre, 3-4 voxel shifts, 5% scale."""
    angle, scale = math.radians(8.0), 1.05
    rotation = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, math.cos(angle), -math.sin(angle)], [0.0, math.sin(angle), math.cos(angle)]]
    )
    linear = scale * rotation
    centre = torch.tensor([(n - 1) / 2 for n in SHAPE])
    shift = torch.tensor([3.0, -4.0, 3.5])
    offset = centre - linear @ centre + shift
    return torch.cat([linear, offset[:, None]], 1)[None]


def _dice(a: torch.Tensor, b: torch.Tensor, value: int) -> float:
    a, b = a == value, b == value
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _zero_network(pair: torch.Tensor, sample: bool = False) -> torch.Tensor:
    return torch.zeros(pair.shape[0], 3, *pair.shape[2:])


def _segment(prealign: bool, atlas_image, atlas_label, subject) -> torch.Tensor:
    inferer = AtlasRegistrationInferer(
        {"image": atlas_image, "label": atlas_label},
        direction="atlas_to_subject",
        affine_prealign=prealign,
        affine_kwargs={"levels": [2, 1], "iterations": [80, 40], "similarity": "mse"},
    )
    with torch.no_grad():
        return inferer(subject, _zero_network)["seg"].long()


def test_affine_prealign_recovers_known_affine_with_zero_deformable_field():
    image, label = _phantom()
    matrix = _known_matrix()
    subject = warp(image, affine_ddf(matrix, SHAPE))
    truth = warp_labels(label, affine_ddf(matrix, SHAPE))
    atlas_image, atlas_label = image[0], label[0]  # the inferer's atlas form: [C, *S] per atlas
    aligned = _segment(True, atlas_image, atlas_label, subject)
    plain = _segment(False, atlas_image, atlas_label, subject)
    for value in (1, 2):
        assert _dice(aligned, truth, value) > 0.9
    for value in (1, 2):
        assert _dice(plain, truth, value) < 0.6
