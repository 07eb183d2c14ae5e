"""Transform-time validation: each bad volume, loaded by MONAI LoadImaged, fails naming its file and a fix."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import Dataset, MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from common.data.transforms import ValidateFilesd, ValidateGeometryd, ValidateImaged, ValidateLabeld, source_name
from common.data.validate import DataValidationError


def _save(path, array, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _load(entry, keys=("image", "label")):
    keys = [k for k in keys if k in entry]
    return Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys)])(entry)


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    image = _save(tmp_path / "img.nii.gz", rng.random((6, 7, 8)).astype(np.float32))
    label = _save(tmp_path / "lab.nii.gz", rng.integers(0, 3, (6, 7, 8)).astype(np.uint8))
    return {"image": image, "label": label}


def _raises_naming(path, transform, data, match):
    with pytest.raises(DataValidationError) as info:
        transform(data)
    message = str(info.value)
    assert str(path) in message and "Fix:" in message and match in message, message
    return message


def test_good_pair_passes_unchanged(pair):
    data = _load(pair)
    out = Compose(
        [ValidateImaged("image", ndim=3), ValidateLabeld("label", [0, 1, 2]), ValidateGeometryd(["image", "label"])]
    )(data)
    assert torch.equal(out["image"], data["image"]) and torch.equal(out["label"], data["label"])


def test_source_name_from_meta_and_meta_dict(pair):
    data = _load(pair)
    assert source_name(data, "image") == pair["image"]
    plain = {"image": np.zeros(3), "image_meta_dict": {"filename_or_obj": "/x/y.nii"}}
    assert source_name(plain, "image") == "/x/y.nii"
    assert "file unknown" in source_name({"image": np.zeros(3)}, "image")


def test_2d_image_given_to_3d_bundle(tmp_path):
    path = _save(tmp_path / "slice.nii.gz", np.random.default_rng(1).random((6, 7)).astype(np.float32))
    data = _load({"image": path})
    assert data["image"].shape == (1, 6, 7)
    _raises_naming(path, ValidateImaged("image", ndim=3), data, "is a 2D image")


def test_3d_volume_given_to_2d_transform(pair):
    _raises_naming(pair["image"], ValidateImaged("image", ndim=2), _load(pair), "is a 3D image")


def test_4d_series_given_to_single_channel_bundle(tmp_path):
    path = _save(tmp_path / "cine.nii.gz", np.random.default_rng(2).random((6, 7, 5, 4)).astype(np.float32))
    data = _load({"image": path})
    _raises_naming(path, ValidateImaged("image", ndim=3, channels=1), data, "has 4 channels")
    ValidateImaged("image", ndim=3, channels=None)(data)  # multi-channel allowed when asked


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_image(tmp_path, bad):
    array = np.random.default_rng(3).random((6, 7, 8)).astype(np.float32)
    array[1, 2, 3] = bad
    array[4, 5, 6] = bad
    path = _save(tmp_path / "nonfinite.nii.gz", array)
    _raises_naming(path, ValidateImaged("image", ndim=3), _load({"image": path}), "contains 2 NaN/Inf voxels")


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_constant_image(tmp_path, value):
    path = _save(tmp_path / "blank.nii.gz", np.full((6, 7, 8), value, np.float32))
    data = _load({"image": path})
    _raises_naming(path, ValidateImaged("image"), data, f"every voxel is {value}")
    ValidateImaged("image", allow_constant=True)(data)


def test_label_values_outside_declared_set(tmp_path):
    label = np.zeros((6, 7, 8), np.uint8)
    label[0, 0, :3] = [1, 13, 35]
    path = _save(tmp_path / "lab35.nii.gz", label)
    data = _load({"label": path}, keys=("label",))
    message = _raises_naming(path, ValidateLabeld("label", 14), data, "label values [35]")
    assert "{0..13}" in message
    ValidateLabeld("label", 36)(data)
    # a datalist "labels" dict declares the set through its keys
    _raises_naming(path, ValidateLabeld("label", {"0": "bg", "1": "a", "13": "b"}), data, "[35]")


def test_non_integer_and_nan_labels(tmp_path):
    soft = np.zeros((6, 7, 8), np.float32)
    soft[0, 0, 0] = 0.5
    path = _save(tmp_path / "soft.nii.gz", soft)
    _raises_naming(path, ValidateLabeld("label", 2), _load({"label": path}, ("label",)), "non-integer")
    soft[0, 0, 0] = np.nan
    path = _save(tmp_path / "nanlab.nii.gz", soft)
    _raises_naming(path, ValidateLabeld("label", 2), _load({"label": path}, ("label",)), "NaN/Inf")


def test_shape_mismatch(pair, tmp_path):
    other = _save(tmp_path / "small_lab.nii.gz", np.zeros((6, 7, 9), np.uint8))
    data = _load({"image": pair["image"], "label": other})
    message = _raises_naming(other, ValidateGeometryd(["image", "label"]), data, "(6, 7, 9) differs")
    assert pair["image"] in message  # the reference file is named too


def test_affine_mismatch(pair, tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    other = _save(tmp_path / "shifted_lab.nii.gz", np.zeros((6, 7, 8), np.uint8), affine)
    data = _load({"image": pair["image"], "label": other})
    _raises_naming(other, ValidateGeometryd(["image", "label"]), data, "affine differs")
    # within tolerance passes
    near = _save(tmp_path / "near_lab.nii.gz", np.zeros((6, 7, 8), np.uint8), np.diag([1.0, 1.0, 1.0001, 1.0]))
    ValidateGeometryd(["image", "label"])(_load({"image": pair["image"], "label": near}))


def test_missing_label_key_allowed_only_when_asked(pair):
    data = _load({"image": pair["image"]}, ("image",))
    ValidateGeometryd(["image", "label"], allow_missing_keys=True)(data)
    with pytest.raises(KeyError):
        ValidateLabeld("label", 3)(data)


def test_error_surfaces_through_dataset_with_file_name(tmp_path):
    """MONAI wraps transform errors in RuntimeError; the DataValidationError (file + fix) is its cause."""
    path = _save(tmp_path / "nan.nii.gz", np.full((6, 7, 8), np.nan, np.float32))
    ds = Dataset([{"image": path}], Compose([LoadImaged("image", image_only=True), ValidateImaged("image")]))
    with pytest.raises(RuntimeError) as info:
        ds[0]
    cause = info.value
    while cause is not None and not isinstance(cause, DataValidationError):
        cause = cause.__cause__
    assert cause is not None and path in str(cause)


def test_plain_arrays_without_meta():
    data = {"image": MetaTensor(torch.ones(1, 4, 4, 4)), "label": np.full((1, 4, 4, 4), 2.0, np.float32)}
    with pytest.raises(DataValidationError, match="file unknown"):
        ValidateImaged("image")(data)
    ValidateLabeld("label", [0, 2])(data)


def test_files_checked_before_loading(pair, tmp_path):
    ValidateFilesd(["image", "label"])(pair)
    missing = tmp_path / "gone.nii.gz"
    _raises_naming(missing, ValidateFilesd("image"), {"image": str(missing)}, "does not exist")
    png = tmp_path / "scan.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    _raises_naming(png, ValidateFilesd("image"), {"image": str(png)}, "not a NIfTI file name")
    header_cut = tmp_path / "cut.nii.gz"
    header_cut.write_bytes(open(pair["image"], "rb").read()[:40])
    _raises_naming(header_cut, ValidateFilesd("image"), {"image": str(header_cut)}, "cannot be read as NIfTI")


def test_truncated_data_block_needs_read_data(tmp_path):
    path = _save(tmp_path / "big.nii.gz", np.random.default_rng(4).random((32, 32, 32)).astype(np.float32))
    blob = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(blob[: len(blob) // 2])  # header intact, data block cut
    ValidateFilesd("image")({"image": path})  # the header alone still parses
    _raises_naming(path, ValidateFilesd("image", read_data=True), {"image": path}, "corrupt or truncated")
