"""Atomic writers: content round-trips, and a failing write keeps the previous file."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from common import io


def test_text_json_and_torch_round_trip(tmp_path):
    io.atomic_write_text(tmp_path / "a" / "x.txt", "hello")
    assert (tmp_path / "a" / "x.txt").read_text() == "hello"
    io.atomic_json_dump({"v": np.float32(1.5), "arr": np.arange(3)}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": 1.5, "arr": [0, 1, 2]}
    io.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "x.json", "x.pt"]  # no temp files left


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    io.atomic_torch_save({"step": 1}, target)

    def broken_save(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_torch_save({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_save_nifti_keeps_affine_and_dtype(tmp_path):
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = io.save_nifti(data, affine, tmp_path / "lab.nii.gz")
    loaded = nib.load(str(path))
    assert np.array_equal(np.asarray(loaded.dataobj), data)
    assert loaded.get_data_dtype() == np.uint8
    assert np.allclose(loaded.affine, affine)
