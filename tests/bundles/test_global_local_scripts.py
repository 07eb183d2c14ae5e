"""Bundle glue of the global/local contrastive bundle: choice of the labelled fine-tuning volumes, best-model record."""

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


def _validate_once(saver, score: float) -> None:
    """One evaluator run whose key metric is ``score``: the saver writes model.pt if it is the best so far."""
    from ignite.engine import Engine, Events

    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def set_metric(e):
        e.state.metrics = {"val_mean_dice": score}

    saver.attach(engine)
    engine.run([0], max_epochs=1)


def test_best_model_record_survives_a_resume(tmp_path):
    """A fresh saver overwrites model.pt with a worse model; one given the saved record keeps the better one."""
    import torch
    from monai.handlers import CheckpointSaver

    with bundle_context(ROOT):
        resume = importlib.import_module("scripts.resume")

    def saver(net):
        return CheckpointSaver(
            str(tmp_path),
            {"model": net},
            save_key_metric=True,
            key_metric_name="val_mean_dice",
            key_metric_filename="model.pt",
        )

    good, worse = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    torch.nn.init.constant_(good.weight, 1.0)
    torch.nn.init.constant_(worse.weight, -1.0)
    first = saver(good)
    _validate_once(first, 0.8)
    record = resume.BestModelRecord(first).state_dict()
    assert [item[0] for item in record["_saved"]] == [0.8]  # (score, ignite file name) of the best model

    restored = saver(worse)
    resume.BestModelRecord(restored).load_state_dict(record)
    _validate_once(restored, 0.5)
    assert torch.equal(torch.load(tmp_path / "model.pt")["weight"], good.weight.detach())

    _validate_once(saver(worse), 0.5)  # without the record the worse model replaces the best one
    assert torch.equal(torch.load(tmp_path / "model.pt")["weight"], worse.weight.detach())

    with pytest.raises(ValueError, match="save_key_metric"):
        resume.BestModelRecord(CheckpointSaver(str(tmp_path), {"model": good}, save_final=True))
