"""SST bundle through the shared harness: every stage (S0-S6, "Reg." evaluation) on a tiny synthetic brain set."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bundles.harness import BundleCase, initialized_workflow, make_bundle_tests

STAGES = [
    "stage0_registration.json",
    "stage1_style.json",
    "stage2_joint.json",
    "stage3_flows.json",
    "stage4_flow_aae.json",
    "stage5_generate.json",
]
TINY = {
    "spatial_size": [32, 32, 32],
    "work_dir": "{tmp}/work",
    "style_dim": 16,
    "moco_queue_size": 8,
    "appearance_features": 4,
    "style_encoder_channels": [8, 16, 16],
    "style_encoder_strides": [4, 2, 2],
    "flow_channels": [8, 16, 16, 16, 16, 8],
    "flow_final_channels": [8],
    "flow_aae_encoder_channels": [8, 16],
    "flow_aae_decoder_channels": [16, 8, 8],
    "flow_aae_latent_channels": 4,
    "registration_ncc_window": 5,
    "unet_channels": [8, 16, 32],
    "unet_strides": [2, 2],
    "num_classes": 9,
}
SHORT = {
    "registration_epochs": 1,
    "registration_batch_size": 2,
    "registration_pairs_per_epoch": 2,
    "style_epochs": 1,
    "style_batch_size": 2,
    "style_pairs_per_epoch": 2,
    "joint_epochs": 1,
    "joint_batch_size": 1,
    "joint_pairs_per_epoch": 2,
    "flow_aae_epochs": 1,
    "flow_aae_samples_per_epoch": 2,
    "num_generated_pairs": 3,
    "unet_epochs": 1,
}
UNET_META = {"_meta_#network_data_format#outputs#pred#num_channels": 9}

CASE = BundleCase(
    name="sst_brain_mri_one_shot_segmentation",
    preset="brain",
    shape=(32, 32, 32),
    num_subjects=8,
    num_sites=2,
    train_stages=[*[["configs/train.json", f"configs/{s}"] for s in STAGES], ["configs/train.json"]],
    evaluate_configs=["configs/train.json", "configs/evaluate.json"],
    overrides=TINY,
    train_overrides=SHORT,
    infer_overrides=UNET_META,
    cli_stage=len(STAGES),
    cli_overrides={**SHORT, "generated_datalist": "{datalist}"},
    checkpoint_files=[
        "model.pt",
        "model_final.pt",
        "sst_registration.pt",
        "sst_style.pt",
        "sst_joint.pt",
        "sst_flow_aae.pt",
    ],
    evaluate_outputs=["segmentation.csv", "segmentation.json", "*_dice_boxplot.png"],
    prediction_glob="*_seg.nii.gz",
)


class TestSSTBundle(make_bundle_tests(CASE)):
    def test_generation_outputs(self, trained):
        generated = trained["tmp"] / "work" / "generated"
        listing = json.loads((generated / "datalist.json").read_text())
        assert len(listing["training"]) == SHORT["num_generated_pairs"] and listing["validation"]
        assert 0 < (generated / "generation_grid.png").stat().st_size < 150_000
        assert (trained["tmp"] / "work" / "flows" / "index.json").is_file()

    def test_flow_model_is_trained_apart_from_the_frozen_registration_network(self, trained):
        """S2 trains F from scratch while T (S0) stays frozen: two modules, so F's weights are neither T's nor left
        untouched (a shared instance once made F a frozen copy of T)."""
        import torch
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config([str(CASE.bundle_root / "configs" / f) for f in ("train.json", "stage2_joint.json")])
        parser.update({**TINY, "dataset_dir": str(trained["tmp"]), "device": "cpu"})
        assert parser.get_parsed_content("flow_net") is not parser.get_parsed_content("registration_net")
        joint = torch.load(trained["ckpt_dir"] / "sst_joint.pt", map_location="cpu", weights_only=True)["flow_net"]
        t = torch.load(trained["ckpt_dir"] / "sst_registration.pt", map_location="cpu", weights_only=True)
        differs = [k for k, v in joint.items() if not torch.equal(v, t["registration_net"][k])]
        assert len(differs) == len(joint), f"F equals T in {len(joint) - len(differs)} tensors"

    def test_unet_reads_generated_pairs_unchanged(self, trained):
        """Generated pairs are already on the preprocessed grid: the U-Net must not crop/rescale them again."""
        import numpy as np
        from monai.bundle import ConfigParser

        from common.data.validate import load_nifti

        generated = trained["tmp"] / "work" / "generated"
        entry = json.loads((generated / "datalist.json").read_text())["training"][0]
        parser = ConfigParser()
        parser.read_config(str(CASE.bundle_root / "configs" / "train.json"))
        parser.update({**TINY, "center_crop_scale": [0.5, 0.5, 1.0], "resample": "resize"})
        item = parser.get_parsed_content("train#preprocessing")(
            {"image": str(generated / entry["image"]), "label": str(generated / entry["label"])}
        )
        assert np.allclose(item["image"][0].numpy(), load_nifti(generated / entry["image"])[0])
        assert np.array_equal(item["label"][0].numpy(), load_nifti(generated / entry["label"])[0])

    def test_registration_report_and_run_all(self, trained):
        """The "Reg." row runs as a workflow; run_all then skips every finished stage except the missing ones."""
        base = self._overrides(trained, "run_all", SHORT)
        out = Path(base["output_dir"])
        configs = ["configs/train.json", "configs/run_all.json"]
        with initialized_workflow(CASE.bundle_root, configs, "train", base) as workflow:
            report = workflow.run()[0]
        finished = ["S0_registration", "S1_style", "S2_joint", "S3_flows", "S4_flow_aae", "S5_generate", "S6_unet"]
        assert all(report[name]["status"] == "skipped" for name in finished), report
        assert report["evaluate"]["status"] == "done" and report["evaluate_registration"]["status"] == "done"
        summary = json.loads((out / "registration_report.json").read_text())["summary"]
        assert summary["num_cases"] == 1 and "dice" in summary["mean_over_groups"]
        assert (out / "segmentation.json").is_file()

    def test_cross_site_appearance_option(self, trained):
        """S5 with another site's appearance model: here one whose output is the constant 0.2 (stored 0.6)."""
        import math

        import numpy as np
        import torch

        from common.data.validate import load_nifti
        from tests.bundles.harness import run_workflow

        state = torch.load(trained["ckpt_dir"] / "sst_joint.pt", map_location="cpu", weights_only=True)
        head = [k for k in state["appearance"] if k.startswith("head.0.")]
        for key in head:
            state["appearance"][key] = torch.zeros_like(state["appearance"][key])
        state["appearance"]["head.0.bias"] += math.atanh(0.2)
        other_site = trained["tmp"] / "other_site_joint.pt"
        torch.save(state, other_site)
        generated = trained["tmp"] / "cross_site"
        overrides = self._overrides(
            trained,
            "cross_site",
            SHORT,
            {"cross_site_appearance_weights": str(other_site), "generated_dir": str(generated)},
        )
        assert not run_workflow(
            CASE.bundle_root, ["configs/train.json", "configs/stage5_generate.json"], "train", overrides
        )
        entry = json.loads((generated / "datalist.json").read_text())["training"][0]
        image = load_nifti(generated / entry["image"])[0]
        assert np.allclose(image, 0.6, atol=1e-4)
