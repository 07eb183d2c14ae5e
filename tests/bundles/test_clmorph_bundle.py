"""CLMorph bundle through the shared harness (tiny synthetic brain set, 1 epoch)."""

from pathlib import Path

import nibabel as nib
import numpy as np

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


class TestClmorphBundle(make_bundle_tests(CASE)):
    """The harness tests plus the bundle's registration mode (one moving/fixed pair -> warped image and field)."""

    def test_registration_mode(self, trained: dict[str, Path]) -> None:
        images = sorted((trained["data_dir"] / "imagesTr").glob("*.nii.gz"))
        extra = {"moving_image": str(images[0]), "fixed_image": str(images[1]), **CASE.infer_overrides}
        overrides = self._overrides(trained, "register", extra)
        self._run_checked(["configs/inference.json", "configs/inference_registration.json"], "infer", overrides)
        out = Path(overrides["output_dir"])
        warped = nib.load(str(next(out.glob("*_warped.nii.gz"))))
        ddf = nib.load(str(next(out.glob("*_ddf.nii.gz"))))
        assert warped.shape[:3] == ddf.shape[:3] == (32, 32, 32)
        assert ddf.shape[-1] == 3 and np.isfinite(np.asarray(ddf.dataobj)).all()
