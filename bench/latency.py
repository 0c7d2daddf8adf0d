"""Latency benchmark: LUT build time, predicted vs measured latency, latency- vs FLOPs-targets.

    python bench/latency.py [--device cpu|cuda] [--batch N] [--configs 20] [--quick]

1. builds the per-layer table of resnet18 (cifar stem, 3x32x32) on the device and times it;
2. calibrates it on the full model plus 4 random-width exported models;
3. predicted vs measured whole-model latency over 20 *other* random width configurations
   (goal: median absolute error <= 5% on GPU, <= 10% on CPU);
4. latency targets 0.7 and 0.5 of the measured baseline (``fit_to_budget`` with the latency cost
   and the measured loop) against a FLOPs-targeted fit at the same FLOPs. Both start from the
   same gates with random (seeded) logits — no gate training, so this compares how the two cost
   models spend a budget, not accuracy.

Whole-model "measured" numbers here are the lowest of ``--passes`` medians taken in interleaved
passes (each a full ``measure_latency`` run): on a shared host a neighbour's burst inflates one
pass, not all of them. The single-pass median error is printed too.

Prints a table; paste it with the machine description into bench/RESULTS.md ("Latency").
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawada.adapters.torchvision import build_model, get_adapter
from hawada.core.budget import fit_to_budget
from hawada.core.cost import FlopsCost
from hawada.core.device import device_name, resolve_device
from hawada.core.gates import Gates
from hawada.core.latency import measure_latency
from hawada.core.lut import LatencyCost, WidthMeasurer, build_lut, calibrate
from hawada.core.recipe import GatesSpec, LatencySpec

ARCH, STEM, INPUT = "resnet18", "cifar", (3, 32, 32)


def flops(model: torch.nn.Module) -> int:
    """FLOPs at batch 1 as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, *INPUT, device=next(model.parameters()).device))
    return fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 8 on CPU")
    ap.add_argument("--configs", type=int, default=20)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument(
        "--points", type=int, default=None, help="LUT points per axis (default: device's)"
    )
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--passes", type=int, default=3, help="interleaved measuring passes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time with one thread, a contention-free stand-in on a shared host",
    )
    ap.add_argument("--quick", action="store_true", help="5 configs, fewer repeats")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    clock = args.clock if dev.type == "cpu" else "wall"
    if clock == "cpu":
        torch.set_num_threads(1)  # process CPU time equals latency only for one thread
    gpu = dev.type == "cuda"
    batch = args.batch or (64 if gpu else 8)
    repeats = args.repeats or (50 if gpu else (5 if args.quick else 10))
    n_configs = 5 if args.quick else args.configs
    spec = LatencySpec(
        batch_size=batch,
        dtype="float32",
        repeats=repeats,
        warmup=10 if gpu else 2,
        channels_last=False,
    )

    torch.manual_seed(0)
    model = build_model(ARCH, num_classes=10, stem=STEM).to(dev).eval()
    adapter = get_adapter(ARCH)
    layers = adapter.layers(model, INPUT)
    groups = adapter.gate_groups(
        model,
        GatesSpec(round_to=args.round_to, min_channels=args.round_to, prune_residual=True),
    )
    measurer = WidthMeasurer(model, adapter.export_pruned, groups, INPUT, spec, dev, clock=clock)

    # 1. table build
    t0 = time.perf_counter()
    table = build_lut(layers, spec, dev, args.round_to, args.points, clock=clock)
    build_s = time.perf_counter() - t0
    # 2. calibration on the full model + 4 random configurations (seed 0)
    t0 = time.perf_counter()
    scale, offset = calibrate(table, layers, measurer, n_random=4, seed=0)
    calib_s = time.perf_counter() - t0
    cost = LatencyCost(layers, table)

    # 3. predicted vs measured over other random configurations (seed 1)
    rng = random.Random(1)
    configs = [measurer.random_widths(rng) for _ in range(n_configs)]
    models = [adapter.export_pruned(model, measurer.keep_for(w)) for w in configs]
    passes = [
        [measure_latency(m, INPUT, spec, dev, clock=clock).median_ms for m in models]
        for _ in range(args.passes)
    ]
    measured = [min(p[i] for p in passes) for i in range(n_configs)]
    predicted = [float(cost.cost(w)) for w in configs]
    errors = [abs(p - m) / m * 100 for p, m in zip(predicted, measured, strict=True)]
    errors_1 = [abs(p - m) / m * 100 for p, m in zip(predicted, passes[0], strict=True)]

    def robust(m: torch.nn.Module) -> float:
        return min(
            measure_latency(m, INPUT, spec, dev, clock=clock).median_ms for _ in range(args.passes)
        )

    # 4. latency targets vs FLOPs targets at equal FLOPs
    base_ms = robust(model)
    base_flops = flops(model)
    flops_cost = FlopsCost(layers)
    rows = []
    for ratio in (0.7, 0.5):
        gates = _random_gates(groups, dev)
        lat = fit_to_budget(
            gates,
            cost,
            ratio * base_ms,
            measure=lambda keep: robust(adapter.export_pruned(model, keep)),
        )
        p_lat = adapter.export_pruned(model, dict(lat))
        f_lat = flops(p_lat)
        gates = _random_gates(groups, dev)
        fl = fit_to_budget(gates, flops_cost.cost, float(f_lat))
        p_fl = adapter.export_pruned(model, dict(fl))
        # interleaved, so both see the same host load
        m_lat, m_fl, m_base = (
            min(v)
            for v in zip(
                *[
                    [
                        measure_latency(m, INPUT, spec, dev, clock=clock).median_ms
                        for m in (p_lat, p_fl, model)
                    ]
                    for _ in range(args.passes)
                ],
                strict=True,
            )
        )
        rows.append(
            (
                ratio,
                lat.met,
                f_lat / base_flops,
                m_base / m_lat,
                base_flops / f_lat,
                flops(p_fl) / base_flops,
                m_base / m_fl,
                lat.measure_rounds,
            )
        )

    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    print(f"\n### Latency benchmark — {ARCH} ({STEM} stem) {INPUT}, batch {batch}, float32")
    print(
        f"device: {device_name(dev)} ({'GPU' if gpu else cpu}); torch {torch.__version__}; "
        f"clock: {clock}; {repeats} repeats x {args.passes} interleaved passes\n"
    )
    print("| measure | value |\n|---|---|")
    print(
        f"| LUT build | {build_s:.1f} s, {len(table.entries)} entries, {table.points} points "
        f"(round_to {args.round_to}, <= {table.meta['max_points_per_axis']} points/axis) |"
    )
    print(
        f"| calibration (5 whole-model timings) | {calib_s:.1f} s, "
        f"scale {scale:.3f}, offset {offset:.3f} ms |"
    )
    print(f"| baseline latency | {base_ms:.2f} ms |")
    print(
        f"| predicted vs measured, {n_configs} random configs | median abs error "
        f"{statistics.median(errors):.1f}%, max {max(errors):.1f}% (goal <= {5 if gpu else 10}%) |"
    )
    print(
        f"| same, single-pass medians | median abs error {statistics.median(errors_1):.1f}%, "
        f"max {max(errors_1):.1f}% |"
    )
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"| host load average (1/5/15 min) at the end | {load} |")
    print(
        "\n| target (latency ratio) | met | FLOPs kept | measured speedup | FLOPs-ideal speedup "
        "| FLOPs-targeted job at same FLOPs: FLOPs kept | its measured speedup | measured rounds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.2f}x | {r[4]:.2f}x | {r[5]:.3f} "
            f"| {r[6]:.2f}x | {r[7]} |"
        )


def _random_gates(groups: list, dev: torch.device) -> Gates:
    """Gates with seeded random logits (the same for every fit, so the fits are comparable)."""
    gates = Gates(groups)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for n in gates.groups:
            p = gates.logit(n)
            p.copy_(torch.randn(p.shape, generator=g) + 2.0)
    return gates.to(dev)


if __name__ == "__main__":
    main()
