"""load_datalist: path resolution against the JSON folder or base_dir, kept metadata, validation on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data.datalist import is_path_key, load_datalist
from common.data.synthetic import generate_dataset
from common.data.validate import DataValidationError


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("syn"), "cardiac", num_subjects=5, shape=(12, 12, 4), num_sites=2)


def test_sections_resolve_to_absolute_existing_paths(synthetic):
    sizes = {s: len(load_datalist(synthetic, s)) for s in ("training", "validation", "test")}
    assert sizes == {"training": 3, "validation": 1, "test": 1}
    entry = load_datalist(synthetic)[1]
    assert entry["image"] == str(synthetic.parent / "imagesTr" / "sub001.nii.gz")
    assert entry["label"] == str(synthetic.parent / "labelsTr" / "sub001.nii.gz")
    assert entry["site"] == 1 and entry["subject"] == "sub001"


def test_base_dir_and_absolute_paths(tmp_path, synthetic):
    data = json.loads(synthetic.read_text())
    data["training"][0]["image"] = str(synthetic.parent / data["training"][0]["image"])  # absolute stays as is
    moved = tmp_path / "elsewhere" / "list.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(data))
    with pytest.raises(DataValidationError):  # relative paths now point next to the moved JSON
        load_datalist(moved)
    entries = load_datalist(moved, base_dir=synthetic.parent)
    assert entries[0]["image"] == str(synthetic.parent / "imagesTr" / "sub000.nii.gz")
    assert entries[1]["label"] == str(synthetic.parent / "labelsTr" / "sub001.nii.gz")


def test_bare_string_entries_and_extra_path_keys(tmp_path, synthetic):
    root = synthetic.parent
    data = {
        "test": ["imagesTr/sub004.nii.gz"],
        "training": [
            {
                "image": "imagesTr/sub000.nii.gz",
                "label": "labelsTr/sub000.nii.gz",
                "moving_mask": "labelsTr/sub001.nii.gz",
                "note": "x/y",
            }
        ],
    }
    path = root / "extra.json"
    path.write_text(json.dumps(data))
    assert load_datalist(path, "test", require_label=False) == [{"image": str(root / "imagesTr/sub004.nii.gz")}]
    entry = load_datalist(path)[0]
    assert entry["moving_mask"] == str(root / "labelsTr/sub001.nii.gz") and entry["note"] == "x/y"
    assert is_path_key("fixed_label") and is_path_key("image") and not is_path_key("site")


def test_tensor_image_size_is_enforced(tmp_path, synthetic):
    data = json.loads(synthetic.read_text())
    data["tensorImageSize"] = "4D"
    path = synthetic.parent / "four_d.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataValidationError, match="4D volumes are expected"):
        load_datalist(path)


def test_validate_command_reports_sections_and_names_a_broken_file(tmp_path, capsys):
    from common.data.__main__ import main
    from common.data.synthetic import generate_dataset

    datalist = generate_dataset(tmp_path / "data", preset="cardiac", num_subjects=5, shape=(24, 24, 6), seed=3)
    assert main(["validate", str(datalist)]) == 0
    out = capsys.readouterr().out
    assert "section 'training': 3 entries OK" in out and "section 'test': 1 entries OK" in out

    broken = tmp_path / "data" / "labelsTr" / "sub000.nii.gz"
    broken.write_bytes(b"not a nifti")
    assert main(["validate", str(datalist)]) == 1
    assert "sub000.nii.gz" in capsys.readouterr().err
