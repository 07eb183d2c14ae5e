"""Every bad input raises DataValidationError naming the offending file; good inputs pass."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from common.data.datalist import load_datalist
from common.data.validate import DataValidationError, check_output_dir, validate_image_label


def _save(path, array, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    image = _save(tmp_path / "img.nii.gz", rng.random((8, 9, 10)).astype(np.float32))
    label = _save(tmp_path / "lab.nii.gz", rng.integers(0, 3, (8, 9, 10)).astype(np.uint8))
    return image, label


def _raises_naming(path, fn, *args, match=None, **kwargs):
    with pytest.raises(DataValidationError) as info:
        fn(*args, **kwargs)
    assert str(path) in str(info.value)
    assert "Fix:" in str(info.value)
    if match:
        assert match in str(info.value)
    return info.value


def test_good_pair_passes_and_reports(good):
    info = validate_image_label(*good, allowed_labels=[0, 1, 2], ndim=3)
    assert info["shape"] == (8, 9, 10) and info["spacing"] == (1.0, 1.0, 1.0)
    assert info["label_values"] == [0, 1, 2]
    assert isinstance(DataValidationError("x"), ValueError)


def test_missing_file(good, tmp_path):
    missing = tmp_path / "nope.nii.gz"
    _raises_naming(missing, validate_image_label, missing, good[1], match="does not exist")
    _raises_naming(missing, validate_image_label, good[0], missing, match="does not exist")


def test_corrupt_truncated_gzip(good, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good[0].read_bytes()[:200])
    _raises_naming(broken, validate_image_label, broken, good[1])


def test_garbage_bytes_named_nifti(good, tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    _raises_naming(garbage, validate_image_label, garbage, good[1], match="cannot be read as NIfTI")


def test_non_nifti_file(good, tmp_path):
    png = tmp_path / "slice.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    _raises_naming(png, validate_image_label, png, good[1], match="not a NIfTI")


def test_shape_mismatch(good, tmp_path):
    label = _save(tmp_path / "small.nii.gz", np.zeros((8, 9, 9), np.uint8))
    _raises_naming(label, validate_image_label, good[0], label, match="shape")


def test_affine_mismatch(good, tmp_path):
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    label = _save(tmp_path / "shifted.nii.gz", np.zeros((8, 9, 10), np.uint8), shifted)
    _raises_naming(label, validate_image_label, good[0], label, match="affine")


def test_labels_out_of_declared_set(good):
    _raises_naming(good[1], validate_image_label, *good, allowed_labels=[0, 1], match="[2]")


def test_non_integer_label(good, tmp_path):
    label = _save(tmp_path / "soft.nii.gz", np.full((8, 9, 10), 0.5, np.float32))
    _raises_naming(label, validate_image_label, good[0], label, match="non-integer")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_image(good, tmp_path, bad):
    data = np.random.default_rng(1).random((8, 9, 10)).astype(np.float32)
    data[3, 4, 5] = bad
    image = _save(tmp_path / "nonfinite.nii.gz", data)
    _raises_naming(image, validate_image_label, image, good[1], match="NaN/Inf")


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_constant_image(good, tmp_path, value):
    image = _save(tmp_path / "flat.nii.gz", np.full((8, 9, 10), value, np.float32))
    _raises_naming(image, validate_image_label, image, good[1], match="constant")


def test_2d_where_3d_expected(tmp_path):
    image = _save(tmp_path / "flat2d.nii.gz", np.random.default_rng(2).random((8, 9)).astype(np.float32))
    label = _save(tmp_path / "lab2d.nii.gz", np.zeros((8, 9), np.uint8))
    _raises_naming(image, validate_image_label, image, label, ndim=3, match="3D volumes are expected")
    validate_image_label(image, label, ndim=2)


def _datalist(tmp_path, content) -> object:
    path = tmp_path / "list.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_empty_and_malformed_datalists(tmp_path, good):
    for content in ["", "   \n", '{"training": [', "[1, 2]"]:
        path = _datalist(tmp_path, content)
        _raises_naming(path, load_datalist, path)
    for content in [{"training": []}, {"validation": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}]:
        path = _datalist(tmp_path, content)
        _raises_naming(path, load_datalist, path, "training")
    missing = tmp_path / "absent.json"
    _raises_naming(missing, load_datalist, missing)


def test_datalist_entry_errors_name_the_file(tmp_path, good):
    path = _datalist(tmp_path, {"training": [{"image": "img.nii.gz"}]})
    _raises_naming(path, load_datalist, path, match="has no 'label'")
    assert load_datalist(path, require_label=False)[0]["image"] == str(good[0])
    path = _datalist(
        tmp_path, {"labels": {"0": "bg", "1": "a"}, "training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}
    )
    _raises_naming(good[1], load_datalist, path, match="outside the declared set")
    assert load_datalist(path, validate=False)[0]["label"] == str(good[1])
    path = _datalist(tmp_path, {"training": [{"image": "missing.nii.gz", "label": "lab.nii.gz"}]})
    _raises_naming(tmp_path / "missing.nii.gz", load_datalist, path)


def test_check_output_dir(tmp_path, good):
    _raises_naming(tmp_path.resolve(), check_output_dir, tmp_path, [tmp_path])
    _raises_naming(tmp_path.resolve(), check_output_dir, tmp_path / ".", [good[0]])  # a file protects its folder
    assert check_output_dir(tmp_path / "out", [tmp_path, good[0]]) == (tmp_path / "out").resolve()
