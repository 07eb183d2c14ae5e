"""A training run killed with SIGKILL resumes from its last complete checkpoint (CLI subprocesses, CPU, tiny data).

Bundles: CLMorph (mid-epoch kill, exact), cyclical self-training (mid-stage kill with a pseudo-label bank on disk,
exact), global/local contrastive fine-tuning (mid-epoch kill with validation and a best model, exact) and global
pre-training (mid-epoch kill, exact), and SST stage 0
(mid-epoch kill, exact). Each test runs
``python -m monai.bundle run training ...`` three times on one synthetic dataset:

1. uninterrupted reference run (started in parallel with 2, same seed);
2. the same command, SIGKILLed as soon as the checkpoint file has been replaced a set number of times (the kill is
   therefore mid-epoch or right after an epoch, never after the end); the file on disk is the last complete checkpoint,
   because `common.io.atomic_torch_save` writes a temporary file and renames it;
3. a kill *during* a checkpoint write is simulated by leaving a partial temporary file ``.<name>.<random>.tmp`` (what
   an interrupted `atomic_torch_save` leaves) beside the checkpoint; then the same command resumes.

Checks: the resumed run logs ``resumed from <checkpoint>`` at exactly the iteration stored in the file, finishes the
planned number of iterations, and ends with the same weights (and optimizer state) as the reference run where the
bundle's randomness is fully checkpointed; otherwise the test says why and checks the step counters and that the
state at the kill equals the reference run's state at the same iteration.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from common.data.synthetic import generate_dataset
from tests.bundles.harness import REPO_ROOT, cli_command, substitute
from tests.robustness.support import bundle_case

TIMEOUT = 420


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _overrides(case, data: Path, run_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    paths = {
        "bundle_root": str(case.bundle_root),
        "data_dir": str(data),
        "datalist": str(data / "datalist.json"),
        "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(run_dir / "out"),
        "tmp": str(run_dir),
    }
    merged = {
        "bundle_root": paths["bundle_root"],
        "dataset_dir": paths["data_dir"],
        "datalist": paths["datalist"],
        "ckpt_dir": paths["ckpt_dir"],
        "output_dir": paths["output_dir"],
    }
    for more in (case.overrides, case.train_overrides, extra):
        merged.update(substitute(dict(more), paths))
    return merged


def _start(case, configs: list[str], overrides: dict[str, Any], log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 - closed by _finish
    proc = subprocess.Popen(
        cli_command(configs, overrides), cwd=case.bundle_root, env=_env(), stdout=handle, stderr=subprocess.STDOUT
    )
    proc.log_handle = handle  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.log_handle.close()  # type: ignore[attr-defined]
    text = log.read_text()
    assert proc.returncode == 0, f"run failed (exit {proc.returncode}):\n{text[-4000:]}"
    return text


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _kill_after_writes(proc: subprocess.Popen, path: Path, writes: int) -> None:
    """SIGKILL ``proc`` right after ``path`` has been (atomically) replaced ``writes`` times."""
    seen, last, deadline = 0, _signature(path), time.monotonic() + TIMEOUT
    while seen < writes:
        if proc.poll() is not None:
            proc.log_handle.close()  # type: ignore[attr-defined]
            pytest.fail(f"the run ended (exit {proc.returncode}) before {writes} checkpoint writes of {path}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {writes} checkpoint writes of {path} within {TIMEOUT} s")
        current = _signature(path)
        if current is not None and current != last:
            seen, last = seen + 1, current
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.log_handle.close()  # type: ignore[attr-defined]
    assert proc.returncode == -signal.SIGKILL


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _plant_partial_tmp(checkpoint: Path) -> Path:
    """What a kill inside `atomic_torch_save` leaves: a truncated temporary file next to the intact checkpoint."""
    partial = checkpoint.with_name(f".{checkpoint.name}.k1ll3d.tmp")
    partial.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 3])
    return partial


def _assert_states_equal(a: Any, b: Any, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for key in a:
            _assert_states_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_states_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _kill_and_resume(case, configs, data, tmp, extra, checkpoint_rel, kill_after):
    """Run reference, killed and resumed runs; return (reference ckpt, resumed ckpt, k, resume log, ref log)."""
    ref_dir, run_dir = tmp / "reference", tmp / "interrupted"
    ref_over = _overrides(case, data, ref_dir, extra)
    run_over = _overrides(case, data, run_dir, extra)
    ref_ckpt, run_ckpt = ref_dir / checkpoint_rel, run_dir / checkpoint_rel
    reference = _start(case, configs, ref_over, tmp / "reference.log")
    killed = _start(case, configs, run_over, tmp / "killed.log")
    _kill_after_writes(killed, run_ckpt, kill_after)
    stored = _load(run_ckpt)["engine"]
    partial = _plant_partial_tmp(run_ckpt)
    resumed = _start(case, configs, run_over, tmp / "resumed.log")
    resume_log = _finish(resumed, tmp / "resumed.log")
    ref_log = _finish(reference, tmp / "reference.log")
    assert partial.is_file(), "the partial temporary file was removed or loaded"
    return _load(ref_ckpt), _load(run_ckpt), stored, resume_log, ref_log


def _assert_resumed_at(log: str, checkpoint: Path, stored: dict) -> None:
    match = re.search(rf"resumed from {re.escape(str(checkpoint))}: epoch (\d+), iteration (\d+)", log)
    assert match, f"the resumed run did not log a resume from {checkpoint}:\n{log[-3000:]}"
    # the handler logs completed epochs; a mid-epoch checkpoint stores ignite's running epoch
    completed = stored["iteration"] // stored["epoch_length"]
    assert (int(match.group(1)), int(match.group(2))) == (completed, stored["iteration"])


def _assert_exact_resume(
    tmp: Path, runs: tuple, checkpoint_rel: str, iterations: int, weights_rel: str, epochs: int | None = None
) -> None:
    """The kill interrupted training, the resumed run logged its resume from the stored point, and it ended where the
    reference did: same final iteration (and epoch), same checkpoint objects, same saved weights ``weights_rel``."""
    ref, resumed, stored, log, _ = runs
    assert 0 < stored["iteration"] < iterations, f"the kill did not interrupt training: {stored}"
    _assert_resumed_at(log, tmp / "interrupted" / checkpoint_rel, stored)
    assert ref["engine"]["iteration"] == resumed["engine"]["iteration"] == iterations
    if epochs is not None:
        assert ref["engine"]["epoch"] == resumed["engine"]["epoch"] == epochs
    _assert_states_equal(ref["objects"], resumed["objects"], "checkpoint objects")
    weights = (_load(tmp / run / weights_rel) for run in ("reference", "interrupted"))
    _assert_states_equal(*weights, Path(weights_rel).name)


@pytest.fixture(scope="module")
def brain_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("brain") / "data"
    generate_dataset(data, preset="brain", num_subjects=6, shape=(32, 32, 32), seed=0)
    return data


def test_clmorph_kill_mid_epoch_resumes_exactly(brain_data, tmp_path):
    """2 epochs x 4 iterations, a checkpoint every iteration, killed after the 2nd write (iteration 2 of epoch 1).

    CLMorph's randomness (pair sampler, flips/rotations/crops, network sampling) flows through the global generators
    and the MONAI transforms of the checkpointed dataloader, so the resumed run must end bit-identical on CPU.
    """
    case = bundle_case("clmorph_brain_mri_registration")
    if case is None:
        pytest.skip("clmorph bundle not present")
    extra = {"epochs": 2, "batch_size": 1, "pairs_per_epoch": 4, "checkpoint_interval": 1, "val_interval": 100}
    rel = "models/checkpoint.pt"
    runs = _kill_and_resume(case, case.train_stages[0], brain_data, tmp_path, extra, rel, kill_after=2)
    _assert_exact_resume(tmp_path, runs, rel, 8, "models/model.pt", epochs=2)


def test_sst_registration_stage_kill_mid_epoch_resumes_exactly(brain_data, tmp_path):
    """SST stage 0 (registration pre-training), 2 epochs x 2 iterations, a checkpoint every iteration, killed after
    the 3rd write (iteration 3, mid epoch 2).

    The random pairs and jitter come from `RandomPairDataset`'s own random state, which the checkpoint holds (the
    stage's DataLoader is in its ``save_dict``) and restores after replaying the interrupted epoch's batches, so the
    resumed run must end bit-identical on CPU.
    """
    case = bundle_case("sst_brain_mri_one_shot_segmentation")
    if case is None:
        pytest.skip("sst bundle not present")
    extra = {
        "registration_epochs": 2,
        "registration_batch_size": 1,
        "registration_pairs_per_epoch": 2,
        "checkpoint_interval": 1,
    }
    rel = "work/checkpoints/stage0_registration.pt"
    runs = _kill_and_resume(case, case.train_stages[0], brain_data, tmp_path, extra, rel, kill_after=3)
    _assert_exact_resume(tmp_path, runs, rel, 4, "models/sst_registration.pt", epochs=2)
    _assert_states_equal(runs[0]["transform_rng"], runs[1]["transform_rng"], "pair sampler random state")


@pytest.mark.slow
def test_cyclical_kill_mid_stage_resumes_exactly(tmp_path_factory, tmp_path):
    """2 stages x 3 iterations, a checkpoint every iteration, killed after the 4th write (iteration 4, mid stage 2).

    The stage-1 pseudo-label bank lives on disk (one atomically written file per pair), the sampler and augmentation
    draw from checkpointed generators, so the resumed run must end bit-identical on CPU.
    """
    case = bundle_case("cyclical_self_training_abdomen_ct_registration")
    if case is None:
        pytest.skip("cyclical bundle not present")
    data = tmp_path_factory.mktemp("abdomen") / "data"
    generate_dataset(data, preset="abdomen", num_subjects=7, shape=(32, 32, 32), seed=0, **case.dataset_kwargs)
    extra = {"num_stages": 2, "iterations_per_stage": 3, "checkpoint_interval": 1, "val_interval": 100}
    rel = "models/checkpoint.pt"
    runs = _kill_and_resume(case, case.train_stages[0], data, tmp_path, extra, rel, kill_after=4)
    _assert_exact_resume(tmp_path, runs, rel, 6, "models/model.pt")


def _global_local_case_and_data(tmp_path_factory):
    case = bundle_case("global_local_contrastive_cardiac_mri_segmentation")
    if case is None:
        pytest.skip("global_local bundle not present")
    data = tmp_path_factory.mktemp("cardiac") / "data"
    generate_dataset(data, preset=case.preset, num_subjects=case.num_subjects, shape=case.shape, seed=0)
    return case, data


def test_global_local_finetuning_kill_mid_epoch_resumes_exactly(tmp_path_factory, tmp_path):
    """Fine-tuning, 3 epochs x 2 iterations with validation (and the best ``model.pt``) after each epoch, a checkpoint
    every iteration, killed after the 3rd write (iteration 3, mid epoch 2). Random initialisation, so the stage runs
    without the pre-training files.

    The slice sampling and augmentation are MONAI random transforms of the checkpointed dataloader, shuffling and
    the BatchNorm re-estimation before each validation use the global generators, and the best-score record of
    ``model.pt`` is in the checkpoint (``scripts.resume.BestModelRecord``), so the resumed run must end bit-identical
    on CPU: same weights, optimizer state and best model.
    """
    case, data = _global_local_case_and_data(tmp_path_factory)
    extra = {
        "epochs": 3,
        "iterations_per_epoch": 2,
        "checkpoint_interval": 1,
        "val_interval": 1,
        "load_pretrained": False,
    }
    rel = "models/checkpoint.pt"
    runs = _kill_and_resume(case, ["configs/train.json"], data, tmp_path, extra, rel, kill_after=3)
    assert runs[0]["objects"]["best_model_record"]["_saved"], "no best model recorded"
    _assert_exact_resume(tmp_path, runs, rel, 6, "models/model.pt", epochs=3)


@pytest.mark.slow
def test_global_local_pretraining_kill_mid_epoch_resumes_exactly(tmp_path_factory, tmp_path):
    """Global pre-training (G^D), 3 epochs x 2 iterations, a checkpoint every iteration, killed after the 3rd write.

    The partition sampler (collate) and the two augmented views draw from the global torch generator, the volume
    order from the checkpointed dataloader, so the resumed run must end bit-identical on CPU (encoder, projection head,
    optimizer).
    """
    case, data = _global_local_case_and_data(tmp_path_factory)
    extra = {"pretrain_epochs": 3, "pretrain_iterations_per_epoch": 2, "checkpoint_interval": 1}
    rel = "models/checkpoint_pretrain_global.pt"
    runs = _kill_and_resume(case, case.train_stages[0], data, tmp_path, extra, rel, 3)
    _assert_exact_resume(tmp_path, runs, rel, 6, "models/model_global.pt")
