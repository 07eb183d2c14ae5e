"""CLMorph on real cardiac MRI (ACDC, the paper's Table IV setting, scaled to a CPU budget).

ACDC is for non-commercial research only (CC BY-NC-SA 4.0); every number this script prints derives from it.

Protocol (all methods share data, atlas, resolution, iterations and batch size):

* data: the 80 shared ACDC patients, end-diastolic frame (frame01). The copy has identity affines (spacing unknown),
  so distances are in voxels of the benchmark grid. Each volume is centre-cropped in-plane to ``--crop`` pixels (no
  label is used; the heart lies within +-50 px of the centre in every volume) and resampled to ``--size``
  (trilinear image, nearest labels). Split: every 4th patient (4 per pathology group) is a test subject (20), the
  other 60 train without labels.
* atlas: the training image closest (NCC) to the training mean, the paper's rule (its label is the only label used).
* methods: identity (atlas labels unwarped), plain MONAI VoxelMorph, CLMorph ablations (recon, recon+smooth =
  probabilistic VoxelMorph, recon+contrast, recon+smooth+BYOL) and full CLMorph, each trained through the bundle's
  ``ConfigWorkflow`` for the same number of iterations.
* metrics per test subject: Dice / HD95 / ASSD per structure (RV, MYO, LV), SDlogJ and % folding of the atlas ->
  subject field, registration Dice (subject labels warped to the atlas, the paper's Table II by-product), train
  seconds per iteration and inference seconds per volume (CPU, registration + label warp).
* beyond the paper (full CLMorph): multi-atlas fusion (K atlases, majority and locally weighted voting) and
  sampling-based uncertainty (N velocity samples: Monte-Carlo segmentation and mean entropy).

Run (about 20 min on 2 shared CPU cores)::

    OMP_NUM_THREADS=1 nice -n 10 python tests/benchmarks/bench_clmorph_acdc.py --out bench_output/clmorph_acdc

Outputs in ``--out`` (git-ignored): ``results.md`` / ``results.json``, ``dice_boxplot.png``, ``overlay_*.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from common.evaluation.figures import save_dice_boxplot, save_overlay_png  # noqa: E402
from common.evaluation.metrics import deformation_stats, per_label_metrics  # noqa: E402
from common.io import atomic_json_dump, atomic_write_text, save_nifti  # noqa: E402
from common.registration.atlas import AtlasRegistrationInferer, select_atlases  # noqa: E402
from common.registration.fields import warp_labels  # noqa: E402
from tests.bundles.harness import BUNDLES_DIR, run_workflow  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "acdc"
BUNDLE = BUNDLES_DIR / "clmorph_brain_mri_registration"
LABELS = {1: "RV", 2: "MYO", 3: "LV"}
NARROW = {"encoder_channels": [8, 16, 16, 16], "decoder_channels": [16, 16, 16, 16, 16, 8, 8]}
METHODS = {
    "VoxelMorph (MONAI)": (
        ["configs/train.json", "configs/voxelmorph.json"],
        {
            "vxm_channels": [8, 16, 16, 16, 16, 16],
            "vxm_unet_out_channels": 16,
            "vxm_final_conv_channels": [8, 8],
            "learning_rate": 0.001,
        },
    ),
    "CLMorph recon": (["configs/train.json"], {"alpha": 0.0, "beta": 0.0}),
    "CLMorph recon+smooth": (["configs/train.json"], {"beta": 0.0}),
    "CLMorph recon+contrast": (["configs/train.json"], {"alpha": 0.0}),
    "CLMorph recon+smooth+BYOL": (["configs/train.json"], {"contrastive": "byol"}),
    "CLMorph full": (["configs/train.json"], {}),
}


def _resize(volume: np.ndarray, size: tuple[int, ...], mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if mode == "nearest":
        return F.interpolate(t, size=size, mode="nearest-exact")[0, 0].numpy()
    return F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()


def _centre_crop(volume: np.ndarray, crop: int) -> np.ndarray:
    out = volume
    for axis in (0, 1):
        n = out.shape[axis]
        if n < crop:  # pad symmetrically with zeros
            before = (crop - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, crop - n - before)
            out = np.pad(out, pad)
        else:
            start = (n - crop) // 2
            out = np.take(out, range(start, start + crop), axis=axis)
    return out


def prepare(out: Path, size: tuple[int, ...], crop: int) -> Path:
    """Write the cropped/resampled ED volumes and a datalist (train 60 unlabelled use, test 20)."""
    datalist = out / "data" / "datalist.json"
    if datalist.is_file() and json.loads(datalist.read_text()).get("bench", {}) == {"size": list(size), "crop": crop}:
        return datalist
    patients = sorted({p.name.split("_")[0] for p in DATA.glob("patient*_frame01.nii.gz")})
    entries = []
    for pid in patients:
        image = np.asarray(nib.load(str(DATA / f"{pid}_frame01.nii.gz")).get_fdata(), dtype=np.float32)
        label = np.asarray(nib.load(str(DATA / f"{pid}_frame01_gt.nii.gz")).dataobj, dtype=np.uint8)
        image = _resize(_centre_crop(image, crop), size, "trilinear")
        label = _resize(_centre_crop(label, crop), size, "nearest").astype(np.uint8)
        save_nifti(image, np.eye(4), out / "data" / "images" / f"{pid}.nii.gz")
        save_nifti(label, np.eye(4), out / "data" / "labels" / f"{pid}.nii.gz", dtype=np.uint8)
        entries.append({"image": f"images/{pid}.nii.gz", "label": f"labels/{pid}.nii.gz", "subject": pid})
    test = entries[3::4]
    train = [e for e in entries if e not in test]
    content = {
        "name": "acdc_ed_bench",
        "description": f"ACDC ED frames, centre crop {crop} px, resampled to {list(size)} (non-commercial research)",
        "labels": {"0": "background", **{str(k): v for k, v in LABELS.items()}},
        "tensorImageSize": "3D",
        "modality": {"0": "MR"},
        "bench": {"size": list(size), "crop": crop},
        "training": train,
        "validation": train[:2],
        "test": test,
    }
    atomic_json_dump(content, datalist)
    return datalist


def prealign_to_atlas(datalist: Path, atlas: dict, out: Path) -> Path:
    """Affine (in-plane, image-based, no label) alignment of every volume to the atlas; returns a new datalist.

    The brain datasets of the paper come MNI-aligned; ACDC does not, so every method (and the identity baseline)
    starts from this pre-alignment. Each entry keeps ``affine_to_subject``: the field mapping the aligned grid back to
    the subject's grid, so segmentations are scored against the unaligned ground truth.
    """
    from common.registration.affine import affine_ddf, invert_affine, prealign

    target = out / "aligned" / "datalist.json"
    if target.is_file():
        return target
    content = json.loads(datalist.read_text())
    atlas_image = _zscore(_load(atlas["image"]))
    for section in ("training", "validation", "test"):
        for entry in content[section]:
            name = Path(entry["image"]).name
            image = _zscore(_load(str(datalist.parent / entry["image"])))
            result = prealign(image, atlas_image, mode="affine", similarity="lncc", init="com", frozen_axes=(2,))
            label = _load(str(datalist.parent / entry["label"])).long()
            aligned_label = warp_labels(label, result.ddf)
            save_nifti(result.warped[0, 0].numpy(), np.eye(4), out / "aligned" / "images" / name)
            save_nifti(aligned_label[0, 0].numpy(), np.eye(4), out / "aligned" / "labels" / name, dtype=np.uint8)
            back = affine_ddf(invert_affine(result.matrix), image.shape[2:])
            (out / "aligned" / "fields").mkdir(parents=True, exist_ok=True)
            np.save(out / "aligned" / "fields" / f"{name.split('.')[0]}.npy", back[0].numpy())
            entry["subject_image"] = str(datalist.parent / entry["image"])
            entry["subject_label"] = str(datalist.parent / entry["label"])
            entry["to_subject"] = f"fields/{name.split('.')[0]}.npy"
            entry["image"], entry["label"] = f"images/{name}", f"labels/{name}"
    atomic_json_dump(content, target)
    return target


def _load(path: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(nib.load(path).dataobj, dtype=np.float32))[None, None]


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-8)


def _subject_truth(entry: dict) -> torch.Tensor:
    """Ground truth on the subject's own (unaligned) grid."""
    return _load(entry.get("subject_label", entry["label"])).long()


def _to_subject(seg: torch.Tensor, entry: dict) -> torch.Tensor:
    """A label map on the aligned grid mapped back to the subject's grid (nearest; identity without prealignment)."""
    if "to_subject" not in entry:
        return seg
    back = torch.from_numpy(np.load(entry["to_subject"]))[None]
    return warp_labels(seg, back)


def train_method(name: str, files: list[str], extra: dict, datalist: Path, out: Path, args) -> tuple[Path, float, int]:
    """Train one method through the bundle; return (weights, seconds per iteration, iterations)."""
    slug = name.lower().replace(" ", "_").replace("+", "_").replace("(", "").replace(")", "")
    ckpt_dir = out / "models" / slug
    pairs = args.iterations_per_epoch * args.batch
    overrides = {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(datalist.parent),
        "datalist": str(datalist),
        "ckpt_dir": str(ckpt_dir),
        "output_dir": str(out / "runs" / slug),
        "image_size": list(args.size),
        "crop_size": list(args.train_crop),
        "epochs": args.epochs,
        "pairs_per_epoch": pairs,
        "batch_size": args.batch,
        "val_interval": args.epochs + 1,
        "int_downsize": 2,
        "checkpoint_interval": 10**6,
        "seed": 0,
        **({} if "VoxelMorph" in name else NARROW),
        **extra,
    }
    iterations = args.epochs * args.iterations_per_epoch
    weights = ckpt_dir / "model.pt"
    timing = ckpt_dir / "timing.json"
    if weights.is_file() and timing.is_file():  # a finished earlier run: reuse it
        return weights, json.loads(timing.read_text())["seconds_per_iteration"], iterations
    start = time.perf_counter()
    failing = run_workflow(BUNDLE, files, "train", overrides)
    if failing:
        raise RuntimeError(f"{name}: bundle properties failing {failing}")
    per_iteration = (time.perf_counter() - start) / iterations
    atomic_json_dump({"seconds_per_iteration": per_iteration, "iterations": iterations}, timing)
    return weights, per_iteration, iterations


def build_network(name: str, files: list[str], extra: dict, weights: Path, size) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / f) for f in files])
    parser.update({"int_downsize": 2, **({} if "VoxelMorph" in name else NARROW), **extra})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


def evaluate(net, atlas, test, name: str, aligned: bool = True) -> dict:
    """Per-subject metrics for one network (None = no deformable registration).

    With ``aligned`` False the atlas labels are used as they are (no registration at all); otherwise they go through
    the affine pre-alignment (and the network's field, if any) into each subject's grid.
    """
    atlas_image, atlas_label = _zscore(_load(atlas["image"])), _load(atlas["label"]).long()
    rows, times = [], []
    direction = _direction(net)
    atlas_dict = {"image": atlas_image[0], "label": atlas_label[0]}
    inferer = AtlasRegistrationInferer(atlas_dict, direction=direction, outputs=("ddf",))
    forward = AtlasRegistrationInferer(atlas_dict, direction="atlas_to_subject")
    for entry in test:
        image, label = _zscore(_load(entry["image"])), _load(entry["label"]).long()
        truth = _subject_truth(entry)
        with torch.no_grad():
            if net is None:
                ddf = torch.zeros(1, 3, *image.shape[2:])
                seg = _to_subject(atlas_label, entry) if aligned else atlas_label
                reg_seg = label if aligned else truth
                other = seg
            else:
                start = time.perf_counter()
                out = inferer(image, net)
                times.append(time.perf_counter() - start)
                seg, ddf = _to_subject(out["seg"].long(), entry), out["ddf"]
                other = _to_subject(forward(image, net)["seg"].long(), entry) if direction == "inverse" else seg
                # registration by-product (Table II): subject -> atlas, subject labels onto the atlas
                reg_seg = warp_labels(label, net(torch.cat([image, atlas_image], 1)))
        metrics = per_label_metrics(seg[0, 0], truth[0, 0], LABELS)
        other_dice = per_label_metrics(other[0, 0], truth[0, 0], LABELS, metrics=("dice",))
        reg = per_label_metrics(reg_seg[0, 0], atlas_label[0, 0], LABELS, metrics=("dice",))
        rows.append(
            {
                "case": entry["subject"],
                **{f"{s}_{m}": metrics[s][m] for s in LABELS.values() for m in ("dice", "hd95", "assd")},
                "reg_dice": float(np.mean([reg[s]["dice"] for s in LABELS.values()])),
                "dice_atlas_to_subject": float(np.mean([other_dice[s]["dice"] for s in LABELS.values()])),
                **deformation_stats(ddf[0]),
            }
        )
    return {
        "method": name,
        "direction": direction if net is not None else "-",
        "cases": rows,
        "inference_seconds": float(np.mean(times)) if times else 0.0,
    }


def _direction(net) -> str:
    """The bundle's default label transfer (paper-literal exp(-z)) when the network has an SVF, else atlas as moving."""
    return "inverse" if net is not None and hasattr(net, "inverse_ddf") else "atlas_to_subject"


def beyond_paper(net, atlas, train, test, args) -> dict:
    """Multi-atlas fusion and sampling uncertainty for the full model: mean Dice of each variant.

    The K atlases are the benchmark atlas plus the next K - 1 training images closest to the training mean.
    """
    results = {}
    ranked = [a for a in select_atlases(train, None, args.num_atlases + 1) if a["subject"] != atlas["subject"]]
    atlases = [atlas, *ranked[: args.num_atlases - 1]]
    prepared = [{"image": _zscore(_load(a["image"]))[0], "label": _load(a["label"])[0]} for a in atlases]
    d = _direction(net)
    variants = {
        "single atlas": AtlasRegistrationInferer(prepared[0], direction=d),
        f"{args.num_atlases} atlases, majority": AtlasRegistrationInferer(prepared, direction=d, fusion="majority"),
        f"{args.num_atlases} atlases, local weighted": AtlasRegistrationInferer(prepared, direction=d, fusion="local"),
        f"1 atlas, {args.num_samples} samples (MC)": AtlasRegistrationInferer(
            prepared[0], direction=d, num_samples=args.num_samples
        ),
    }
    for label, inferer in variants.items():
        dice, entropy = [], []
        for entry in test:
            image, gt = _zscore(_load(entry["image"])), _subject_truth(entry)
            with torch.no_grad():
                out = inferer(image, net)
            seg = _to_subject((out["seg_mc"] if "seg_mc" in out else out["seg"]).long(), entry)
            m = per_label_metrics(seg[0, 0], gt[0, 0], LABELS, metrics=("dice",))
            dice.append(np.mean([m[s]["dice"] for s in LABELS.values()]))
            if "entropy" in out:
                entropy.append(float(out["entropy"].mean()))
        results[label] = {"mean_dice": float(np.mean(dice)), "std_dice": float(np.std(dice))}
        if entropy:
            results[label]["mean_entropy_nats"] = float(np.mean(entropy))
    return results


def _entries(datalist: Path, section: str) -> list[dict]:
    base = datalist.parent
    paths = ("image", "label", "to_subject")
    return [
        {k: str(base / v) if k in paths else v for k, v in e.items()} for e in json.loads(datalist.read_text())[section]
    ]


def _fmt(values, digits=3) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def table(summaries: list[dict], train_info: dict) -> str:
    head = (
        "| method | transfer | " + " | ".join(f"Dice {s}" for s in LABELS.values()) + " | mean Dice | HD95 | ASSD"
        " | mean Dice, atlas as moving | reg. Dice | SDlogJ | % folding | train s/it | infer s/vol |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        rows = s["cases"]
        dice = [np.mean([r[f"{k}_dice"] for k in LABELS.values()]) for r in rows]
        hd = [np.mean([r[f"{k}_hd95"] for k in LABELS.values()]) for r in rows]
        assd = [np.mean([r[f"{k}_assd"] for k in LABELS.values()]) for r in rows]
        per = " | ".join(_fmt([r[f"{k}_dice"] for r in rows]) for k in LABELS.values())
        sec, _ = train_info.get(s["method"], (None, None))
        lines.append(
            f"| {s['method']} | {s['direction']} | {per} | **{_fmt(dice)}** | {_fmt(hd, 2)} | {_fmt(assd, 2)} "
            f"| {_fmt([r['dice_atlas_to_subject'] for r in rows])} "
            f"| {_fmt([r['reg_dice'] for r in rows])} | {_fmt([r['sdlogj'] for r in rows])} "
            f"| {np.mean([r['folding_percent'] for r in rows]):.3f} | {'-' if sec is None else f'{sec:.2f}'} "
            f"| {s['inference_seconds']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench_output" / "clmorph_acdc")
    parser.add_argument("--size", type=int, nargs=3, default=(48, 48, 16))
    parser.add_argument("--train-crop", type=int, nargs=3, default=(48, 48, 16))
    parser.add_argument("--crop", type=int, default=176)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations-per-epoch", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--num-atlases", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--prealign", type=int, default=1, help="1: affine in-plane pre-alignment to the atlas")
    args = parser.parse_args()
    args.out = args.out.resolve()  # workflows run from the bundle root
    if not DATA.is_dir():
        print(f"SKIP: ACDC not found at {DATA}")
        return
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = prepare(args.out, tuple(args.size), args.crop)
    raw_train, raw_test = _entries(raw, "training"), _entries(raw, "test")
    atlas = select_atlases(raw_train, None, 1)[0]
    print(f"{len(raw_train)} train / {len(raw_test)} test; atlas {atlas['subject']} (closest to the mean)", flush=True)
    summaries = [evaluate(None, atlas, raw_test, "identity (no registration)", aligned=False)]
    datalist = prealign_to_atlas(raw, atlas, args.out) if args.prealign else raw
    train, test = _entries(datalist, "training"), _entries(datalist, "test")
    atlas = next(e for e in train if e["subject"] == atlas["subject"])
    if args.prealign:
        summaries.append(evaluate(None, atlas, test, "affine pre-alignment only"))
    train_info: dict[str, tuple[float, int]] = {}
    extra_results, full_net = {}, None
    for name in args.methods:
        files, extra = METHODS[name]
        weights, per_it, iterations = train_method(name, files, extra, datalist, args.out, args)
        train_info[name] = (per_it, iterations)
        net = build_network(name, files, extra, weights, args.size)
        summaries.append(evaluate(net, atlas, test, name))
        print(table(summaries[-1:], train_info).splitlines()[-1], flush=True)
        if name == "CLMorph full":
            full_net = net
    if full_net is not None:
        extra_results = beyond_paper(full_net, atlas, train, test, args)
        atlas_image, atlas_label = _zscore(_load(atlas["image"])), _load(atlas["label"]).long()
        case = test[0]
        image, gt = _zscore(_load(case["image"])), _load(case["label"]).long()
        with torch.no_grad():
            inferer = AtlasRegistrationInferer({"image": atlas_image[0], "label": atlas_label[0]}, direction="inverse")
            seg = inferer(image, full_net)["seg"]
        save_overlay_png(
            image[0, 0],
            {"atlas (affine only)": atlas_label[0, 0], "CLMorph": seg[0, 0].long(), "ground truth": gt[0, 0]},
            args.out / f"overlay_{case['subject']}.png",
            title=f"ACDC {case['subject']} (non-commercial research data)",
        )
    boxplot_rows = [
        {"label": f"{s['method'][:22]}", "case": r["case"], "dice": np.mean([r[f"{k}_dice"] for k in LABELS.values()])}
        for s in summaries
        for r in s["cases"]
    ]
    save_dice_boxplot(boxplot_rows, args.out / "dice_boxplot.png", title="ACDC ED: mean Dice per method")
    budget = (
        f"{args.epochs * args.iterations_per_epoch} iterations x batch {args.batch} random pairs, "
        f"grid {list(args.size)} (train crop {list(args.train_crop)}), Adam 3e-3 (VoxelMorph 1e-3), "
        "integration at 1/2 resolution"
    )
    text = [
        "ACDC (non-commercial research use only): ED frames, 60 train (label-free) / 20 test, one atlas; "
        "distances in voxels (spacing unknown).",
        f"Budget: {budget}. torch threads 1, CPU shared with other jobs.",
        "",
        table(summaries, train_info),
    ]
    if extra_results:
        text += ["", "| full CLMorph variant | mean Dice | mean entropy (nats) |", "|---|---|---|"]
        for label, r in extra_results.items():
            entropy = f"{r['mean_entropy_nats']:.4f}" if "mean_entropy_nats" in r else "-"
            text.append(f"| {label} | {r['mean_dice']:.3f} ± {r['std_dice']:.3f} | {entropy} |")
    report = "\n".join(text) + "\n"
    atomic_write_text(args.out / "results.md", report)
    atomic_json_dump(
        {
            "summaries": summaries,
            "train": train_info,
            "beyond_paper": extra_results,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        },
        args.out / "results.json",
    )
    print(report, flush=True)


if __name__ == "__main__":
    main()
