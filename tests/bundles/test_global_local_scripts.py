"""Bundle glue of the global/local contrastive bundle: choice of the labelled fine-tuning volumes."""

import importlib

import pytest

from tests.bundles.harness import BUNDLES_DIR, bundle_context

ROOT = BUNDLES_DIR / "global_local_contrastive_cardiac_mri_segmentation"
POOL = [
    {"image": "/d/patient002_frame01.nii.gz"},
    {"image": "/d/patient002_frame02.nii.gz"},
    {"image": "/d/patient042_frame01.nii.gz"},
    {"image": "/d/sub7.nii.gz", "subject": "sub007"},
]


def _data_module():
    with bundle_context(ROOT):
        return importlib.import_module("scripts.data")


def test_select_by_ids_exact_prefix_and_errors():
    data = _data_module()
    chosen = data.select_volumes(POOL, ids=["patient042", "patient002_frame02", "sub007"])
    assert [c["image"] for c in chosen] == [POOL[2]["image"], POOL[1]["image"], POOL[3]["image"]]
    with pytest.raises(ValueError, match="matched"):
        data.select_volumes(POOL, ids=["patient002"])  # two frames: ambiguous
    with pytest.raises(ValueError, match="nothing"):
        data.select_volumes(POOL, ids=["patient099"])


def test_select_by_count_is_seeded_and_without_replacement():
    data = _data_module()
    a = data.select_volumes(POOL, count=3, seed=5)
    assert a == data.select_volumes(POOL, count=3, seed=5)
    assert len({c["image"] for c in a}) == 3
    draws = {tuple(c["image"] for c in data.select_volumes(POOL, count=1, seed=s)) for s in range(40)}
    assert len(draws) == 4  # every volume can be drawn
    with pytest.raises(ValueError):
        data.select_volumes(POOL, count=5)
