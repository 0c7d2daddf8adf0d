"""Compression quality: `gates` against the baselines at equal step budgets, on real data.

    python bench/quality.py [--quick] [--cells 0.5:0,0.25:0,0.25:1,0.1:0,0.1:1,u0.1:0]
                            [--methods gates,l1,slimming,uniform,tp] [--cache DIR] [--threads 2]
                            [--jobs 1]   # --jobs 2 --threads 1: two runs at once (2 cores)
                            [--arch resnet18]   # --arch mobilenet_v2 --cells 0.5:0: a new family
                            [--metric flops] [--device cpu] [--latency-batch N]
                            # issue 8's GPU cell:
                            # --metric latency --device cuda --cells 0.25:0 --methods gates,tp

Setup (the issue's): a ResNet-18 (cifar stem) teacher trained once (cached) on 10,000 images of the
official Fashion-MNIST train split at 32x32; held-out = 2,000 images of the official test split
(the job's `fashion-mnist` source does exactly that with `limit: 12000` and `val_fraction: 1/6`).
Every method gets the same post-teacher step budget (`--budget`, 256): `gates` and `slimming` spend
`--train-steps` (32) on gate / sparsity training and the rest on fine-tuning (32 + 224 was chosen
on this benchmark's held-out images over the earlier 96 + 160: bench/RESULTS.md), `l1`, `uniform`
and Torch-Pruning's group-magnitude pruner (`tp`, from the `bench` extra) spend it all on
fine-tuning. Fine-tuning is the pipeline's (`core.train.finetune`: the recipe's KD + CE mix from
the same teacher, cosine lr, BN recalibration) for every method, Torch-Pruning included. A cell is
`RATIO:SEED`; `u` marks the under-trained teacher (the same recipe stopped after one epoch). The
seed is `data.seed`: it draws the training images, the held-out images and the batch order; within
a cell every method sees the same images.

Every finished run is cached as JSON in `--cache`, so an interrupted grid resumes. The runs of
a cell share the teacher's logits (and its held-out accuracy) through `--cache`/teacher-logits,
the jobs' own cache (`JobContext.teacher_dir`): a cell pays for the teacher's passes once.
Prints one Markdown table (mean and spread over seeds, FLOPs ratio reached). Nothing here is
tuned to a method: all share the recipe below; the anchor (Torch-Pruning) runs in the same
invocation.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawada.adapters.torchvision import build_model
from hawada.core.data import TensorBundle, load_data
from hawada.core.evaluate import accuracy, count_flops
from hawada.core.latency import measure_latency_interleaved
from hawada.core.recipe import Recipe, parse_recipe
from hawada.core.train import TeacherCache, finetune, train_classifier
from hawada.worker.baseline import save_weights
from hawada.worker.pipeline import JobContext, heldout_key, run_job, teacher_store

FULL = {
    "size": 32,
    "n_train": 10_000,
    "n_heldout": 2_000,
    "batch": 64,
    "teacher_steps": 624,  # ~4 epochs of 10k images
    "budget": 256,
    "train_steps": 32,
    "cells": "0.5:0,0.25:0,0.25:1,0.1:0,0.1:1,u0.1:0",
}
QUICK = {
    "size": 16,
    "n_train": 2_000,
    "n_heldout": 500,
    "batch": 32,
    "teacher_steps": 150,
    "budget": 48,
    "train_steps": 16,
    "cells": "0.25:0",
}
METHODS = ("gates", "l1", "slimming", "uniform", "tp")
UNDER_METHODS = ("gates", "tp")  # the under-trained-teacher cell: gates against Torch-Pruning
#: How jobs time models (the `latency` target's table, the measured speed-ups): batch 1 and few
#: repeats on a CPU; on a GPU the recipe's defaults (batch 64, 50 repeats after 10 warm-ups).
#: One image is launch-bound on a GPU; at 32x32 so is a batch of 64 on an H200 (bench/RESULTS.md):
#: `--latency-batch 1024` times where compute decides.
CPU_LATENCY = {"batch_size": 1, "repeats": 3, "warmup": 1}
GPU_LATENCY = {"batch_size": 64, "repeats": 50, "warmup": 10}


def make_recipe(
    cfg: dict[str, Any], *, method: str, ratio: float, seed: int, ft_steps: int, train_steps: int
) -> Recipe:
    """The one recipe every method shares (only `method` and the step split differ)."""
    total = cfg["n_train"] + cfg["n_heldout"]
    epochs = ft_steps * cfg["batch"] / cfg["n_train"]
    return parse_recipe(
        {
            "method": method,
            "model": {
                "arch": cfg["arch"],
                "num_classes": 10,
                "stem": "cifar",
                "input_size": [3, cfg["size"], cfg["size"]],
                "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            },
            "data": {
                "source": "fashion-mnist",
                "limit": total,
                "val_fraction": cfg["n_heldout"] / total,
                "batch_size": cfg["batch"],
                "seed": seed,
            },
            "target": {"metric": cfg["metric"], "ratio": ratio},
            "train": {"steps": max(1, train_steps), "log_every": 16},
            "finetune": {"epochs": epochs, "lr": 0.01},
            "latency": cfg["latency"],
        }
    )


def _tag(cfg: dict[str, Any]) -> str:
    """Cache-name prefix of the model (none for ResNet-18, the issue's model)."""
    return "" if cfg["arch"] == "resnet18" else f"{cfg['arch']}-"


def teacher(cfg: dict[str, Any], cache: Path, *, under: bool) -> Path:
    """Train (once) and cache the teacher; `under`: the same recipe stopped after one epoch."""
    steps = cfg["n_train"] // cfg["batch"] if under else cfg["teacher_steps"]
    path = cache / f"teacher-{_tag(cfg)}{cfg['size']}px-{cfg['n_train']}-{steps}.safetensors"
    if path.exists():
        return path
    recipe = make_recipe(cfg, method="gates", ratio=0.5, seed=0, ft_steps=1, train_steps=1)
    data = load_data(recipe)
    torch.manual_seed(0)
    model = build_model(cfg["arch"], num_classes=10, stem="cifar")
    t0 = time.perf_counter()
    dev = cfg["device"]
    train_classifier(model, data, steps=steps, lr=0.05, device=dev, batch_size=cfg["batch"])
    model.to("cpu")
    acc = accuracy(model, data.heldout_batches(256), "cpu")
    print(
        f"teacher {path.name}: {steps} steps, held-out {acc:.4f}, {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    save_weights(model, path)
    return path


def run_tp(recipe: Recipe, weights: Path, device: str, teacher_dir: Path) -> dict[str, Any]:
    """Torch-Pruning group-magnitude pruning (per-layer ratio found by bisection on FLOPs) plus
    the pipeline's fine-tune; accuracy on the job's held-out images, and the measured speed-up
    (the unpruned and the pruned model timed interleaved, as jobs do) next to the FLOPs-ideal."""
    import torch_pruning as tp
    from safetensors.torch import load_file

    data = load_data(recipe)
    size = tuple(recipe.model.input_size)
    model = build_model(recipe.model.arch, num_classes=10, stem="cifar")
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    base_flops = count_flops(model, size)
    goal = float(recipe.target.ratio or 0.5) * base_flops
    example = torch.zeros(1, *size)

    def pruned_at(ratio: float) -> torch.nn.Module:
        m = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(
            m,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[  # the classifier's output (the class count) stays
                mod
                for mod in m.modules()
                if isinstance(mod, torch.nn.Linear) and mod.out_features == 10
            ],
            round_to=recipe.gates.round_to,
        )
        pruner.step()
        return m

    lo, hi = 0.0, 0.99
    for _ in range(12):  # largest kept share whose FLOPs fit the target
        mid = 0.5 * (lo + hi)
        if count_flops(pruned_at(mid), size) <= goal:
            hi = mid
        else:
            lo = mid
    student = pruned_at(hi)
    flops_ratio = count_flops(student, size) / base_flops
    model.to(device)
    # The jobs' teacher-logit cache, shared with the other methods' runs of this cell.
    assert isinstance(data, TensorBundle)  # fashion-mnist: in memory, no augmentation
    dev = torch.device(device)
    cache = TeacherCache(len(data.images), 10, dev)
    store = teacher_store(teacher_dir, weights, recipe, data, dev)
    cache.load(*store)
    finetune(student.to(device).train(), model, data, recipe, device=device, teacher_cache=cache)
    cache.save(*store)
    base_lat, pruned_lat = measure_latency_interleaved(
        [model, student], size, recipe.latency, device
    )
    known = cache.number(heldout_key(data))
    return {
        "accuracy": accuracy(student, data.heldout_batches(256), device),
        "flops_ratio": flops_ratio,
        "baseline_accuracy": (
            known if known is not None else accuracy(model, data.heldout_batches(256), device)
        ),
        "speedup_measured": base_lat.median_ms / pruned_lat.median_ms,
        "speedup_ideal": 1.0 / flops_ratio,
    }


def run_one(cfg: dict[str, Any], cache: Path, cell: str, method: str) -> dict[str, Any]:
    """One method in one cell, cached as JSON."""
    under = cell.startswith("u")
    ratio_s, seed_s = cell.lstrip("u").split(":")
    ratio, seed = float(ratio_s), int(seed_s)
    trains = method in ("gates", "slimming")
    train_steps = cfg["train_steps"] if trains else 0
    # A split, metric or device variant never reads another variant's run.
    variant = f"-t{train_steps}" if trains else ""
    if cfg["metric"] != "flops" or cfg["device"] != "cpu":
        variant += f"-{cfg['metric']}-{cfg['device']}"
    if cfg["latency"] != CPU_LATENCY:
        variant += f"-b{cfg['latency']['batch_size']}"
    out = cache / f"run-{_tag(cfg)}{cfg['size']}px-{cell}-{method}-{cfg['budget']}{variant}.json"
    if out.exists():
        return dict(json.loads(out.read_text()))
    weights = teacher(cfg, cache, under=under)
    recipe = make_recipe(
        cfg,
        method="gates" if method == "tp" else method,
        ratio=ratio,
        seed=seed,
        ft_steps=cfg["budget"] - train_steps,
        train_steps=train_steps,
    )
    t0 = time.perf_counter()
    if method == "tp":
        row = run_tp(recipe, weights, cfg["device"], cache / "teacher-logits")
    else:
        job_dir = cache / f"job-{_tag(cfg)}{cfg['size']}px-{cell}-{method}{variant}"
        ctx = JobContext(
            recipe=recipe,
            weights=weights,
            out_dir=job_dir,
            device=cfg["device"],
            teacher_dir=cache / "teacher-logits",  # the teacher's passes, once per cell
        )
        report = run_job(ctx)
        corr = report["correction"]
        row = {
            "accuracy": report["pruned"]["accuracy"],
            "flops_ratio": report["pruned"]["flops"] / report["baseline"]["flops"],
            "baseline_accuracy": report["baseline"]["accuracy"],
            "trained_ratio": corr["cost_ratio_trained"],
            "acc_before_correction": corr["accuracy_before"],
            "acc_after_correction": corr["accuracy_after"],
            "closed_channels": corr["closed_channels"],
            "heldout": report["heldout"],
            "speedup_measured": report["speedup"]["measured"],
            "speedup_ideal": report["speedup"]["flops_ideal"],
        }
    row.update(
        {
            "cell": cell,
            "method": method,
            "train_steps": train_steps,
            "seconds": time.perf_counter() - t0,
        }
    )
    out.write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per (teacher, ratio) and method, mean accuracy ± half-range over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        key = (
            "under" if r["cell"].startswith("u") else "full",
            r["cell"].lstrip("u").split(":")[0],
        )
        groups.setdefault(key, []).append(r)
    lines = [
        "| teacher | FLOPs target | method | seeds | held-out acc (mean ± half-range) "
        "| FLOPs reached | speed-up measured / FLOPs-ideal "
        "| gates: acc before / after correction |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for (kind, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -float(kv[0][1]))):
        for method in METHODS:
            ms = [r for r in rs if r["method"] == method]
            if not ms:
                continue
            accs = [r["accuracy"] for r in ms]
            spread = (max(accs) - min(accs)) / 2
            flops = statistics.mean(r["flops_ratio"] for r in ms)
            speed = ""  # runs cached before the benchmark timed Torch-Pruning have none
            if all("speedup_measured" in r for r in ms):
                speed = (
                    f"{statistics.mean(r['speedup_measured'] for r in ms):.2f} / "
                    f"{statistics.mean(r['speedup_ideal'] for r in ms):.2f}"
                )
            extra = ""
            if "acc_before_correction" in ms[0]:
                extra = " ; ".join(
                    f"{r['acc_before_correction']:.3f} / {r['acc_after_correction']:.3f} "
                    f"(trained {r['trained_ratio']:.3f})"
                    for r in ms
                )
            lines.append(
                f"| {kind} | {ratio} | {method} | {len(ms)} | {statistics.mean(accs):.4f} ± "
                f"{spread:.4f} | {flops:.4f} | {speed} | {extra} |"
            )
    return "\n".join(lines)


def main() -> None:
    """Run the grid (or what is asked), print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16x16, 2k images, one cell")
    parser.add_argument("--cells", default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--cache", type=Path, default=Path("bench/.quality-cache"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once, one process each (e.g. 2 x 1 thread)"
    )
    parser.add_argument(
        "--arch", default="resnet18", help="the model (cifar stem); e.g. mobilenet_v2 at 0.5:0"
    )
    parser.add_argument(
        "--metric", choices=("flops", "latency"), default="flops", help="the jobs' target.metric"
    )
    parser.add_argument("--device", default="cpu", help="where runs train and time (e.g. cuda)")
    parser.add_argument(
        "--latency-batch", type=int, default=None, help="timing batch (default: 1 CPU, 64 GPU)"
    )
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--teacher-steps", type=int, default=None, help="smoke runs only")
    args = parser.parse_args()
    cfg: dict[str, Any] = dict(QUICK if args.quick else FULL)
    cfg["arch"] = args.arch
    cfg["metric"] = args.metric
    cfg["device"] = args.device
    cfg["latency"] = dict(CPU_LATENCY if args.device == "cpu" else GPU_LATENCY)
    if args.latency_batch is not None:
        cfg["latency"]["batch_size"] = args.latency_batch
    if args.budget is not None:
        cfg["budget"] = args.budget
    if args.train_steps is not None:
        cfg["train_steps"] = args.train_steps
    if args.teacher_steps is not None:
        cfg["teacher_steps"] = args.teacher_steps
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, torch {torch.__version__}, threads {args.threads}, "
        f"arch {args.arch}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f", timing {cfg['latency']}, load {os.getloadavg()}",
        flush=True,
    )
    todo = [
        (cell, m)
        for cell in (args.cells or cfg["cells"]).split(",")
        for m in args.methods.split(",")
        if m in (UNDER_METHODS if cell.startswith("u") else METHODS)
    ]
    # Each cell's first run fills the cell's teacher-logit cache (`teacher-logits/`) that its
    # later runs read: start every cell's first run before any cell's second one.
    per_cell = {cell: [m for c, m in todo if c == cell] for cell, _ in todo}
    todo.sort(key=lambda cm: per_cell[cm[0]].index(cm[1]))
    t0 = time.perf_counter()
    # Teachers train once, before the runs, on every thread the runs will share (jobs x
    # threads): on 2 cores a 2-thread teacher step takes 0.55x a 1-thread one (bench/RESULTS.md).
    torch.set_num_threads(args.jobs * args.threads)
    for under in sorted({cell.startswith("u") for cell, _ in todo}):
        teacher(cfg, args.cache, under=under)
    torch.set_num_threads(args.threads)
    if args.jobs > 1:
        # Independent runs in `--jobs` processes of `--threads` threads each: on a small CPU
        # two single-thread runs finish sooner than two runs one after the other on two threads.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            args.jobs, mp_context=ctx, initializer=torch.set_num_threads, initargs=(args.threads,)
        ) as pool:
            futures = [pool.submit(run_one, cfg, args.cache, c, m) for c, m in todo]
            rows = [f.result() for f in futures]
    else:
        rows = [run_one(cfg, args.cache, c, m) for c, m in todo]
    print(table(rows))
    print(f"wall {time.perf_counter() - t0:.0f} s for {len(todo)} runs (cached ones count 0)")
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
