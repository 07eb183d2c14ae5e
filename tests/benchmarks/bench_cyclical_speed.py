"""Speed and memory of the cyclical self-training optimiser at the AbdomenCTCT grid (CPU).

Image 192x160x256, features 16x24x20x32 (1/8), Adam on 32-channel half-resolution features (96x80x128). Every case
runs in its own subprocess (``--case NAME``) so that its peak resident memory is its own; each prints one JSON line
with wall seconds, CPU seconds (all threads) and the peak RSS increase over the idle process. On a shared machine
the CPU seconds of a single-thread run are the stable measure (wall time depends on the other load).

Cases:
    convex_ice     coupled convex optimisation of both directions + 15 ICE iterations + upsampling to full size
    convex_ice_lowres  the same without the upsampling (the field on the 24x20x32 feature grid)
    adam           Adam instance optimisation, ``--adam-iterations`` iterations (per-iteration time reported)
    adam_plain     the same optimisation written plainly (avg_pool3d x3, NCDHW grid_sample, autograd everywhere),
                   i.e. how the reference computes it, on the same machine and load
    pair           full test pipeline without Adam: g on fixed, moving and re-warped moving, 2 warps with ICE
    pair_adam      the same pipeline with the Adam refinement (``--adam-iterations``, 50 in the paper)
    fwd_bwd        forward + backward of the differentiable optimiser on 16x48^3 features (training path)

Run::

    OMP_NUM_THREADS=2 python -m tests.benchmarks.bench_cyclical_speed --adam-iterations 50 \
        --out bench_output/cyclical_speed

The reference figures of the issue are 2-thread wall times on this kind of 2-core machine: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

FULL = (192, 160, 256)
HALF = tuple(n // 2 for n in FULL)
GRID = tuple(n // 8 for n in FULL)


def _smooth(shape, channels, seed):
    from common.registration.convex import box_filter

    x = box_filter(torch.randn(1, channels, *shape, generator=torch.Generator().manual_seed(seed)), 2)
    return x / x.std()


def plain_adam(feat_fixed, feat_moving, ddf, iterations):
    """Reference-style loop: smoothing by avg_pool3d, regulariser by slices, NCDHW sampling, grid rebuilt per step."""
    from common.registration import fields

    theta = (F.interpolate(ddf, size=HALF, mode="trilinear", align_corners=False) / 2).requires_grad_(True)
    optimiser = torch.optim.Adam([theta], lr=1.0)
    for _ in range(iterations):
        optimiser.zero_grad()
        phi = theta
        for _ in range(3):
            phi = F.avg_pool3d(phi, 3, stride=1, padding=1)
        reg = sum(((phi.narrow(d, 1, n - 1) - phi.narrow(d, 0, n - 1)) ** 2).mean() for d, n in zip((2, 3, 4), HALF))
        sampled = F.grid_sample(feat_moving, fields.to_sampling_grid(phi), align_corners=True)
        loss = 12 * ((sampled - feat_fixed) ** 2).mean() + 0.65 * reg
        loss.backward()
        optimiser.step()
    up = F.interpolate(phi.detach() * 2, size=FULL, mode="trilinear", align_corners=False)
    for _ in range(3):
        up = F.avg_pool3d(up, 3, stride=1, padding=1)
    return up


def run_case(name: str, adam_iterations: int) -> dict:
    from common.registration.convex import convex_register, coupled_convex, inverse_consistency, sad_cost_volume
    from common.registration.cst_pipeline import CSTRegistrationNet, register_pair
    from common.registration.instance_opt import adam_refine

    torch.manual_seed(0)
    extra: dict = {}
    if name == "convex_ice":
        fixed = _smooth(GRID, 16, 1)
        moving = torch.roll(fixed, 1, dims=2)
        work = lambda: convex_register(fixed, moving, FULL, use_ice=True)  # noqa: E731
    elif name == "convex_ice_lowres":
        fixed = 5 * _smooth(GRID, 16, 1)
        moving = torch.roll(fixed, 1, dims=2)

        def work():
            with torch.no_grad():
                forward = coupled_convex(sad_cost_volume(fixed, moving))
                backward = coupled_convex(sad_cost_volume(moving, fixed))
                return inverse_consistency(forward, backward)[0]

    elif name in ("adam", "adam_plain"):
        fixed, moving = 5 * _smooth(HALF, 32, 2), 5 * _smooth(HALF, 32, 3)
        ddf = F.interpolate(torch.randn(1, 3, 6, 5, 8, generator=torch.Generator().manual_seed(4)) * 8, size=FULL)
        if name == "adam":
            work = lambda: adam_refine(fixed, moving, ddf, iterations=adam_iterations)  # noqa: E731
        else:
            work = lambda: plain_adam(fixed, moving, ddf, adam_iterations)  # noqa: E731
        extra["iterations"] = adam_iterations
    elif name == "pair":
        net = CSTRegistrationNet().eval()
        pair = torch.rand(1, 2, *FULL) - 0.2

        def work():
            with torch.no_grad():
                return net(pair)

    elif name == "pair_adam":
        net = CSTRegistrationNet().eval()
        moving, fixed = torch.rand(1, 1, *FULL) - 0.2, torch.rand(1, 1, *FULL) - 0.2
        generator = torch.Generator().manual_seed(0)
        work = lambda: register_pair(net, moving, fixed, adam_iterations=adam_iterations, generator=generator)  # noqa
        extra["iterations"] = adam_iterations
    elif name == "fwd_bwd":
        fixed = _smooth((48, 48, 48), 16, 5).requires_grad_(True)
        moving = _smooth((48, 48, 48), 16, 6).requires_grad_(True)

        def work():
            field = convex_register(fixed, moving, (96, 96, 96))
            field.pow(2).mean().backward()
            return field

    else:
        raise ValueError(name)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if name in (
        "convex_ice",
        "convex_ice_lowres",
        "fwd_bwd",
    ):  # cheap: one warm-up call (allocator, thread pool), time the second
        work()
        if name == "fwd_bwd":
            fixed.grad = moving.grad = None
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    work()
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": name, "wall_s": wall, "cpu_s": cpu, "peak_rss_increase_mb": (peak - base_rss) / 1024, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default=None)
    parser.add_argument("--out", default="bench_output/cyclical_speed")
    parser.add_argument("--adam-iterations", type=int, default=20)
    parser.add_argument(
        "--cases",
        nargs="*",
        default=["convex_ice", "convex_ice_lowres", "fwd_bwd", "pair", "pair_adam", "adam", "adam_plain"],
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.case:
        print(json.dumps(run_case(args.case, args.adam_iterations)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases:
        cmd = [sys.executable, "-m", "tests.benchmarks.bench_cyclical_speed", "--case", case]
        cmd += ["--adam-iterations", str(args.adam_iterations)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(row, flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "?")
    lines = [f"threads: {threads}", "| case | wall s | CPU s | peak RSS increase MB |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_increase_mb']:.0f} |")
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
