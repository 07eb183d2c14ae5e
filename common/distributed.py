"""Small helpers that let one ``multi_gpu_*.json`` run under ``torchrun`` on GPUs (NCCL) and on CPUs (Gloo).

Why: the Model Zoo multi-GPU configs hard-code ``nccl`` and ``cuda:<LOCAL_RANK>``, so they cannot be tested on a
CPU-only machine; here the backend and the device are config values with a GPU/CPU default, and handlers that write
files or logs are dropped on ranks > 0 by type (no fragile list slicing).

Typical use in a multi-GPU override file::

    "dist_backend": "$common.distributed.default_backend()",
    "device": "$common.distributed.local_device()",
    "network": {"_target_": "torch.nn.parallel.DistributedDataParallel", "module": "$@network_def.to(@device)",
                "device_ids": "$common.distributed.device_ids(@device)"},
    "train#trainer#train_handlers": "$common.distributed.rank0_handlers(@train#handlers)",
    "initialize": ["$common.distributed.init_process_group(@dist_backend, @device)", ...],
    "finalize": ["$common.distributed.destroy_process_group()"]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "RANK0_ONLY_HANDLERS",
    "default_backend",
    "destroy_process_group",
    "device_ids",
    "get_rank",
    "get_world_size",
    "init_process_group",
    "is_rank0",
    "local_device",
    "local_rank",
    "rank0_handlers",
]

# Handlers that only write (logs, TensorBoard, checkpoints): one writer is enough, and two ranks writing the same file
# race. Matched by class name along the MRO, so subclasses count and nothing must be imported. Not listed on purpose:
# MONAI's MetricsSaver and ClassificationSaver, which all-gather file names and per-case values (collectives every rank
# must join) and write on one rank themselves.
RANK0_ONLY_HANDLERS = frozenset(
    {
        "StatsHandler",
        "TensorBoardStatsHandler",
        "TensorBoardImageHandler",
        "CheckpointSaver",
        "MLFlowHandler",
        "ClearMLStatsHandler",
        "ClearMLImageHandler",
    }
)


def default_backend() -> str:
    """``nccl`` when CUDA (with NCCL) is available, otherwise ``gloo`` (CPU tensors)."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def local_rank() -> int:
    """Rank of this process on its node (``LOCAL_RANK`` set by torchrun; 0 when not launched by it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` (the node-local index, model-zoo#444) when CUDA is available, else ``cpu``."""
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def device_ids(device: torch.device | str) -> list[torch.device] | None:
    """``device_ids`` for DistributedDataParallel: the one GPU of this process, or None for CPU modules."""
    device = torch.device(device)
    return [device] if device.type == "cuda" else None


def init_process_group(backend: str | None = None, device: torch.device | str | None = None) -> bool:
    """Join the process group from torchrun's environment (``env://``) once; select this rank's GPU.

    Returns True, so it can sit in a config ``initialize`` list. Calling it again (e.g. evaluate after train in one
    process) is a no-op.
    """
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or default_backend(), init_method="env://")
    return True


def destroy_process_group() -> bool:
    """Leave the process group if this process joined one (config ``finalize``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return True


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank0() -> bool:
    return get_rank() == 0


def _is_rank0_only(handler: object, names: Iterable[str]) -> bool:
    names = set(names)
    return any(cls.__name__ in names for cls in type(handler).__mro__)


def rank0_handlers(handlers: Sequence[object] | None, rank0_only: Iterable[str] = RANK0_ONLY_HANDLERS) -> list | None:
    """All ``handlers`` on rank 0; on other ranks, those whose class (or a base) is not in ``rank0_only``.

    Handlers that change the training itself (LR schedule, validation, checkpoint loading, early stopping, NaN guard)
    stay on every rank, so all ranks keep stepping the same schedule and loading the same weights.
    """
    if handlers is None:
        return None
    if is_rank0():
        return list(handlers)
    return [h for h in handlers if not _is_rank0_only(h, rank0_only)]
