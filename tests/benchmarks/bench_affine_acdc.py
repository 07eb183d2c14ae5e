"""Affine atlas-to-subject label transfer on ACDC short-axis cine MRI (ACDC: non-commercial research use only).

Why: ACDC hearts sit at different positions, sizes and angles in each field of view, unlike the pre-aligned data of the
registration papers; this measures how much ``common.registration.affine.prealign`` recovers before any deformable
stage. Every test subject (held-out patients, end-diastole) is registered to each atlas (training patients; the
settings below were chosen on other training patients, never on the test split): moving =
subject, fixed = atlas, so a dilated atlas heart mask can focus the similarity; the atlas labels then reach the subject
through the inverse matrix with nearest-neighbour warping. Volumes are resampled to one grid (default 96 x 96 x 16);
the spacing is unknown (identity NIfTI affines), so everything is in voxels of that grid.

Run (about 5-10 min on one CPU core):
    OMP_NUM_THREADS=1 nice -n 10 python tests/benchmarks/bench_affine_acdc.py
Writes ``bench_output/affine/{results.json, cases.csv, table.md}`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Resize

from common.evaluation.metrics import per_label_metrics
from common.io import atomic_json_dump, atomic_write_text
from common.registration import fields
from common.registration.affine import affine_ddf, invert_affine, prealign

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "acdc"
LABELS = {1: "RV", 2: "MYO", 3: "LV"}

# name -> prealign keyword arguments (None = identity); "focus" adds the dilated atlas heart as fixed mask.
# Two pyramid levels (in-plane factors 4, 2 of the 96 x 96 grid): a full-resolution level cost 3x the time for no gain.
COMMON = {"levels": (4, 2), "iterations": (100, 50)}
VARIANTS = {
    "identity": None,
    "affine 3D, whole image": {"mode": "affine", **COMMON},
    "affine in-plane, whole image": {"mode": "affine", "frozen_axes": (2,), **COMMON},
    "affine in-plane, dilated atlas heart": {"mode": "affine", "frozen_axes": (2,), "focus": True, **COMMON},
    "affine in-plane, dilated atlas heart, search init": {
        "mode": "affine",
        "frozen_axes": (2,),
        "focus": True,
        "init": "search",
        **COMMON,
    },
    "similarity in-plane, dilated atlas heart": {"mode": "similarity", "frozen_axes": (2,), "focus": True, **COMMON},
    "similarity in-plane, dilated atlas heart, search init": {
        "mode": "similarity",
        "frozen_axes": (2,),
        "focus": True,
        "init": "search",
        **COMMON,
    },
}


def load_case(patient: str, frame: str, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``[1, *shape]`` (linear, anti-aliased) and label ``[1, *shape]`` (nearest) on the common grid."""
    image = nib.load(DATA / f"{patient}_{frame}.nii.gz").get_fdata(dtype=np.float32)
    label = np.asarray(nib.load(DATA / f"{patient}_{frame}_gt.nii.gz").dataobj, dtype=np.uint8)
    image = Resize(shape, mode="trilinear", anti_aliasing=True)(torch.from_numpy(image)[None])
    label = Resize(shape, mode="nearest-exact")(torch.from_numpy(label.astype(np.float32))[None])
    return torch.as_tensor(image).float(), torch.as_tensor(label).round().to(torch.uint8)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """In-plane (axes 0, 1) square dilation of a ``[B, 1, X, Y, Z]`` mask."""
    size = 2 * radius + 1
    return F.max_pool3d(mask.float(), (size, size, 1), stride=1, padding=(radius, radius, 0))


def dice_rows(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    scores = per_label_metrics(pred[0], gt[0], LABELS, metrics=("dice",))
    return {name: float(scores[name]["dice"]) for name in LABELS.values()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 16))
    parser.add_argument("--num_atlases", type=int, default=2)
    parser.add_argument("--test_every", type=int, default=4, help="every n-th patient (sorted) is a test subject")
    parser.add_argument("--test_offset", type=int, default=1, help="index of the first test patient (sorted)")
    parser.add_argument("--mask_radius", type=int, default=8, help="in-plane dilation of the atlas heart, voxels")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--output_dir", default=str(REPO / "bench_output" / "affine"))
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"ACDC not found at {DATA}")
    torch.manual_seed(0)
    shape = tuple(args.shape)

    patients = sorted({p.name.split("_")[0] for p in DATA.glob("patient*_frame01.nii.gz")})
    test = patients[args.test_offset :: args.test_every]
    train = [p for p in patients if p not in test]
    atlases = train[:: max(1, len(train) // args.num_atlases)][: args.num_atlases]
    print(f"{len(test)} test subjects, atlases {atlases}, grid {shape}", flush=True)

    subjects = [load_case(p, "frame01", shape) for p in test]
    subject_images = torch.stack([s[0] for s in subjects])  # [N, 1, *shape]
    subject_labels = torch.stack([s[1] for s in subjects])

    rows = []
    for atlas_name in atlases:
        atlas_image, atlas_label = (t[None] for t in load_case(atlas_name, "frame01", shape))
        heart = dilate(atlas_label > 0, args.mask_radius)
        for variant in args.variants:
            options = VARIANTS[variant]
            start, start_cpu = time.perf_counter(), time.process_time()
            if options is None:
                matrix = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1).expand(len(test), 3, 4)
            else:
                kwargs = {k: v for k, v in options.items() if k != "focus"}
                mask = heart if options.get("focus") else None
                matrix = prealign(subject_images, atlas_image, fixed_mask=mask, **kwargs).matrix
            # atlas labels onto each subject: subject voxel -> atlas voxel is the inverse of (atlas -> subject)
            transferred = fields.warp_labels(
                atlas_label.expand(len(test), -1, -1, -1, -1), affine_ddf(invert_affine(matrix), shape)
            )
            seconds = (time.perf_counter() - start) / len(test)
            cpu_seconds = (time.process_time() - start_cpu) / len(test)
            for name, pred, gt in zip(test, transferred, subject_labels):
                rows.append(
                    {
                        "variant": variant,
                        "atlas": atlas_name,
                        "subject": name,
                        "seconds": seconds,
                        "cpu_seconds": cpu_seconds,
                        **dice_rows(pred, gt),
                    }
                )
            last = [r for r in rows if r["variant"] == variant and r["atlas"] == atlas_name]
            mean = np.mean([[r[k] for k in LABELS.values()] for r in last])
            print(f"  atlas {atlas_name} | {variant}: mean Dice {mean:.3f}, {cpu_seconds:.2f} CPU s/pair", flush=True)

    table = ["| variant | RV | MYO | LV | mean | CPU s / pair | wall s / pair |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for variant in args.variants:
        sel = [r for r in rows if r["variant"] == variant]
        per = {k: float(np.mean([r[k] for r in sel])) for k in LABELS.values()}
        per["mean"] = float(np.mean(list(per.values())))
        per["seconds_per_pair"] = float(np.mean([r["seconds"] for r in sel]))
        per["cpu_seconds_per_pair"] = float(np.mean([r["cpu_seconds"] for r in sel]))
        summary[variant] = per
        table.append(
            f"| {variant} | {per['RV']:.3f} | {per['MYO']:.3f} | {per['LV']:.3f} | **{per['mean']:.3f}** "
            f"| {per['cpu_seconds_per_pair']:.2f} | {per['seconds_per_pair']:.2f} |"
        )
    text = "\n".join(table)
    print(text)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_json_dump({"args": vars(args), "test": test, "atlases": atlases, "summary": summary}, out / "results.json")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "cases.csv", buffer.getvalue())
    atomic_write_text(out / "table.md", text + "\n")


if __name__ == "__main__":
    main()
