"""Cyclical self-training bundle through the shared harness (tiny synthetic abdomen set, 2 stages of 2 iterations),
plus its extra workflows: Fig. 1 stage curve, pair registration, atlas outputs and affine pre-alignment.

``network_def`` of inference is the atlas segmenter; the harness runs it without the Adam refinement
(``test_use_adam`` False), which a trace export cannot record; the default (with Adam) runs in the extra tests."""

import json
from pathlib import Path

import nibabel as nib
import pytest

from common.cli_checks import ConfigOverrideError
from tests.bundles.harness import BundleCase, make_bundle_tests, run_workflow
from tests.robustness.support import describe, find_error

TINY = {"image_size": [32, 32, 32], "feature_channels": [8, 8, 8, 8, 8], "adam_iterations": 2}

CASE = BundleCase(
    name="cyclical_self_training_abdomen_ct_registration",
    preset="abdomen",
    shape=(32, 32, 32),
    num_subjects=7,
    dataset_kwargs={"num_validation": 2, "num_test": 2},
    overrides=TINY,
    train_overrides={"num_stages": 2, "iterations_per_stage": 2, "loss_crop": 2, "checkpoint_interval": 1},
    infer_overrides={"test_use_adam": False},
    evaluate_outputs=["registration.csv", "registration_pairs.json", "segmentation_dice_boxplot.png"],
    prediction_glob="*_seg.nii.gz",
    require_foreground=True,
    use_trace=True,
    export_input_shape=(1, 1, 32, 32, 32),
)


class TestCyclicalBundle(make_bundle_tests(CASE)):
    def test_stage_curve(self, trained):
        overrides = self._overrides(trained, "stages")
        files = ["configs/train.json", "configs/evaluate.json", "configs/evaluate_stages.json"]
        assert not run_workflow(CASE.bundle_root, files, "train", overrides)
        rows = json.loads((Path(overrides["output_dir"]) / "stage_curve.json").read_text())
        # stage_00 = the random network g_A, then one row per trained stage
        assert [r["checkpoint"] for r in rows] == ["stage_00", "stage_01", "stage_02"]
        assert all(0.0 <= r["mean_dice"] <= 1.0 for r in rows)

    def test_evaluation_of_one_volume_fails_clearly(self, trained):
        """Evaluation scores i<j pairs: a section with one volume has none, and must stop instead of writing nothing."""
        datalist = json.loads(trained["datalist"].read_text())
        datalist["test"] = datalist["test"][:1]
        one = trained["datalist"].with_name("one_test_volume.json")  # beside it: relative paths stay valid
        one.write_text(json.dumps(datalist))
        overrides = self._overrides(trained, "one_volume", {"datalist": str(one)})
        with pytest.raises(Exception) as info:
            run_workflow(CASE.bundle_root, ["configs/train.json", "configs/evaluate.json"], "train", overrides)
        error = find_error(info.value, ConfigOverrideError)
        assert error is not None, describe(info.value)
        assert "section test has 1 item(s)" in str(error) and "evaluation pairs" in str(error), str(error)
        assert not (Path(overrides["output_dir"]) / "registration.csv").exists()

    def test_registration_mode(self, trained):
        """``inference_registration.json``: every i<j test pair -> field, warped image and warped label (Adam on)."""
        overrides = self._overrides(trained, "pairs")
        files = ["configs/inference.json", "configs/inference_registration.json"]
        assert not run_workflow(CASE.bundle_root, files, "infer", overrides)
        out = Path(overrides["output_dir"])
        for suffix in ("_ddf", "_warped", "_warped_label"):
            assert len(sorted(out.glob(f"*_to_*{suffix}.nii.gz"))) == 1, suffix  # 2 test volumes -> 1 pair

    def test_atlas_outputs(self, trained):
        """``inference_atlas_outputs.json``: the segmentation plus the atlas field and the warped atlas image."""
        overrides = self._overrides(trained, "atlas", {"save_ddf": True, "save_warped": True})
        files = ["configs/inference.json", "configs/inference_atlas_outputs.json"]
        assert not run_workflow(CASE.bundle_root, files, "infer", overrides)
        out = Path(overrides["output_dir"])
        for suffix in ("_seg", "_ddf", "_warped_atlas"):
            assert len(sorted(out.glob(f"*{suffix}.nii.gz"))) == 2, suffix
        assert all(nib.load(str(p)).get_fdata().max() > 0 for p in out.glob("*_seg.nii.gz"))

    def test_affine_prealign_train_and_infer(self, workspace):
        """``--affine_prealign True``: one matrix file per training pair beside the bank, and inference / atlas
        segmentation through the composed affine + deformable field, written on the inputs' grids."""
        fast = {"affine_prealign": True, "affine_levels": [2, 1], "affine_iterations": [5, 5]}
        ckpt = str(workspace["tmp"] / "affine_models")
        train = {**CASE.train_overrides, "num_stages": 1, "iterations_per_stage": 1, **fast, "ckpt_dir": ckpt}
        assert not run_workflow(
            CASE.bundle_root, ["configs/train.json"], "train", self._overrides(workspace, "affine_train", train)
        )
        matrices = sorted((Path(ckpt) / "prealignment").glob("affine_*.pt"))
        assert len(matrices) == 3, matrices  # 3 training volumes -> 3 pairs
        infer = {**fast, "ckpt_dir": ckpt}
        overrides = self._overrides(workspace, "affine_infer", infer)
        files = ["configs/inference.json", "configs/inference_registration.json"]
        assert not run_workflow(CASE.bundle_root, files, "infer", overrides)
        assert len(sorted(Path(overrides["output_dir"]).glob("*_warped_label.nii.gz"))) == 1
        overrides = self._overrides(workspace, "affine_atlas", infer)
        assert not run_workflow(CASE.bundle_root, ["configs/inference.json"], "infer", overrides)
        segs = sorted(Path(overrides["output_dir"]).glob("*_seg.nii.gz"))
        tests = json.loads(workspace["datalist"].read_text())["test"]
        assert [p.name for p in segs] == sorted(Path(e["image"]).name.replace(".nii.gz", "_seg.nii.gz") for e in tests)
        for seg, entry in zip(segs, sorted(tests, key=lambda e: e["image"])):
            source = nib.load(str(workspace["data_dir"] / entry["image"]))
            assert nib.load(str(seg)).shape == source.shape and nib.load(str(seg)).get_fdata().max() > 0
