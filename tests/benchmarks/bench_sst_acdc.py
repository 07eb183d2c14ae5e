"""SST one-shot benchmark on ACDC (non-commercial research use only): Reg. vs U-Net w/o appearance vs full SST.

One labelled atlas (the training image closest to the mean) plus the other training images without labels; Dice per
structure (RV, MYO, LV) on held-out patients, in the preprocessed grid (voxel units: the ACDC copy has no spacing).
Runs the bundle's stage configs in-process (``common.engines.sst.run_stages``) at a reduced CPU budget.

    nice -n 10 env OMP_NUM_THREADS=1 python -m tests.benchmarks.bench_sst_acdc [--out bench_output/sst_acdc]
        [--prealign [--unet-space native]] [--skip-ablation]

``--prealign`` layers ``configs/dataset_acdc.json`` (affine pre-alignment of the pool and of the "Reg." test images
to the atlas) and trains S2 for ``--joint-iterations`` (600); its ``unet_space`` "atlas" keeps the generated pairs
in the atlas's pose and aligns the U-Net's test images too (``--unet-space native`` overrides it).
``--skip-ablation`` runs the full SST variant only (else also "w/o appearance model" and "w/o joint optimisation",
sharing S0/S1). ``--more-pairs N`` adds "full_more": the full variant's models and flows, N generated pairs and
``--more-unet-epochs`` U-Net epochs. Stages whose output exists in ``--out`` are skipped, so a rerun with a new
option only runs what is new.

Split of the 80 shared patients (the 20 hidden holdout patients are not available here): test = patient number
% 5 == 1 (20 patients of the copy here), validation (U-Net model selection, as in the paper) = the first 4 with
% 5 == 2, training pool = the other 56; both annotated frames (ED, ES) of a patient stay in the same split.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from common.engines.sst import dice_by_label, run_stages
from common.io import atomic_json_dump, atomic_write_text

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "sst_brain_mri_one_shot_segmentation"
DATA = REPO.parent / "shared" / "data" / "acdc"
LABELS = {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}

# reduced CPU budget (2 shared cores): small grid, small networks, few iterations; see docs/README.md
COMMON = {
    "spatial_size": [64, 64, 8],
    "resample": "resize",
    "center_crop_scale": [0.6, 0.6, 1.0],
    "num_classes": 4,
    "style_dim": 32,
    "moco_queue_size": 64,
    "appearance_features": 8,
    "appearance_strides": [[2, 2, 1], [2, 2, 1]],
    "style_encoder_channels": [8, 16, 32],
    "style_encoder_strides": [[4, 4, 2], 2, [2, 2, 1]],
    "flow_channels": [8, 16, 16, 16, 16, 8],
    "flow_final_channels": [8],
    "flow_kernel_size": 3,
    "flow_aae_encoder_channels": [16, 32],
    "flow_aae_decoder_channels": [32, 16, 16],
    "flow_aae_latent_channels": 8,
    "registration_ncc_window": 5,
    "ssim_window": 5,
    "sst_learning_rate": 1e-3,
    "registration_epochs": 1,
    "registration_batch_size": 4,
    "registration_pairs_per_epoch": 160,
    "style_epochs": 1,
    "style_batch_size": 8,
    "style_pairs_per_epoch": 160,
    "joint_epochs": 1,
    "joint_batch_size": 2,
    "joint_pairs_per_epoch": 300,
    "flow_aae_epochs": 1,
    "flow_aae_batch_size": 4,
    "flow_aae_samples_per_epoch": 320,
    "num_generated_pairs": 300,
    "flow_code_sampler": "latent-mix",
    "label_mask_threshold": None,
    "unet_epochs": 5,
    "unet_batch_size": 4,
    "unet_channels": [16, 32, 64, 128],
    "unet_strides": [2, 2, 2],
    "learning_rate": 1e-3,
    "val_interval": 1,
}
SMOKE = {
    "registration_pairs_per_epoch": 8,
    "style_pairs_per_epoch": 16,
    "joint_pairs_per_epoch": 4,
    "flow_aae_samples_per_epoch": 8,
    "num_generated_pairs": 8,
    "unet_epochs": 2,
    "val_interval": 1,
}


def write_datalist(out: Path) -> Path:
    patients = sorted({p.name[:10] for p in DATA.glob("patient*_frame01.nii.gz")})

    def entries(group):
        return [
            {"image": str(DATA / f"{p}_{f}.nii.gz"), "label": str(DATA / f"{p}_{f}_gt.nii.gz"), "subject": f"{p}_{f}"}
            for p in group
            for f in ("frame01", "frame02")
        ]

    number = {p: int(p[7:10]) for p in patients}
    test = [p for p in patients if number[p] % 5 == 1]
    validation = [p for p in patients if number[p] % 5 == 2][:4]
    training = [p for p in patients if p not in test and p not in validation]
    datalist = {
        "name": "acdc_sst_benchmark",
        "description": "ACDC (non-commercial research use only); identity affines, spacing unknown",
        "labels": LABELS,
        "modality": {"0": "MR"},
        "tensorImageSize": "3D",
        "training": entries(training),
        "validation": entries(validation),
        "test": entries(test),
    }
    return atomic_json_dump(datalist, out / "datalist.json")


def stage(name: str, *configs: str, output: str) -> dict:
    return {"name": name, "configs": [str(BUNDLE / "configs" / c) for c in configs], "output": output}


def pipeline(root: Path, names: list[str]) -> list[dict]:
    models, work, evald = root / "models", root / "work", root / "eval"
    all_stages = {
        "S0_registration": stage(
            "S0_registration", "train.json", "stage0_registration.json", output=str(models / "sst_registration.pt")
        ),
        "S1_style": stage("S1_style", "train.json", "stage1_style.json", output=str(models / "sst_style.pt")),
        "S2_joint": stage("S2_joint", "train.json", "stage2_joint.json", output=str(models / "sst_joint.pt")),
        "S3_flows": stage("S3_flows", "train.json", "stage3_flows.json", output=str(work / "flows" / "index.json")),
        "S4_flow_aae": stage(
            "S4_flow_aae", "train.json", "stage4_flow_aae.json", output=str(models / "sst_flow_aae.pt")
        ),
        "S5_generate": stage(
            "S5_generate", "train.json", "stage5_generate.json", output=str(work / "generated" / "datalist.json")
        ),
        "S6_unet": stage("S6_unet", "train.json", output=str(models / "model_final.pt")),
        "evaluate": stage("evaluate", "train.json", "evaluate.json", output=str(evald / "segmentation.json")),
        "evaluate_registration": stage(
            "evaluate_registration",
            "train.json",
            "evaluate_registration.json",
            output=str(evald / "registration_report.json"),
        ),
    }
    return [all_stages[n] for n in names]


def run_variant(root: Path, names: list[str], overrides: dict, timings: dict, memory: dict) -> None:
    for item in pipeline(root, names):
        report = run_stages([item], overrides, logging_file=str(BUNDLE / "configs" / "logging.conf"))
        key = f"{root.name}/{item['name']}"
        timings[key] = report[item["name"]]
        memory[key] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(f"[bench] {key}: {timings[key]} peak RSS so far {memory[key]} MiB", flush=True)


def markdown(rows: dict[str, dict], num_pairs: dict, timings: dict, memory: dict, wall: float) -> str:
    lines = ["| method | RV | MYO | LV | mean Dice (per-case mean over structures) |", "|---|---|---|---|---|"]
    for name, d in rows.items():
        lines.append(f"| {name} | {d['RV']:.3f} | {d['MYO']:.3f} | {d['LV']:.3f} | {d['mean']:.3f} |")
    lines += ["", "Generated pairs: " + ", ".join(f"{k}: {v}" for k, v in num_pairs.items()), ""]
    lines += ["| stage | status | seconds | peak RSS after (MiB) |", "|---|---|---|---|"]
    for key, t in timings.items():
        lines.append(f"| {key} | {t['status']} | {t['seconds']} | {memory[key]} |")
    lines += ["", f"Total wall time: {wall / 60:.1f} min (CPU only, OMP_NUM_THREADS=1, shared machine)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench_output" / "sst_acdc"))
    parser.add_argument("--smoke", action="store_true", help="a few iterations per stage (pipeline check only)")
    parser.add_argument("--prealign", action="store_true", help="affine pre-alignment (configs/dataset_acdc.json)")
    parser.add_argument("--skip-ablation", action="store_true", help="only the full SST variant")
    parser.add_argument("--joint-iterations", type=int, default=600, help="S2 iterations with --prealign")
    parser.add_argument(
        "--more-pairs",
        type=int,
        default=0,
        help="also generate this many pairs from the full variant's models and train the U-Net on them (full_more)",
    )
    parser.add_argument("--more-unet-epochs", type=int, default=10, help="U-Net epochs of the full_more variant")
    parser.add_argument(
        "--unet-space",
        choices=("native", "atlas"),
        default=None,
        help="U-Net on pairs in each image's own pose (native) or in the atlas's pose (atlas, needs --prealign); "
        "default: the configs' value (atlas with --prealign, from configs/dataset_acdc.json)",
    )
    args = parser.parse_args(argv)
    budget = dict(COMMON)
    if args.prealign:
        budget.update(json.loads((BUNDLE / "configs" / "dataset_acdc.json").read_text()))
        budget["joint_pairs_per_epoch"] = args.joint_iterations * budget["joint_batch_size"]
    if args.unet_space is not None:
        budget["unet_space"] = args.unet_space
    if args.smoke:
        budget.update(SMOKE)
    if not DATA.is_dir():
        print(f"ACDC data not found at {DATA}: benchmark skipped")
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    datalist = write_datalist(out)
    start = time.perf_counter()
    timings: dict = {}
    memory: dict = {}
    full, no_app, no_joint = out / "full", out / "no_app", out / "no_joint"

    def overrides(root: Path, **extra) -> dict:
        return {
            "bundle_root": str(BUNDLE),
            "dataset_dir": str(out),
            "datalist": str(datalist),
            "ckpt_dir": str(root / "models"),
            "work_dir": str(root / "work"),
            "output_dir": str(root / "eval"),
            **budget,
            **extra,
        }

    everything = [
        "S0_registration",
        "S1_style",
        "S2_joint",
        "S3_flows",
        "S4_flow_aae",
        "S5_generate",
        "S6_unet",
        "evaluate",
        "evaluate_registration",
    ]
    run_variant(full, everything, overrides(full), timings, memory)
    variants = [full]
    # ablations (Table 2): no appearance model; no joint optimisation. S0/S1 are shared with the full run.
    shared = {
        "registration_weights": str(full / "models" / "sst_registration.pt"),
        "style_weights": str(full / "models" / "sst_style.pt"),
    }
    ablations = {no_app: {"use_appearance": False}, no_joint: {"joint_optimisation": False}}
    if not args.skip_ablation:
        for root, extra in ablations.items():
            run_variant(root, everything[2:], overrides(root, **shared, **extra), timings, memory)
            variants.append(root)
    more = out / "full_more"
    if args.more_pairs > 0:  # the same S0-S4 models and flows, more generated pairs and a longer U-Net training
        reuse = {
            **shared,
            "joint_weights": str(full / "models" / "sst_joint.pt"),
            "flow_aae_weights": str(full / "models" / "sst_flow_aae.pt"),
            "flows_dir": str(full / "work" / "flows"),
            "affine_cache": str(full / "work" / "affine_prealign.pt"),
            "num_generated_pairs": args.more_pairs,
            "unet_epochs": args.more_unet_epochs,
        }
        run_variant(more, ["S5_generate", "S6_unet", "evaluate"], overrides(more, **reuse), timings, memory)
        variants.append(more)
    wall = time.perf_counter() - start

    def load(path: Path) -> dict:
        return dice_by_label(json.loads(path.read_text()))

    rows = {"Reg. (atlas registration, SST flow model)": load(full / "eval" / "registration_report.json")}
    if no_app in variants:
        rows["Reg. w/o appearance model"] = load(no_app / "eval" / "registration_report.json")
        rows["U-Net on pairs w/o appearance model"] = load(no_app / "eval" / "segmentation.json")
    if no_joint in variants:
        rows["U-Net on pairs w/o joint optimisation"] = load(no_joint / "eval" / "segmentation.json")
    rows["Full SST (U-Net on generated pairs)"] = load(full / "eval" / "segmentation.json")
    if more in variants:
        rows[f"Full SST, {args.more_pairs} pairs, {args.more_unet_epochs} U-Net epochs"] = load(
            more / "eval" / "segmentation.json"
        )
    num_pairs = {
        v.name: len(json.loads((v / "work" / "generated" / "datalist.json").read_text())["training"]) for v in variants
    }
    text = markdown(rows, num_pairs, timings, memory, wall)
    atomic_write_text(out / "results.md", text)
    atomic_json_dump(
        {"dice": rows, "num_pairs": num_pairs, "timings": timings, "peak_rss_mib": memory}, out / "results.json"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
