"""Atlas label transfer (direction checked with a known shift), atlas choice, label fusion and uncertainty."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from common.registration.atlas import (
    AtlasRegistrationInferer,
    PairRegistrationInferer,
    fuse_labels,
    label_entropy,
    local_similarity_weights,
    select_atlas,
    select_atlases,
)
from common.registration.fields import warp, warp_labels

SHAPE = (20, 20, 20)
SHIFT = 3


def _phantom() -> tuple[torch.Tensor, torch.Tensor]:
    """Image and labels [1, 1, *SHAPE]: two blocks of different intensity/label."""
    labels = torch.zeros(1, 1, *SHAPE, dtype=torch.int64)
    labels[..., 4:9, 6:12, 5:11] = 1
    labels[..., 10:14, 4:9, 8:15] = 2
    image = torch.where(labels == 1, 1.0, torch.where(labels == 2, 2.0, 0.0))
    return image, labels


class TranslationNet(torch.nn.Module):
    """Brute-force integer translation registration in the bundle's convention warped(p) = moving(p + ddf(p)).

    It knows nothing about labels or atlases, so the test checks only how the inferer uses the field.
    """

    def forward(self, pair: torch.Tensor, sample: bool = False) -> torch.Tensor:
        moving, fixed = pair[:, :1], pair[:, 1:]
        best, best_err = None, math.inf
        for t in range(-5, 6):
            ddf = torch.zeros(pair.shape[0], 3, *pair.shape[2:])
            ddf[:, 0] = float(t)
            err = float((warp(moving, ddf, padding_mode="zeros") - fixed).pow(2).sum())
            if err < best_err:
                best, best_err = ddf, err
        return best

    def inverse_ddf(self, pair: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return -self.forward(pair)


def _shifted(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Content moved by +shift voxels along axis 0 (zeros enter)."""
    out = torch.zeros_like(x)
    out[:, :, shift:] = x[:, :, :-shift]
    return out


@pytest.mark.parametrize("direction", ["atlas_to_subject", "inverse"])
def test_label_transfer_direction_with_known_shift(direction):
    atlas_image, atlas_labels = _phantom()
    subject_image, subject_labels = _shifted(atlas_image, SHIFT), _shifted(atlas_labels, SHIFT)
    inferer = AtlasRegistrationInferer(
        {"image": atlas_image[0], "label": atlas_labels[0]}, direction=direction, outputs=("ddf", "warped")
    )
    out = inferer(subject_image, TranslationNet())
    assert torch.equal(out["seg"].long(), subject_labels)
    assert float(out["ddf"][:, 0].mean()) == -SHIFT  # atlas -> subject field, whatever the transfer direction
    # warping with the opposite field (the other direction) moves the labels the wrong way
    assert not torch.equal(warp_labels(atlas_labels, -out["ddf"]), subject_labels)
    assert torch.allclose(out["warped"], subject_image)


def test_multi_atlas_majority_and_weighted_fusion():
    image, labels = _phantom()
    wrong = labels.clone()
    wrong[labels == 2] = 1  # a corrupted atlas: structure 2 labelled as 1
    atlases = [{"image": image[0], "label": labels[0]}] * 2 + [{"image": image[0], "label": wrong[0]}]
    for fusion in ("majority", "global", "local"):
        out = AtlasRegistrationInferer(atlases, fusion=fusion)(image, TranslationNet())
        assert torch.equal(out["seg"].long(), labels), fusion


def test_sampling_outputs_and_entropy():
    image, labels = _phantom()
    inferer = AtlasRegistrationInferer({"image": image[0], "label": labels[0]}, num_samples=3)
    out = inferer(image, TranslationNet())
    assert torch.equal(out["seg_mc"].long(), labels)
    assert float(out["entropy"].abs().max()) < 1e-6  # every sample agrees: zero entropy


def test_fuse_labels_by_hand():
    maps = torch.tensor([[0, 1, 2], [1, 1, 2], [1, 2, 0]]).view(3, 1, 1, 3)  # K=3 atlases, 3 voxels
    values = torch.tensor([0, 1, 2])
    seg, probs = fuse_labels(maps, values)
    assert seg.flatten().tolist() == [1, 1, 2]
    assert torch.allclose(probs[0, :, 0], torch.tensor([1 / 3, 2 / 3, 0.0]))
    weights = torch.tensor([10.0, 1.0, 1.0]).view(3, 1, 1, 1)
    seg_w, _ = fuse_labels(maps, values, weights)
    assert seg_w.flatten().tolist() == [0, 1, 2]
    entropy = label_entropy(probs)
    assert float(entropy[0, 0, 1]) == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3), rel=1e-5)


def test_local_weights_prefer_the_matching_atlas():
    target = torch.rand(1, 1, 8, 8, 8)
    warped = torch.stack([target, target + 0.5])
    w = local_similarity_weights(warped, target)
    assert bool((w[0] > w[1]).all())


def test_pair_registration_inferer():
    image, _ = _phantom()
    pair = torch.cat([image, _shifted(image, SHIFT)], 1)
    out = PairRegistrationInferer()(pair, TranslationNet())
    assert torch.allclose(out["warped"], pair[:, 1:])


def _write(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.eye(4)), str(path))
    return str(path)


def test_atlas_selection_rules(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(8, 8, 8))
    noise = rng.normal(size=(8, 8, 8))
    entries = []
    for i, vol in enumerate([base + noise, base + 0.1 * noise, base - noise]):
        entries.append(
            {
                "image": _write(tmp_path / f"s{i}.nii.gz", vol),
                "label": _write(tmp_path / f"l{i}.nii.gz", vol > 0),
                "subject": f"s{i}",
            }
        )
    # the group mean is base + 0.033 noise: the closest image is the one with the least noise
    assert select_atlas(entries)["atlas_index"] == 1
    assert select_atlas(entries, 2)["atlas_index"] == 2
    assert select_atlas(entries, "s0")["atlas_index"] == 0
    assert [a["atlas_index"] for a in select_atlases(entries, num_atlases=2)][0] == 1
    unlabelled = [{"image": e["image"]} for e in entries[:2]] + entries[2:]
    assert select_atlas(unlabelled)["atlas_index"] == 2  # only labelled images can be atlases
    with pytest.raises(ValueError, match="matches 0"):
        select_atlas(entries, "nobody")


def test_one_ranking_serves_both_rules(tmp_path):
    """CLMorph's NCC rule and SST's MSE rule come from the same `common.data.atlas` ranking and differ as expected:
    a cleaner image at three times the intensity is the closest by NCC (scale-free) but the farthest by MSE."""
    from common.data.atlas import rank_by_closeness_to_mean, select_atlas_closest_to_mean

    rng = np.random.default_rng(1)
    base = rng.normal(size=(8, 8, 8))
    volumes = [3.0 * (base + 0.05 * rng.normal(size=base.shape))] + [
        base + s * rng.normal(size=base.shape) for s in (0.3, 0.5)
    ]
    assert rank_by_closeness_to_mean(volumes, "ncc")[0] == 0
    assert rank_by_closeness_to_mean(volumes, "mse")[-1] == 0
    assert select_atlas_closest_to_mean(volumes) == rank_by_closeness_to_mean(volumes, "mse")[0] == 1
    entries = [{"image": _write(tmp_path / f"v{i}.nii.gz", v), "label": _write(tmp_path / f"m{i}.nii.gz", v > 0)}
               for i, v in enumerate(volumes)]  # fmt: skip
    assert select_atlas(entries)["atlas_index"] == 0  # the bundle's default atlas rule is the NCC one
    with pytest.raises(ValueError, match="similarity"):
        rank_by_closeness_to_mean(volumes, "mi")
