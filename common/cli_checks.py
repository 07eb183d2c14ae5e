"""Type and range checks of config ids that users override on the command line, naming the id and the fix.

Why: ``python -m monai.bundle run ... --epochs ten`` hands the string "ten" to ignite, and ``--amp false`` gives the
truthy string "false" (fire parses only True/False as booleans); both fail, or silently misbehave, far from the
cause. Bundles list the ids to check as ``{id: [rule, "@id"]}`` and call `check_config` first in ``initialize``::

    "override_checks": {"epochs": ["positive_int", "@epochs"], "amp": ["bool", "@amp"]},
    "initialize": ["$common.cli_checks.check_config(@override_checks)", ...]

plus `check_min_items` / `check_batch_fits` where a stage needs a minimum number of volumes, and
`check_output_dir_free` before inference writes its predictions.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigOverrideError",
    "RULES",
    "check_batch_fits",
    "check_config",
    "check_min_items",
    "check_needs_config",
    "check_output_dir_free",
    "check_together",
]


class ConfigOverrideError(ValueError):
    """A config id (usually a CLI override) has the wrong type or value; the message names the id and the fix."""


def _fail(name: str, value: Any, expected: str, example: str) -> ConfigOverrideError:
    return ConfigOverrideError(
        f"config id {name!r} must be {expected}, got {value!r} ({type(value).__name__}). "
        f"Fix: e.g. --{name} {example} on the command line (or the same value in the config)"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise _fail(name, value, "an integer >= 1", "10")


def _non_negative_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise _fail(name, value, "an integer >= 0", "0")


def _optional_positive_int(name: str, value: Any) -> None:
    if value is not None:
        _positive_int(name, value)


def _positive_float(name: str, value: Any) -> None:
    if not _is_real(value) or value <= 0:
        raise _fail(name, value, "a finite number > 0", "0.001")


def _non_negative_float(name: str, value: Any) -> None:
    if not _is_real(value) or value < 0:
        raise _fail(name, value, "a finite number >= 0", "0.0")


def _probability(name: str, value: Any) -> None:
    if not _is_real(value) or not 0.0 <= value <= 1.0:
        raise _fail(name, value, "a probability in [0, 1]", "0.5")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        hint = " (the command line reads only True/False as booleans; 'false' is a non-empty, truthy string)"
        raise _fail(name, value, "True or False" + (hint if isinstance(value, str) else ""), "False")


def _positive_int_list(name: str, value: Any) -> None:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise _fail(name, value, "a non-empty list of integers >= 1", "[32,32,32]")
    if not all(_is_int(v) and v >= 1 for v in value):
        raise _fail(name, value, "a non-empty list of integers >= 1", "[32,32,32]")


def _spatial_size_3d(name: str, value: Any) -> None:
    _positive_int_list(name, value)
    if len(value) != 3:
        raise _fail(name, value, "a list of 3 integers >= 1", "[64,64,64]")


RULES: dict[str, Callable[[str, Any], None]] = {
    "positive_int": _positive_int,
    "non_negative_int": _non_negative_int,
    "optional_positive_int": _optional_positive_int,
    "positive_float": _positive_float,
    "non_negative_float": _non_negative_float,
    "probability": _probability,
    "bool": _boolean,
    "positive_int_list": _positive_int_list,
    "spatial_size_3d": _spatial_size_3d,
}


def check_config(spec: Mapping[str, tuple[str, Any] | Sequence[Any]]) -> bool:
    """Check ``{id: (rule, value)}``; raise `ConfigOverrideError` naming the first id that fails. Returns True.

    Rules: positive_int, non_negative_int, optional_positive_int (None or >= 1), positive_float,
    non_negative_float, probability, bool, positive_int_list, spatial_size_3d.
    """
    for name, item in spec.items():
        rule, value = item
        if rule not in RULES:
            raise ValueError(f"check_config: unknown rule {rule!r} for {name!r}; known: {sorted(RULES)}")
        RULES[rule](name, value)
    return True


def check_together(values: Mapping[str, Any], reason: str) -> bool:
    """Ids that only make sense together (e.g. ``atlas_image`` and ``atlas_label``): all set or all None."""
    given = [k for k, v in values.items() if v is not None]
    if given and len(given) != len(values):
        missing = [k for k in values if k not in given]
        raise ConfigOverrideError(
            f"config id(s) {given} are set but {missing} are not: {reason}. "
            "Fix: " + " ".join(f"--{k} <value>" for k in missing)
        )
    return True


def check_needs_config(values: Mapping[str, Any], config: str) -> bool:
    """Ids that only a layered config file uses: refuse them set (truthy) without ``config``.

    Why: an override of an id the running configs do not read is silently ignored (no file written, no error).
    """
    given = [k for k, v in values.items() if v]
    if given:
        raise ConfigOverrideError(
            f"config id(s) {given} are set but only {config} uses them. "
            f"Fix: add '{config}' to --config_file (after the base config), or leave them unset"
        )
    return True


def check_min_items(items: Sized, name: str, minimum: int, purpose: str) -> Sized:
    """Require ``len(items) >= minimum``; ``name`` is the datalist/section id, ``purpose`` says why. Returns items."""
    if len(items) < minimum:
        raise ConfigOverrideError(
            f"{name} has {len(items)} item(s) but {purpose} needs at least {minimum}. "
            f"Fix: add volumes to {name} (or point the id at a larger datalist section)"
        )
    return items


def check_batch_fits(batch_size: int, batch_id: str, items: Sized, data_id: str, minimum: int = 1) -> int:
    """Require ``minimum <= batch_size <= len(items)`` (e.g. a contrastive batch needs that many distinct volumes).

    ``data_id`` names the data (e.g. ``"<datalist> section 'training'"``). Returns ``batch_size``.
    """
    _positive_int(batch_id, batch_size)
    if len(items) < minimum:
        raise ConfigOverrideError(
            f"{data_id} has {len(items)} item(s) but a batch ({batch_id!r}) needs at least {minimum} distinct ones. "
            f"Fix: add volumes to {data_id}"
        )
    if batch_size < minimum or batch_size > len(items):
        raise ConfigOverrideError(
            f"config id {batch_id!r} = {batch_size} but {data_id} has {len(items)} item(s)"
            + (f" and at least {minimum} are needed per batch" if minimum > 1 else "")
            + f". Fix: set --{batch_id} between {minimum} and {len(items)}, or add volumes to {data_id}"
        )
    return batch_size


def check_output_dir_free(output_dir: str | os.PathLike, overwrite: bool, pattern: str = "*") -> Path:
    """Refuse to write into ``output_dir`` when it already holds files matching ``pattern``, unless ``overwrite``.

    Why: inference writers (``SaveImaged``) replace earlier results silently; a re-run must not destroy them unless
    the user asks. Returns the folder.
    """
    _boolean("overwrite", overwrite)
    out = Path(output_dir)
    existing = sorted(p.name for p in out.glob(pattern) if p.is_file()) if out.is_dir() else []
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise ConfigOverrideError(
            f"output folder {out} already holds results ({shown}); a re-run would overwrite them. "
            "Fix: choose another --output_dir, or pass --overwrite True to replace them"
        )
    return out
