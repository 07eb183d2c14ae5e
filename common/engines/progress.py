"""Progress bars for long runs: an ignite handler for trainers/evaluators and a wrapper for plain Python loops.

Why: training epochs, pseudo-label refreshes, pair generation and folder inference run for minutes to hours with no
sign of life between log lines. Bars are for people at a terminal, not for CI logs (every redraw would be a new line
there), so they are on only where someone watches:

* never on ranks > 0 of a distributed run (``common.distributed.get_rank``; one bar per job);
* ``BUNDLE_PROGRESS=0`` (also ``false``/``off``/``no``) turns them off, ``BUNDLE_PROGRESS=1`` (``true``/``on``/``yes``)
  forces them on, e.g. to watch a run redirected to a file with ``tail -f``;
* otherwise they show when stderr (where tqdm draws) is a terminal.

In a bundle config, list the handler first among the handlers, so that a trainer's bar closes before validation
starts at the end of the epoch::

    {"_target_": "common.engines.progress.ProgressBarHandler"}                        (trainers: shows the loss)
    {"_target_": "common.engines.progress.ProgressBarHandler", "desc": "validation"}   (evaluators)

and in code, ``for item in progress(items, "generating pairs"): ...``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from ignite.engine import Engine
from ignite.handlers import ProgressBar

from common.distributed import get_rank
from common.engines.guards import loss_value

__all__ = ["ENV_VAR", "ProgressBarHandler", "loss_postfix", "progress", "progress_enabled"]

ENV_VAR = "BUNDLE_PROGRESS"
_ON = frozenset({"1", "true", "on", "yes"})
_OFF = frozenset({"0", "false", "off", "no"})

logger = logging.getLogger(__name__)
T = TypeVar("T")


def progress_enabled(enabled: bool | None = None) -> bool:
    """Whether to draw a bar here: never on ranks > 0; else ``enabled`` if given, then ``BUNDLE_PROGRESS``, then
    whether stderr is a terminal. An unrecognised ``BUNDLE_PROGRESS`` value is reported and ignored."""
    if get_rank() != 0:
        return False
    if enabled is not None:
        return bool(enabled)
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value:
        logger.warning("%s=%r is neither on (1/true/on/yes) nor off (0/false/off/no): ignored", ENV_VAR, value)
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress(
    iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool | None = None
) -> Iterable[T] | Iterator[T]:
    """``iterable`` behind a tqdm bar when bars are enabled (see :func:`progress_enabled`), else ``iterable`` itself.

    The bar disappears when the loop ends (``leave=False``), so finished loops leave only the log lines.
    """
    if not progress_enabled(enabled):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def loss_postfix(output: Any) -> dict[str, float]:
    """``{"loss": value}`` from a trainer's output (MONAI's decollated list or a dict), ``{}`` without a loss."""
    value = loss_value(output)
    return {} if value is None else {"loss": float(value)}


class ProgressBarHandler(ProgressBar):
    """ignite's ``ProgressBar`` attachable from a bundle config (``attach(engine)`` only), on where bars are wanted.

    One bar per epoch (trainers: "Epoch [k/N]", closed at EPOCH_COMPLETED, removed unless ``persist``), with the
    loss of the last iteration for trainers (``output_transform``, default :func:`loss_postfix`; evaluators have no
    loss, so their bar shows only the count). ``enabled``: None decides by :func:`progress_enabled`. Rank > 0 never
    draws; ``common.distributed.rank0_handlers`` also drops it there (``ProgressBar`` is in RANK0_ONLY_HANDLERS).
    """

    def __init__(
        self,
        desc: str | None = None,
        enabled: bool | None = None,
        persist: bool = False,
        output_transform: Callable[[Any], dict] | None = loss_postfix,
    ) -> None:
        kwargs = {"desc": desc} if desc else {}
        super().__init__(persist=persist, dynamic_ncols=True, **kwargs)
        self.enabled = enabled
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:  # type: ignore[override]
        if progress_enabled(self.enabled):
            super().attach(engine, output_transform=self.output_transform)
