"""Pairwise registration evaluation with the Learn2Reg conventions: label Dice, SDlogJ, folding, seconds per pair.

* Dice per label, over the labels present in both the fixed and the moving label map (L2R ``compute_dice``);
  the pair's mean, then the mean over pairs. The moving label map is warped with nearest neighbour.
* SDlogJ as L2R computes it: ``std(log(clip(J + 3, 1e-9, 1e9)))`` over the field with 2 voxels cropped per side
  (the "+3" is L2R's, so values are much smaller than the textbook ``std(log J)``, which is also reported through
  ``common.evaluation.metrics.deformation_stats``), and the percentage of voxels with ``J <= 0``.
* Time from loaded tensors to the full-resolution field (CUDA synchronised).

:class:`PairRegistrationEvaluator` runs a registration inferer over a dataset of pairs
(``common.data.pairs.PairedDataset`` keys) and :class:`RegistrationReportHandler` writes ``<name>.csv|json|md`` with
one row per (pair, label) plus ``<name>_pairs.*`` (one row per pair: mean Dice, SDlogJ, folding, seconds).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from common.distributed import gather_rows, get_rank, is_distributed
from common.evaluation.metrics import deformation_stats, per_label_metrics
from common.evaluation.report import write_report
from common.io import atomic_json_dump, atomic_write_text
from common.registration import fields

__all__ = ["l2r_sdlogj", "pair_metrics", "prepare_pair_batch", "PairRegistrationEvaluator", "RegistrationReportHandler"]

logger = logging.getLogger(__name__)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def l2r_sdlogj(ddf: torch.Tensor, crop: int = 2) -> dict[str, float]:
    """L2R ``sdlogj`` (``std(log(clip(J + 3)))`` on the cropped field) and ``folding_percent`` of one voxel field."""
    field = _plain(ddf).float()
    field = field[None] if field.ndim == field.shape[0] + 1 else field
    det = fields.jacobian_determinant(field)[0]
    det = det[tuple(slice(crop, n - crop) for n in det.shape)].double()
    return {
        "sdlogj": float(torch.log((det + 3.0).clamp(1e-9, 1e9)).std(unbiased=False)),
        "folding_percent": float(100.0 * (det <= 0).double().mean()),
    }


def pair_metrics(
    fixed_label: torch.Tensor, moving_label: torch.Tensor, ddf: torch.Tensor | None, labels: Mapping[int, str]
) -> tuple[dict[str, float], dict[str, float]]:
    """``({label name: Dice}, summary)`` for one pair; ``ddf=None`` scores the unregistered pair.

    Labels absent from the fixed or the moving map are left out (L2R). ``summary`` holds ``dice`` (mean over the
    scored labels) and, with a field, ``sdlogj`` / ``folding_percent`` (L2R) and ``sdlogj_textbook``.
    """
    fixed = _plain(fixed_label).reshape(_plain(fixed_label).shape[-3:])
    moving = _plain(moving_label).reshape(fixed.shape).to(fixed.device)
    if ddf is None:
        warped = moving
    else:
        field = _plain(ddf).reshape(1, 3, *fixed.shape).float()
        warped = fields.warp_labels(moving[None, None].to(field.device), field)[0, 0]
    present_fixed, present_moving = set(torch.unique(fixed).tolist()), set(torch.unique(moving).tolist())
    scored = {int(k): v for k, v in labels.items() if int(k) in present_fixed and int(k) in present_moving}
    dice = {}
    if scored:
        result = per_label_metrics(warped.cpu(), fixed.cpu(), scored, metrics=("dice",))
        dice = {name: float(values["dice"]) for name, values in result.items()}
    summary = {"dice": float(np.mean(list(dice.values()))) if dice else float("nan")}
    if ddf is not None:
        summary.update(l2r_sdlogj(ddf))
        summary["sdlogj_textbook"] = deformation_stats(_plain(ddf).reshape(3, *fixed.shape))["sdlogj"]
    return dice, summary


def prepare_pair_batch(batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
    """``(inputs, targets)`` for registration engines: ``[B, 2, *S]`` (moving, fixed) and the fixed label (if any)."""
    pair = torch.cat([batchdata["moving_image"], batchdata["fixed_image"]], dim=1)
    label = batchdata.get("fixed_label")
    inputs = pair.to(device=device, non_blocking=non_blocking)
    return inputs, None if label is None else label.to(device=device, non_blocking=non_blocking)


class PairRegistrationEvaluator(SupervisedEvaluator):
    """Evaluator over pairs: ``ddf = inferer(pair, network)``; output items hold ``ddf``, ``warped`` (moving image
    on the fixed grid), ``pred`` (the warped moving label, when the batch has one), ``label`` (fixed label),
    ``moving_label``, ``image`` / ``moving_image`` (inputs with their meta) and ``seconds`` (inferer time per pair)."""

    def _iteration(self, engine: SupervisedEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = prepare_pair_batch(batchdata, engine.state.device, engine.non_blocking)
        sync = inputs.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(inputs.device)
        start = time.perf_counter()
        with engine.mode(engine.network):
            ddf = engine.inferer(inputs, engine.network)
        if sync:
            torch.cuda.synchronize(inputs.device)
        seconds = (time.perf_counter() - start) / inputs.shape[0]
        output = {Keys.IMAGE: batchdata["fixed_image"], Keys.LABEL: targets, "ddf": ddf}
        output["moving_image"] = batchdata["moving_image"]
        output["warped"] = fields.warp(inputs[:, :1].float(), ddf.float())
        output["seconds"] = torch.full((inputs.shape[0],), seconds)
        if "moving_label" in batchdata:
            moving_label = batchdata["moving_label"].to(ddf.device)
            output["moving_label"] = moving_label
            output[Keys.PRED] = fields.warp_labels(moving_label, ddf.to(torch.float32))
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output


class RegistrationReportHandler:
    """L2R metrics of every evaluated pair, written at EPOCH_COMPLETED and stored in ``engine.state.metrics``.

    ``engine.state.metrics`` receives ``mean_dice``, ``mean_sdlogj``, ``mean_folding_percent`` and
    ``seconds_per_pair``; the files are ``<name>.csv|json|md`` (per label) and ``<name>_pairs.csv|json|md``.
    ``history_file`` (optional, e.g. ``stage_curve.json``): one summary line per evaluator run is appended, which
    traces Dice over the self-training stages when the evaluator runs after every stage.
    Distributed: every rank gathers all ranks' rows (same metrics everywhere); rank 0 alone writes the files. A pair
    is named ``<moving>_to_<fixed>`` from its files, so names do not depend on which rank evaluated it.
    """

    def __init__(
        self,
        labels: Mapping[int | str, str],
        output_dir: str | Path,
        name: str = "registration",
        output_transform: Callable | None = None,
        history_file: str | Path | None = None,
    ) -> None:
        self.labels = {int(k): v for k, v in labels.items() if int(k) != 0}
        self.output_dir, self.name = Path(output_dir), name
        self.output_transform = output_transform
        self.history_file = None if history_file is None else Path(history_file)
        self.reset()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self) -> None:
        self.label_rows: list[dict] = []
        self.pair_rows: list[dict] = []

    def _items(self, output) -> list[dict]:
        output = self.output_transform(output) if self.output_transform is not None else output
        if isinstance(output, Mapping):
            batch = len(output["ddf"])
            return [{k: v[i] for k, v in output.items() if v is not None} for i in range(batch)]
        return list(output)

    def iteration_completed(self, engine: Engine) -> None:
        for item in self._items(engine.state.output):
            case = self._case_name(item)
            if item.get("moving_label") is not None and item.get(Keys.LABEL) is not None:
                dice, summary = pair_metrics(item[Keys.LABEL], item["moving_label"], item["ddf"], self.labels)
            else:
                dice, summary = {}, l2r_sdlogj(item["ddf"])
            self.label_rows += [{"case": case, "label": name, "dice": value} for name, value in dice.items()]
            self.pair_rows.append({"case": case, **summary, "seconds": float(item.get("seconds", float("nan")))})

    def _case_name(self, item: Mapping) -> str:
        fixed = getattr(item.get(Keys.LABEL), "meta", None) or getattr(item.get(Keys.IMAGE), "meta", None) or {}
        moving_data = item.get("moving_label") if item.get("moving_label") is not None else item.get("moving_image")
        moving = getattr(moving_data, "meta", None) or {}
        if "filename_or_obj" in fixed and "filename_or_obj" in moving:
            return f"{_stem(moving, 'moving')}_to_{_stem(fixed, 'fixed')}"
        rank = f"rank{get_rank()}_" if is_distributed() else ""
        return f"{rank}pair{len(self.pair_rows):04d}"

    def epoch_completed(self, engine: Engine) -> None:
        label_rows, pair_rows = gather_rows(self.label_rows), gather_rows(self.pair_rows)
        if not pair_rows:
            logger.warning("RegistrationReportHandler %r saw no pair; no report written", self.name)
            return
        summary = {
            "mean_dice": float(np.nanmean([r.get("dice", np.nan) for r in pair_rows])),
            "mean_sdlogj": float(np.mean([r["sdlogj"] for r in pair_rows])),
            "mean_folding_percent": float(np.mean([r["folding_percent"] for r in pair_rows])),
            "seconds_per_pair": float(np.mean([r["seconds"] for r in pair_rows])),
        }
        engine.state.metrics.update(summary)
        if get_rank() != 0:
            return
        if label_rows:
            write_report(label_rows, self.output_dir, self.name)
        write_report(pair_rows, self.output_dir, f"{self.name}_pairs", group_key="case")
        if self.history_file is not None:
            previous = self.history_file.read_text() if self.history_file.is_file() else ""
            line = json.dumps({"num_pairs": len(pair_rows), **summary})
            atomic_write_text(self.history_file, previous + line + "\n")
        logger.info("%s: %s", self.name, ", ".join(f"{k} = {v:.4f}" for k, v in summary.items()))


def _stem(meta: Mapping | None, default: str) -> str:
    name = str((meta or {}).get("filename_or_obj", default))
    return Path(name).name.split(".")[0]


class NamePairOutputsd:
    """Postprocessing: give the ``keys`` of an output item the fixed image's affine and the file name
    ``<moving stem>_to_<fixed stem>``, so ``SaveImaged`` writes ``<moving>_to_<fixed>_<postfix>.nii.gz`` on the fixed
    image's grid. Missing keys are skipped."""

    def __init__(self, keys: Sequence[str], fixed_key: str = "image", moving_key: str = "moving_image") -> None:
        self.keys, self.fixed_key, self.moving_key = list(keys), fixed_key, moving_key

    def __call__(self, item: Mapping) -> dict:
        out = dict(item)
        fixed_meta = getattr(item[self.fixed_key], "meta", {})
        moving_meta = getattr(item.get(self.moving_key), "meta", {})
        name = f"{_stem(moving_meta, 'moving')}_to_{_stem(fixed_meta, 'fixed')}"
        for key in self.keys:
            if key in out and out[key] is not None:
                meta = {"affine": fixed_meta.get("affine"), "filename_or_obj": name}
                out[key] = MetaTensor(_plain(out[key]).detach().cpu(), meta=meta)
        return out


def evaluate_checkpoints(
    evaluator: Engine, network: torch.nn.Module, paths: Sequence[str | Path], output_file: str | Path
) -> list[dict]:
    """Run ``evaluator`` once per weight file (state dicts of ``network``) and write the metric table.

    Used for the Dice over self-training stages (the paper's Fig. 1): ``stage_00.pt`` is the random stage-0 network.
    Writes ``output_file`` (JSON rows) and the same table as markdown next to it; returns the rows.
    """
    if not paths:
        raise ValueError("evaluate_checkpoints: no weight files given")
    rows = []
    for path in paths:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=True)
        evaluator.run()
        metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}
        rows.append({"checkpoint": Path(path).stem, **metrics})
        logger.info("%s: %s", Path(path).name, metrics)
    output_file = Path(output_file)
    atomic_json_dump(rows, output_file)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append(
            "| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |"
        )
    atomic_write_text(output_file.with_suffix(".md"), "\n".join(lines) + "\n")
    return rows
