"""Resumable training checkpoints: a run killed at any point continues from its last complete checkpoint.

`ResumableCheckpointHandler` keeps ONE file (``save_dir/filename``) that it overwrites atomically
(`common.io.atomic_torch_save`: temporary file + ``os.replace``), so a kill during a save leaves the previous checkpoint
intact. The file holds the ``state_dict`` of every object of ``save_dict`` (networks unwrapped from DataParallel/DDP, so
keys carry no ``module.`` prefix; optimizers; LR schedulers; GradScalers ...), the engine's iteration/epoch, the global
random states (python, numpy, torch CPU and CUDA) and the random states of MONAI random transforms reachable from
DataLoader/Dataset/Compose entries of ``save_dict``.

Resume is iteration-exact. At STARTED the handler loads the file and sets ``engine.state.iteration``/``epoch``; ignite
then finishes the interrupted epoch with the remaining ``epoch_length - k`` iterations. The handler also wraps the
engine's data so that the interrupted epoch replays the same batch order: the random state at the moment the epoch's
data iterator was created is part of the checkpoint; it is restored, the iterator is re-created, the ``k`` batches
already trained on are drawn and discarded (loaded, not trained on), and then the checkpoint's random states are
restored. A resumed run therefore reproduces the uninterrupted run exactly when all randomness flows through those
generators (DataLoader shuffling, worker seeds, MONAI random transforms of entries given in ``save_dict``, dropout, ...)
and no handler between the checkpoint and the next data draw consumes random numbers. Not exact: DataLoaders with
``persistent_workers=True`` (their workers' random streams run on across epochs and are not saved). Cost of a mid-epoch
resume: loading ``k`` batches.

Everything is loaded with ``map_location`` (default "cpu") and ``torch.load(weights_only=True)``: GPU-saved checkpoints
load on CPU-only machines, and loading never executes pickled code. A state that does not fit raises
`CheckpointMismatchError` naming the file, the object and the mismatching keys/shapes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.engines.guards import is_finite, loss_value
from common.io import atomic_torch_save

logger = logging.getLogger(__name__)

FORMAT = "common.engines.checkpoint/1"
_ENGINE_KEY = "engine"
_MAX_LISTED = 10


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the objects it is loaded into (missing/unexpected keys, shapes, objects)."""


def unwrap_module(module: Any) -> Any:
    """The module inside DataParallel / DistributedDataParallel wrappers (anything else unchanged)."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while isinstance(module, wrappers):
        module = module.module
    return module


# ---------------------------------------------------------------------------------------------------- random states
def _np_state_to_plain(state: tuple) -> list:
    """numpy RandomState state as plain python values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = state
    return [str(name), np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]


def _np_state_from_plain(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


def capture_rng_state() -> dict:
    """Global random states: python ``random``, numpy, torch CPU and (when initialised) every CUDA device."""
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": _np_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored only if this machine has as many devices."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_np_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            logger.warning(
                "checkpoint has CUDA random states of %d devices, this machine has %d: not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def _random_transforms(obj: Any) -> list:
    """MONAI Randomizable objects reachable from a DataLoader (.dataset), a Dataset (.transform) or a transform.

    Randomizable transforms are searched recursively through their attributes, because dictionary transforms draw
    from the array transform they wrap (e.g. ``RandGaussianNoised.rand_gaussian_noise``), and Compose holds a list.
    """
    from monai.transforms import Randomizable

    found: list = []

    def visit(x: Any) -> None:
        if x is None or any(x is f for f in found):
            return
        if isinstance(x, Randomizable):
            found.append(x)
            for value in vars(x).values():
                for child in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(child, Randomizable):
                        visit(child)
        elif isinstance(x, torch.utils.data.DataLoader):
            visit(x.dataset)
        elif isinstance(x, torch.utils.data.Dataset):
            visit(getattr(x, "transform", None))

    visit(obj)
    return found


def _is_data_like(obj: Any) -> bool:
    from monai.transforms import Transform

    return isinstance(obj, (torch.utils.data.DataLoader, torch.utils.data.Dataset, Transform))


# ---------------------------------------------------------------------------------------------------- state dicts
def _describe_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> list[str]:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and torch.is_tensor(given[k]) and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            problems.append(f"{title} ({len(items)}): " + ", ".join(items[:_MAX_LISTED]) + more)
    return problems


def load_module_state(module: torch.nn.Module, state: Mapping, source: str, name: str = "network", strict=True):
    """``load_state_dict`` that raises `CheckpointMismatchError` naming ``source`` and every mismatching key/shape.

    With ``strict=False`` missing/unexpected keys are allowed (logged) but shapes must still match.
    """
    target = unwrap_module(module)
    problems = _describe_mismatch(target.state_dict(), state)
    if not strict:
        problems = [p for p in problems if p.startswith("shape")]
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {source} does not fit {name!r} ({type(target).__name__}): "
            + "; ".join(problems)
            + ". Check that the network configuration (channels, labels, features) matches the one that was trained."
        )
    result = target.load_state_dict(state, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        logger.warning("%s -> %s: missing %s, unexpected %s", source, name, result.missing_keys, result.unexpected_keys)
    return module


def _strip_module_prefix(state: Mapping[str, Any]) -> dict:
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def load_weights(
    network: torch.nn.Module, path: str | Path, map_location: Any = "cpu", key: str | None = None, strict: bool = True
) -> torch.nn.Module:
    """Load network weights from ``path`` with clear errors; returns ``network`` (usable in config expressions).

    Accepts a plain state_dict (e.g. a bundle's ``models/model.pt``), a dict of state_dicts such as MONAI
    ``CheckpointSaver`` writes with several entries (pick one with ``key``), or a `ResumableCheckpointHandler` file
    (``key`` selects the object; default: the only network-like entry among "network", "model", "net").
    A ``module.`` prefix on every key (DDP-saved weights) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_weights: no checkpoint at {path}")
    data = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(data, Mapping) and data.get("format") == FORMAT:
        data = data["objects"]
    if key is not None:
        if not isinstance(data, Mapping) or key not in data:
            available = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise CheckpointMismatchError(f"checkpoint {path} has no entry {key!r}; available: {available}")
        data = data[key]
    elif not _is_tensor_dict(data) and isinstance(data, Mapping):
        candidates = [k for k in ("network", "model", "net") if k in data]
        if len(candidates) != 1:
            raise CheckpointMismatchError(
                f"checkpoint {path} holds several objects {sorted(data)}; pass key= to choose the network's weights"
            )
        data = data[candidates[0]]
    if not isinstance(data, Mapping):
        raise CheckpointMismatchError(f"checkpoint {path} does not contain a state_dict (found {type(data).__name__})")
    return load_module_state(network, _strip_module_prefix(data), str(path), key or "network", strict)


# ---------------------------------------------------------------------------------------------------- handler
class _ResumableData:
    """Wraps an engine's data so that each new epoch iterator records the random state, and replays a resumed epoch."""

    def __init__(self, data: Any, handler: ResumableCheckpointHandler) -> None:
        self.data = data
        self.handler = handler

    def __len__(self) -> int:
        return len(self.data)

    def __getattr__(self, name: str) -> Any:
        if name == "data":
            raise AttributeError(name)
        return getattr(self.data, name)

    def __iter__(self):
        return self.handler._new_epoch_iterator(self.data)


class ResumableCheckpointHandler:
    """Save everything a training run needs to continue, and continue from it at engine start (see module docstring).

    Args:
        save_dir: folder of the checkpoint file (created if needed).
        save_dict: ``{name: object}``; objects with ``state_dict``/``load_state_dict`` (networks, optimizers,
            schedulers, GradScaler, other engines) are saved; DataLoader/Dataset/Compose entries contribute the random
            states of their MONAI random transforms. The engine the handler is attached to is always saved.
        interval_iterations: also save every N iterations (mid-epoch checkpoints; None: only at epochs' ends).
        interval_epochs: save every N epochs (None or 0: never at epoch end).
        filename: checkpoint file name.
        resume: load ``save_dir/filename`` at STARTED when it exists.
        map_location: where loaded tensors go first (state is then copied into the objects on their devices).
    Only rank 0 writes in distributed runs; every rank loads. No checkpoint is written while the loss is not finite or
    after `common.engines.guards.NaNGuard` stopped the run.
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: Mapping[str, Any],
        interval_iterations: int | None = None,
        interval_epochs: int | None = 1,
        filename: str = "checkpoint.pt",
        resume: bool = True,
        map_location: Any = "cpu",
    ) -> None:
        if interval_iterations is not None and interval_iterations < 1:
            raise ValueError(f"interval_iterations must be >= 1 or None, got {interval_iterations}")
        self.save_dir = Path(save_dir)
        self.path = self.save_dir / filename
        self.save_dict = dict(save_dict)
        self.interval_iterations = interval_iterations
        self.interval_epochs = interval_epochs or None
        self.resume = resume
        self.map_location = map_location
        self.stateful = {k: v for k, v in self.save_dict.items() if hasattr(v, "state_dict")}
        unsupported = [k for k, v in self.save_dict.items() if k not in self.stateful and not _is_data_like(v)]
        if unsupported:
            raise TypeError(
                f"ResumableCheckpointHandler: save_dict entries {unsupported} have no state_dict and are not a "
                "DataLoader, Dataset or transform; pass networks, optimizers, schedulers, engines or data loaders"
            )
        self.transforms = {k: _random_transforms(v) for k, v in self.save_dict.items() if k not in self.stateful}
        self._epoch_start_rng: dict | None = None
        self._replay: tuple[dict, int, dict, dict] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        if self.interval_iterations:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval_iterations), self.iteration_save)
        if self.interval_epochs:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval_epochs), self.save)

    # ----------------------------------------------------------------------------------------------------- saving
    def _engine_state(self, engine: Engine) -> dict:
        s = engine.state
        state = {
            "iteration": int(s.iteration),
            "epoch": int(s.epoch),
            "epoch_length": s.epoch_length,
            "max_epochs": s.max_epochs,
        }
        for extra in ("best_metric", "best_metric_epoch"):  # MONAI workflows
            if hasattr(s, extra):
                state[extra] = float(getattr(s, extra)) if extra == "best_metric" else int(getattr(s, extra))
        return state

    def _transform_states(self) -> dict:
        return {k: [_np_state_to_plain(t.R.get_state()) for t in ts] for k, ts in self.transforms.items()}

    def _restore_transform_states(self, states: Mapping, source: str) -> None:
        for k, ts in self.transforms.items():
            saved = states.get(k)
            if saved is None or len(saved) != len(ts):
                raise CheckpointMismatchError(
                    f"checkpoint {source}: {k!r} has {len(ts)} random transforms, checkpoint has "
                    f"{'none' if saved is None else len(saved)}; was the transform chain changed?"
                )
            for t, st in zip(ts, saved):
                t.R.set_state(_np_state_from_plain(st))

    def _refuse_reason(self, engine: Engine) -> str | None:
        if getattr(engine.state, "non_finite", None):
            return "the run was stopped by NaNGuard"
        loss = loss_value(engine.state.output)
        if loss is not None and not is_finite(loss):
            return f"the loss of iteration {engine.state.iteration} is not finite"
        return None

    def iteration_save(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        if length is None:
            logger.warning("epoch length unknown: mid-epoch checkpoints are not resumable, skipped")
            return
        at_epoch_end = engine.state.iteration % length == 0
        epoch_save_follows = self.interval_epochs and (engine.state.iteration // length) % self.interval_epochs == 0
        if not (at_epoch_end and epoch_save_follows):  # the EPOCH_COMPLETED save would overwrite it at once
            self.save(engine)

    def save(self, engine: Engine) -> None:
        """Write the checkpoint now (rank 0 only), unless the state is not finite."""
        reason = self._refuse_reason(engine)
        if reason:
            logger.error("checkpoint %s NOT written: %s; the previous checkpoint is kept", self.path, reason)
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        objects = {}
        for name, obj in self.stateful.items():
            if obj is engine:
                continue
            objects[name] = self._engine_state(obj) if isinstance(obj, Engine) else unwrap_module(obj).state_dict()
        checkpoint = {
            "format": FORMAT,
            "objects": objects,
            _ENGINE_KEY: self._engine_state(engine),
            "rng": capture_rng_state(),
            "epoch_start_rng": self._epoch_start_rng,
            "transform_rng": self._transform_states(),
        }
        atomic_torch_save(checkpoint, self.path)
        logger.info(
            "checkpoint saved: %s (epoch %d, iteration %d)", self.path, engine.state.epoch, engine.state.iteration
        )

    # ----------------------------------------------------------------------------------------------------- loading
    def _restore_engine(self, engine: Engine, saved: Mapping, source: str) -> None:
        state = engine.state
        iteration = int(saved["iteration"])
        length, saved_length = state.epoch_length, saved.get("epoch_length")
        if length is not None and saved_length is not None and length != saved_length:
            if iteration % saved_length:
                raise CheckpointMismatchError(
                    f"checkpoint {source} was saved mid-epoch with {saved_length} iterations per epoch, the data now "
                    f"gives {length}; resume with the same data (or from an epoch-end checkpoint)"
                )
            iteration = iteration // saved_length * length
            logger.warning(
                "%s: epoch length changed %d -> %d, resuming at epoch %d",
                source,
                saved_length,
                length,
                iteration // length,
            )
        epoch = iteration // length if length else int(saved["epoch"])
        if state.max_epochs is not None and epoch > state.max_epochs:
            raise CheckpointMismatchError(
                f"checkpoint {source} is at epoch {epoch}, beyond max_epochs={state.max_epochs} of this run; "
                "raise max_epochs or start in a fresh checkpoint folder"
            )
        state.iteration, state.epoch = iteration, epoch
        for extra in ("best_metric", "best_metric_epoch"):
            if extra in saved:
                setattr(state, extra, saved[extra])

    def _load_object(self, name: str, obj: Any, state: Any, source: str) -> None:
        if isinstance(obj, Engine):
            self._restore_engine(obj, state, source)
        elif isinstance(unwrap_module(obj), torch.nn.Module):
            load_module_state(obj, state, source, name)
        else:
            try:
                obj.load_state_dict(state)
            except (KeyError, ValueError, RuntimeError, TypeError) as e:
                raise CheckpointMismatchError(
                    f"checkpoint {source} does not fit {name!r} ({type(obj).__name__}): {e}. Was the object created "
                    "with the same parameters (e.g. the optimizer over the same network)?"
                ) from e

    def load(self, engine: Engine) -> bool:
        """Load ``self.path`` into every object, the engine and the random states; False when there is no file."""
        if not self.path.is_file():
            return False
        source = str(self.path)
        try:
            checkpoint = torch.load(self.path, map_location=self.map_location, weights_only=True)
        except Exception as e:  # corrupted or foreign file: say which one
            raise CheckpointMismatchError(f"cannot read checkpoint {source}: {e}") from e
        if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != FORMAT:
            raise CheckpointMismatchError(f"{source} is not a ResumableCheckpointHandler checkpoint ({FORMAT})")
        objects = checkpoint["objects"]
        wanted = [k for k, v in self.stateful.items() if v is not engine]
        missing = [k for k in wanted if k not in objects]
        if missing:
            raise CheckpointMismatchError(
                f"checkpoint {source} has no state for {missing} (it holds {sorted(objects)}); save_dict changed?"
            )
        for name in wanted:
            self._load_object(name, self.stateful[name], objects[name], source)
        self._restore_engine(engine, checkpoint[_ENGINE_KEY], source)
        self._restore_transform_states(checkpoint["transform_rng"], source)
        restore_rng_state(checkpoint["rng"])
        length = engine.state.epoch_length
        done = engine.state.iteration % length if length else 0
        self._replay = None
        if done:
            if checkpoint["epoch_start_rng"] is None:
                logger.warning("%s: no epoch-start random state, the resumed epoch uses a new batch order", source)
            else:
                self._replay = (checkpoint["epoch_start_rng"], done, checkpoint["rng"], checkpoint["transform_rng"])
        logger.info("resumed from %s: epoch %d, iteration %d", source, engine.state.epoch, engine.state.iteration)
        return True

    def started(self, engine: Engine) -> None:
        if engine.state.dataloader is not None and not isinstance(engine.state.dataloader, _ResumableData):
            engine.state.dataloader = _ResumableData(engine.state.dataloader, self)
        if self.resume:
            self.load(engine)

    def _new_epoch_iterator(self, data: Any):
        replay, self._replay = self._replay, None
        if replay is None:
            self._epoch_start_rng = capture_rng_state()
            return iter(data)
        epoch_start_rng, done, rng, transform_rng = replay
        restore_rng_state(epoch_start_rng)
        self._epoch_start_rng = epoch_start_rng
        iterator = iter(data)
        for i in range(done):
            try:
                next(iterator)
            except StopIteration as e:
                raise CheckpointMismatchError(
                    f"checkpoint {self.path}: the data ended after {i} batches while replaying {done} done iterations"
                ) from e
        self._restore_transform_states(transform_rng, str(self.path))
        restore_rng_state(rng)
        return iterator
