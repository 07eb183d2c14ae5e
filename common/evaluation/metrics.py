"""Segmentation and deformation metrics shared by every bundle.

Overlap and surface metrics are computed with MONAI on one binary mask per label (or per region = union of labels):
`compute_dice`, and MONAI's edge distances (`get_edge_surface_distance`) reduced exactly as
`compute_hausdorff_distance(percentile=95)` / `compute_average_surface_distance(symmetric=True)` reduce them, but
computed once for all distance metrics. The numbers therefore match MONAI's own metric classes.
What MONAI leaves to the caller is made explicit here:

* Units. With ``spacing`` given, distances are in the spacing's units (mm for NIfTI pixdim) and ``units == "mm"``;
  without it they are in voxels and ``units == "voxel"`` (e.g. the ACDC copy with identity affines).
* Empty masks (MONAI would return nan/inf and warn):
    - label absent from both prediction and ground truth: Dice 1, distances 0 with ``both_empty="perfect"`` (the
      default: nothing to find and nothing predicted is a correct answer), or every metric NaN with ``both_empty="nan"``
      (then the case is left out of the means, see `common.evaluation.report`);
    - label present in only one of them: Dice 0; the distances have no finite value, so they are set by
      ``missing_distance``: ``"diagonal"`` (default: the length of the field-of-view diagonal in the reported units, the
      largest distance two voxels of the volume can have, so means stay finite and the miss is penalised),
      ``"nan"``, ``"inf"`` or a number.
* HD95 is MONAI's definition: the larger of the two directed 95th percentiles of the edge-to-edge distances.
  ``"hd"`` (percentile None, the "longest distance" of CLMorph) is available on request.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.metrics.utils import get_edge_surface_distance

SUPPORTED_METRICS = ("dice", "hd95", "hd", "assd")
DEFAULT_METRICS = ("dice", "hd95", "assd")


def _lpba40_regions() -> dict[str, list[int]]:
    """LPBA40 (56 structures, ids of the LONI label file) grouped into the 7 regions of CLMorph [Cf] Table 1.

    The paper names the regions but not their members; the grouping follows the CLMorph spec §2.2, which uses the
    standard LPBA40 id blocks (left/right pairs): frontal 21-34, parietal 41-50, occipital 61-68, temporal 81-92,
    cingulate 121-122, putamen 163-164, hippocampus 165-166. Insula (101-102), caudate (161-162), cerebellum (181) and
    brainstem (182) belong to no reported region and are not scored. Check the ids against the dataset's label file.
    """
    return {
        "frontal": list(range(21, 35)),
        "parietal": list(range(41, 51)),
        "occipital": list(range(61, 69)),
        "temporal": list(range(81, 93)),
        "cingulate": [121, 122],
        "putamen": [163, 164],
        "hippocampus": [165, 166],
    }


def _mindboggle_regions() -> dict[str, list[int]]:
    """MindBoggle101 DKT cortical labels (FreeSurfer aparc codes, left 10xx, right 20xx) grouped into 5 lobes.

    Membership follows the CLMorph spec §2.2 (the paper only names the lobes). The lists hold the 30 DKT codes per
    hemisphere that map to a lobe (60 ids); insula (1035/2035) is excluded. The paper's "50 labels" subset (after FAIM)
    is not listed anywhere: ids that do not occur in a volume simply add nothing to the union masks, so the same
    grouping serves the 50-label subset.
    """
    lobes = {
        "frontal": [3, 12, 14, 17, 18, 19, 20, 24, 27, 28],
        "parietal": [8, 22, 25, 29, 31],
        "occipital": [5, 11, 13, 21],
        "temporal": [6, 7, 9, 15, 16, 30, 34],
        "cingulate": [2, 10, 23, 26],
    }
    return {name: [1000 + c for c in codes] + [2000 + c for c in codes] for name, codes in lobes.items()}


REGION_GROUPS: dict[str, dict[str, list[int]]] = {"lpba40": _lpba40_regions(), "mindboggle": _mindboggle_regions()}


def _as_label_map(x) -> torch.Tensor:
    """Label map as a plain integer tensor of spatial dims; a leading size-1 channel axis (ndim >= 3) is dropped."""
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    if t.ndim >= 3 and t.shape[0] == 1:
        t = t[0]
    if t.is_floating_point():
        t = t.round()
    return t.long()


def _normalise_spacing(spacing, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    values = np.atleast_1d(np.asarray(spacing.cpu() if torch.is_tensor(spacing) else spacing, dtype=float)).ravel()
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim:
        raise ValueError(
            f"spacing {tuple(values)} has {values.size} entries but the label maps have {ndim} spatial dims"
        )
    if not np.all(values > 0):
        raise ValueError(f"spacing must be positive, got {tuple(values)}")
    return tuple(float(v) for v in values)


def distance_units(spacing) -> str:
    """ "mm" when a physical spacing is known, "voxel" otherwise."""
    return "voxel" if spacing is None else "mm"


def _missing_value(missing_distance: str | float, shape: Sequence[int], spacing: tuple[float, ...] | None) -> float:
    if isinstance(missing_distance, str):
        if missing_distance == "diagonal":
            sp = spacing or (1.0,) * len(shape)
            return float(math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, sp))))
        if missing_distance in ("nan", "inf"):
            return float(missing_distance)
        raise ValueError(f"missing_distance must be 'diagonal', 'nan', 'inf' or a number, got {missing_distance!r}")
    return float(missing_distance)


def mask_metrics(
    pred_mask: torch.Tensor,
    gt_mask: torch.Tensor,
    spacing=None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    both_empty: str = "perfect",
    missing_distance: str | float = "diagonal",
    fov_shape: Sequence[int] | None = None,
) -> dict[str, float]:
    """Metrics of one binary prediction mask against one binary ground-truth mask (same spatial shape).

    See the module docstring for units and the handling of empty masks. ``fov_shape``: shape of the whole image when
    the masks are crops of it (sets the "diagonal" missing distance); default: the masks' shape.
    """
    unknown = set(metrics) - set(SUPPORTED_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; supported: {SUPPORTED_METRICS}")
    if both_empty not in ("perfect", "nan"):
        raise ValueError(f"both_empty must be 'perfect' or 'nan', got {both_empty!r}")
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"prediction shape {tuple(pred_mask.shape)} != ground-truth shape {tuple(gt_mask.shape)}")
    spacing = _normalise_spacing(spacing, pred_mask.ndim)
    p, g = bool(pred_mask.any()), bool(gt_mask.any())
    distances = [m for m in metrics if m != "dice"]
    out: dict[str, float] = {}
    if not p and not g:
        perfect = both_empty == "perfect"
        return {m: (1.0 if m == "dice" else 0.0) if perfect else float("nan") for m in metrics}
    if p != g:
        miss = _missing_value(missing_distance, fov_shape or pred_mask.shape, spacing)
        return {m: 0.0 if m == "dice" else miss for m in metrics}
    yp = pred_mask.bool()[None, None].float()
    yt = gt_mask.bool()[None, None].float()
    if "dice" in metrics:
        out["dice"] = float(compute_dice(yp, yt, include_background=True, ignore_empty=False)[0, 0])
    if distances:
        out.update(_surface_metrics(yp[0, 0], yt[0, 0], spacing))
    return {m: out[m] for m in metrics}


def _surface_metrics(pred: torch.Tensor, gt: torch.Tensor, spacing) -> dict[str, float]:
    """HD95, HD and ASSD of two non-empty masks from ONE edge-distance computation.

    `compute_hausdorff_distance` and `compute_average_surface_distance` each run MONAI's `get_edge_surface_distance`
    (two distance transforms); calling it once and reducing the distances as those functions do (max of the directed
    95th percentiles; max; mean of both directions pooled) gives the same numbers at a third of the cost.
    `tests/unit/test_evaluation_metrics.py` checks the equality.
    """
    with warnings.catch_warnings():
        # MONAI 1.6 calls its own deprecated `always_return_as_numpy` argument internally; the warning is not ours
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        _, (d_pg, d_gp), _ = get_edge_surface_distance(pred, gt, spacing=spacing, symmetric=True)
    d_pg, d_gp = d_pg.double(), d_gp.double()
    return {
        "hd95": float(torch.maximum(torch.quantile(d_pg, 0.95), torch.quantile(d_gp, 0.95))),
        "hd": float(torch.maximum(d_pg.max(), d_gp.max())),
        "assd": float(torch.cat([d_pg, d_gp]).mean()),
    }


def _labels_to_dict(labels) -> dict[str, list[int]]:
    """{name: [id]} from a {id: name} mapping (keys may be strings, as in datalist JSON) or a sequence of ids."""
    if isinstance(labels, Mapping):
        return {str(name): [int(k)] for k, name in labels.items()}
    return {str(int(k)): [int(k)] for k in labels}


def region_metrics(
    pred,
    gt,
    regions: Mapping[str, Sequence[int]],
    spacing=None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    both_empty: str = "perfect",
    missing_distance: str | float = "diagonal",
) -> dict[str, dict[str, float | str]]:
    """Metrics per region, a region being the union mask of its label ids (not the mean of its labels' scores).

    Args:
        pred, gt: label maps of the same spatial shape, ``[*spatial]`` or ``[1, *spatial]`` (tensor or array).
        regions: ``{region name: [label ids]}``, e.g. ``REGION_GROUPS["lpba40"]``. Labels in no region are ignored.
        spacing: voxel spacing per spatial axis (or one number); None reports voxel units.
        metrics: subset of ``("dice", "hd95", "hd", "assd")``.
    Returns:
        ``{region: {metric: value, ..., "units": "mm" | "voxel"}}`` in the order of ``regions``.
    """
    pred_t, gt_t = _as_label_map(pred), _as_label_map(gt)
    if pred_t.shape != gt_t.shape:
        raise ValueError(f"prediction shape {tuple(pred_t.shape)} != ground-truth shape {tuple(gt_t.shape)}")
    gt_t = gt_t.to(pred_t.device)
    spacing = _normalise_spacing(spacing, pred_t.ndim)
    units = distance_units(spacing)
    boxes = _label_boxes(pred_t, gt_t, [i for ids in regions.values() for i in ids])
    result: dict[str, dict[str, float | str]] = {}
    for name, ids in regions.items():
        crop = _union_box(boxes, ids, pred_t.shape)
        p, g = pred_t[crop], gt_t[crop]
        ids_t = torch.as_tensor(list(ids), dtype=p.dtype, device=p.device)
        values = mask_metrics(
            torch.isin(p, ids_t), torch.isin(g, ids_t), spacing, metrics, both_empty, missing_distance, pred_t.shape
        )
        result[name] = {**values, "units": units}
    return result


def _label_boxes(pred: torch.Tensor, gt: torch.Tensor, ids: Sequence[int]) -> dict[int, list[tuple[int, int]]] | None:
    """Per label id, the bounding box (start, stop per axis) of its voxels in pred or gt; None if ids are negative.

    One `scipy.ndimage.find_objects` pass per map replaces a full-volume mask per label: the metrics of a label then
    cost in proportion to its size, not the volume's (56 labels of a 1 mm brain).
    """
    from scipy.ndimage import find_objects

    if not ids or min(ids) < 0:
        return None
    max_id = max(ids)
    boxes: dict[int, list[tuple[int, int]]] = {}
    for label_map in (pred, gt):
        arr = label_map.cpu().numpy()
        arr = np.where((arr >= 0) & (arr <= max_id), arr, 0)  # ids above the requested range are not needed
        for index, box in enumerate(find_objects(arr, max_label=max_id), start=1):
            if box is None:
                continue
            span = [(sl.start, sl.stop) for sl in box]
            old = boxes.get(index)
            boxes[index] = span if old is None else [(min(a, c), max(b, d)) for (a, b), (c, d) in zip(old, span)]
    return boxes


def _union_box(boxes, ids: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """Crop holding every voxel of ``ids`` in both maps plus a 1-voxel margin (edge detection sees the background).

    Distances between edge voxels do not depend on the crop's origin, so metrics on the crop equal full-volume ones.
    """
    if boxes is None:
        return tuple(slice(None) for _ in shape)
    spans = [boxes[i] for i in ids if i in boxes]
    if not spans:
        return tuple(slice(0, 1) for _ in shape)  # both masks empty: a one-voxel crop is enough
    return tuple(
        slice(max(0, min(sp[d][0] for sp in spans) - 1), min(n, max(sp[d][1] for sp in spans) + 1))
        for d, n in enumerate(shape)
    )


def per_label_metrics(
    pred,
    gt,
    labels: Mapping[int, str] | Sequence[int],
    spacing=None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    both_empty: str = "perfect",
    missing_distance: str | float = "diagonal",
) -> dict[str, dict[str, float | str]]:
    """Dice / HD95 / ASSD (by default) for each label of ``labels`` ({id: name}, or ids named by their value).

    Returns ``{label name: {"dice", "hd95", "assd", "units"}}``; see `region_metrics` for the arguments.
    Background (0) is scored only if it is listed.
    """
    return region_metrics(pred, gt, _labels_to_dict(labels), spacing, metrics, both_empty, missing_distance)


def mean_over_labels(result: Mapping[str, Mapping[str, float | str]]) -> dict[str, float]:
    """Per-metric mean over the labels (or regions) of one case, NaN entries ignored (all NaN gives NaN)."""
    names = [k for k, v in next(iter(result.values()), {}).items() if not isinstance(v, str)]
    out = {}
    for m in names:
        vals = np.array([float(r[m]) for r in result.values()], dtype=float)
        out[m] = float(np.nanmean(vals)) if np.any(~np.isnan(vals)) else float("nan")
    return out


SDLOGJ_CLIP = (1e-9, 1e9)


def deformation_stats(ddf, mask=None) -> dict[str, float]:
    """Regularity of a displacement field (voxel units, MONAI `Warp` convention), for one field.

    Uses `common.registration.fields.jacobian_determinant` (det of d(p + u)/dp, central differences).

    Returns:
        ``sdlogj``: standard deviation of log(det J), with det J clipped to [1e-9, 1e9] (``SDLOGJ_CLIP``) first so that
            folded voxels (det <= 0) give a large finite penalty instead of NaN;
        ``folding_percent``: 100 * fraction of voxels with det J <= 0;
        ``jacobian_min``: the smallest determinant.
    Args:
        ddf: ``[D, *spatial]`` or ``[1, D, *spatial]``; a batch of several fields is rejected (loop over it).
        mask: optional boolean ``[*spatial]`` (or ``[1, *spatial]``) restricting the statistics (e.g. brain voxels).
    """
    from common.registration.fields import jacobian_determinant

    field = torch.as_tensor(ddf.as_tensor() if hasattr(ddf, "as_tensor") else ddf).float()
    if field.ndim >= 3 and field.shape[0] == field.ndim - 1:
        field = field[None]
    if field.ndim < 4 or field.shape[0] != 1 or field.shape[1] != field.ndim - 2:
        raise ValueError(f"expected one displacement field [D, *spatial] or [1, D, *spatial], got {tuple(field.shape)}")
    det = jacobian_determinant(field)[0]
    if mask is not None:
        m = _as_label_map(mask).bool().to(det.device)
        if m.shape != det.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} != field spatial shape {tuple(det.shape)}")
        det = det[m]
    det = det.double().flatten()
    if det.numel() == 0:
        raise ValueError("deformation_stats: the mask selects no voxel")
    log_det = torch.log(det.clamp(*SDLOGJ_CLIP))
    return {
        "sdlogj": float(log_det.std(unbiased=False)),
        "folding_percent": float(100.0 * (det <= 0).double().mean()),
        "jacobian_min": float(det.min()),
    }
