"""Pair samplers, PairedDataset with MONAI dict transforms, atlas closest to the mean."""

from __future__ import annotations

from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from common.data.atlas import select_atlas_closest_to_mean
from common.data.datalist import load_datalist
from common.data.pairs import PairedDataset, all_ordered_pairs, atlas_to_all, random_pairs
from common.data.synthetic import generate_dataset


def test_random_pairs_distinct_uniform_deterministic():
    pairs = random_pairs(4, 12000, np.random.default_rng(0))
    assert all(i != j for i, j in pairs)
    counts = Counter(pairs)
    assert len(counts) == 12  # every ordered pair occurs
    assert all(abs(c - 1000) < 150 for c in counts.values())  # 1000 expected, binomial std ~30
    assert random_pairs(4, 50, 3) == random_pairs(4, 50, 3)
    assert random_pairs(4, 50, 3) != random_pairs(4, 50, 4)
    with pytest.raises(ValueError):
        random_pairs(1, 5, 0)


def test_atlas_and_ordered_pairs():
    assert atlas_to_all(5, 2) == [(2, 0), (2, 1), (2, 3), (2, 4)]
    assert all_ordered_pairs(3) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert len(all_ordered_pairs(30)) == 870  # CLMorph LPBA40 epoch size
    with pytest.raises(ValueError):
        atlas_to_all(3, 3)


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    path = generate_dataset(tmp_path_factory.mktemp("pairs"), "brain", num_subjects=4, shape=(8, 10, 12), seed=1)
    return load_datalist(path)


def test_paired_dataset_paths_with_monai_transforms(entries):
    keys = ["moving_image", "moving_label", "fixed_image", "fixed_label"]
    ds = PairedDataset(entries, [(0, 1), (2, 0)], transform=Compose([LoadImaged(keys), EnsureChannelFirstd(keys)]))
    assert len(ds) == 2
    item = ds[1]
    assert item["moving_index"] == 2 and item["fixed_index"] == 0
    assert tuple(item["moving_image"].shape) == (1, 8, 10, 12)
    expected = nib.load(entries[0]["label"]).get_fdata()
    np.testing.assert_array_equal(np.asarray(item["fixed_label"][0]), expected)
    assert item["moving_site"] == 0


def test_paired_dataset_loaded_arrays(entries):
    item = PairedDataset(entries, [(2, 1)], load=True)[0]
    assert item["moving_image"].dtype == np.float32 and item["fixed_label"].dtype == np.int64
    np.testing.assert_allclose(item["fixed_image"], nib.load(entries[1]["image"]).get_fdata(), rtol=1e-6)
    batch = torch.utils.data.default_collate([item, item])
    assert tuple(batch["moving_image"].shape) == (2, 8, 10, 12)
    with pytest.raises(ValueError):
        PairedDataset(entries, [(0, 3)])


def test_atlas_closest_to_mean(tmp_path):
    # constant volumes 0, 2, 10: mean 4, squared errors 16, 4, 36 -> index 1.
    images = [np.full((3, 4, 5), v, np.float32) for v in (0.0, 2.0, 10.0)]
    assert select_atlas_closest_to_mean(images) == 1
    assert select_atlas_closest_to_mean([torch.from_numpy(a) for a in images[::-1]]) == 1
    paths = []
    for i, a in enumerate([images[2], images[0], images[1]]):
        paths.append(tmp_path / f"{i}.nii.gz")
        nib.save(nib.Nifti1Image(a, np.eye(4)), str(paths[-1]))
    assert select_atlas_closest_to_mean(paths) == 2
    rng = np.random.default_rng(0)
    base = rng.random((6, 6, 6))
    noisy = [base + s * rng.standard_normal((6, 6, 6)) for s in (0.5, 0.05, 0.4, 0.3)]
    assert select_atlas_closest_to_mean(noisy) == 1
    with pytest.raises(ValueError):
        select_atlas_closest_to_mean([images[0], np.zeros((2, 2, 2))])
