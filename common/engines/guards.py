"""Stop training as soon as the loss (or a parameter) stops being finite, before a bad state can be checkpointed.

`NaNGuard` runs at ITERATION_COMPLETED. On a NaN/Inf it records the reason in ``engine.state.non_finite``, asks the
engine to terminate (so that even an EXCEPTION_RAISED handler that swallows errors cannot keep the run going) and raises
`NonFiniteLossError`. `common.engines.checkpoint.ResumableCheckpointHandler` refuses to save while
``engine.state.non_finite`` is set or the current loss is not finite, whatever the order the handlers were attached in,
so the last good checkpoint stays on disk.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from ignite.engine import Engine, Events


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or parameter."""


def loss_value(output, loss_key: str = "loss") -> torch.Tensor | float | None:
    """The loss in an engine output: a tensor/number, ``output[loss_key]``, or the first decollated item's loss.

    MONAI trainers decollate their output into a list of per-sample dicts that all carry the batch loss.
    Returns None when the output holds no loss.
    """
    if torch.is_tensor(output) or isinstance(output, numbers.Number):
        return output
    if isinstance(output, Mapping):
        return output.get(loss_key)
    if isinstance(output, Sequence) and not isinstance(output, str) and len(output) > 0:
        return loss_value(output[0], loss_key)
    return None


def is_finite(value) -> bool:
    """True for finite numbers and tensors whose entries are all finite."""
    if torch.is_tensor(value):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


def _modules(networks) -> list[tuple[str, torch.nn.Module]]:
    if networks is None:
        return []
    if isinstance(networks, torch.nn.Module):
        return [("network", networks)]
    if isinstance(networks, Mapping):
        return [(str(k), v) for k, v in networks.items()]
    return [(f"network{i}", n) for i, n in enumerate(networks)]


def non_finite_parameters(networks, check_grads: bool = False) -> list[str]:
    """Names (``<network>.<parameter>``, ``.grad`` suffix for gradients) of parameters holding NaN/Inf."""
    bad = []
    for prefix, module in _modules(networks):
        for pname, param in module.named_parameters():
            if not torch.isfinite(param.detach()).all():
                bad.append(f"{prefix}.{pname}")
            if check_grads and param.grad is not None and not torch.isfinite(param.grad).all():
                bad.append(f"{prefix}.{pname}.grad")
    return bad


_FIXES = (
    "Likely fixes: lower the learning rate (e.g. 10x) or add gradient clipping; check the inputs for NaN/Inf and for "
    "constant images (division by zero in intensity normalisation); add an epsilon to log/sqrt/division terms of the "
    "loss; with AMP, use a GradScaler or run in float32."
)


class NaNGuard:
    """Ignite handler: stop with a clear error when the loss (optionally parameters/gradients) is NaN or Inf.

    Args:
        loss_key: key of the loss in the engine output (see `loss_value`).
        output_transform: optional ``f(engine.state.output) -> loss``, replacing the key lookup.
        networks: module, list or ``{name: module}`` whose parameters are checked when ``check_parameters``.
        check_parameters: also check parameters (after the optimiser step) every ``every`` iterations.
        check_grads: with ``check_parameters``, check gradients too.
        every: check every N iterations (1 = every iteration; the loss check is one ``isfinite``).
        checkpoint_dir: named in the message as the place of the last good checkpoint.
    """

    def __init__(
        self,
        loss_key: str = "loss",
        output_transform: Callable | None = None,
        networks: torch.nn.Module | Iterable[torch.nn.Module] | Mapping[str, torch.nn.Module] | None = None,
        check_parameters: bool = False,
        check_grads: bool = False,
        every: int = 1,
        checkpoint_dir: str | None = None,
    ) -> None:
        if check_parameters and networks is None:
            raise ValueError("NaNGuard(check_parameters=True) needs `networks`")
        self.loss_key = loss_key
        self.output_transform = output_transform
        self.networks = networks
        self.check_parameters = check_parameters
        self.check_grads = check_grads
        self.every = every
        self.checkpoint_dir = checkpoint_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)

    def _stop(self, engine: Engine, what: str) -> None:
        where = f"iteration {engine.state.iteration} (epoch {engine.state.epoch})"
        kept = f" in {self.checkpoint_dir}" if self.checkpoint_dir else ""
        message = (
            f"NaNGuard: {what} at {where}. Training stopped; no checkpoint of this state is written and the last good "
            f"checkpoint{kept} is kept (resume from it after the fix). {_FIXES}"
        )
        engine.state.non_finite = message
        engine.terminate()
        raise NonFiniteLossError(message)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        loss = self.output_transform(output) if self.output_transform is not None else loss_value(output, self.loss_key)
        if loss is not None and not is_finite(loss):
            if torch.is_tensor(loss):
                flat = loss.detach().float().reshape(-1)
                value = float(flat[~torch.isfinite(flat)][0])
            else:
                value = float(loss)
            self._stop(engine, f"loss is {value}")
        if self.check_parameters:
            bad = non_finite_parameters(self.networks, self.check_grads)
            if bad:
                shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                self._stop(engine, f"non-finite values in {shown}")
