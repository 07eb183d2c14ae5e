"""Speed and memory of the cyclical self-training optimiser at the AbdomenCTCT grid (CPU, or a GPU with --device).

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

On a GPU (the paper: 1.2 s per pair with Adam): ``--device cuda --cases pair pair_adam``. Inputs are moved to the
device before the clock starts, the clock stops after ``torch.cuda.synchronize()``, every case gets one warm-up call
(CUDA context, cuDNN autotuning), and the memory column is then the peak of ``torch.cuda.max_memory_allocated``.
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


def run_case(name: str, adam_iterations: int, device: str = "cpu") -> dict:
    from common.registration.convex import convex_register, coupled_convex, inverse_consistency, sad_cost_volume
    from common.registration.cst_pipeline import CSTRegistrationNet, register_pair
    from common.registration.instance_opt import adam_refine

    torch.manual_seed(0)
    extra: dict = {}
    if name == "convex_ice":
        fixed = _smooth(GRID, 16, 1)
        moving = torch.roll(fixed, 1, dims=2)
        fixed, moving = fixed.to(device), moving.to(device)
        work = lambda: convex_register(fixed, moving, FULL, use_ice=True)  # noqa: E731
    elif name == "convex_ice_lowres":
        fixed = 5 * _smooth(GRID, 16, 1).to(device)
        moving = torch.roll(fixed, 1, dims=2)

        def work():
            with torch.no_grad():
                forward = coupled_convex(sad_cost_volume(fixed, moving))
                backward = coupled_convex(sad_cost_volume(moving, fixed))
                return inverse_consistency(forward, backward)[0]

    elif name in ("adam", "adam_plain"):
        fixed, moving = 5 * _smooth(HALF, 32, 2).to(device), 5 * _smooth(HALF, 32, 3).to(device)
        ddf = F.interpolate(torch.randn(1, 3, 6, 5, 8, generator=torch.Generator().manual_seed(4)) * 8, size=FULL)
        ddf = ddf.to(device)
        if name == "adam":
            work = lambda: adam_refine(fixed, moving, ddf, iterations=adam_iterations)  # noqa: E731
        else:
            work = lambda: plain_adam(fixed, moving, ddf, adam_iterations)  # noqa: E731
        extra["iterations"] = adam_iterations
    elif name == "pair":
        net = CSTRegistrationNet().eval().to(device)
        pair = (torch.rand(1, 2, *FULL) - 0.2).to(device)

        def work():
            with torch.no_grad():
                return net(pair)

    elif name == "pair_adam":
        net = CSTRegistrationNet().eval().to(device)
        moving, fixed = (torch.rand(1, 1, *FULL) - 0.2).to(device), (torch.rand(1, 1, *FULL) - 0.2).to(device)
        generator = torch.Generator().manual_seed(0)
        work = lambda: register_pair(net, moving, fixed, adam_iterations=adam_iterations, generator=generator)  # noqa
        extra["iterations"] = adam_iterations
    elif name == "fwd_bwd":
        fixed = _smooth((48, 48, 48), 16, 5).to(device).requires_grad_(True)
        moving = _smooth((48, 48, 48), 16, 6).to(device).requires_grad_(True)

        def work():
            field = convex_register(fixed, moving, (96, 96, 96))
            field.pow(2).mean().backward()
            return field

    else:
        raise ValueError(name)
    cuda = torch.device(device).type == "cuda"
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda or name in ("convex_ice", "convex_ice_lowres", "fwd_bwd"):
        # one warm-up call (allocator, thread pool; CUDA context and autotuning), time the second
        work()
        if name == "fwd_bwd":
            fixed.grad = moving.grad = None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    work()
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    if cuda:
        memory = {"peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    else:
        memory = {"peak_rss_increase_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024}
    return {"case": name, "device": device, "wall_s": wall, "cpu_s": cpu, **memory, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default=None)
    parser.add_argument("--out", default="bench_output/cyclical_speed")
    parser.add_argument("--adam-iterations", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--cases",
        nargs="*",
        default=["convex_ice", "convex_ice_lowres", "fwd_bwd", "pair", "pair_adam", "adam", "adam_plain"],
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.case:
        print(json.dumps(run_case(args.case, args.adam_iterations, args.device)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases:
        cmd = [sys.executable, "-m", "tests.benchmarks.bench_cyclical_speed", "--case", case]
        cmd += ["--adam-iterations", str(args.adam_iterations), "--device", args.device]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(row, flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "?")
    memory = "peak_gpu_memory_mb" if torch.device(args.device).type == "cuda" else "peak_rss_increase_mb"
    lines = [f"device: {args.device}, threads: {threads}", f"| case | wall s | CPU s | {memory} |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r[memory]:.0f} |")
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
