"""Cyclical self-training on real data: ACDC inter-patient 3D registration (end-diastole frames) on one fixed grid.

ACDC: non-commercial research use only (CC BY-NC-SA 4.0). Spacing unknown: SDlogJ/folding are in voxels of the grid.

Prints one table (Dice per structure RV/MYO/LV and mean, L2R SDlogJ, % folding, CPU seconds per pair) for: identity,
the random-feature optimiser (stage 0) and every self-training stage (2 warps + ICE, without and with Adam: the rows
without Adam show the feature network alone), the final model under each test configuration of the paper's Table 1,
and NCC / MIND supervision of the same network and optimiser trained with the same budget. Pairs: all i<j of the
training patients (fixed = lower index) for training, the same rule on the test patients for evaluation. Run (about
10 CPU minutes at the defaults)::

    OMP_NUM_THREADS=1 nice -n 10 python tests/benchmarks/bench_cyclical_acdc.py --out bench_output/cyclical_acdc

``--evaluate-only`` re-scores the stage files of an earlier run with the same arguments (writes ``results_rescored.*``).
``--seed N`` changes the initialisation of g, the stage-0 g and the Adam projections; ``--summarize DIR DIR ...``
then tabulates the stages of several such runs (without ``--affine``, same split) and their paired mean (``seeds.md``).

``--affine``: affine pre-alignment as ``configs/mr.json`` sets it (in-plane affine, LNCC, 2 pyramid levels), at
training (matrices once per pair) and at test (one composed field); adds the row "affine alone" and skips the
NCC / MIND baselines. Seconds per pair then include the pre-alignment.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from torch.utils.data import DataLoader

from common.engines.pseudo_labels import AgreementSampler, PrealignmentStore, PseudoLabelBank, l2r_pairs
from common.engines.registration_eval import pair_metrics
from common.engines.self_training import CyclicalSelfTrainer, ImagePairDataset
from common.networks.cst_features import CSTFeatureNet
from common.registration import fields
from common.registration.affine import affine_ddf, compose_with_affine
from common.registration.cst_pipeline import CSTRegistrationNet, register_pair
from tests.benchmarks.bench_cyclical_data import ACDC_DIR, ACDC_LABELS, acdc_patients, load_acdc_volume

TEST_CONFIGS = {
    "1 warp w/o Adam": dict(num_warps=1, use_adam=False),
    "1 warp w/ Adam": dict(num_warps=1, use_adam=True),
    "2 warps w/o Adam": dict(num_warps=2, use_adam=False),
    "2 warps w/ Adam": dict(num_warps=2, use_adam=True),
}

# the pipelines every stage and baseline is scored with (without Adam: the feature network alone)
STAGE_PIPELINES = ("2 warps w/o Adam", "2 warps w/ Adam")

AFFINE = {"mode": "affine", "similarity": "lncc", "frozen_axes": (2,), "levels": (4, 2), "iterations": (100, 50)}


def prealign_pairs(network, volumes, pairs) -> tuple[list[torch.Tensor], list[float]]:
    """Affine matrix and CPU seconds of every pair (computed once, reused by every test configuration)."""
    matrices, seconds = [], []
    for m, f in pairs:
        start = time.process_time()
        matrices.append(network.prealign(volumes[m]["image"][None], volumes[f]["image"][None]))
        seconds.append(time.process_time() - start)
    return matrices, seconds


def evaluate(network, volumes, pairs, prealigned=None, affine_only=False, **kwargs) -> dict:
    """Mean Dice per structure (labels present in both), mean Dice, SDlogJ, folding, CPU seconds per pair.

    ``prealigned`` = (matrices, seconds): the moving image is aligned first and the composed field is scored."""
    per_label = {name: [] for name in ACDC_LABELS.values()}
    means, sdlogj, folding, seconds = [], [], [], []
    for k, (m, f) in enumerate(pairs):
        fixed, moving = volumes[f], volumes[m]
        ddf = None
        moving_image = moving["image"][None]
        if prealigned is not None:
            matrix = prealigned[0][k]
            ddf = affine_ddf(matrix, moving_image.shape[2:])
            moving_image = fields.warp(moving_image, ddf)
        if network is not None and not affine_only:
            start = time.process_time()
            generator = torch.Generator().manual_seed(k)
            ddf = register_pair(network, moving_image, fixed["image"][None], generator=generator, **kwargs).ddf
            ddf = ddf if prealigned is None else compose_with_affine(matrix, ddf)
            seconds.append(time.process_time() - start + (0.0 if prealigned is None else prealigned[1][k]))
        elif prealigned is not None:
            seconds.append(prealigned[1][k])
        dice, summary = pair_metrics(fixed["label"], moving["label"], ddf, ACDC_LABELS)
        for name, value in dice.items():
            per_label[name].append(value)
        means.append(summary["dice"])
        if ddf is not None:
            sdlogj.append(summary["sdlogj"])
            folding.append(summary["folding_percent"])
    row = {name: float(np.mean(v)) for name, v in per_label.items()}
    row["mean"] = float(np.mean(means))
    row["sdlogj"] = float(np.mean(sdlogj)) if sdlogj else float("nan")
    row["folding_%"] = float(np.mean(folding)) if folding else float("nan")
    row["s/pair"] = float(np.mean(seconds)) if seconds else 0.0
    row["per_pair_dice"] = [float(v) for v in means]
    return row


def stage_names(stages: int, prefix: str, test_config: str) -> list[str]:
    """Row names of stage 0 (the random g) ... ``stages`` for one test pipeline."""
    names = [f"{prefix}stage 0 (random g), {test_config}"]
    return names + [f"{prefix}stage {s}, {test_config}" for s in range(1, stages + 1)]


def stage_steps(runs: list[dict[str, dict]], stages: int, prefix: str) -> list[str]:
    """Markdown rows: mean Dice change from each stage to the next over the same test pairs, with its paired
    standard error (std of the per-pair differences / sqrt(n)) so that a tie can be told from a real drop.

    ``runs``: the rows of one or more runs on the same test pairs (e.g. seeds); per-pair Dice is averaged over them."""
    lines = [
        "| step | test pipeline | mean Dice change | paired s.e. | pairs better / worse |",
        "|---|---|---|---|---|",
    ]
    for test_config in STAGE_PIPELINES:
        names = stage_names(stages, prefix, test_config)
        for before, after in zip(names[:-1], names[1:], strict=True):
            diff = np.mean([np.subtract(r[after]["per_pair_dice"], r[before]["per_pair_dice"]) for r in runs], axis=0)
            se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
            step = f"{before.split(',')[0]} -> {after.split(',')[0]}"
            lines.append(
                f"| {step} | {test_config} | {diff.mean():+.4f} | {se:.4f} | {(diff > 0).sum()} / {(diff < 0).sum()} |"
            )
    return lines


def summarize_runs(run_dirs: list[Path], out: Path) -> None:
    """Mean Dice per stage of each run (seeds), their mean, and the paired step table over the per-pair mean.

    Reads ``results_rescored.json`` where present (runs older than the per-pair lists), else ``results.json``."""
    runs, labels = [], []
    for run_dir in run_dirs:
        path = run_dir / "results_rescored.json"
        path = path if path.is_file() else run_dir / "results.json"
        result = json.loads(path.read_text())
        runs.append(result["rows"])
        labels.append(f"seed {result['args']['seed']}")
        stages = result["args"]["stages"]
    header = ["stage 0 (random g)", *[f"stage {s}" for s in range(1, stages + 1)]]
    lines = ["| run | test pipeline | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
    for test_config in STAGE_PIPELINES:
        names = stage_names(stages, "", test_config)
        for label, rows in [*zip(labels, runs, strict=True), ("mean", None)]:
            values = [rows[n]["mean"] if rows else np.mean([r[n]["mean"] for r in runs]) for n in names]
            lines.append(f"| {label} | {test_config} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    table = "\n".join(
        lines + ["", f"per-pair Dice averaged over {len(runs)} runs:", ""] + stage_steps(runs, stages, "")
    )
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.md").write_text(table + "\n")


def make_network(args) -> CSTRegistrationNet:
    torch.manual_seed(args.seed)
    return CSTRegistrationNet(
        CSTFeatureNet(),
        intensity_clamp=None,
        standardize_features=True,
        affine_prealign=args.affine,
        affine_kwargs=AFFINE,
    )


def adam_settings(args) -> dict:
    return {"reg_fac": args.reg_fac, "adam_feature_scale": args.adam_feature_scale}


def train(args, volumes, pairs, supervision: str, out: Path) -> CyclicalSelfTrainer:
    network = make_network(args)
    bank = PseudoLabelBank(len(pairs), storage="memory")
    store = PrealignmentStore(len(pairs), storage="memory") if args.affine else None
    pair_dataset = ImagePairDataset(volumes, pairs, prealignment=store)
    sampler = AgreementSampler(bank, args.iterations * args.batch_size, weighted=supervision == "pseudo_label")
    loader = DataLoader(pair_dataset, batch_size=args.batch_size, sampler=sampler)
    optimizer = torch.optim.Adam(network.feature_net.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=args.iterations, eta_min=1e-5)
    trainer = CyclicalSelfTrainer(
        device="cpu",
        max_epochs=args.stages,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        bank=bank,
        supervision=supervision,
        epoch_length=args.iterations,
        loss_crop=args.loss_crop,
        adam_iterations=args.adam_iterations,
        pl_reg_fac=args.reg_fac,
        adam_feature_scale=args.adam_feature_scale,
        aug_label_transform="exact",
        metric_reg_weight=args.metric_reg_weight,
        stage_dir=out / supervision,
        stage0_seed=12345 + args.seed,
        pl_seed=args.seed,
        labels=ACDC_LABELS,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: scheduler.step())
    start = time.process_time()
    trainer.run()
    print(f"[{supervision}] trained in {time.process_time() - start:.0f} CPU s", flush=True)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_output/cyclical_acdc")
    parser.add_argument("--train-patients", type=int, default=7)
    parser.add_argument("--test-patients", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=3, default=(64, 64, 24))
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--adam-iterations", type=int, default=50)
    parser.add_argument("--loss-crop", type=int, default=2)
    # MR deviation (tuned on 4 training patients, see docs): standardised Adam features at scale 1, regulariser 25
    parser.add_argument("--adam-feature-scale", type=float, default=1.0)
    parser.add_argument("--reg-fac", type=float, default=25.0)
    parser.add_argument("--metric-reg-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="init of g, of stage-0 g and Adam projections")
    parser.add_argument("--affine", action="store_true", help="affine pre-alignment (configs/mr.json setting)")
    parser.add_argument("--skip-baselines", action="store_true", help="no NCC / MIND supervision runs")
    parser.add_argument(
        "--summarize", nargs="+", metavar="RUN_DIR", help="only summarise earlier runs (seeds) on the same test pairs"
    )
    parser.add_argument(
        "--evaluate-only", action="store_true", help="re-score the stage files of an earlier run in --out (no training)"
    )
    args = parser.parse_args()
    if args.summarize:
        summarize_runs([Path(d) for d in args.summarize], Path(args.out))
        return
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)
    if not ACDC_DIR.is_dir():
        raise SystemExit(f"ACDC not found at {ACDC_DIR}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    patients = acdc_patients()
    # both splits spread over all pathology groups (patients are ordered by group): test = every (total/test)-th
    total = args.train_patients + args.test_patients
    chosen = [patients[i] for i in np.linspace(0, len(patients) - 1, total).round().astype(int)]
    step = total / args.test_patients
    test_ids = [chosen[int(step / 2 + step * k)] for k in range(args.test_patients)]
    train_ids = [p for p in chosen if p not in test_ids]
    train_vols = [load_acdc_volume(p, args.size) for p in train_ids]
    test_vols = [load_acdc_volume(p, args.size) for p in test_ids]
    train_pairs, test_pairs = l2r_pairs(len(train_vols)), l2r_pairs(len(test_vols))
    print(f"train {train_ids} ({len(train_pairs)} pairs), test {test_ids} ({len(test_pairs)} pairs), grid {args.size}")

    rows: dict[str, dict] = {"identity": evaluate(None, test_vols, test_pairs)}
    if args.evaluate_only:  # re-score the stages saved by an earlier run in --out (no training, no baselines)
        network = make_network(args)
    else:
        network = train(args, train_vols, train_pairs, "pseudo_label", out).network
    prealigned = prealign_pairs(network, test_vols, test_pairs) if args.affine else None
    prefix = "affine + " if args.affine else ""
    if args.affine:
        rows["affine alone"] = evaluate(network, test_vols, test_pairs, prealigned, affine_only=True)
    for stage in range(args.stages + 1):
        network.feature_net.load_state_dict(torch.load(out / "pseudo_label" / f"stage_{stage:02d}.pt"))
        name = "stage 0 (random g)" if stage == 0 else f"stage {stage}"
        for test_config in STAGE_PIPELINES:
            config = {**TEST_CONFIGS[test_config], **adam_settings(args)}
            key = f"{prefix}{name}, {test_config}"
            rows[key] = evaluate(network, test_vols, test_pairs, prealigned, **config)
            print(key, {k: v for k, v in rows[key].items() if k != "per_pair_dice"}, flush=True)
    # the network now holds the last stage's weights = the final model
    for name, config in TEST_CONFIGS.items():
        rows[f"{prefix}final, {name}"] = evaluate(
            network, test_vols, test_pairs, prealigned, **config, **adam_settings(args)
        )
    for supervision in () if args.affine or args.evaluate_only or args.skip_baselines else ("ncc", "mind"):
        baseline = train(args, train_vols, train_pairs, supervision, out).network
        for name in STAGE_PIPELINES:
            rows[f"{supervision.upper()} supervision, {name}"] = evaluate(
                baseline, test_vols, test_pairs, **TEST_CONFIGS[name], **adam_settings(args)
            )
    columns = [*ACDC_LABELS.values(), "mean", "sdlogj", "folding_%", "s/pair"]
    lines = ["| setting | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    table = "\n".join(lines + [""] + stage_steps([rows], args.stages, prefix))
    print(table)
    history = json.loads((out / "pseudo_label" / "stage_history.json").read_text())
    suffix = "_rescored" if args.evaluate_only else ""
    results = {"args": vars(args), "rows": rows, "history": history}
    (out / f"results{suffix}.json").write_text(json.dumps(results, indent=2))
    (out / f"results{suffix}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
