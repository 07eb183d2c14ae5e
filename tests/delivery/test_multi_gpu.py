"""Multi-GPU configs on PyTorch's distributed engine, run on CPU: 2 Gloo processes under torchrun.

Unit part: ``common.distributed`` (gradient all-reduce through routed entry points, the per-epoch subset sampler,
rank-0 handler filtering) with two forked Gloo processes. Bundle part, for every bundle: all training stages layered
with ``multi_gpu_train.json`` and then ``evaluate.json + multi_gpu_evaluate.json`` in one torchrun launch; the rank-0
checkpoint has the single-process structure (plain ``network_def`` keys) and the distributed evaluation reports the
same per-case numbers as a single-process evaluation of the same weights.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.distributed import (
    DistributedNetwork,
    DistributedSubsetSampler,
    SyncStatesAtStart,
    average_gradients_on_step,
    destroy_process_group,
    rank0_handlers,
)
from tests.bundles.harness import run_workflow
from tests.delivery.bundles import (
    PYTHON,
    TINY,
    build_inference_network,
    bundle_root_of,
    discover_bundles,
    harness_case,
    make_workspace,
    subprocess_bundle_names,
    subprocess_env,
    tiny_case,
)
from tests.delivery.tiny_bundle import write_tiny_bundle

RUNNER = Path(__file__).with_name("dist_runner.py")
# Validation/test cases per rank >= 1 (MONAI's DistributedSampler(even_divisible=False) needs as many items as ranks);
# pair-based bundles evaluate all ordered pairs of a split, so 3 cases give 3 pairs.
DATASET_SPLITS = {"cyclical_self_training_abdomen_ct_registration": {"num_validation": 3, "num_test": 3}}


# ---------------------------------------------------------------------------------------------------- unit: helpers
def test_subset_sampler_splits_one_shared_order() -> None:
    dataset = list(range(7))
    ranks = [DistributedSubsetSampler(dataset, num_samples=5, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(4)
    per_rank = [list(s) for s in ranks]
    order = torch.randperm(7, generator=torch.Generator().manual_seed(3 + 4)).tolist()[:5]
    padded = order + order[:1]  # 5 items padded to 6 = 2 ranks x 3
    assert per_rank == [padded[0::2], padded[1::2]]
    assert len(ranks[0]) == 3
    ranks[0].set_epoch(5)
    assert list(ranks[0]) != per_rank[0], "a new epoch must draw a new subset"
    many = DistributedSubsetSampler(dataset, num_samples=16, seed=0, num_replicas=2, rank=0)
    assert len(list(many)) == 8 and set(list(many)) <= set(dataset)


class StatsHandler:  # stand-ins named like the handlers they represent (matching is by class name)
    pass


class ValidationHandler:
    pass


class ModelWeightsSaver:
    pass


class _Twin(torch.nn.Module):
    """A network with an extra training entry point and a non-differentiable helper (like BYOL's target update)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.constant_(self.lin.weight, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.lin(x)

    def helper(self) -> str:
        return "module attribute"


def _worker(rank: int, init_file: str, results: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        net = DistributedNetwork(_Twin(), methods=["forward_train"])
        x = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank
        net.forward_train(x).sum().backward()
        handlers = [StatsHandler(), ValidationHandler(), ModelWeightsSaver()]
        kept = [type(h).__name__ for h in rank0_handlers(handlers, extra=["ModelWeightsSaver"])]
        # no wrapper: gradients averaged when the optimizer steps; rank 0's states copied at engine start
        plain = _Twin()
        plain.register_buffer("marker", torch.tensor([float(rank + 7)]))
        plain.lin.weight.data += rank  # a rank-dependent start that SyncStatesAtStart must undo
        SyncStatesAtStart([plain])(None)
        average_gradients_on_step()
        optimizer = torch.optim.SGD(plain.parameters(), lr=1.0)
        plain.forward_train(x).sum().backward()
        optimizer.step()
        stepped = (plain.lin.weight.detach().clone(), float(plain.marker))
        results[rank] = (net.module.lin.weight.grad.clone(), net.helper(), kept, sorted(net.state_dict())[0], stepped)
    finally:
        destroy_process_group()


def test_gradient_sync_routed_ddp_and_optimizer_hook() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.get_context("fork").Manager()
        results = manager.dict()
        mp.start_processes(_worker, args=(os.path.join(tmp, "init"), results), nprocs=2, start_method="fork")
        results = dict(results)
    # d/dw sum(2 * x w) = 2 * column sums of x; DDP averages the two ranks' gradients.
    x0 = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    expected = (2 * x0.sum(0) + 2 * (x0 + 10).sum(0)) / 2
    for rank in (0, 1):
        grad, helper, kept, first_key, (weight, marker) = results[rank]
        torch.testing.assert_close(grad, expected[None])
        torch.testing.assert_close(weight, 0.5 - expected[None])  # SGD lr 1 from rank 0's 0.5 with the mean gradient
        assert marker == 7.0
        assert helper == "module attribute"
        assert first_key == "module.lin.weight"  # the wrapper's own keys; savers unwrap them
    assert results[0][2] == ["StatsHandler", "ValidationHandler", "ModelWeightsSaver"]
    assert results[1][2] == ["ValidationHandler"]


def _refresh_worker(rank: int, init_file: str, folder: str, storage: str, results: Any) -> None:
    from tests.unit.test_self_training import make_trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        trainer = make_trainer(Path(folder), storage=storage)[0]
        trainer.state.device = torch.device("cpu")
        computed, put = [], trainer.bank.put
        trainer.bank.put = lambda k, *args, **kwargs: (computed.append(k), put(k, *args, **kwargs))
        trainer.refresh_pseudo_labels(0)
        results[rank] = (computed, trainer.bank.load(range(3)), trainer.bank.difficulty, trainer.bank.stage)
    finally:
        destroy_process_group()


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_pseudo_label_refresh_is_split_over_ranks_and_equals_one_process(storage: str, tmp_path: Path) -> None:
    from tests.unit.test_self_training import make_trainer

    single = make_trainer(tmp_path / "single", storage=storage)[0]
    single.state.device = torch.device("cpu")
    single.refresh_pseudo_labels(0)
    manager = mp.get_context("fork").Manager()
    results = manager.dict()
    args = (str(tmp_path / "init"), str(tmp_path / "dist"), storage, results)
    mp.start_processes(_refresh_worker, args=args, nprocs=2, start_method="fork")
    results = dict(results)
    assert results[0][0] == [0, 2] and results[1][0] == [1], "pairs are dealt round-robin, each computed once"
    for rank in (0, 1):
        _, fields_, difficulty, stage = results[rank]
        torch.testing.assert_close(fields_, single.bank.load(range(3)))
        assert difficulty == pytest.approx(single.bank.difficulty) and stage == 0


# ------------------------------------------------------------------------------------------------- bundle configs
def _case(name: str, tmp_path: Path):
    case = tiny_case(write_tiny_bundle(tmp_path / "src")) if name == TINY else harness_case(name)
    if case is None:
        pytest.skip(f"{name}: no harness BundleCase in tests/bundles yet")
    root = bundle_root_of(case)
    # two validation and two test cases, so that every rank of two evaluates at least one
    splits = DATASET_SPLITS.get(name, {"num_validation": 2, "num_test": 2})
    kwargs = {**case.dataset_kwargs, **splits}
    bigger = dataclasses.replace(case, num_subjects=4 + sum(splits.values()), dataset_kwargs=kwargs)
    bigger._root = root
    return bigger, root


@pytest.mark.parametrize("name", discover_bundles())
def test_multi_gpu_configs_keep_the_bundle_initialize(name: str) -> None:
    """Override files replace whole top-level lists: multi_gpu_*.json must repeat every train.json initialize step."""
    folder = Path(__file__).resolve().parents[2] / "bundles" / name / "configs"
    base = json.loads((folder / "train.json").read_text()).get("initialize", [])
    for override in ("multi_gpu_train.json", "multi_gpu_evaluate.json"):
        path = folder / override
        assert path.is_file(), f"{name}: {override} is missing"
        config = json.loads(path.read_text())
        init = config["initialize"]
        assert init[0].startswith("$common.distributed.init_process_group("), f"{override}: join the group first"
        assert config["finalize"] == ["$common.distributed.destroy_process_group()"]
        ours = [step for step in init[1:] if step.startswith("$common.distributed.")]
        theirs = [step for step in init[1:] if not step.startswith("$common.distributed.")]
        assert len(ours) + len(theirs) == len(init) - 1
        plain = [step for step in theirs if "set_determinism" not in step]
        assert plain == [step for step in base if "set_determinism" not in step], f"{override}: initialize drifted"
        assert any("set_determinism" in step for step in theirs) == any("set_determinism" in s for s in base)


def _run_process_group(cmd: list[str], cwd: Path, timeout: float = 420) -> tuple[int, str]:
    """Run torchrun in its own session; on timeout make every rank print its stack (SIGUSR1), then kill them all."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGUSR1)
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -1, f"timed out after {timeout} s (stacks of the ranks below)\n{output}"


def _iter_keys(obj: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{prefix}{key}"
            yield from _iter_keys(value, f"{prefix}{key}.")


TIMING_COLUMNS = ("seconds", "time")


def _numeric_rows(path: Path) -> list[tuple[float, ...]]:
    """The numbers of each row, rows sorted: case names may differ (ranks number duplicate cases on their own).

    Wall-clock columns (header containing "seconds" or "time") differ between runs and are left out.
    """
    rows = []
    with open(path, newline="") as handle:
        reader = csv.reader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
        header = next(reader, [])
        timing = {i for i, column in enumerate(header) if any(t in column.lower() for t in TIMING_COLUMNS)}
        for row in reader:
            numbers = []
            for cell in (c for i, c in enumerate(row) if i not in timing):
                try:
                    numbers.append(float(cell))
                except ValueError:
                    continue
            rows.append(tuple(numbers))
    return sorted(rows, key=lambda r: [(x != x, x if x == x else 0.0) for x in r])


def _assert_same_table(got: Path, expected: Path) -> None:
    rows_got, rows_expected = _numeric_rows(got), _numeric_rows(expected)
    assert len(rows_got) == len(rows_expected), f"{got.name}: {len(rows_got)} rows != {len(rows_expected)}"
    for row_got, row_expected in zip(rows_got, rows_expected):
        assert row_got == pytest.approx(row_expected, rel=1e-4, abs=1e-5, nan_ok=True), f"{got.name}: {row_got}"


@pytest.mark.parametrize("name", subprocess_bundle_names())
def test_torchrun_two_cpu_processes(name: str, tmp_path: Path) -> None:
    case, root = _case(name, tmp_path)
    ws = make_workspace(case, tmp_path)
    jobs = [
        {
            "config_file": [*stage, "configs/multi_gpu_train.json"],
            "overrides": ws.overrides("train", tmp_path / f"t{i}"),
        }
        for i, stage in enumerate(case.train_stages)
    ]
    evaluate = ws.overrides("evaluate", tmp_path / "mg_eval")
    jobs.append({"config_file": [*case.evaluate_files(), "configs/multi_gpu_evaluate.json"], "overrides": evaluate})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RUNNER)]
    returncode, output = _run_process_group([*cmd, str(tmp_path / "jobs.json")], root)
    assert returncode == 0, f"exit {returncode}\n{output[-8000:]}"

    # rank 0 saved what a single process saves: the plain state_dict of network_def (no DDP "module." prefix)
    reference = build_inference_network(ws).state_dict()
    model = torch.load(ws.ckpt_dir / case.checkpoint_files[0], map_location="cpu", weights_only=True)
    model = model[case.key_in_ckpt] if case.key_in_ckpt else model
    assert {k: tuple(v.shape) for k, v in model.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    for file in sorted(ws.ckpt_dir.glob("*.pt")):
        state = torch.load(file, map_location="cpu", weights_only=False)
        wrapped = [k for k in _iter_keys(state) if ".module." in f".{k}"]
        assert not wrapped, f"{file.name}: DDP-wrapped keys {wrapped[:3]}"

    # the distributed evaluation gathers every case: same tables as one process on the same weights
    single = ws.overrides("evaluate", tmp_path / "sp_eval")
    assert not run_workflow(root, case.evaluate_files(), "train", single)
    tables = sorted(p for p in (tmp_path / "sp_eval").rglob("*") if p.suffix in (".csv", ".tsv"))
    assert tables, "the single-process evaluation wrote no table to compare"
    for table in tables:
        twin = tmp_path / "mg_eval" / table.relative_to(tmp_path / "sp_eval")
        assert twin.is_file(), f"multi-GPU evaluation wrote no {twin.name}"
        _assert_same_table(twin, table)
