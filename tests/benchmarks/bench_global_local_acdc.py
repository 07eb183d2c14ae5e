"""ACDC benchmark of the global_local_contrastive bundle, following the paper's protocol at a chosen budget.

Protocol (Chaitanya et al., NeurIPS 2020, section 4 and appendix 7.3; ACDC is non-commercial research data):
* X_pre = the paper's 52 pre-training patients (`tr52` list of the authors' code) that exist in this copy; X_ts = the
  paper's 20 test patients that exist here (patients whose number is divisible by 5 are held out of this copy).
  End-diastolic frames (frame01) only, as the authors' code.
* Pre-training on the X_pre images without labels, through the bundle's own configs: G^R and G^D global stages
  (`pretrain_global.json`) and the G^D + L^R local stage (`pretrain_local.json`).
* Fine-tuning (`train.json`) with |X_tr| = 1, 2, 8 labelled volumes and 2 validation volumes drawn from X_pre for
  each of ``--draws`` draws, from four initialisations: random, G^R, G^D (encoder only) and G^D + L^R (encoder and
  first 3 decoder blocks); the same iterations for all. Test (`evaluate.json`) on X_ts: mean foreground Dice.

Run from the repository root (CPU: keep it niced, one thread)::

    OMP_NUM_THREADS=1 nice -n 10 python tests/benchmarks/bench_global_local_acdc.py --out bench_output/global_local_acdc

The defaults are a reduced CPU budget (64 x 64 slices, half-width U-Net, a few hundred iterations); pass
``--full`` for the paper's budget (192 x 192, full width, 10 000 iterations per stage: GPU hours).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "global_local_contrastive_cardiac_mri_segmentation"
ACDC = REPO.parent / "shared" / "data" / "acdc"

# authors' code, experiment_init/data_cfg_acdc.py (spec section 2.3)
PAPER_TEST = [7, 8, 9, 10, 27, 28, 29, 30, 47, 48, 49, 50, 67, 68, 69, 70, 87, 88, 89, 90]
PAPER_PRE = (
    [1, 2, 3, 4, 5, 6, 12]
    + list(range(17, 27))
    + list(range(37, 47))
    + list(range(57, 67))
    + [72]
    + list(range(77, 87))
    + [97, 98, 99, 100]
)
PAPER_TABLE1 = {  # mean foreground Dice on ACDC, |X_tr| = 1 / 2 / 8, 6 runs, full budget
    "random": (0.614, 0.702, 0.844),
    "GR": (0.631, 0.729, 0.847),
    "GD": (0.691, 0.784, 0.870),
    "GD+LR": (0.725, 0.789, 0.872),
}
LABELS = {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}
# the benchmark table needs Dice only; HD95/ASSD at native resolution would dominate the CPU budget
EVAL_DICE_ONLY = {"validate#handlers#3#metrics": ["dice"], "validate#handlers#3#boxplot": False}


def patients(ids: list[int]) -> list[dict]:
    out = []
    for i in ids:
        image = ACDC / f"patient{i:03d}_frame01.nii.gz"
        if image.is_file():
            out.append(
                {
                    "image": str(image),
                    "label": str(ACDC / f"patient{i:03d}_frame01_gt.nii.gz"),
                    "subject": f"patient{i:03d}",
                }
            )
    return out


def write_datalist(path: Path, training: list[dict], validation: list[dict], test: list[dict]) -> Path:
    doc = {
        "name": "ACDC_ED_paper_split",
        "description": "ACDC end-diastolic frames, split of Chaitanya et al. 2020 restricted to this copy",
        "licence": "ACDC: non-commercial research use only (CC BY-NC-SA 4.0)",
        "tensorImageSize": "3D",
        "modality": {"0": "MR"},
        "labels": LABELS,
        "training": training,
        "validation": validation or training[:1],
        "test": test,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path


def run_workflow(files: list[str], overrides: dict, workflow_type: str = "train") -> None:
    from monai.bundle import ConfigWorkflow

    for module in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[module]
    cwd = os.getcwd()
    sys.path.insert(0, str(BUNDLE))
    os.chdir(BUNDLE)
    try:
        wf = ConfigWorkflow(
            config_file=[str(BUNDLE / f) for f in files],
            meta_file=str(BUNDLE / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type=workflow_type,
            **overrides,
        )
        wf.initialize()
        failing = wf.check_properties()
        if failing:
            raise RuntimeError(f"bundle properties failing: {failing}")
        wf.run()
        wf.finalize()
    finally:
        os.chdir(cwd)
        sys.path.remove(str(BUNDLE))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench_output" / "global_local_acdc"))
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--pretrain_iterations", type=int, default=200)
    ap.add_argument("--finetune_iterations", type=int, default=60)
    ap.add_argument("--val_every", type=int, default=20)
    ap.add_argument("--finetune_batch", type=int, default=8)
    ap.add_argument("--image_size", type=int, default=64)
    ap.add_argument("--spacing", type=float, default=3.0, help="in-plane voxel size after resampling (voxel units)")
    ap.add_argument("--channels", type=int, nargs=6, default=[8, 16, 32, 64, 64, 64])
    ap.add_argument("--full", action="store_true", help="paper budget: 192^2, full width, 10k iterations per stage")
    args = ap.parse_args()
    if not ACDC.is_dir():
        print(f"SKIP: ACDC copy not found at {ACDC}")
        return 0
    if args.full:
        args.pretrain_iterations, args.finetune_iterations, args.val_every, args.finetune_batch = 10000, 10000, 50, 20
        args.image_size, args.spacing, args.channels = 192, 1.367, [16, 32, 64, 128, 128, 128]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pre, test = patients(PAPER_PRE), patients(PAPER_TEST)
    print(f"X_pre: {len(pre)} ED volumes, X_ts: {len(test)} ED volumes (ACDC: non-commercial research use only)")
    common = {
        "image_size": args.image_size,
        "target_spacing": [args.spacing, args.spacing],
        "network_def#channels": list(args.channels),
        "num_workers": 0,
        "slice_batch_size": 64,
    }
    per_epoch = 50 if args.pretrain_iterations % 50 == 0 else args.pretrain_iterations
    pretrain = {
        **common,
        "pretrain_epochs": args.pretrain_iterations // per_epoch,
        "pretrain_iterations_per_epoch": per_epoch,
        "dataset_dir": str(ACDC),
        "datalist": str(write_datalist(out / "datalist_pretrain.json", pre, [], test)),
    }
    timings: dict[str, float] = {}
    stages = {
        "GR": (["configs/train.json", "configs/pretrain_global.json"], {"global_strategy": "GR"}),
        "GD": (["configs/train.json", "configs/pretrain_global.json"], {"global_strategy": "GD"}),
        "GD+LR": (
            ["configs/train.json", "configs/pretrain_global.json", "configs/pretrain_local.json"],
            {"global_strategy": "GD", "local_strategy": "LR"},
        ),
    }
    for name, (files, extra) in stages.items():
        ckpt = out / "pretrain" / name.split("+")[0]
        t0 = time.time()
        run_workflow(files, {**pretrain, **extra, "ckpt_dir": str(ckpt), "output_dir": str(out / "logs" / name)})
        timings[f"pretrain {name}"] = time.time() - t0
        print(f"pre-training {name}: {timings[f'pretrain {name}']:.0f} s", flush=True)
    inits = {
        "random": {"load_pretrained": False},
        "GR": {"pretrained_checkpoint": str(out / "pretrain/GR/model_global.pt"), "pretrained_decoder_blocks": 0},
        "GD": {"pretrained_checkpoint": str(out / "pretrain/GD/model_global.pt"), "pretrained_decoder_blocks": 0},
        "GD+LR": {"pretrained_checkpoint": str(out / "pretrain/GD/model_local.pt"), "pretrained_decoder_blocks": 3},
    }
    results = []
    for draw in range(args.draws):
        order = np.random.default_rng(1000 + draw).permutation(len(pre))
        val = [pre[i] for i in order[:2]]
        pool = [pre[i] for i in order[2:]]
        datalist = write_datalist(out / f"datalist_draw{draw}.json", pool, val, test)
        for size in args.sizes:
            ids = [e["subject"] for e in pool[:size]]
            for init, extra in inits.items():
                run_dir = out / "finetune" / f"draw{draw}" / f"n{size}" / init
                overrides = {
                    **common,
                    **extra,
                    "dataset_dir": str(ACDC),
                    "datalist": str(datalist),
                    "train_volume_ids": ids,
                    "epochs": args.finetune_iterations // args.val_every,
                    "iterations_per_epoch": args.val_every,
                    "finetune_batch_size": args.finetune_batch,
                    "random_seed": draw,
                    "ckpt_dir": str(run_dir / "models"),
                    "output_dir": str(run_dir / "train"),
                }
                t0 = time.time()
                run_workflow(["configs/train.json"], overrides)
                t_train = time.time() - t0
                run_workflow(
                    ["configs/train.json", "configs/evaluate.json"],
                    {**overrides, "output_dir": str(run_dir / "eval"), "num_overlays": 0, **EVAL_DICE_ONLY},
                )
                report = json.loads((run_dir / "eval" / "test_report.json").read_text())["summary"]
                row = {
                    "draw": draw,
                    "size": size,
                    "init": init,
                    "train_ids": ids,
                    "val_ids": [e["subject"] for e in val],
                    "finetune_seconds": t_train,
                    "mean_dice": report["mean_over_groups"]["dice"]["mean"],
                    **{f"dice_{k}": v["dice"]["mean"] for k, v in report["groups"].items()},
                }
                results.append(row)
                timings[f"finetune {init}"] = timings.get(f"finetune {init}", 0.0) + t_train
                print(f"draw {draw} |X_tr|={size} {init}: Dice {row['mean_dice']:.3f} ({t_train:.0f} s)", flush=True)
                (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=2))
    table = summary_table(results, args, timings, len(pre), len(test))
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": results, "timings": timings}, indent=2))
    print(table)
    return 0


def summary_table(rows: list[dict], args, timings: dict[str, float], n_pre: int, n_test: int) -> str:
    sizes = sorted({r["size"] for r in rows})
    lines = [
        f"ACDC (non-commercial research licence), X_pre {n_pre} / X_ts {n_test} ED volumes, {args.draws} draws; "
        f"{args.image_size}^2 slices, channels {args.channels}, {args.pretrain_iterations} pre-training iterations "
        f"per stage (batch 40), {args.finetune_iterations} fine-tuning iterations (batch {args.finetune_batch}).",
        "",
        "| init | "
        + " | ".join(f"|X_tr|={s} (ours)" for s in sizes)
        + " | "
        + " | ".join(f"paper {s}" for s in sizes)
        + " | fine-tune s/run | pre-train s |",
        "|---|" + "---|" * (2 * len(sizes) + 2),
    ]
    for init in ("random", "GR", "GD", "GD+LR"):
        mine = [r for r in rows if r["init"] == init]
        if not mine:
            continue
        cells = []
        for s in sizes:
            vals = [r["mean_dice"] for r in mine if r["size"] == s]
            cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if vals else "n/a")
        paper = [f"{v:.3f}" for v, s in zip(PAPER_TABLE1[init], (1, 2, 8), strict=True) if s in sizes]
        per_run = np.mean([r["finetune_seconds"] for r in mine])
        pre_s = timings.get(f"pretrain {init}", 0.0) + (timings.get("pretrain GD", 0.0) if init == "GD+LR" else 0.0)
        lines.append(f"| {init} | " + " | ".join(cells + paper) + f" | {per_run:.0f} | {pre_s:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
