"""SST data preparation: affine pre-alignment against a known affine, its cache, the atlas index check and the
checkpointable random state of the pair / flow datasets."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd
from torch import nn

import common.engines.sst_data as sst_data
from common.data.datalist import load_datalist
from common.engines.sst import (
    FlowDataset,
    RandomPairDataset,
    SSTData,
    dice_by_label,
    evaluate_atlas_registration,
    extract_flows,
    load_flows,
    prepare_sst_data,
)
from common.io import atomic_json_dump
from common.registration.affine import affine_ddf, invert_affine
from common.registration.fields import warp, warp_labels

SIZE = (24, 24, 16)
OPTIONS = {"mode": "rigid", "frozen_axes": [2], "mask_margin": None}


def _phantom() -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric phantom [1, *SIZE]: a body ellipsoid with two off-centre structures (labels 1 and 2)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in SIZE], indexing="ij"))

    def ellipsoid(centre, radii):
        return sum(((grid[i] - c) / r) ** 2 for i, (c, r) in enumerate(zip(centre, radii))) <= 1

    body = ellipsoid((11.5, 11.5, 7.5), (9, 7, 6))
    one = ellipsoid((8, 9, 7.5), (3, 2.5, 3))
    two = ellipsoid((15, 14, 7.5), (2.5, 3.5, 3))
    label = torch.zeros(SIZE, dtype=torch.long)
    label[one], label[two] = 1, 2
    image = 0.3 * body.float() + 0.4 * one.float() + 0.6 * two.float()
    return image[None], label[None]


def _known_matrix() -> torch.Tensor:
    """Atlas voxel -> subject voxel: 12 degrees in-plane rotation about the centre plus a (2, -1.5) voxel shift."""
    angle = math.radians(12)
    rot = torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1.0]])
    centre = torch.tensor([(n - 1) / 2 for n in SIZE])
    shift = torch.tensor([2.0, -1.5, 0.0])
    return torch.cat([rot, (centre - rot @ centre + shift)[:, None]], dim=1)


def _subject(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The atlas moved by ``matrix``: subject(M q) = atlas(q), so subject = warp(atlas, ddf(M^-1))."""
    image, label = _phantom()
    back = affine_ddf(invert_affine(matrix), SIZE)
    return warp(image[None], back)[0], warp_labels(label[None], back)[0]


class _ZeroFlow(nn.Module):
    """A flow model that does not move anything: isolates the affine part."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 3, *x.shape[2:])


def _data(images, options=None, matrices=None) -> SSTData:
    base, label = _phantom()
    return SSTData(
        base_image=base,
        base_label=label,
        base_name="atlas",
        affine=np.eye(4),
        images=list(images),
        names=[f"s{i}" for i in range(len(images))],
        labels={1: "one", 2: "two"},
        matrices=matrices,
        affine_options=options,
    )


def test_align_to_atlas_recovers_a_known_affine():
    matrix = _known_matrix()
    subject, _ = _subject(matrix)
    base, label = _phantom()
    found = sst_data.align_to_atlas([subject], base, label, OPTIONS)[0]
    assert torch.allclose(found[:, :3], matrix[:, :3], atol=0.03), found
    assert torch.allclose(found[:, 3], matrix[:, 3], atol=0.5), found


def test_registration_row_puts_atlas_labels_in_the_subject_grid(tmp_path):
    """'Reg.' with a flow model that does not move: the labels still land where the known affine put them, and only
    with pre-alignment."""
    subject, truth = _subject(_known_matrix())
    store = {"subject.nii.gz": subject, "subject_gt.nii.gz": truth}
    entries = [{"image": "subject.nii.gz", "label": "subject_gt.nii.gz"}]

    def transform(d):
        return {"image": store[d["image"]], "label": store[d["label"]]}

    args = (entries, transform, nn.Identity(), None, _ZeroFlow())
    aligned = dice_by_label(evaluate_atlas_registration(_data([subject], OPTIONS), *args, tmp_path / "a"))
    plain = dice_by_label(evaluate_atlas_registration(_data([subject]), *args, tmp_path / "b"))
    assert aligned["mean"] > 0.85, aligned
    assert plain["mean"] < 0.6, plain


def test_extracted_flows_map_the_atlas_onto_the_native_images(tmp_path):
    matrix = _known_matrix()
    subject, truth = _subject(matrix)
    aligned = warp(subject[None], affine_ddf(matrix, SIZE))[0]
    data = _data([aligned], OPTIONS, matrix[None])
    extract_flows(data, nn.Identity(), None, _ZeroFlow(), tmp_path)
    flow = load_flows(tmp_path / "index.json")[0]
    assert torch.allclose(flow, affine_ddf(invert_affine(matrix), SIZE)[0], atol=1e-4)
    moved = warp_labels(data.base_label[None], flow[None])[0]
    for value in (1, 2):
        overlap = 2 * ((moved == value) & (truth == value)).sum() / ((moved == value).sum() + (truth == value).sum())
        assert float(overlap) > 0.95


def test_atlas_space_flows_stay_residual_and_the_unet_sees_aligned_images(tmp_path):
    """``unet_space="atlas"``: S3 keeps only the flow to the aligned image (zero here), and a segmenter that knows only
    the atlas pose labels the rotated subject on its own grid through AtlasSpaceInferer."""
    from common.engines.sst_inference import AtlasSpaceInferer

    matrix = _known_matrix()
    subject, truth = _subject(matrix)
    aligned = warp(subject[None], affine_ddf(matrix, SIZE))[0]
    data = _data([aligned], OPTIONS, matrix[None])
    extract_flows(data, nn.Identity(), None, _ZeroFlow(), tmp_path, native_pose=False)
    assert torch.count_nonzero(load_flows(tmp_path / "index.json")[0]) == 0

    def atlas_pose_unet(image: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(data.base_label[0], 3).permute(3, 0, 1, 2)[None].float()

    scores = AtlasSpaceInferer(data.base_image, data.base_label, OPTIONS)(subject[None], atlas_pose_unet)
    found = scores.argmax(1)[0]
    for value in (1, 2):
        overlap = 2 * ((found == value) & (truth[0] == value)).sum() / ((found == value).sum() + (truth == value).sum())
        assert float(overlap) > 0.9, (value, float(overlap))


def _write_dataset(root, count: int = 3):
    images = root / "imagesTr"
    images.mkdir(parents=True)
    base, label = _phantom()
    entries = []
    for i in range(count):
        angle = math.radians(6 * i)
        matrix = _known_matrix()
        matrix[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        image, seg = _subject(matrix) if i else (base, label)
        nib.save(nib.Nifti1Image(image[0].numpy().astype(np.float32), np.eye(4)), str(images / f"s{i}.nii.gz"))
        nib.save(nib.Nifti1Image(seg[0].numpy().astype(np.uint8), np.eye(4)), str(images / f"s{i}_gt.nii.gz"))
        entries.append({"image": f"imagesTr/s{i}.nii.gz", "label": f"imagesTr/s{i}_gt.nii.gz"})
    labels = {"0": "background", "1": "one", "2": "two"}
    return atomic_json_dump({"name": "t", "labels": labels, "training": entries}, root / "datalist.json")


TRANSFORM = Compose(
    [
        LoadImaged(["image", "label"], allow_missing_keys=True),
        EnsureChannelFirstd(["image", "label"], allow_missing_keys=True),
        ScaleIntensityd("image"),
    ]
)


def test_prepare_sst_data_aligns_once_and_reuses_the_cache(tmp_path, monkeypatch):
    datalist = _write_dataset(tmp_path)
    cache = tmp_path / "work" / "affine.pt"
    data = prepare_sst_data(datalist, TRANSFORM, 0, affine_prealign=True, affine_options=OPTIONS, affine_cache=cache)
    assert data.matrices.shape == (2, 3, 4) and cache.is_file() and data.affine_options == OPTIONS
    for image in data.images:  # the aligned pool now matches the atlas
        assert float((image - data.base_image).abs().mean()) < 0.02

    def fail(*args, **kwargs):
        raise AssertionError("the cached matrices were not used")

    monkeypatch.setattr(sst_data, "align_to_atlas", fail)
    again = prepare_sst_data(datalist, TRANSFORM, 0, affine_prealign=True, affine_options=OPTIONS, affine_cache=cache)
    assert torch.equal(again.matrices, data.matrices)
    with pytest.raises(AssertionError, match="cached"):  # another atlas: the cache does not apply
        prepare_sst_data(datalist, TRANSFORM, 1, affine_prealign=True, affine_options=OPTIONS, affine_cache=cache)
    plain = prepare_sst_data(datalist, TRANSFORM, 0)
    assert plain.matrices is None and plain.affine_options is None


def test_integer_atlas_out_of_range_names_the_section(tmp_path):
    datalist = _write_dataset(tmp_path)
    assert len(load_datalist(datalist, "training", validate=False)) == 3
    with pytest.raises(ValueError, match="atlas index 3 is out of range.*has 3 images"):
        prepare_sst_data(datalist, TRANSFORM, 3)
    with pytest.raises(ValueError, match="atlas index -1"):
        prepare_sst_data(datalist, TRANSFORM, -1)


@pytest.mark.parametrize("make", ["pairs", "flows"])
def test_dataset_random_state_round_trip(make):
    """Restoring ``state_dict`` replays the same draws (what a resumed stage relies on)."""
    if make == "pairs":
        ds = RandomPairDataset([torch.rand(1, 4, 4, 4) for _ in range(5)], 10, shared_jitter=False, seed=3)
        key = "source"
    else:
        ds = FlowDataset([torch.randn(3, 4, 4, 4) for _ in range(5)], length=10, mix=0.3, seed=3)
        key = "flow"
    ds[0]
    state = ds.state_dict()
    first = [ds[i][key] for i in range(1, 4)]
    ds[0]  # moves on
    ds.load_state_dict(state)
    assert all(torch.equal(a, ds[i][key]) for a, i in zip(first, range(1, 4)))
