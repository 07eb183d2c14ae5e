"""CLMorph bundle through the shared harness (tiny synthetic brain set, 1 epoch)."""

from tests.bundles.harness import BundleCase, make_bundle_tests

CASE = BundleCase(
    name="clmorph_brain_mri_registration",
    preset="brain",
    shape=(32, 32, 32),
    num_subjects=6,
    overrides={"image_size": [32, 32, 32]},
    train_overrides={
        "epochs": 1,
        "batch_size": 2,
        "pairs_per_epoch": 4,
        "crop_size": [32, 32, 32],
        "val_interval": 1,
        "encoder_channels": [8, 8, 8, 8],
        "decoder_channels": [8, 8, 8, 8, 8, 8, 8],
    },
    evaluate_overrides={
        "encoder_channels": [8, 8, 8, 8],
        "decoder_channels": [8, 8, 8, 8, 8, 8, 8],
        "save_overlays": 1,
    },
    infer_overrides={
        "encoder_channels": [8, 8, 8, 8],
        "decoder_channels": [8, 8, 8, 8, 8, 8, 8],
        "num_samples": 2,
        "save_ddf": True,
        "save_warped": True,
        "save_png": True,
    },
    evaluate_outputs=["segmentation.csv", "segmentation.json", "segmentation_deformation.csv", "*_dice_boxplot.png"],
    prediction_glob="*_seg.nii.gz",
    require_foreground=True,
    use_trace=True,
    export_input_shape=(1, 2, 32, 32, 32),
    net_io_kwargs={},
)
TestClmorphBundle = make_bundle_tests(CASE)
