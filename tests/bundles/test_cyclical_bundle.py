"""Cyclical self-training bundle through the shared harness (tiny synthetic abdomen set, 2 stages of 2 iterations),
plus its extra workflows: Fig. 1 stage curve and atlas-segmentation inference."""

import json
from pathlib import Path

import nibabel as nib

from tests.bundles.harness import BundleCase, make_bundle_tests, run_workflow

TINY = {"image_size": [32, 32, 32], "feature_channels": [8, 8, 8, 8, 8], "adam_iterations": 2}

CASE = BundleCase(
    name="cyclical_self_training_abdomen_ct_registration",
    preset="abdomen",
    shape=(32, 32, 32),
    num_subjects=7,
    dataset_kwargs={"num_validation": 2, "num_test": 2},
    overrides=TINY,
    train_overrides={"num_stages": 2, "iterations_per_stage": 2, "loss_crop": 2, "checkpoint_interval": 1},
    evaluate_outputs=["registration.csv", "registration_pairs.json", "segmentation_dice_boxplot.png"],
    prediction_glob="*_warped_label.nii.gz",
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

    def test_atlas_inference(self, trained):
        overrides = self._overrides(trained, "atlas")
        files = ["configs/inference.json", "configs/inference_atlas.json"]
        assert not run_workflow(CASE.bundle_root, files, "infer", overrides)
        segs = sorted(Path(overrides["output_dir"]).glob("*_seg.nii.gz"))
        assert len(segs) == 2, segs
        assert all(nib.load(str(p)).get_fdata().max() > 0 for p in segs)

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
        assert not run_workflow(CASE.bundle_root, ["configs/inference.json"], "infer", overrides)
        assert len(sorted(Path(overrides["output_dir"]).glob("*_warped_label.nii.gz"))) == 1
        overrides = self._overrides(workspace, "affine_atlas", infer)
        files = ["configs/inference.json", "configs/inference_atlas.json"]
        assert not run_workflow(CASE.bundle_root, files, "infer", overrides)
        segs = sorted(Path(overrides["output_dir"]).glob("*_seg.nii.gz"))
        tests = json.loads(workspace["datalist"].read_text())["test"]
        assert [p.name for p in segs] == sorted(Path(e["image"]).name.replace(".nii.gz", "_seg.nii.gz") for e in tests)
        for seg, entry in zip(segs, sorted(tests, key=lambda e: e["image"])):
            source = nib.load(str(workspace["data_dir"] / entry["image"]))
            assert nib.load(str(seg)).shape == source.shape and nib.load(str(seg)).get_fdata().max() > 0
