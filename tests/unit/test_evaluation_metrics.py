"""Metrics against hand-built masks and fields with answers known in closed form or by brute force."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import cdist

from common.evaluation.metrics import (
    REGION_GROUPS,
    SDLOGJ_CLIP,
    deformation_stats,
    mask_metrics,
    mean_over_labels,
    per_label_metrics,
    region_metrics,
)

SHAPE = (24, 24, 24)


def cube(origin, side=10, shape=SHAPE, value=1):
    m = np.zeros(shape, dtype=np.int64)
    m[tuple(slice(o, o + side) for o in origin)] = value
    return m


def brute_force_surface(a, b, spacing):
    """Edge voxels = mask minus its 6-connected erosion; all pairwise physical distances, no MONAI involved."""
    pts = []
    for m in (a, b):
        edge = m.astype(bool) & ~binary_erosion(m.astype(bool))
        pts.append(np.argwhere(edge) * np.asarray(spacing, dtype=float))
    d = cdist(pts[0], pts[1])
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    return {
        "hd": max(d_ab.max(), d_ba.max()),
        "hd95": max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)),
        "assd": (d_ab.sum() + d_ba.sum()) / (len(d_ab) + len(d_ba)),
    }


def test_one_voxel_shift_closed_form():
    a, b = cube((5, 5, 5)), cube((6, 5, 5))
    r = per_label_metrics(a, b, {1: "cube"}, metrics=("dice", "hd95", "hd", "assd"))["cube"]
    s = 10
    assert r["dice"] == pytest.approx((s - 1) / s, abs=1e-6)
    assert r["hd"] == pytest.approx(1.0) and r["hd95"] == pytest.approx(1.0)
    # faces x=0 of A (s^2 voxels) and the inner part of face x=s-1 ((s-2)^2) are 1 voxel from B's surface, rest 0
    assert r["assd"] == pytest.approx((s**2 + (s - 2) ** 2) / (s**3 - (s - 2) ** 3), abs=1e-5)
    assert r["units"] == "voxel"


def test_spec_check_10_shift_at_2mm():
    a, b = cube((5, 5, 5)), cube((6, 5, 5))
    r = per_label_metrics(a, b, [1], spacing=(2.0, 2.0, 2.0), metrics=("hd",))["1"]
    assert r["hd"] == pytest.approx(2.0) and r["units"] == "mm"
    same = per_label_metrics(a, a, [1], spacing=2.0)["1"]
    assert same["dice"] == pytest.approx(1.0) and same["hd95"] == 0.0 and same["assd"] == 0.0


@pytest.mark.parametrize("k, axis", [(3, 1), (2, 0)])
@pytest.mark.parametrize("spacing", [None, (1.0, 2.5, 0.7)])
def test_offset_cubes_against_brute_force(k, axis, spacing):
    origin_b = [5, 5, 5]
    origin_b[axis] += k
    a, b = cube((5, 5, 5)), cube(origin_b)
    r = per_label_metrics(a, b, {1: "c"}, spacing=spacing, metrics=("dice", "hd95", "hd", "assd"))["c"]
    sp = spacing or (1.0, 1.0, 1.0)
    expected = brute_force_surface(a, b, sp)
    assert r["dice"] == pytest.approx((10 - k) / 10, abs=1e-6)
    assert r["hd"] == pytest.approx(k * sp[axis], abs=1e-5)  # closed form: the far face moves by k voxels
    assert r["hd"] == pytest.approx(expected["hd"], abs=1e-5)
    assert r["hd95"] == pytest.approx(expected["hd95"], abs=1e-4)
    assert r["assd"] == pytest.approx(expected["assd"], abs=1e-4)
    assert r["units"] == ("voxel" if spacing is None else "mm")


def test_anisotropic_spacing_scales_distances_along_the_shift_axis_only():
    a, b = cube((5, 5, 5)), cube((5, 7, 5))
    iso = per_label_metrics(a, b, [1], metrics=("hd",))["1"]["hd"]
    along = per_label_metrics(a, b, [1], spacing=(1, 3, 1), metrics=("hd",))["1"]["hd"]
    across = per_label_metrics(a, b, [1], spacing=(3, 1, 1), metrics=("hd",))["1"]["hd"]
    assert (iso, along, across) == pytest.approx((2.0, 6.0, 2.0))


def test_empty_masks_are_explicit():
    a = cube((5, 5, 5))
    empty = np.zeros_like(a)
    diag = math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(SHAPE, (1.0, 2.0, 3.0))))
    missed = per_label_metrics(a, empty, [1], spacing=(1, 2, 3))["1"]
    assert missed["dice"] == 0.0 and missed["hd95"] == pytest.approx(diag) and missed["assd"] == pytest.approx(diag)
    spurious = per_label_metrics(empty, a, [1], missing_distance="nan")["1"]
    assert spurious["dice"] == 0.0 and math.isnan(spurious["hd95"]) and math.isnan(spurious["assd"])
    assert per_label_metrics(empty, a, [1], missing_distance="inf")["1"]["hd95"] == math.inf
    assert per_label_metrics(empty, a, [1], missing_distance=50.0)["1"]["assd"] == 50.0
    both = per_label_metrics(empty, empty, [1])["1"]
    assert (both["dice"], both["hd95"], both["assd"]) == (1.0, 0.0, 0.0)
    both_nan = per_label_metrics(empty, empty, [1], both_empty="nan")["1"]
    assert all(math.isnan(both_nan[m]) for m in ("dice", "hd95", "assd"))
    with pytest.raises(ValueError, match="missing_distance"):
        per_label_metrics(empty, a, [1], missing_distance="max")


def test_input_forms_and_2d():
    a = cube((5, 5, 5), value=2)
    b = np.roll(a, 1, axis=0)
    ref = per_label_metrics(a, b, {2: "x"})
    as_tensor = per_label_metrics(torch.from_numpy(a)[None].float(), torch.from_numpy(b)[None], {"2": "x"})
    assert ref == as_tensor
    a2, b2 = np.zeros((12, 12), int), np.zeros((12, 12), int)
    a2[2:6, 2:6], b2[2:6, 3:7] = 1, 1
    r = per_label_metrics(a2, b2, [1], metrics=("dice", "hd"))["1"]
    assert r["dice"] == pytest.approx(0.75) and r["hd"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        per_label_metrics(a, a[:-1], [2])


def test_region_dice_is_dice_of_union_spec_check_9():
    gt = np.zeros((20, 20, 20), dtype=np.int64)
    gt[0:10, 0:10, 0:10] = 1  # A: 1000 voxels
    gt[15:17, 15:20, 15] = 2  # B: 10 voxels
    gt[12:14, 0:3, 0:3] = 9  # in no group
    pred = np.where(gt == 1, 1, 0)
    pred[18:20, 18:20, 18:20] = 9  # wrong, but outside every group
    r = region_metrics(pred, gt, {"AB": [1, 2]}, metrics=("dice",))
    assert r["AB"]["dice"] == pytest.approx(2 * 1000 / (1010 + 1000), abs=1e-6)
    assert round(r["AB"]["dice"], 5) == 0.99502


def test_region_grouping_on_toy_map():
    gt = np.zeros((16, 16, 16), dtype=np.int64)
    gt[1:5, 1:5, 1:5], gt[5:9, 1:5, 1:5], gt[1:5, 8:12, 8:12], gt[10:14, 8:12, 8:12] = 1, 2, 3, 4
    pred = gt.copy()
    pred[gt == 1], pred[gt == 2] = 2, 1  # left labels swapped: per-label Dice 0, region "left" perfect
    pred[gt == 4] = 0  # one right label missed: region right Dice = 2*64 / (64 + 128)
    labels = per_label_metrics(pred, gt, {1: "l1", 2: "l2", 3: "r3", 4: "r4"}, metrics=("dice",))
    assert [labels[k]["dice"] for k in ("l1", "l2", "r3", "r4")] == pytest.approx([0, 0, 1, 0])
    regions = region_metrics(pred, gt, {"left": [1, 2], "right": [3, 4]}, metrics=("dice", "hd"))
    assert regions["left"]["dice"] == pytest.approx(1.0) and regions["left"]["hd"] == 0.0
    assert regions["right"]["dice"] == pytest.approx(2 * 64 / (64 + 128), abs=1e-6)
    assert mean_over_labels(labels)["dice"] == pytest.approx(0.25)


def test_region_groups_tables():
    lpba = REGION_GROUPS["lpba40"]
    assert list(lpba) == ["frontal", "parietal", "occipital", "temporal", "cingulate", "putamen", "hippocampus"]
    ids = [i for v in lpba.values() for i in v]
    assert len(ids) == len(set(ids)) == 14 + 10 + 8 + 12 + 2 + 2 + 2
    assert lpba["frontal"][0] == 21 and lpba["frontal"][-1] == 34 and lpba["hippocampus"] == [165, 166]
    assert not {101, 102, 161, 162, 181, 182} & set(ids)  # insula, caudate, cerebellum, brainstem excluded
    mb = REGION_GROUPS["mindboggle"]
    assert list(mb) == ["frontal", "parietal", "occipital", "temporal", "cingulate"]
    mb_ids = [i for v in mb.values() for i in v]
    assert len(mb_ids) == len(set(mb_ids)) == 60 and 1035 not in mb_ids and 2035 not in mb_ids
    assert 1003 in mb["frontal"] and 2030 in mb["temporal"] and 1002 in mb["cingulate"]


def _grid(shape):
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))


def test_jacobian_of_affine_field_is_det_a():
    a = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.05, 0.0, 1.1]], dtype=torch.float64)
    ddf = torch.einsum("ij,jxyz->ixyz", a - torch.eye(3, dtype=torch.float64), _grid((12, 14, 10))).float()
    stats = deformation_stats(ddf)
    assert stats["jacobian_min"] == pytest.approx(float(torch.det(a)), abs=1e-5)
    assert stats["sdlogj"] < 1e-5 and stats["folding_percent"] == 0.0
    assert deformation_stats(ddf[None]) == stats


def test_folding_percent_exact_on_tent_field():
    n = 16
    x = torch.arange(n, dtype=torch.float32)
    phi = torch.where(x <= 7, x, 14 - x)  # p -> p for p <= 7, then mirrored: slope -1 after the fold at p = 7
    ddf = torch.zeros(3, n, 6, 5)
    ddf[0] = (phi - x)[:, None, None]
    stats = deformation_stats(ddf)
    folded = (n - 7) / n  # det 0 at p = 7 (central difference 0), -1 beyond: 9 of 16 slices
    assert stats["folding_percent"] == pytest.approx(100 * folded)
    log_clip = math.log(SDLOGJ_CLIP[0])
    assert stats["sdlogj"] == pytest.approx(abs(log_clip) * math.sqrt(folded * (1 - folded)), rel=1e-6)
    mask = torch.zeros(n, 6, 5, dtype=torch.bool)
    mask[:7] = True
    assert deformation_stats(ddf, mask=mask)["folding_percent"] == 0.0


def test_deformation_stats_rejects_batches():
    with pytest.raises(ValueError, match="one displacement field"):
        deformation_stats(torch.zeros(2, 3, 8, 8, 8))


def test_mask_metrics_rejects_unknown_metric():
    with pytest.raises(ValueError, match="unknown metrics"):
        mask_metrics(torch.ones(4, 4, 4), torch.ones(4, 4, 4), metrics=("dice", "hd99"))


@pytest.mark.parametrize("spacing", [None, (0.8, 1.7, 3.0)])
def test_distances_equal_monai_compute_functions(spacing):
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    blobs = [gaussian_filter(rng.standard_normal((20, 22, 18)), 2.0) > 0.05 for _ in range(2)]
    r = mask_metrics(torch.from_numpy(blobs[0]), torch.from_numpy(blobs[1]), spacing, ("hd95", "hd", "assd"))
    yp, yt = (torch.from_numpy(b)[None, None].float() for b in blobs)
    kw = dict(include_background=True, spacing=spacing)
    assert r["hd95"] == pytest.approx(float(compute_hausdorff_distance(yp, yt, percentile=95, **kw)), rel=1e-5)
    assert r["hd"] == pytest.approx(float(compute_hausdorff_distance(yp, yt, **kw)), rel=1e-6)
    assert r["assd"] == pytest.approx(float(compute_average_surface_distance(yp, yt, symmetric=True, **kw)), rel=1e-5)


def test_cropping_to_labels_does_not_change_results():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 4, size=(6, 7, 5)).repeat(3, 0).repeat(3, 1).repeat(3, 2)  # blocky, touches every face
    pred = np.roll(gt, 2, axis=2)
    pred[pred == 3] = 0  # label 3 missed: its distances use the diagonal of the whole volume, not of a crop
    full = {
        str(k): mask_metrics(torch.from_numpy(pred == k), torch.from_numpy(gt == k), (1, 1, 2), ("dice", "hd", "assd"))
        for k in (1, 2, 3, 7)
    }
    cropped = per_label_metrics(pred, gt, [1, 2, 3, 7], spacing=(1, 1, 2), metrics=("dice", "hd", "assd"))
    assert {k: {m: v[m] for m in ("dice", "hd", "assd")} for k, v in cropped.items()} == full
