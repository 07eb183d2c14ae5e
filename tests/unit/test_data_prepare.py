"""Preparers: real data sets in ../shared/data (skipped when absent) and fake trees for the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.data.datalist import load_datalist
from common.data.prepare import (
    prepare_abdomenctct,
    prepare_acdc,
    prepare_lpba40,
    prepare_mindboggle101,
    prepare_oasis,
    prepare_prostate_mr,
)
from common.data.validate import DataValidationError, validate_image_label

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data set {path} is not available on this machine")
    return path


def _fake_pair(image: Path, label: Path, label_values=(0, 1)) -> None:
    rng = np.random.default_rng(len(str(image)))
    image.parent.mkdir(parents=True, exist_ok=True)
    label.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(rng.random((4, 5, 6)).astype(np.float32), np.eye(4)), str(image))
    lab = np.resize(np.asarray(label_values, dtype=np.int16), (4, 5, 6))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(label))


def _sections(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {s: data[s] for s in ("training", "validation", "test")}


def test_acdc_split_by_patient_and_loads(tmp_path):
    src = _shared("acdc")
    out = prepare_acdc(src, tmp_path / "acdc.json", validate=False)
    data = json.loads(out.read_text())
    assert data["spacing_known"] is False and data["labels"]["3"] == "left_ventricle"
    patients = {s: {e["patient"] for e in entries} for s, entries in _sections(out).items()}
    assert not patients["training"] & patients["validation"] and not patients["training"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    all_patients = {p.name[:10] for p in src.glob("patient*_frame01.nii.gz")}
    assert set().union(*patients.values()) == all_patients
    for section in ("training", "validation", "test"):
        entries = _sections(out)[section]
        assert len(entries) == 2 * len(patients[section])  # ED and ES frames stay together
        assert all(Path(e["image"]).is_file() and Path(e["label"]).is_file() for e in entries)
    groups = [e["group"] for e in data["validation"] if e["frame"] == 1]
    assert sorted(set(groups)) == ["DCM", "HCM", "MINF", "NOR", "RV"]  # stratified by pathology
    for entry in load_datalist(out, "validation", validate=False)[:2]:
        info = validate_image_label(entry["image"], entry["label"], allowed_labels=[0, 1, 2, 3], ndim=3)
        assert info["label_values"] == [0, 1, 2, 3]
    again = prepare_acdc(src, tmp_path / "again.json", validate=False)
    assert again.read_text() == out.read_text()
    other = json.loads(prepare_acdc(src, tmp_path / "other.json", seed=1, validate=False).read_text())
    assert {e["patient"] for e in other["validation"]} != patients["validation"]


def test_oasis_datalist_loads(tmp_path):
    src = _shared("oasis_brain")
    out = prepare_oasis(src, tmp_path / "oasis.json", validate=False)
    sections = _sections(out)
    names = sorted(e["subject"] for s in sections.values() for e in s)
    expected = sorted(d.name for d in src.iterdir() if (d / "aligned_seg35.nii.gz").is_file())
    assert names == expected and len(sections["validation"]) >= 1
    entry = load_datalist(out, "validation")[0]  # full validation of one subject
    label = np.asanyarray(nib.load(entry["label"]).dataobj)
    assert label.max() <= 35 and label.shape == nib.load(entry["image"]).shape


def test_prostate_gland_labels_derived(tmp_path):
    src = _shared("prostate_mr_deepreg")
    out = prepare_prostate_mr(src, tmp_path / "prostate" / "list.json")
    sections = _sections(out)
    cases = {s: [e["case"] for e in entries] for s, entries in sections.items()}
    assert cases["test"] == ["case000025", "case000026"]
    assert cases["validation"] == ["case000022", "case000023", "case000024"]
    entry = next(e for e in load_datalist(out) if e["case"] == "case000000")
    source = np.asanyarray(nib.load(src / "case000000_mr_label.nii.gz").dataobj)
    derived = np.asanyarray(nib.load(entry["label"]).dataobj)
    assert source.ndim == 4 and derived.ndim == 3
    np.testing.assert_array_equal(derived, (source[..., 0] > 0).astype(np.uint8))
    marks = np.asanyarray(nib.load(entry["landmark_label"]).dataobj)
    assert set(np.unique(marks).tolist()) <= set(range(source.shape[3]))
    assert (marks > 0).sum() > 0


def test_refuses_output_in_source_folder(tmp_path):
    for case in range(2):
        _fake_pair(tmp_path / f"case{case:06d}_mr.nii.gz", tmp_path / f"case{case:06d}_mr_label.nii.gz")
    with pytest.raises(DataValidationError, match="input location"):
        prepare_prostate_mr(tmp_path, tmp_path / "list.json")


def test_abdomenctct_paper_split_and_cli(tmp_path):
    src = tmp_path / "AbdomenCTCT"
    for case in range(1, 31):
        name = f"AbdomenCTCT_{case:04d}_0000.nii.gz"
        _fake_pair(src / "imagesTr" / name, src / "labelsTr" / name, label_values=(0, 6, 13))
    out = tmp_path / "lists" / "abdomen.json"
    cmd = [sys.executable, "-m", "common.data", "prepare", "abdomenctct", "--src", str(src), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    cases = {s: [e["case"] for e in entries] for s, entries in _sections(out).items()}
    assert cases["test"] == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]
    assert len(cases["training"]) == 20 and not set(cases["training"]) & set(cases["test"])
    assert cases["validation"] == [2, 3, 5]
    (src / "labelsTr" / "AbdomenCTCT_0030_0000.nii.gz").unlink()
    with pytest.raises(DataValidationError, match="AbdomenCTCT_0030_0000"):
        prepare_abdomenctct(src, tmp_path / "x.json")


def test_lpba40_fake_tree(tmp_path):
    src = tmp_path / "LPBA40" / "delineation_space"
    for sid in range(1, 41):
        folder = src / f"S{sid:02d}"
        _fake_pair(
            folder / f"S{sid:02d}.delineation.skullstripped.nii.gz",
            folder / f"S{sid:02d}.delineation.structure.label.nii.gz",
            label_values=(0, 21, 182),
        )
    out = prepare_lpba40(tmp_path / "LPBA40", tmp_path / "lpba.json")
    data = json.loads(out.read_text())
    assert [e["subject"] for e in data["training"]] == [f"S{i:02d}" for i in range(1, 31)]
    assert [e["subject"] for e in data["test"]] == [f"S{i:02d}" for i in range(31, 41)]
    assert data["atlas"]["subject"] == "S30" and len(data["labels"]) == 57
    (src / "S07" / "S07.delineation.structure.label.nii.gz").rename(src / "S07" / "S07.label.hdr")
    with pytest.raises(DataValidationError, match="S07"):
        prepare_lpba40(tmp_path / "LPBA40", tmp_path / "lpba2.json")


def test_mindboggle_fake_tree(tmp_path):
    src = tmp_path / "mindboggle"
    for group, count in (("NKI-RS-22", 22), ("NKI-TRT-20", 20), ("OASIS-TRT-20", 20)):
        for i in range(1, count + 1):
            folder = src / f"{group}_volumes" / f"{group}-{i}"
            _fake_pair(
                folder / "t1weighted_brain.MNI152.nii.gz",
                folder / "labels.DKT31.manual.MNI152.nii.gz",
                label_values=(0, 1002, 2035),
            )
    out = prepare_mindboggle101(src, tmp_path / "mb.json")
    data = json.loads(out.read_text())
    train = [e["subject"] for e in data["training"]]
    assert len(train) == 42 and train[0] == "NKI-RS-22-1" and train[9] == "NKI-RS-22-10" and train[22] == "NKI-TRT-20-1"
    assert all(e["subject"].startswith("OASIS-TRT-20-") for e in data["test"]) and len(data["test"]) == 20
    assert data["atlas"]["subject"] == "NKI-TRT-20-17"  # 39th in natural order: 22 NKI-RS, then TRT-17
    assert data["labels"]["1002"] == "ctx-lh-caudalanteriorcingulate" and len(data["labels"]) == 63
