"""Small helpers that let one ``multi_gpu_*.json`` run under ``torchrun`` on GPUs (NCCL) and on CPUs (Gloo).

Why: the Model Zoo multi-GPU configs hard-code ``nccl`` and ``cuda:<LOCAL_RANK>``, so they cannot be tested on a
CPU-only machine; here the backend and the device are config values with a GPU/CPU default, and handlers that write
files or logs are dropped on ranks > 0 by type (no fragile list slicing).

Two ways to make a trainer data-parallel, both used by the bundles' ``multi_gpu_train.json``:

* ``"train#trainer#network": {"_target_": "common.distributed.DistributedNetwork", "module": "@network", ...}``: DDP
  around the network the trainer steps (the stage's own ``network``, so one override serves every stage); extra entry
  points such as ``forward_train`` are routed through DDP's forward. Savers keep plain ``network_def`` keys.
* ``"$common.distributed.average_gradients_on_step()"`` in ``initialize`` plus ``SyncStatesAtStart`` in the handlers:
  for trainers with several networks, alternating optimizers or custom network methods that DDP cannot see.

Common to both::

    "dist_backend": "$common.distributed.default_backend()",
    "device": "$common.distributed.local_device()",
    "train#trainer#train_handlers": "$common.distributed.rank0_handlers(@train#handlers)",
    "initialize": ["$common.distributed.init_process_group(@dist_backend, @device)", <the bundle's own steps>],
    "finalize": ["$common.distributed.destroy_process_group()"]
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "RANK0_ONLY_HANDLERS",
    "DistributedNetwork",
    "DistributedSubsetSampler",
    "SyncStatesAtStart",
    "average_gradients_on_step",
    "barrier",
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
    "shard",
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
        "ProgressBar",
        "OverlayPreviewHandler",
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
    """Leave the process group if this process joined one (config ``finalize``); drop the gradient hook."""
    global _GRADIENT_HOOK
    if _GRADIENT_HOOK is not None:
        _GRADIENT_HOOK.remove()
        _GRADIENT_HOOK = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return True


_GRADIENT_HOOK = None


def average_gradients_on_step() -> bool:
    """Average every optimizer's gradients over the ranks right before its ``step()`` (a global step pre-hook).

    Why: DistributedDataParallel synchronises gradients only for computations that go through its ``forward``. Stages
    that train several networks through custom methods and alternating optimizers (GAN discriminator steps, momentum
    encoders, registration ``register(...)`` calls) are data-parallel with this instead: the same mean gradient as DDP,
    computed when the optimizer steps (no overlap with the backward pass, so slower on many GPUs, but exact). Every
    rank must step its optimizers in the same order, which holds for trainers with rank-independent control flow.
    Registered once per process (returns True for config ``initialize`` lists); removed by destroy_process_group.
    """
    global _GRADIENT_HOOK
    if _GRADIENT_HOOK is None:
        _GRADIENT_HOOK = register_optimizer_step_pre_hook(_average_gradients)
    return True


def _average_gradients(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    world = get_world_size()
    if world == 1:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if not params:
        return
    device = params[0].device
    # one flat all-reduce: gradients (zeros where a rank has none) and, last, how many ranks had each gradient
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float() for p in params]
        + [torch.tensor([float(p.grad is not None) for p in params], device=device)]
    )
    dist.all_reduce(flat)
    present = flat[-len(params) :]
    offset = 0
    for param, count in zip(params, present.tolist()):
        size = param.numel()
        if count > 0:
            mean = (flat[offset : offset + size] / world).view_as(param).to(param.dtype)
            if param.grad is None:
                param.grad = mean
            else:
                param.grad.copy_(mean)
        offset += size


class SyncStatesAtStart:
    """Ignite handler: when the engine starts, copy rank 0's parameters and buffers to every rank.

    The counterpart of DDP's broadcast at construction for networks trained without a DDP wrapper (see
    ``average_gradients_on_step``). ``modules`` defaults to every ``nn.Module`` attribute of the engine (network,
    encoders, momentum encoders, MoCo queue, discriminators), visited in attribute-name order, so all ranks broadcast
    the same tensors in the same order. Attach it after handlers that load weights at start (resume).
    """

    def __init__(self, modules: Sequence[torch.nn.Module] | None = None) -> None:
        self.modules = modules

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        if get_world_size() == 1:
            return
        if self.modules is not None:
            modules = list(self.modules)
        else:
            modules = [v for _, v in sorted(vars(engine).items()) if isinstance(v, torch.nn.Module)]
        seen: set[int] = set()
        for module in modules:
            for tensor in module.state_dict(keep_vars=True).values():
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                dist.broadcast(tensor.data, src=0)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_rows(rows: list) -> list:
    """Every rank's ``rows`` concatenated in rank order (on every rank); ``rows`` itself outside distributed runs."""
    if not is_distributed():
        return rows
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op outside distributed runs)."""
    if is_distributed():
        dist.barrier()


def shard(items: Sequence) -> list:
    """This rank's round-robin share of ``items`` (all of them outside distributed runs).

    Item ``k`` belongs to rank ``k % world_size``: the shares are disjoint, cover every item and differ in size by at
    most one, whatever the order in which ranks reach the call.
    """
    return list(items)[get_rank() :: get_world_size()]


def _is_rank0_only(handler: object, names: Iterable[str]) -> bool:
    names = set(names)
    return any(cls.__name__ in names for cls in type(handler).__mro__)


def rank0_handlers(handlers: Sequence[object] | None, extra: Iterable[str] = ()) -> list | None:
    """All ``handlers`` on rank 0; on other ranks, those whose class (or a base) is neither in RANK0_ONLY_HANDLERS
    nor named in ``extra`` (a bundle's own writer handlers, e.g. ``["ModelWeightsSaver"]``).

    Handlers that change the training itself (LR schedule, validation, checkpoint loading, early stopping, NaN guard)
    or that hold collectives (MetricsSaver, report handlers that gather rows) stay on every rank.
    """
    if handlers is None:
        return None
    if is_rank0():
        return list(handlers)
    names = RANK0_ONLY_HANDLERS | set(extra)
    return [h for h in handlers if not _is_rank0_only(h, names)]


class DistributedNetwork(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that also synchronises gradients for a network's extra entry points.

    Why: custom trainers call e.g. ``network.forward_train(moving, fixed)``; on a plain DDP wrapper that attribute does
    not exist, and calling the inner module's method directly would skip DDP's forward, so gradients would not be
    all-reduced. Names in ``methods`` are run through DDP's forward (the inner module's ``forward`` is pointed at the
    method for that call); any other attribute (``update_target``, ``inverse_ddf``, sub-networks) comes from the
    wrapped module. The state_dict keeps DDP's ``module.`` prefix; checkpoint savers unwrap it (ignite's Checkpoint,
    ``common.engines.checkpoint.unwrap_module``), so saved files have the plain single-process keys.
    """

    def __init__(self, module: torch.nn.Module, *args: Any, methods: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(module, *args, **kwargs)
        self.routed_methods = tuple(methods)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self.__dict__.get("routed_methods", ()):
                return lambda *args, **kwargs: self._routed_call(name, *args, **kwargs)
            return getattr(self.module, name)

    def _routed_call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        inner = self.module
        inner.forward = getattr(type(inner), name).__get__(inner)
        try:
            return super().forward(*args, **kwargs)
        finally:
            del inner.forward


class DistributedSubsetSampler(DistributedSampler):
    """Per epoch, ``num_samples`` indices in an order shared by all ranks, split across ranks (every rank gets the same
    count, so DDP steps stay in lockstep).

    The distributed counterpart of ``RandomSampler(dataset, num_samples=n)`` (an epoch of ``n`` random items from a
    large pool such as all ordered image pairs): the order is a permutation seeded with ``seed + epoch`` (repeated
    permutations when ``num_samples`` exceeds the dataset), the first ``num_samples`` are padded by wrapping to a
    multiple of the world size, and rank ``r`` takes items ``r, r + W, ...``. ``num_samples=None`` uses the dataset.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_samples: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.epoch_items = len(dataset) if num_samples is None else int(num_samples)  # type: ignore[arg-type]
        if self.epoch_items < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = math.ceil(self.epoch_items / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        size = len(self.dataset)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        rounds = math.ceil(self.epoch_items / size)
        if self.shuffle:
            order = torch.cat([torch.randperm(size, generator=generator) for _ in range(rounds)])
        else:
            order = torch.arange(size).repeat(rounds)
        order = order[: self.epoch_items]
        order = torch.cat([order, order.repeat(math.ceil(self.total_size / len(order)))])[: self.total_size]
        return iter(order[self.rank : self.total_size : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
