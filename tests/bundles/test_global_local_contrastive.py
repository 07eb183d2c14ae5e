"""Harness run of the global/local contrastive bundle: three training stages on a tiny synthetic cardiac set."""

from tests.bundles.harness import BundleCase, make_bundle_tests

STAGES = [
    ["configs/train.json", "configs/pretrain_global.json"],
    ["configs/train.json", "configs/pretrain_global.json", "configs/pretrain_local.json"],
    ["configs/train.json"],
]

TRAIN_OVERRIDES = {
    "epochs": 1,
    "iterations_per_epoch": 2,
    "pretrain_epochs": 1,
    "pretrain_iterations_per_epoch": 2,
    "volumes_per_batch": 2,
    "finetune_batch_size": 4,
    "num_workers": 0,
    "projection_hidden_features": 16,
}

CASE = BundleCase(
    name="global_local_contrastive_cardiac_mri_segmentation",
    preset="cardiac",
    shape=(64, 64, 10),
    num_subjects=6,
    overrides={"image_size": 32, "target_spacing": [2.0, 2.0], "slice_batch_size": 16},
    train_overrides=TRAIN_OVERRIDES,
    train_stages=STAGES,
    checkpoint_files=["model.pt", "model_global.pt", "model_local.pt"],
    evaluate_outputs=["*.csv", "*.png"],
    # the CLI run checks the random-initialisation baseline override of the fine-tuning stage
    cli_stage=2,
    cli_overrides={**TRAIN_OVERRIDES, "load_pretrained": False},
    prediction_glob="**/*_seg.nii.gz",
)
TestGlobalLocalContrastiveBundle = make_bundle_tests(CASE)
