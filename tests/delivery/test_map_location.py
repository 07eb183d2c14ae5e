"""GPU-saved checkpoints load on a CPU-only machine through each bundle's own CheckpointLoaders (map_location).

A "GPU checkpoint" is produced without a GPU: while saving, a storage tagger registered ahead of torch's CPU tagger
labels every storage ``cuda:0``, exactly the location string a CUDA tensor gets. Plain ``torch.load`` of such a file
fails on a CPU-only machine (checked first, so the test cannot pass vacuously); the bundle loaders must succeed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.serialization
from ignite.engine import Engine

from tests.bundles.harness import initialized_workflow
from tests.delivery.bundles import (
    TINY,
    Workspace,
    all_bundle_names,
    build_inference_network,
    bundle_root_of,
    harness_case,
    make_workspace,
    tiny_case,
)
from tests.delivery.tiny_bundle import write_tiny_bundle


@contextmanager
def storages_tagged_as_cuda() -> Iterator[None]:
    entry = (-1000, lambda storage: "cuda:0", lambda obj, location: None)
    torch.serialization._package_registry.insert(0, entry)
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)


def save_as_if_on_gpu(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with storages_tagged_as_cuda():
        torch.save(obj, path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine loads cuda-tagged files without map_location")
def test_cuda_tagged_file_needs_map_location(tmp_path: Path) -> None:
    from monai.handlers import CheckpointLoader

    net = torch.nn.Conv3d(1, 2, 3)
    state = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    path = tmp_path / "model.pt"
    save_as_if_on_gpu(state, path)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)
    CheckpointLoader(str(path), {"model": net}, map_location=torch.device("cpu"))(Engine(lambda e, b: None))
    for key, value in net.state_dict().items():
        assert value.device.type == "cpu"
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def _gpu_checkpoint(ws: Workspace, seed: int) -> dict[str, torch.Tensor]:
    """Weights unlike any a workflow builds (fresh init of another seed + noise), saved cuda-tagged as model.pt."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fresh = build_inference_network(ws).state_dict()
    state = {
        k: (v + 0.01 * torch.randn(v.shape, generator=generator)).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in fresh.items()
    }
    key = ws.case.key_in_ckpt
    save_as_if_on_gpu({key: state} if key else state, ws.ckpt_dir / ws.case.checkpoint_files[0])
    return state


def _run_and_get_network(ws: Workspace, files: list[str], workflow_type: str, kind: str) -> dict[str, torch.Tensor]:
    """Run the workflow as the CLI does (initialize, run, finalize); return its ``network`` weights afterwards."""
    overrides = ws.overrides(kind, ws.tmp / f"out_{kind}")
    with initialized_workflow(ws.bundle_root, files, workflow_type, overrides) as workflow:
        workflow.run()
        workflow.finalize()
        state = workflow.parser.get_parsed_content("network").state_dict()
    return {k.removeprefix("module."): v for k, v in state.items()}


@pytest.mark.parametrize("name", all_bundle_names())
def test_bundle_workflows_load_gpu_checkpoints_on_cpu(name: str, tmp_path: Path) -> None:
    """Inference and evaluation, each through whatever loader the bundle uses (CheckpointLoader, a load function)."""
    case = tiny_case(write_tiny_bundle(tmp_path / "src")) if name == TINY else harness_case(name)
    if case is None:
        pytest.skip(f"{name}: no harness BundleCase in tests/bundles yet")
    ws = make_workspace(case, tmp_path)
    runs = [("infer", case.inference_configs or ["configs/inference.json"], "infer")]
    if (bundle_root_of(case) / "configs" / "evaluate.json").is_file():
        runs.append(("evaluate", case.evaluate_files(), "train"))
    for seed, (kind, files, workflow_type) in enumerate(runs, start=3):
        expected = _gpu_checkpoint(ws, seed)
        loaded = _run_and_get_network(ws, files, workflow_type, kind)
        for key, value in expected.items():
            assert loaded[key].device.type == "cpu"
            assert torch.equal(loaded[key], value), f"{name} {kind}: {key} is not the checkpoint's value"
