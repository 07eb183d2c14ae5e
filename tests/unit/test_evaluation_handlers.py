"""SegmentationReportHandler inside a real MONAI SupervisedEvaluator, built the way a bundle config builds it."""

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator

from common.evaluation.handlers import SegmentationReportHandler, spacing_from_meta

SHAPE = (16, 16, 16)


class OneHotOfImage(torch.nn.Module):
    """'Segments' by reading the label value stored in the image: logits = one-hot of round(image)."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].round().long(), 3).permute(0, 4, 1, 2, 3).float()


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def make_cases(spacing):
    base = np.zeros(SHAPE, dtype=np.float32)
    base[3:11, 3:11, 3:11], base[5:9, 5:9, 5:9] = 1, 2
    affine = np.diag([*spacing, 1.0])
    preds = [base, np.roll(base, 2, axis=0), np.roll(base, 1, axis=1)]
    cases = []
    for i, pred in enumerate(preds):
        meta = {"filename_or_obj": f"/data/labelsTr/sub{i:03d}.nii.gz"}
        cases.append(
            {
                "image": MetaTensor(torch.from_numpy(pred)[None], affine=affine, meta=dict(meta)),
                "label": MetaTensor(torch.from_numpy(base)[None], affine=affine, meta=dict(meta)),
            }
        )
    return base, preds, cases


def run_evaluator(handler, cases, batch_size=2, postprocessing=None):
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(cases), batch_size=batch_size),
        network=OneHotOfImage(),
        postprocessing=postprocessing,
        val_handlers=[handler],
    )
    evaluator.run()
    return evaluator


def test_report_from_monai_evaluator(tmp_path):
    base, preds, cases = make_cases((2.0, 2.0, 2.0))
    config = {
        "handler": {
            "_target_": "common.evaluation.handlers.SegmentationReportHandler",
            "labels": {"1": "outer", "2": "inner"},
            "output_dir": str(tmp_path),
            "name": "val",
            "regions": {"all": [1, 2]},
            "image_key": "image",
            "num_overlays": 1,
        }
    }
    handler = ConfigParser(config).get_parsed_content("handler")
    evaluator = run_evaluator(handler, cases)

    expected = [[dice(p == k, base == k) for k in (1, 2)] for p in preds]  # per case, per label, counted by hand
    assert evaluator.state.metrics["mean_dice"] == pytest.approx(np.mean(expected), abs=1e-6)
    doc = json.loads((tmp_path / "val.json").read_text())
    rows = {(r["case"], r["label"]): r for r in doc["rows"]}
    assert len(rows) == 6
    for i, per_label in enumerate(expected):
        for name, value in zip(("outer", "inner"), per_label):
            row = rows[(f"sub{i:03d}", name)]
            assert row["dice"] == pytest.approx(value, abs=1e-6) and row["units"] == "mm"
    # case 1 is shifted by 2 voxels along axis 0 at 2 mm: the far faces are 4 mm apart
    assert rows[("sub001", "outer")]["hd95"] == pytest.approx(4.0)
    region = json.loads((tmp_path / "val_regions.json").read_text())["rows"]
    assert region[1]["dice"] == pytest.approx(dice(preds[1] > 0, base > 0), abs=1e-6)
    for name in ("val.csv", "val.md", "val_dice_boxplot.png", "val_sub000.png", "val_regions.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert not (tmp_path / "val_sub001.png").exists()  # only num_overlays previews


def test_identity_affine_means_voxel_units_and_deformation_report(tmp_path):
    base, preds, cases = make_cases((1.0, 1.0, 1.0))
    assert spacing_from_meta(cases[0]["label"], 3) is None

    handler = SegmentationReportHandler(
        {1: "outer"}, tmp_path, name="reg", summary_of="labels", ddf_key="ddf", metric_name="dice_outer", boxplot=False
    )

    def add_field(item):  # a registration bundle's evaluator would put its displacement field in the output
        return {**item, "ddf": torch.zeros(3, *SHAPE)}

    evaluator = run_evaluator(handler, cases, batch_size=3, postprocessing=add_field)
    assert evaluator.state.metrics["dice_outer"] == pytest.approx(np.mean([dice(p == 1, base == 1) for p in preds]))
    assert evaluator.state.metrics["mean_folding_percent"] == 0.0 and evaluator.state.metrics["mean_sdlogj"] == 0.0
    rows = json.loads((tmp_path / "reg.json").read_text())["rows"]
    assert {r["units"] for r in rows} == {"voxel"} and rows[1]["hd95"] == pytest.approx(2.0)
    assert (tmp_path / "reg_deformation.csv").exists() and not (tmp_path / "reg_dice_boxplot.png").exists()


def test_output_transform_with_batched_one_hot(tmp_path):
    from ignite.engine import Engine

    gt = torch.zeros(2, 1, *SHAPE, dtype=torch.long)
    gt[:, :, 2:8, 2:8, 2:8] = 1
    pred = torch.nn.functional.one_hot(gt[:, 0], 2).permute(0, 4, 1, 2, 3)
    pred[1] = pred[1].roll(3, dims=1)
    handler = SegmentationReportHandler([1], tmp_path, output_transform=lambda out: (out["p"], out["y"]), spacing=None)
    engine = Engine(lambda e, b: {"p": pred, "y": gt})
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    expected = (1.0 + dice(pred[1, 1].numpy() > 0, gt[1, 0].numpy() > 0)) / 2
    assert engine.state.metrics["mean_dice"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="summary_of"):
        SegmentationReportHandler([1], tmp_path, summary_of="regions")


def test_overlay_previews_first_cases_of_each_run(tmp_path):
    """Validation previews: only the first ``num_previews`` cases, overwritten at each run, one-hot items accepted."""
    from common.evaluation.handlers import OverlayPreviewHandler

    _, _, cases = make_cases((1.0, 1.0, 1.0))

    def one_hot_label(item):  # as the bundles' AsDiscreted leaves the ground truth
        return {**item, "label": torch.nn.functional.one_hot(item["label"][0].long(), 3).permute(3, 0, 1, 2).float()}

    handler = OverlayPreviewHandler(tmp_path, num_previews=2, name="validation")
    evaluator = run_evaluator(handler, cases, postprocessing=one_hot_label)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["validation_sub000.png", "validation_sub001.png"]
    evaluator.run()  # a second validation rewrites the same files
    assert len(list(tmp_path.iterdir())) == 2 and len(handler.written) == 2
    off = tmp_path / "off"
    run_evaluator(OverlayPreviewHandler(off, num_previews=0), cases, postprocessing=one_hot_label)
    assert not off.exists()  # --val_previews 0: no preview
    with pytest.raises(ValueError, match="num_previews"):
        OverlayPreviewHandler(tmp_path, num_previews=-1)


def test_overlay_preview_skips_image_on_another_grid(tmp_path, caplog):
    from common.evaluation.handlers import OverlayPreviewHandler

    _, _, cases = make_cases((1.0, 1.0, 1.0))

    def shrink_image(item):  # the image's preprocessing was not inverted
        return {**item, "image": item["image"][:, ::2]}

    handler = OverlayPreviewHandler(tmp_path, num_previews=1)
    run_evaluator(handler, cases, postprocessing=shrink_image)
    assert not list(tmp_path.glob("*.png")) and "differ in shape" in caplog.text


def test_overlay_previews_only_on_rank0(tmp_path, monkeypatch):
    import common.distributed
    import common.evaluation.handlers as handlers

    _, _, cases = make_cases((1.0, 1.0, 1.0))
    handler = handlers.OverlayPreviewHandler(tmp_path, num_previews=2)
    monkeypatch.setattr(common.distributed, "get_rank", lambda: 1)
    assert common.distributed.rank0_handlers([handler]) == []  # dropped from multi-GPU handler lists
    monkeypatch.setattr(handlers, "get_rank", lambda: 1)
    run_evaluator(handler, cases)  # and silent if attached anyway
    assert not list(tmp_path.glob("*.png"))
