"""Numerical guards through the bundles: a NaN loss stops training and keeps the last good checkpoint; same seed,
same weights on CPU (set_determinism in ``initialize``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.data.synthetic import generate_dataset
from common.engines.guards import NonFiniteLossError
from tests.robustness.support import ENTRIES, bundle_case, describe, find_error, run_entry

CLMORPH = "clmorph_brain_mri_registration"
SST = "sst_brain_mri_one_shot_segmentation"

# a loss weight set to NaN makes the first loss of the next run NaN; checkpoint file of each bundle's first stage
NAN_RUNS = {
    CLMORPH: (
        {"epochs": 1, "batch_size": 1, "pairs_per_epoch": 2, "checkpoint_interval": 1, "val_interval": 100},
        {"epochs": 2, "alpha": "$float('nan')"},
        "models/checkpoint.pt",
    ),
    SST: (
        {"registration_epochs": 1, "registration_batch_size": 1, "registration_pairs_per_epoch": 2},
        {"registration_epochs": 2, "registration_grad_weight": "$float('nan')"},
        "work/checkpoints/stage0_registration.pt",
    ),
}


@pytest.fixture(scope="module")
def brain_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("brain") / "data"
    generate_dataset(data, preset="brain", num_subjects=6, shape=(32, 32, 32), seed=0)
    return data


@pytest.mark.parametrize("bundle", list(NAN_RUNS))
def test_nan_loss_stops_and_keeps_last_good_checkpoint(bundle, brain_data, tmp_path):
    case = bundle_case(bundle)
    if case is None:
        pytest.skip(f"{bundle} not present")
    good, bad, rel = NAN_RUNS[bundle]
    run_entry(case, ENTRIES["train"], brain_data, tmp_path, good)
    checkpoint = tmp_path / rel
    before = checkpoint.read_bytes()
    with pytest.raises(BaseException) as info:
        run_entry(case, ENTRIES["train"], brain_data, tmp_path, {**good, **bad})
    guard = find_error(info.value, NonFiniteLossError)
    assert guard is not None, f"a NaN loss did not stop training through NaNGuard: {describe(info.value)}"
    assert "loss is nan" in str(guard) and "last good checkpoint" in str(guard)
    assert checkpoint.read_bytes() == before, "the last good checkpoint was overwritten after the NaN loss"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["objects"][next(iter(state["objects"]))].values())
    assert not list(checkpoint.parent.glob(f".{checkpoint.name}.*.tmp")), "a temporary checkpoint file was left"


def _train_weights(case, data: Path, work: Path, seed: int) -> dict:
    extra = {"epochs": 1, "batch_size": 1, "pairs_per_epoch": 2, "val_interval": 100, "seed": seed}
    run_entry(case, ENTRIES["train"], data, work, extra)
    return torch.load(work / "models" / "model.pt", map_location="cpu", weights_only=True)


def test_same_seed_gives_identical_weights_on_cpu(brain_data, tmp_path):
    """Two runs with seed 0 end bit-identical; seed 1 differs (so the comparison can fail)."""
    case = bundle_case(CLMORPH)
    if case is None:
        pytest.skip("clmorph bundle not present")
    first = _train_weights(case, brain_data, tmp_path / "a", seed=0)
    second = _train_weights(case, brain_data, tmp_path / "b", seed=0)
    other = _train_weights(case, brain_data, tmp_path / "c", seed=1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "same seed, different weights"
    assert any(not torch.equal(first[k], other[k]) for k in first), "a different seed gave identical weights"
