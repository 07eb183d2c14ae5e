"""Shared pieces of the robustness suite: bundle entry points, dataset corruptions and error-chain inspection.

The bundles' tiny-run overrides come from their harness cases (tests/bundles/test_*.py), so this suite drives the
same configurations the bundle tests do. Each corruption copies a clean synthetic dataset and breaks one thing in it.
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from tests.bundles.harness import BundleCase, run_workflow, substitute

__all__ = ["Entry", "ENTRIES", "bundle_case", "error_chain", "find_error", "run_entry", "Corruption"]

HARNESS_TESTS = Path(__file__).resolve().parents[1] / "bundles"


def bundle_case(name: str) -> BundleCase | None:
    """The harness case (``CASE`` of a tests/bundles/test_*.py) of a bundle; None while it has none yet."""
    for path in sorted(HARNESS_TESTS.glob("test_*.py")):
        if name not in path.read_text():
            continue
        case = getattr(importlib.import_module(f"tests.bundles.{path.stem}"), "CASE", None)
        if isinstance(case, BundleCase) and case.name == name:
            return case if (case.bundle_root / "configs" / "metadata.json").is_file() else None
    return None


@dataclass(frozen=True)
class Entry:
    """One user entry point: the first training stage ("train") or inference without weights ("infer")."""

    name: str
    workflow_type: str
    section: str  # the datalist section this entry point reads first


ENTRIES = {"train": Entry("train", "train", "training"), "infer": Entry("infer", "infer", "test")}


def entry_configs(case: BundleCase, entry: Entry) -> list[str]:
    return list(case.train_stages[0]) if entry.name == "train" else list(case.inference_configs or [])


def run_entry(case: BundleCase, entry: Entry, data_dir: Path, work: Path, extra: dict[str, Any] | None = None) -> None:
    """Run an entry point on ``data_dir`` (datalist.json inside) with the harness's tiny overrides (+ ``extra``)."""
    paths = {
        "bundle_root": str(case.bundle_root),
        "data_dir": str(data_dir),
        "datalist": str(data_dir / "datalist.json"),
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "out"),
        "tmp": str(work),
    }
    overrides: dict[str, Any] = {
        "bundle_root": paths["bundle_root"],
        "dataset_dir": paths["data_dir"],
        "datalist": paths["datalist"],
        "ckpt_dir": paths["ckpt_dir"],
        "output_dir": paths["output_dir"],
    }
    phase = case.train_overrides if entry.name == "train" else {**case.infer_overrides, "load_pretrain": False}
    for more in (case.overrides, phase, extra or {}):
        overrides.update(substitute(dict(more), paths))
    failing = run_workflow(case.bundle_root, entry_configs(case, entry), entry.workflow_type, overrides)
    assert not failing, f"{case.name}: failing bundle properties {failing}"


def error_chain(error: BaseException) -> list[BaseException]:
    """The error and its causes/contexts, outermost first (MONAI wraps config and transform errors in RuntimeError)."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return chain


def find_error(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    return next((e for e in error_chain(error) if isinstance(e, kind)), None)


def describe(error: BaseException) -> str:
    return " <- ".join(f"{type(e).__name__}: {str(e)[:300]}" for e in error_chain(error))


# ------------------------------------------------------------------------------------------------- corruptions
def _datalist(data_dir: Path) -> dict:
    return json.loads((data_dir / "datalist.json").read_text())


def _write_datalist(data_dir: Path, data: dict) -> None:
    (data_dir / "datalist.json").write_text(json.dumps(data, indent=2))


def _first(data_dir: Path, section: str, key: str = "image") -> Path:
    return data_dir / _datalist(data_dir)[section][0][key]


def _resave(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    reference = nib.load(str(path))
    nib.save(nib.Nifti1Image(array, reference.affine if affine is None else affine), str(path))


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def missing_image(data_dir: Path, section: str) -> str:
    path = _first(data_dir, section)
    path.unlink()
    return str(path)


def not_nifti(data_dir: Path, section: str) -> str:
    data = _datalist(data_dir)
    png = data_dir / "imagesTr" / "scan.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    data[section][0]["image"] = "imagesTr/scan.png"
    _write_datalist(data_dir, data)
    return str(png)


def truncated_nifti(data_dir: Path, section: str) -> str:
    path = _first(data_dir, section)
    path.write_bytes(path.read_bytes()[:300])
    return str(path)


def _set_image(data_dir: Path, section: str, make: Callable[[np.ndarray], np.ndarray], label_too: bool = False) -> str:
    path = _first(data_dir, section)
    _resave(path, make(_read(path)).astype(np.float32))
    entry = _datalist(data_dir)[section][0]
    if label_too and "label" in entry:
        label = data_dir / entry["label"]
        _resave(label, make(_read(label)).astype(np.uint8))
    return str(path)


def image_2d(data_dir: Path, section: str) -> str:
    return _set_image(data_dir, section, lambda a: np.ascontiguousarray(a[:, :, a.shape[2] // 2]), label_too=True)


def image_4d(data_dir: Path, section: str) -> str:
    return _set_image(data_dir, section, lambda a: np.stack([a, a], axis=-1), label_too=True)


def image_zero(data_dir: Path, section: str) -> str:
    return _set_image(data_dir, section, np.zeros_like)


def image_constant(data_dir: Path, section: str) -> str:
    return _set_image(data_dir, section, lambda a: np.full_like(a, 7.0))


def image_nan(data_dir: Path, section: str) -> str:
    def make(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        a[tuple(n // 2 for n in a.shape)] = np.nan
        return a

    return _set_image(data_dir, section, make)


def image_inf(data_dir: Path, section: str) -> str:
    def make(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        a[tuple(n // 3 for n in a.shape)] = np.inf
        return a

    return _set_image(data_dir, section, make)


def label_shape(data_dir: Path, section: str) -> str:
    path = _first(data_dir, section, "label")
    _resave(path, np.ascontiguousarray(_read(path)[:-2]))
    return str(path)


def label_affine(data_dir: Path, section: str) -> str:
    path = _first(data_dir, section, "label")
    affine = nib.load(str(path)).affine.copy()
    affine[:3, :3] *= 1.5
    _resave(path, _read(path), affine)
    return str(path)


def label_values(data_dir: Path, section: str) -> str:
    path = _first(data_dir, section, "label")
    label = _read(path).copy()
    label[0, 0, :3] = 35
    _resave(path, label)
    return str(path)


def datalist_empty(data_dir: Path, section: str) -> str:
    (data_dir / "datalist.json").write_text("")
    return str(data_dir / "datalist.json")


def datalist_malformed(data_dir: Path, section: str) -> str:
    text = (data_dir / "datalist.json").read_text()
    (data_dir / "datalist.json").write_text(text[: len(text) // 2])
    return str(data_dir / "datalist.json")


def datalist_no_section(data_dir: Path, section: str) -> str:
    data = _datalist(data_dir)
    del data[section]
    _write_datalist(data_dir, data)
    return str(data_dir / "datalist.json")


def atlas_without_label(data_dir: Path, section: str) -> str:
    """No training entry has a label map: the atlas (chosen among them) cannot have one."""
    data = _datalist(data_dir)
    for entry in data["training"]:
        entry.pop("label", None)
    _write_datalist(data_dir, data)
    return str(data_dir / "datalist.json")


def one_volume(data_dir: Path, section: str) -> str:
    """A single volume where a stage samples pairs or contrastive batches."""
    data = _datalist(data_dir)
    data[section] = data[section][:1]
    _write_datalist(data_dir, data)
    return str(data_dir / "datalist.json")


@dataclass(frozen=True)
class Corruption:
    """A bad input: ``apply(data_dir, section) -> name`` the error message must contain (a file, a path or an id)."""

    name: str
    apply: Callable[[Path, str], str]
    error: str  # name of the expected error class (see EXPECTED_TYPES in the test module)
    entries: tuple[str, ...] = ("train", "infer")


CORRUPTIONS = {
    c.name: c
    for c in [
        Corruption("missing_image", missing_image, "DataValidationError"),
        Corruption("not_nifti", not_nifti, "DataValidationError"),
        Corruption("truncated_nifti", truncated_nifti, "DataValidationError"),
        Corruption("image_2d_for_3d", image_2d, "DataValidationError"),
        Corruption("image_4d_for_3d", image_4d, "DataValidationError"),
        Corruption("image_all_zero", image_zero, "DataValidationError"),
        Corruption("image_constant", image_constant, "DataValidationError"),
        Corruption("image_nan", image_nan, "DataValidationError"),
        Corruption("image_inf", image_inf, "DataValidationError"),
        Corruption("label_shape_differs", label_shape, "DataValidationError", ("train",)),
        Corruption("label_affine_differs", label_affine, "DataValidationError", ("train",)),
        Corruption("label_value_35", label_values, "DataValidationError", ("train",)),
        Corruption("datalist_empty", datalist_empty, "DataValidationError"),
        Corruption("datalist_malformed", datalist_malformed, "DataValidationError"),
        Corruption("datalist_section_missing", datalist_no_section, "DataValidationError"),
        Corruption("atlas_without_label", atlas_without_label, "ValueError"),
        Corruption("single_volume", one_volume, "ValueError", ("train",)),
    ]
}


def corrupted_copy(clean: Path, dest: Path, corruption: Corruption, section: str) -> tuple[Path, str]:
    """Copy the clean dataset to ``dest`` and apply ``corruption``; return (data dir, name the error must contain)."""
    shutil.copytree(clean, dest)
    return dest, corruption.apply(dest, section)
