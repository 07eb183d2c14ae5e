"""Decathlon-style datalist JSON: read (with validation) and write.

Why: every bundle reads its cases through one function so that path resolution, error messages and input checks
are the same everywhere. Datalist paths are relative to the JSON's folder unless ``base_dir`` is given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.data.validate import DataValidationError, validate_image_label
from common.io import atomic_json_dump

__all__ = ["is_path_key", "load_datalist", "read_datalist_json", "write_datalist"]

SECTIONS = ("training", "validation", "test")
_PATH_SUFFIXES = ("image", "label", "mask")


def is_path_key(key: str) -> bool:
    """Entry keys holding file paths: image/label/mask and any ``*_image``/``*_label``/``*_mask`` key."""
    return key in _PATH_SUFFIXES or key.endswith(tuple("_" + s for s in _PATH_SUFFIXES))


def read_datalist_json(path: str | os.PathLike) -> dict:
    """Parse a datalist JSON into a dict; raise DataValidationError for a missing, empty or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise DataValidationError(
            f"{p}: datalist JSON does not exist. Fix: check the path or run `python -m common.data prepare`"
        )
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise DataValidationError(f"{p}: datalist JSON is empty. Fix: regenerate it (`python -m common.data prepare`)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataValidationError(
            f"{p}: datalist is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}). "
            "Fix: repair the JSON syntax or regenerate the file"
        ) from err
    if not isinstance(data, dict):
        raise DataValidationError(
            f"{p}: datalist must be a JSON object with 'training'/'validation'/'test' lists, "
            f"got {type(data).__name__}. "
            'Fix: use the Decathlon layout {"labels": {...}, "training": [{"image": ..., "label": ...}]}'
        )
    return data


def _allowed_labels(data: dict, path: Path) -> list[int] | None:
    labels = data.get("labels")
    if labels is None:
        return None
    try:
        return sorted(int(k) for k in labels)
    except (TypeError, ValueError) as err:
        raise DataValidationError(
            f'{path}: \'labels\' must map integer strings to names, got {labels!r}. Fix: e.g. {{"0": "background"}}'
        ) from err


def _ndim(data: dict) -> int | None:
    size = str(data.get("tensorImageSize", "")).upper()
    return int(size[0]) if len(size) == 2 and size[0].isdigit() and size[1] == "D" else None


def load_datalist(
    path: str | os.PathLike,
    section: str = "training",
    base_dir: str | os.PathLike | None = None,
    require_label: bool = True,
    validate: bool = True,
) -> list[dict]:
    """Entries of one section with absolute paths (other keys such as "site" are kept).

    Raises DataValidationError for a missing/malformed JSON, a missing or empty section, an entry without a label
    when ``require_label``, and (when ``validate``) any entry whose files fail ``validate_image_label`` against the
    datalist's "labels" set and "tensorImageSize".
    """
    p = Path(path).expanduser().resolve()
    data = read_datalist_json(p)
    if section not in data:
        present = [k for k, v in data.items() if isinstance(v, list)]
        raise DataValidationError(
            f"{p}: datalist has no '{section}' section (list sections present: {present}). "
            f"Fix: add a '{section}' list or choose one of {present}"
        )
    items = data[section]
    if not isinstance(items, list) or not items:
        raise DataValidationError(
            f"{p}: section '{section}' is empty or not a list. Fix: add entries or choose another section"
        )
    root = Path(base_dir).expanduser().resolve() if base_dir is not None else p.parent
    allowed, ndim = _allowed_labels(data, p), _ndim(data)
    entries = []
    for i, item in enumerate(items):
        entry = {"image": item} if isinstance(item, str) else item  # Decathlon "test" lists may hold bare paths
        if not isinstance(entry, dict) or "image" not in entry and not any(is_path_key(k) for k in entry):
            raise DataValidationError(
                f"{p}: entry {i} of '{section}' is {item!r}; expected an object with an 'image' path. "
                'Fix: write entries as {"image": ..., "label": ...}'
            )
        if require_label and "image" in entry and "label" not in entry:
            raise DataValidationError(
                f"{p}: entry {i} of '{section}' ({entry['image']}) has no 'label'. "
                "Fix: add the label path, or call load_datalist(..., require_label=False)"
            )
        out = dict(entry)
        for key, value in entry.items():
            if is_path_key(key) and isinstance(value, str):
                out[key] = str((root / value).resolve()) if not Path(value).is_absolute() else value
        if validate and "image" in out:
            validate_image_label(out["image"], out.get("label"), allowed_labels=allowed, ndim=ndim)
        entries.append(out)
    return entries


def write_datalist(datalist: dict, path: str | os.PathLike) -> Path:
    """Write a datalist JSON atomically (temp file + rename) and return its path."""
    return atomic_json_dump(datalist, path)
