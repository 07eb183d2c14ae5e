"""CLMorph bundle through the shared harness (tiny synthetic brain set, 1 epoch): ``network_def`` is the atlas
segmenter; the registration-network variants (extra atlas outputs, pair registration) run as extra tests."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.cli_checks import ConfigOverrideError
from tests.bundles.harness import BundleCase, make_bundle_tests, run_workflow
from tests.robustness.support import describe, find_error

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
    infer_overrides={"encoder_channels": [8, 8, 8, 8], "decoder_channels": [8, 8, 8, 8, 8, 8, 8], "save_png": True},
    evaluate_outputs=["segmentation.csv", "segmentation.json", "segmentation_deformation.csv", "*_dice_boxplot.png"],
    prediction_glob="*_seg.nii.gz",
    require_foreground=True,
    use_trace=True,
    export_input_shape=(1, 1, 32, 32, 32),
    net_io_kwargs={},
)


class TestClmorphBundle(make_bundle_tests(CASE)):
    """The harness tests plus the atlas outputs of the registration network and the registration mode."""

    def test_atlas_outputs(self, trained: dict[str, Path]) -> None:
        """``inference_atlas_outputs.json``: the same segmentation as the segmenter network (one implementation) plus
        field, warped atlas, MC segmentation and entropy; without that file the same switches are refused."""
        extra = {**CASE.infer_overrides, "num_samples": 2, "save_ddf": True, "save_warped": True}
        overrides = self._overrides(trained, "atlas_outputs", extra)
        configs = ["configs/inference.json", "configs/inference_atlas_outputs.json"]
        self._run_checked(configs, "infer", overrides)
        out = Path(overrides["output_dir"])
        tests = json.loads(trained["datalist"].read_text())["test"]
        for entry in tests:
            stem = Path(entry["image"]).name.removesuffix(".nii.gz")
            written = {p.name.removeprefix(stem) for p in out.glob(f"{stem}_*")}
            expected = {"_seg.nii.gz", "_seg_mc.nii.gz", "_entropy.nii.gz", "_ddf.nii.gz", "_warped_atlas.nii.gz"}
            assert expected | {"_overlay.png"} == written, written
        plain = self._overrides(trained, "atlas_outputs_plain", CASE.infer_overrides)
        self._run_checked(["configs/inference.json"], "infer", plain)
        for seg in sorted(out.glob("*_seg.nii.gz")):
            same = nib.load(str(Path(plain["output_dir"]) / seg.name))
            assert np.array_equal(np.asarray(same.dataobj), np.asarray(nib.load(str(seg)).dataobj)), seg.name
        with pytest.raises(BaseException) as info:
            refused = {**overrides, "output_dir": str(out) + "_refused"}
            run_workflow(CASE.bundle_root, ["configs/inference.json"], "infer", refused)
        found = find_error(info.value, ConfigOverrideError)
        assert found is not None and "inference_atlas_outputs.json" in str(found), describe(info.value)

    def test_evaluate_previews_off_grid(self, trained: dict[str, Path]) -> None:
        """With ``image_size`` unlike the data grid, evaluation still writes its PNG previews: the image is mapped
        back to the data grid with the labels (a preview on mismatched grids would be skipped with a warning)."""
        extra = {**CASE.evaluate_overrides, "image_size": [16, 16, 16]}
        overrides = self._overrides(trained, "evaluate_off_grid", extra)
        self._run_checked(CASE.evaluate_files(), "train", overrides)
        previews = [
            p
            for p in Path(overrides["output_dir"]).glob("segmentation_*.png")
            if not p.name.endswith("_dice_boxplot.png") and p.stat().st_size > 0
        ]
        assert len(previews) == extra["save_overlays"], previews

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
