"""Synthetic phantoms: determinism, label/image consistency, anatomy layout, diffeomorphic deformations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common.data.synthetic import generate_dataset, generate_subject, random_diffeomorphic_ddf, site_intensity_table

REPO = Path(__file__).resolve().parents[2]
SMALL = {"brain": (32, 32, 32), "abdomen": (32, 32, 32), "cardiac": (32, 32, 8)}


def _bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a = generate_dataset(tmp_path / "a", "brain", num_subjects=3, shape=(16, 16, 16), seed=3, num_sites=2)
    b = generate_dataset(tmp_path / "b", "brain", num_subjects=3, shape=(16, 16, 16), seed=3, num_sites=2)
    c = generate_dataset(tmp_path / "c", "brain", num_subjects=3, shape=(16, 16, 16), seed=4, num_sites=2)
    files_a, files_b, files_c = _bytes(a.parent), _bytes(b.parent), _bytes(c.parent)
    assert len(files_a) == 7  # 3 images + 3 labels + datalist
    assert files_a == files_b
    for name in files_a:
        if name.startswith(("imagesTr", "labelsTr")):
            assert files_a[name] != files_c[name], name


def test_dataset_layout_datalist_and_headers(tmp_path):
    path = generate_dataset(tmp_path, "cardiac", num_subjects=10, shape=(16, 16, 6), num_sites=3, spacing=(1.5, 1.5, 8))
    data = json.loads(path.read_text())
    assert [len(data[s]) for s in ("training", "validation", "test")] == [6, 2, 2]
    assert data["labels"] == {"0": "background", "1": "right_ventricle", "2": "myocardium", "3": "left_ventricle"}
    entries = data["training"] + data["validation"] + data["test"]
    assert [e["site"] for e in entries] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    img = nib.load(tmp_path / entries[4]["image"])
    lab = nib.load(tmp_path / entries[4]["label"])
    assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
    assert img.shape == lab.shape == (16, 16, 6)
    np.testing.assert_allclose(img.affine, np.diag([1.5, 1.5, 8.0, 1.0]))
    np.testing.assert_allclose(lab.affine, img.affine)


@pytest.mark.parametrize("preset,num_labels", [("brain", 8), ("abdomen", 13), ("cardiac", 3)])
def test_all_label_ids_present_and_aligned(preset, num_labels):
    for seed in range(3):
        image, label = generate_subject(preset, SMALL[preset], np.random.default_rng(seed))
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == SMALL[preset]
        assert set(np.unique(label).tolist()) == set(range(num_labels + 1))
        assert np.isfinite(image).all()


def _means(image, label):
    return {int(k): float(image[label == k].mean()) for k in np.unique(label)}


def test_brain_t1_contrast_and_nesting():
    image, label = generate_subject("brain", (32, 32, 32), 0)
    m = _means(image, label)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert m[2] > m[1] + 0.15  # T1: white matter brighter than cortex
    assert m[1] > m[3] + 0.15 and m[1] > m[4] + 0.15  # cortex brighter than ventricular CSF
    brain = label > 0
    # ventricles and thalami sit inside white matter, white matter inside the brain: none touches background.
    for child in (2, 3, 4, 5, 6):
        ring = ndimage.binary_dilation(label == child) & ~(label == child)
        assert not (ring & ~brain).any(), child
    # RAS-like axis 0: left structures (3, 5) at larger index than right ones (4, 6).
    com = {k: ndimage.center_of_mass(label == k)[0] for k in (3, 4, 5, 6)}
    assert com[3] > com[4] and com[5] > com[6]


def test_abdomen_hounsfield_units():
    image, label = generate_subject("abdomen", (32, 32, 32), 1)
    m = _means(image, label)
    corner = image[:3, :3, :].mean()
    assert corner < -900  # air outside the body outline
    assert all(-100 < m[k] < 300 for k in range(1, 14))  # soft tissue and enhanced vessels
    assert m[8] > m[6] > m[4]  # contrast-filled aorta > liver parenchyma > gallbladder bile
    liver_x = ndimage.center_of_mass(label == 6)[0]
    spleen_x = ndimage.center_of_mass(label == 1)[0]
    assert liver_x < 16 < spleen_x  # liver on the patient's right (low axis-0 index), spleen on the left


def test_cardiac_ring_myocardium():
    image, label = generate_subject("cardiac", (32, 32, 8), 2)
    m = _means(image, label)
    assert m[3] > m[2] + 0.25 and m[1] > m[2] + 0.25  # bright blood pools, dark myocardium
    for z in range(label.shape[2]):
        lv = label[:, :, z] == 3
        if lv.sum() < 4:
            continue
        # the LV cavity is enclosed by myocardium in-plane: its 4-neighbour ring is myocardium only.
        ring = ndimage.binary_dilation(lv) & ~lv
        assert set(np.unique(label[:, :, z][ring]).tolist()) == {2}, z
    # RV touches the myocardium (septum) but not the LV cavity.
    rv_ring = ndimage.binary_dilation(label == 1) & (label != 1)
    assert (label[rv_ring] == 2).any() and not (label[rv_ring] == 3).any()


def test_sites_change_appearance_not_anatomy():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    img0, lab0 = generate_subject("brain", (24, 24, 24), rng_a, site=0)
    img1, lab1 = generate_subject("brain", (24, 24, 24), rng_b, site=1)
    np.testing.assert_array_equal(lab0, lab1)
    diffs = [abs(img0[lab0 == k].mean() - img1[lab1 == k].mean()) for k in range(1, 9)]
    assert max(diffs) > 0.05
    # a site restyles a tissue, not a side: left and right ventricles keep one intensity at every site.
    for site in range(1, 4):
        table = site_intensity_table("brain", site)
        assert table[3] == table[4] and table[5] == table[6] and table != site_intensity_table("brain", 0)


def test_subjects_vary_but_share_anatomy():
    _, a = generate_subject("brain", (32, 32, 32), 10)
    _, b = generate_subject("brain", (32, 32, 32), 11)
    assert (a != b).any()
    for k in (1, 2, 8):
        dice = 2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum())
        assert 0.5 < dice < 1.0, (k, dice)


def test_random_deformation_is_diffeomorphic():
    shape = (20, 24, 16)
    ddf = random_diffeomorphic_ddf(shape, np.random.default_rng(0), max_displacement=(3.0, 3.0, 2.0))
    assert ddf.shape == (3, *shape)
    assert 0.5 < np.abs(ddf).max() < 6.0
    # independent Jacobian: forward differences of the mapping p + u(p).
    phi = ddf + np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    d = [np.diff(phi, axis=a + 1)[:, : shape[0] - 1, : shape[1] - 1, : shape[2] - 1] for a in range(3)]
    jac = np.stack(d, axis=1)  # [i, j, ...]: d phi_i / d x_j
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    assert det.min() > 0


def test_return_ddf_and_rng_determinism():
    img, lab, ddf = generate_subject("cardiac", (24, 24, 6), np.random.default_rng(3), return_ddf=True)
    assert ddf.shape == (3, 24, 24, 6) and np.abs(ddf[2]).max() <= 0.03 * 6 + 1e-9
    img2, lab2 = generate_subject("cardiac", (24, 24, 6), np.random.default_rng(3))
    np.testing.assert_array_equal(lab, lab2)
    np.testing.assert_array_equal(img, img2)


def test_cli_writes_datalist(tmp_path):
    cmd = [sys.executable, "-m", "common.data", "synthetic", "--preset", "abdomen", "--out", str(tmp_path)]
    cmd += ["--num_subjects", "2", "--shape", "12,12,12", "--seed", "1"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    data = json.loads((tmp_path / "datalist.json").read_text())
    assert len(data["training"]) == 1 and len(data["validation"]) == 1 and len(data["labels"]) == 14
    assert nib.load(tmp_path / data["training"][0]["image"]).shape == (12, 12, 12)
