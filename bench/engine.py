"""Engine benchmark: ResNet-18 (cifar stem) on Fashion-MNIST at 32x32, compressed to 50% FLOPs.

    python bench/engine.py [--quick] [--threads 2] [--limit N] [--out DIR]

1. trains a baseline on the train split (`hawada.worker.baseline.train_baseline`, modest steps);
2. runs the whole job in-process (`hawada.worker.pipeline.run_job`): gate training with
   distillation and the FLOPs penalty, export, one fine-tune epoch, evaluation, packaging;
3. measures the gate-training step time against a plain forward+backward+SGD step of the same
   model at the same batch (same number of timed steps after warm-up, interleaved rounds,
   medians): the overhead of gates + teacher pass + cost penalty. Goal <= 1.15.

Prints a rich table plus a Markdown block; paste it with the machine line into bench/RESULTS.md
("Engine"). Timings here never decide a test.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawada.adapters.torchvision import get_adapter, load_pruned
from hawada.core.cost import make_cost_model
from hawada.core.data import load_data
from hawada.core.device import device_name
from hawada.core.gates import Gates, attach
from hawada.core.latency import measure_latency
from hawada.core.recipe import parse_recipe
from hawada.core.train import train_classifier, train_gates
from hawada.worker.baseline import save_weights, train_baseline
from hawada.worker.pipeline import JobContext, run_job

# Sized for a 2-core host shared with other work (about 4 s per ResNet-18 step at 32x32, batch
# 32): the full run takes roughly 40 minutes there; --limit scales the data.
FULL = {
    "limit": 4000,
    "base_steps": 200,
    "gate_steps": 150,
    "batch": 32,
    "finetune": 1.0,
    "timed_steps": 10,
    "rounds": 2,
}
QUICK = {
    "limit": 2000,
    "base_steps": 60,
    "gate_steps": 60,
    "batch": 32,
    "finetune": 1.0,
    "timed_steps": 8,
    "rounds": 2,
}
WARMUP_STEPS = 3
LATENCY_PASSES = 5


def make_recipe(cfg: dict[str, Any]) -> Any:
    """The benchmark's recipe (Fashion-MNIST, 32x32, 50% FLOPs, one fine-tune epoch)."""
    return parse_recipe(
        {
            "model": {
                "arch": "resnet18",
                "num_classes": 10,
                "stem": "cifar",
                "input_size": [3, 32, 32],
                "normalize": {"mean": [0.286, 0.286, 0.286], "std": [0.353, 0.353, 0.353]},
            },
            "data": {
                "source": "fashion-mnist",
                "batch_size": cfg["batch"],
                "val_fraction": 0.1,
                "seed": 0,
                "limit": cfg["limit"],
            },
            "target": {"metric": "flops", "ratio": 0.5},
            "train": {"steps": cfg["gate_steps"], "lr": 0.05, "log_every": 10},
            "finetune": {"epochs": cfg["finetune"], "lr": 0.01, "recalibrate_bn": True},
            "latency": {"batch_size": 1, "repeats": 30, "warmup": 5, "device": "cpu"},
        }
    )


def _step_times(run: Callable[[Callable[[dict], None], int], Any], steps: int) -> list[float]:
    """Seconds per step of `run(on_step, steps)`, from consecutive on_step timestamps."""
    stamps = [time.perf_counter()]
    run(lambda _row: stamps.append(time.perf_counter()), steps)
    return [b - a for a, b in itertools.pairwise(stamps)][WARMUP_STEPS:]


def _plain_steps(model: torch.nn.Module, data: Any, batch: int, steps: int) -> list[float]:
    """Step times of ordinary supervised training of a copy of `model`."""
    student = copy.deepcopy(model)
    return _step_times(
        lambda cb, n: train_classifier(
            student, data, steps=n, lr=0.01, device="cpu", batch_size=batch, on_step=cb
        ),
        steps,
    )


def _gate_steps(
    model: torch.nn.Module, data: Any, recipe: Any, cost: Any, steps: int
) -> list[float]:
    """Step times of gate training on `model` (fresh gates, attached for the run only)."""
    adapter = get_adapter(recipe.model.arch)
    gates = Gates(adapter.gate_groups(model, recipe.gates))
    handle = attach(model, gates)
    try:
        return _step_times(
            lambda cb, n: train_gates(model, gates, cost, data, recipe, device="cpu", on_step=cb),
            steps,
        )
    finally:
        handle.remove()


def step_time_ratio(
    model: torch.nn.Module, data: Any, recipe: Any, timed: int, rounds: int
) -> dict[str, float]:
    """Median gate-training step / median plain training step (same model, same batch)."""
    adapter = get_adapter(recipe.model.arch)
    cost = make_cost_model("flops", adapter.layers(model, recipe.model.input_size))
    steps = WARMUP_STEPS + timed
    timing_recipe = recipe.model_copy(deep=True)
    timing_recipe.train.steps = steps
    timing_recipe.train.log_every = 1  # on_step (the timestamps) fires on logged steps only
    plain: list[float] = []
    gated: list[float] = []
    for _ in range(rounds):  # interleaved: a neighbour's burst hits both kinds, not one
        plain += _plain_steps(model, data, recipe.data.batch_size, steps)
        gated += _gate_steps(model, data, timing_recipe, cost, steps)
    p, g = statistics.median(plain), statistics.median(gated)
    return {"plain_s": p, "gate_s": g, "ratio": g / p, "timed_steps": len(plain)}


def interleaved_latency(
    baseline: torch.nn.Module, pruned: torch.nn.Module, recipe: Any, passes: int = LATENCY_PASSES
) -> dict[str, float]:
    """Batch-1 CPU latency of both models, alternating passes, lowest median of each.

    The job measures baseline and pruned minutes apart; on a shared host a neighbour's burst
    can land on either. Alternating passes and keeping each model's best median compares them
    under the same conditions.
    """
    size = recipe.model.input_size
    best = {"baseline_ms": float("inf"), "pruned_ms": float("inf")}
    for _ in range(passes):
        for key, m in (("baseline_ms", baseline), ("pruned_ms", pruned)):
            best[key] = min(best[key], measure_latency(m, size, recipe.latency, "cpu").median_ms)
    best["ratio"] = best["pruned_ms"] / best["baseline_ms"]
    return best


def _fmt_int(v: int) -> str:
    return f"{v / 1e6:.2f} M"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small subset, few steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--limit", type=int, default=None, help="Fashion-MNIST samples used")
    parser.add_argument("--out", type=Path, default=None, help="keep the job's artifacts here")
    args = parser.parse_args(argv)
    cfg: dict[str, Any] = dict(QUICK if args.quick else FULL)
    if args.limit:
        cfg["limit"] = args.limit
    torch.set_num_threads(args.threads)
    recipe = make_recipe(cfg)
    started = time.perf_counter()

    data = load_data(recipe)
    print(
        f"data: {data.n_train} train / {data.n_heldout} held-out Fashion-MNIST images at 32x32",
        flush=True,
    )
    model, base_acc, base_t = train_baseline(
        recipe,
        steps=cfg["base_steps"],
        lr=0.05,
        device="cpu",
        data=data,
        log=lambda m: print("baseline", m, flush=True),
    )
    print(f"baseline held-out accuracy {base_acc:.4f} after {base_t['train_s']:.0f} s", flush=True)

    ratio = step_time_ratio(model, data, recipe, cfg["timed_steps"], cfg["rounds"])
    print(
        f"step time: plain {ratio['plain_s'] * 1e3:.0f} ms, gate {ratio['gate_s'] * 1e3:.0f} ms, "
        f"ratio {ratio['ratio']:.3f}",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "baseline.safetensors"
        save_weights(model, weights)
        out = args.out or Path(tmp) / "job"

        def on_event(ev: dict[str, Any]) -> None:
            if ev["kind"] == "phase":
                print(f"phase {ev['phase']}", flush=True)

        report = run_job(
            JobContext(recipe=recipe, weights=weights, out_dir=out, device="cpu", on_event=on_event)
        )
        pruned = load_pruned(out / "pruned.json", out / "pruned.safetensors")
        latency = interleaved_latency(model, pruned, recipe)
    total = time.perf_counter() - started
    print_tables(report, ratio, latency, cfg, base_t["train_s"], total, args)
    return 0


def print_tables(
    report: dict[str, Any],
    ratio: dict[str, float],
    latency: dict[str, float],
    cfg: dict[str, Any],
    base_train_s: float,
    total_s: float,
    args: argparse.Namespace,
) -> None:
    """Rich table on the terminal and the same numbers as Markdown for RESULTS.md."""
    from rich.console import Console
    from rich.table import Table

    b, p = report["baseline"], report["pruned"]
    rows = [
        (
            "held-out accuracy",
            f"{b['accuracy']:.4f}",
            f"{p['accuracy']:.4f}",
            f"{p['accuracy'] - b['accuracy']:+.4f}",
        ),
        (
            "params",
            _fmt_int(b["params"]),
            _fmt_int(p["params"]),
            f"{p['params'] / b['params']:.3f}",
        ),
        (
            "FLOPs (batch 1)",
            _fmt_int(b["flops"]),
            _fmt_int(p["flops"]),
            f"{p['flops'] / b['flops']:.3f}",
        ),
        (
            "CPU latency ms (batch 1, median, in the job)",
            f"{b['latency_ms']:.2f}",
            f"{p['latency_ms']:.2f}",
            f"{p['latency_ms'] / b['latency_ms']:.3f}",
        ),
        (
            f"CPU latency ms (batch 1, best of {LATENCY_PASSES} interleaved medians)",
            f"{latency['baseline_ms']:.2f}",
            f"{latency['pruned_ms']:.2f}",
            f"{latency['ratio']:.3f}",
        ),
    ]
    table = Table(
        title="HawAda engine: ResNet-18 (cifar stem), Fashion-MNIST 32x32, target 50% FLOPs"
    )
    for col in ("", "baseline", "pruned", "pruned / baseline"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*r)
    phases = Table(title="seconds per phase")
    phases.add_column("phase")
    phases.add_column("s", justify="right")
    phases.add_row("baseline training (outside the job)", f"{base_train_s:.1f}")
    for name, sec in report["phases"].items():
        phases.add_row(name, f"{sec:.1f}")
    console = Console()
    console.print(table)
    console.print(phases)
    console.print(
        f"gate-training step / plain training step: [bold]{ratio['ratio']:.3f}[/bold] "
        f"({ratio['gate_s'] * 1e3:.0f} ms vs {ratio['plain_s'] * 1e3:.0f} ms, batch "
        f"{cfg['batch']}, median of {ratio['timed_steps']} timed steps each; goal <= 1.15)"
    )
    in_job = report["phases"]["training"] / cfg["gate_steps"]
    console.print(
        f"gate training inside the job: {in_job:.2f} s/step over {cfg['gate_steps']} "
        "steps (includes progress events; shared host)"
    )
    console.print(f"target met: {report['target_met']}  total {total_s:.0f} s")

    load = os.getloadavg()
    machine = (
        f"`python bench/engine.py{' --quick' if args.quick else ''}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); machine: "
        f"{device_name('cpu')} (torch threads {torch.get_num_threads()}), "
        f"{platform.system()} {platform.release()}, torch {torch.__version__}; load average "
        f"at the end {load[0]:.1f} on a host shared with other work."
    )
    setup = (
        f"Data: {report['data']['n_train']} train / {report['data']['n_heldout']} held-out "
        f"images; baseline {cfg['base_steps']} SGD steps, gate training {cfg['gate_steps']} "
        f"steps, fine-tune {cfg['finetune']} epoch, batch {cfg['batch']}."
    )
    verdict = (
        f"Gate-training step / plain forward+backward+SGD step: **{ratio['ratio']:.3f}** "
        f"({ratio['gate_s'] * 1e3:.0f} ms vs {ratio['plain_s'] * 1e3:.0f} ms, median of "
        f"{ratio['timed_steps']} timed steps each after {WARMUP_STEPS} warm-up steps, "
        f"interleaved rounds; goal <= 1.15). Inside the job gate training took "
        f"{in_job:.2f} s/step. Target met: {report['target_met']}; total {total_s:.0f} s."
    )
    md = [machine, setup, "", "| | baseline | pruned | pruned / baseline |", "|---|---:|---:|---:|"]
    md += [f"| {' | '.join(r)} |" for r in rows]
    md += [
        "",
        "| phase | seconds |",
        "|---|---:|",
        f"| baseline training (outside the job) | {base_train_s:.1f} |",
    ]
    md += [f"| {n} | {s:.1f} |" for n, s in report["phases"].items()]
    md += ["", verdict]
    print("\n--- Markdown for bench/RESULTS.md ---")
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
