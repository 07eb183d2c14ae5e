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

from tests.bundles.harness import bundle_context
from tests.delivery.bundles import TINY, Workspace, all_bundle_names, bundle_root_of, harness_case, tiny_case
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


def _loader_ids(config: dict, prefix: str = "") -> Iterator[str]:
    """Config ids of every CheckpointLoader component (``_target_`` ending in CheckpointLoader)."""
    if isinstance(config, dict):
        if str(config.get("_target_", "")).split(".")[-1] == "CheckpointLoader" and not config.get("_disabled_"):
            yield prefix.rstrip("#")
        for key, value in config.items():
            yield from _loader_ids(value, f"{prefix}{key}#")
    elif isinstance(config, list):
        for index, value in enumerate(config):
            yield from _loader_ids(value, f"{prefix}{index}#")


def _check_loaders(ws: Workspace, files: list[str], kind: str) -> list[str]:
    """Parse ``files`` as the bundle does, put a cuda-tagged checkpoint at each loader's path, load, compare."""
    from monai.bundle import ConfigParser

    root = ws.bundle_root
    with bundle_context(root):
        parser = ConfigParser()
        parser.read_config([str(root / f) for f in files])
        parser.read_meta(str(root / "configs" / "metadata.json"))
        parser.update(ws.overrides(kind, ws.tmp / f"out_{kind}"))
        ids = list(_loader_ids(parser.get()))
        generator = torch.Generator().manual_seed(1)
        for loader_id in ids:
            loader = parser.get_parsed_content(loader_id, instantiate=True)
            expected = {
                key: {k: torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in obj.state_dict().items()}
                for key, obj in loader.load_dict.items()
            }
            single = len(expected) == 1
            save_as_if_on_gpu(next(iter(expected.values())) if single else expected, Path(loader.load_path))
            loader(Engine(lambda e, b: None))
            for key, obj in loader.load_dict.items():
                for name, value in obj.state_dict().items():
                    assert value.device.type == "cpu", f"{loader_id}: {key}.{name} on {value.device}"
                    torch.testing.assert_close(value, expected[key][name], rtol=0, atol=0)
    return ids


@pytest.mark.parametrize("name", all_bundle_names())
def test_bundle_loaders_map_gpu_checkpoints_to_cpu(name: str, tmp_path: Path) -> None:
    case = tiny_case(write_tiny_bundle(tmp_path / "src")) if name == TINY else harness_case(name)
    if case is None:
        pytest.skip(f"{name}: no harness BundleCase in tests/bundles yet")
    root = bundle_root_of(case)
    ws = Workspace(case, root, tmp_path, tmp_path / "data", tmp_path / "data" / "datalist.json", tmp_path / "models")
    found = _check_loaders(ws, case.inference_configs or ["configs/inference.json"], "infer")
    assert "checkpointloader" in found, f"{name}: inference has no `checkpointloader` (found {found})"
    if (root / "configs" / "evaluate.json").is_file():
        assert _check_loaders(ws, case.evaluate_files(), "evaluate"), f"{name}: evaluate loads no checkpoint"
