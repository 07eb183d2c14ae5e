"""Ignite handlers for evaluator runs: per-case, per-label reports (CSV/JSON/markdown + box plot) and PNG previews.

Attach the report handler through a bundle config's handler list, e.g. in ``validate#handlers`` or inference
``handlers``::

    {"_target_": "common.evaluation.handlers.SegmentationReportHandler",
     "labels": {"1": "RV", "2": "MYO", "3": "LV"}, "output_dir": "@output_dir"}

It reads the output MONAI's evaluators leave in ``engine.state.output`` after decollation and postprocessing, so its
numbers are those of the saved predictions. The mean Dice it stores in ``engine.state.metrics`` is written at
EPOCH_COMPLETED, after MONAI has already compared key metrics; to select the best checkpoint by mean Dice use MONAI's
``MeanDice`` handler as ``key_metric`` (an ignite ``Metric``) and keep this handler for the detailed report.

``OverlayPreviewHandler`` only draws the first few cases (image, prediction, ground truth), e.g. during validation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.distributed import gather_rows, get_rank, is_distributed
from common.evaluation.figures import save_dice_boxplot, save_overlay_png
from common.evaluation.metrics import DEFAULT_METRICS, deformation_stats, per_label_metrics, region_metrics
from common.evaluation.report import rows_from_metrics, write_report

logger = logging.getLogger(__name__)


def _to_label_map(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """``[C, *spatial]`` one-hot/probabilities (C > 1, argmax) or ``[1, *spatial]`` label map -> ``[*spatial]``."""
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    if t.ndim == spatial_dims:
        return t
    if t.ndim != spatial_dims + 1:
        raise ValueError(f"expected [C, *spatial] with {spatial_dims} spatial dims per case, got {tuple(t.shape)}")
    return t.argmax(dim=0) if t.shape[0] > 1 else t[0]


def spacing_from_meta(x, spatial_dims: int) -> tuple[float, ...] | None:
    """Voxel size from a MetaTensor's affine (column norms); None when unknown or when the affine is the identity.

    An identity affine is what loaders write when the file carried no geometry (e.g. the ACDC copy used here), so it is
    treated as "spacing unknown" and distances are reported in voxels.
    """
    affine = getattr(x, "affine", None)
    if affine is None:
        return None
    a = np.asarray(affine.detach().cpu() if torch.is_tensor(affine) else affine, dtype=float)
    if a.ndim == 3:
        a = a[0]
    if np.allclose(a, np.eye(a.shape[0])):
        return None
    return tuple(float(v) for v in np.linalg.norm(a[:spatial_dims, :spatial_dims], axis=0))


def case_name(x, default: str) -> str:
    """File name (without .nii/.nii.gz) recorded in a MetaTensor's meta, else ``default``."""
    meta = getattr(x, "meta", None) or {}
    source = meta.get("filename_or_obj")
    if isinstance(source, (list, tuple)):
        source = source[0] if source else None
    if not source:
        return default
    name = Path(str(source)).name
    for ext in (".nii.gz", ".nii", ".npy", ".png"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def save_case_overlay(
    image, pred, gt, path: Path, spatial_dims: int, spacing: Sequence[float] | None = None, title: str | None = None
) -> Path | None:
    """``path``: the image (first channel) bare, under the prediction and under the ground truth (label maps, one-hot
    or scores; see `_to_label_map`). None, with a warning, when the image is on another grid than the labels (the
    preprocessing of the image key was not inverted), since the overlay would be misaligned."""
    image = image[0] if image.ndim == spatial_dims + 1 else image  # first channel of [C, *spatial]
    pred, gt = _to_label_map(pred, spatial_dims), _to_label_map(gt, spatial_dims)
    if tuple(image.shape) != tuple(gt.shape) or tuple(pred.shape) != tuple(gt.shape):
        logger.warning(
            "no preview %s: image %s, prediction %s and ground truth %s differ in shape (invert the image's "
            "preprocessing too)",
            path.name,
            tuple(image.shape),
            tuple(pred.shape),
            tuple(gt.shape),
        )
        return None
    maps = {"prediction": pred.cpu(), "ground truth": gt.cpu()}
    return save_overlay_png(image, maps, path, spacing=spacing, title=title)


class SegmentationReportHandler:
    """Per-case, per-label Dice / HD95 / ASSD over one evaluator epoch, written as a report at EPOCH_COMPLETED.

    Args:
        labels: ``{id: name}`` of the labels to score (string keys, as in datalist JSON, are fine) or a list of ids.
        output_dir: folder of the report files ``<name>.csv|json|md`` and ``<name>_dice_boxplot.png``.
        name: report base name.
        pred_key, label_key: keys of the prediction and the ground truth in each decollated output item.
        output_transform: optional ``f(engine.state.output) -> (preds, labels)``, each a batched ``[B, C, *spatial]``
            tensor or a list of ``[C, *spatial]`` tensors; overrides the two keys.
        spatial_dims: 3 for volumes, 2 for slices. Items are ``[C, *spatial]``: C > 1 is one-hot or scores (argmax is
            taken, so channel c means label value c), C == 1 is a label map.
        spacing: ``"meta"`` (voxel size from the label's MetaTensor affine, see `spacing_from_meta`), a sequence, or
            None (voxel units).
        metrics: metric names (`common.evaluation.metrics.SUPPORTED_METRICS`).
        regions: optional ``{region: [ids]}`` (e.g. ``REGION_GROUPS["lpba40"]``); adds ``<name>_regions.*``.
        summary_of: ``"labels"`` or ``"regions"``: which mean Dice goes into ``engine.state.metrics[metric_name]``.
        metric_name: the key in ``engine.state.metrics``.
        both_empty, missing_distance: empty-mask policy, see `common.evaluation.metrics`.
        ddf_key: optional key of a displacement field in each item; adds ``<name>_deformation.*`` (SDlogJ, % folding)
            and ``mean_sdlogj`` / ``mean_folding_percent`` metrics.
        image_key, num_overlays: with an image key, the first ``num_overlays`` cases also get
            ``<name>_<case>.png`` (image, prediction, ground truth).
        boxplot: write the Dice box plot.
    In distributed runs every rank computes its cases; rows are gathered and rank 0 writes the files.
    """

    def __init__(
        self,
        labels: Mapping[int, str] | Sequence[int],
        output_dir: str | Path,
        name: str = "segmentation_report",
        pred_key: str = "pred",
        label_key: str = "label",
        output_transform: Callable | None = None,
        spatial_dims: int = 3,
        spacing: str | Sequence[float] | None = "meta",
        metrics: Sequence[str] = DEFAULT_METRICS,
        regions: Mapping[str, Sequence[int]] | None = None,
        summary_of: str = "labels",
        metric_name: str = "mean_dice",
        both_empty: str = "perfect",
        missing_distance: str | float = "diagonal",
        ddf_key: str | None = None,
        image_key: str | None = None,
        num_overlays: int = 0,
        boxplot: bool = True,
    ) -> None:
        if summary_of not in ("labels", "regions") or (summary_of == "regions" and not regions):
            raise ValueError(f"summary_of must be 'labels', or 'regions' with regions given; got {summary_of!r}")
        if "dice" not in metrics:
            raise ValueError("SegmentationReportHandler needs 'dice' in metrics (it stores the mean Dice)")
        self.labels = labels
        self.output_dir = Path(output_dir)
        self.name = name
        self.pred_key, self.label_key = pred_key, label_key
        self.output_transform = output_transform
        self.spatial_dims = spatial_dims
        self.spacing = spacing
        self.metrics = tuple(metrics)
        self.regions = regions
        self.summary_of = summary_of
        self.metric_name = metric_name
        self.both_empty, self.missing_distance = both_empty, missing_distance
        self.ddf_key, self.image_key, self.num_overlays = ddf_key, image_key, num_overlays
        self.boxplot = boxplot
        self.reset()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self) -> None:
        self.label_rows: list[dict] = []
        self.region_rows: list[dict] = []
        self.deformation_rows: list[dict] = []
        self._count = 0
        self._cases: set[str] = set()
        self.written: list[Path] = []

    def _items(self, output) -> list[dict]:
        if self.output_transform is not None:
            preds, labels = self.output_transform(output)[:2]
            return [{self.pred_key: p, self.label_key: y} for p, y in zip(preds, labels)]
        if isinstance(output, Mapping):  # not decollated: batched tensors
            batch = len(output[self.pred_key])
            keys = [k for k in (self.pred_key, self.label_key, self.ddf_key, self.image_key) if k is not None]
            return [{k: output[k][i] for k in keys if k in output} for i in range(batch)]
        return list(output)

    def _spacing_for(self, label) -> Sequence[float] | None:
        if isinstance(self.spacing, str):
            if self.spacing != "meta":
                raise ValueError(f"spacing must be 'meta', a sequence or None, got {self.spacing!r}")
            return spacing_from_meta(label, self.spatial_dims)
        return self.spacing

    def iteration_completed(self, engine: Engine) -> None:
        for item in self._items(engine.state.output):
            if self.pred_key not in item or self.label_key not in item:
                raise KeyError(
                    f"SegmentationReportHandler: output item has keys {sorted(item)}, expected "
                    f"{self.pred_key!r} and {self.label_key!r}; set pred_key/label_key or output_transform"
                )
            label_src = item[self.label_key]
            pred = _to_label_map(item[self.pred_key], self.spatial_dims)
            gt = _to_label_map(label_src, self.spatial_dims)
            spacing = self._spacing_for(label_src)
            case = case_name(label_src, f"case{self._rank_prefix()}{self._count:04d}")
            if case in self._cases:  # e.g. one ground truth scored against several predictions
                case = f"{case}_{self._count:04d}"
            self._cases.add(case)
            kwargs = dict(
                spacing=spacing,
                metrics=self.metrics,
                both_empty=self.both_empty,
                missing_distance=self.missing_distance,
            )
            self.label_rows += rows_from_metrics(case, per_label_metrics(pred, gt, self.labels, **kwargs))
            if self.regions:
                self.region_rows += rows_from_metrics(case, region_metrics(pred, gt, self.regions, **kwargs))
            if self.ddf_key is not None and self.ddf_key in item:
                self.deformation_rows.append({"case": case, **deformation_stats(item[self.ddf_key])})
            if self.image_key is not None and self._count < self.num_overlays and self.image_key in item:
                path = self.output_dir / f"{self.name}_{case}.png"
                written = save_case_overlay(item[self.image_key], pred, gt, path, self.spatial_dims, spacing, case)
                self.written += [written] if written is not None else []
            self._count += 1

    @staticmethod
    def _rank_prefix() -> str:
        """ "r<rank>_" in distributed runs, so that fallback case names stay unique after gathering."""
        return f"r{get_rank()}_" if is_distributed() else ""

    @staticmethod
    def _mean_of_case_means(rows: list[dict], metric: str) -> float:
        """Mean over cases of each case's mean over labels (NaN entries ignored at both levels)."""
        per_case: dict[str, list[float]] = {}
        for r in rows:
            per_case.setdefault(r["case"], []).append(float(r[metric]))
        means = np.array([np.nanmean(v) if not np.all(np.isnan(v)) else np.nan for v in per_case.values()])
        return float(np.nanmean(means)) if not np.all(np.isnan(means)) else float("nan")

    def epoch_completed(self, engine: Engine) -> None:
        label_rows = gather_rows(self.label_rows)
        region_rows = gather_rows(self.region_rows)
        deformation_rows = gather_rows(self.deformation_rows)
        if not label_rows:
            logger.warning("SegmentationReportHandler %r saw no case; no report written", self.name)
            return
        summary_rows = region_rows if self.summary_of == "regions" else label_rows
        engine.state.metrics[self.metric_name] = self._mean_of_case_means(summary_rows, "dice")
        if deformation_rows:
            for key in ("sdlogj", "folding_percent"):
                engine.state.metrics[f"mean_{key}"] = float(np.mean([r[key] for r in deformation_rows]))
        if get_rank() != 0:
            return
        self.written += write_report(label_rows, self.output_dir, self.name)
        if region_rows:
            self.written += write_report(region_rows, self.output_dir, f"{self.name}_regions")
        if deformation_rows:
            self.written += write_report(deformation_rows, self.output_dir, f"{self.name}_deformation")
        if self.boxplot:
            rows = region_rows if self.summary_of == "regions" else label_rows
            path = self.output_dir / f"{self.name}_dice_boxplot.png"
            self.written.append(save_dice_boxplot(rows, path, title=f"{self.name}: Dice per structure"))
        logger.info(
            "%s: %s = %.4f over %d cases -> %s",
            self.name,
            self.metric_name,
            engine.state.metrics[self.metric_name],
            len({r["case"] for r in label_rows}),
            self.output_dir,
        )


class OverlayPreviewHandler:
    """PNG previews of the first ``num_previews`` cases of every evaluator run: image, prediction, ground truth.

    Why: a glance at validation during training (is the network segmenting anything, is the overlay on the anatomy)
    without a full report. Written to ``<output_dir>/<name>_<case>.png``, where the case name comes from the ground
    truth's file name (made unique with the item index when several items share it, e.g. registration pairs with one
    fixed image); the same cases are overwritten at each validation, so the folder stays small. The image and both
    label maps must be on one grid (invert the image's preprocessing with the prediction's). Only rank 0 writes.

    Args:
        output_dir: folder of the PNGs.
        num_previews: how many cases per run (0 disables the handler).
        name: file name prefix.
        image_key, pred_key, label_key: keys of a decollated output item (or of a batched output dict).
        spatial_dims: 3 for volumes, 2 for slices; label items are ``[C, *spatial]`` (one-hot, scores or a label map).
        spacing: ``"meta"`` (from the label's affine, see `spacing_from_meta`), a sequence, or None.
    """

    def __init__(
        self,
        output_dir: str | Path,
        num_previews: int = 2,
        name: str = "preview",
        image_key: str = "image",
        pred_key: str = "pred",
        label_key: str = "label",
        spatial_dims: int = 3,
        spacing: str | Sequence[float] | None = "meta",
    ) -> None:
        if int(num_previews) < 0:
            raise ValueError(f"num_previews must be >= 0, got {num_previews}")
        if isinstance(spacing, str) and spacing != "meta":
            raise ValueError(f"spacing must be 'meta', a sequence or None, got {spacing!r}")
        self.output_dir = Path(output_dir)
        self.num_previews = int(num_previews)
        self.name = name
        self.image_key, self.pred_key, self.label_key = image_key, pred_key, label_key
        self.spatial_dims = spatial_dims
        self.spacing = spacing
        self._count = 0
        self._cases: set[str] = set()
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        if self.num_previews > 0:
            engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def reset(self, engine: Engine | None = None) -> None:
        self._count = 0
        self._cases = set()
        self.written = []

    def _items(self, output) -> list[Mapping]:
        if isinstance(output, Mapping):  # not decollated: batched tensors
            keys = [k for k in (self.image_key, self.pred_key, self.label_key) if output.get(k) is not None]
            return [{k: output[k][i] for k in keys} for i in range(len(output[self.pred_key]))]
        return list(output or [])

    def __call__(self, engine: Engine) -> None:
        if get_rank() != 0:
            return
        for item in self._items(engine.state.output):
            if self._count >= self.num_previews:
                return
            if any(item.get(k) is None for k in (self.image_key, self.pred_key, self.label_key)):
                raise KeyError(
                    f"OverlayPreviewHandler: output item has keys {sorted(item)}, expected {self.image_key!r}, "
                    f"{self.pred_key!r} and {self.label_key!r}"
                )
            label = item[self.label_key]
            case = case_name(label, f"case{self._count:04d}")
            case = f"{case}_{self._count:02d}" if case in self._cases else case
            self._cases.add(case)
            spacing = spacing_from_meta(label, self.spatial_dims) if self.spacing == "meta" else self.spacing
            path = self.output_dir / f"{self.name}_{case}.png"
            written = save_case_overlay(
                item[self.image_key], item[self.pred_key], label, path, self.spatial_dims, spacing, case
            )
            self.written += [written] if written is not None else []
            self._count += 1
