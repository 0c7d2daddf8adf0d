"""Speed-up stability: the report's speed-up (baseline latency / pruned latency) measured in two
runs some time apart (how the pipeline did it before: baseline in `profiling`, pruned in
`evaluating`) against one interleaved run (`measure_latency_interleaved`, how it does it now),
repeated `--trials` times, optionally next to a bursty neighbour process.

    python bench/speedup.py [--device cpu|cuda] [--trials 12] [--load bursty|none] [--quick]

The models: resnet18 (cifar stem, 3x32x32, 10 classes) and the same model with every coupling
group cut to half its channels (exported by the ResNet adapter). For each trial both methods run
(which one goes first alternates); "separate" times the baseline, waits `--gap` seconds, then
times the pruned model; "interleaved" times both in one run. The table gives, per method, the
median speed-up, its min and max over the trials, and the spread (max - min) / median: the
number a user reading two reports of the same job would see move. The separate method is the
anchor, measured in the same run; the interleaved one can come out worse.

`--load bursty` starts one neighbour process (one thread) that alternates busy matrix
products and idle pauses of random length (0.2-1.5 s, seeded), like another job's data loader
on a shared host. Paste the table with the machine and `uptime` into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawada.adapters.torchvision import build_model, get_adapter
from hawada.core.device import device_name, resolve_device
from hawada.core.latency import measure_latency, measure_latency_interleaved
from hawada.core.recipe import GatesSpec, LatencySpec

ARCH, STEM, INPUT = "resnet18", "cifar", (3, 32, 32)


def models(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The baseline and a copy with every group cut to half its channels (eval, on device)."""
    torch.manual_seed(0)
    base = build_model(ARCH, num_classes=10, stem=STEM).eval()
    adapter = get_adapter(ARCH)
    groups = adapter.gate_groups(base, GatesSpec(round_to=8, min_channels=8))
    keep = {g.name: torch.arange(max(8, g.channels // 2)) for g in groups}
    pruned = adapter.export_pruned(base, keep).eval()
    return base.to(device), pruned.to(device)


def neighbour(stop: mp.synchronize.Event, seed: int) -> None:
    """A bursty CPU load: busy matmuls and idle pauses of random length."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    a = torch.randn(256, 256)
    while not stop.is_set():
        end = time.monotonic() + rng.uniform(0.2, 1.5)
        while time.monotonic() < end and not stop.is_set():
            a = (a @ a).tanh_()
        stop.wait(rng.uniform(0.2, 1.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 8 on CPU")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--gap", type=float, default=2.0, help="seconds between the separate runs")
    ap.add_argument("--load", choices=["none", "bursty"], default="bursty")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 trials, tiny settings")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.repeats, args.gap, args.batch = 2, 3, 0.1, args.batch or 2
    device = resolve_device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 8)
    spec = LatencySpec(batch_size=batch, repeats=args.repeats, warmup=3)
    base, pruned = models(device)

    stop = mp.Event()
    load = None
    if args.load == "bursty":
        load = mp.Process(target=neighbour, args=(stop, 0), daemon=True)
        load.start()
    speedups: dict[str, list[float]] = {"separate": [], "interleaved": []}
    try:
        for trial in range(args.trials):
            order = ["separate", "interleaved"][:: 1 if trial % 2 == 0 else -1]
            for method in order:
                if method == "separate":
                    b = measure_latency(base, INPUT, spec, device).median_ms
                    time.sleep(args.gap)
                    p = measure_latency(pruned, INPUT, spec, device).median_ms
                else:
                    bs, ps = measure_latency_interleaved([base, pruned], INPUT, spec, device)
                    b, p = bs.median_ms, ps.median_ms
                speedups[method].append(b / p)
            print(
                f"trial {trial + 1}/{args.trials}: separate {speedups['separate'][-1]:.3f}x, "
                f"interleaved {speedups['interleaved'][-1]:.3f}x",
                flush=True,
            )
    finally:
        stop.set()
        if load is not None:
            load.join(5)

    print()
    print(
        f"device {device_name(device)}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, batch {batch}, repeats {args.repeats}, gap {args.gap} s, "
        f"load {args.load}, trials {args.trials}, loadavg {os.getloadavg()[0]:.2f}"
        + (" (QUICK: smoke test, not a result)" if args.quick else "")
    )
    print("| method | median speed-up | min | max | spread (max-min)/median |")
    print("|---|---|---|---|---|")
    for method, values in speedups.items():
        med = statistics.median(values)
        lo, hi = min(values), max(values)
        print(f"| {method} | {med:.3f}x | {lo:.3f}x | {hi:.3f}x | {(hi - lo) / med:.1%} |")


if __name__ == "__main__":
    main()
