"""Gate-training step time / plain fine-tuning step time of the same model, alone (no job).

    .venv/bin/python bench/step_ratio.py [--batch 64] [--timed 8] [--rounds 2] [--repeat 2]
                                         [--no-cache] [--quick]

ResNet-18 (cifar stem) on Fashion-MNIST at 32x32. The plain step is ordinary supervised training
of a copy of the model (forward, cross-entropy, backward through the weights, SGD). The gate step
is `train_gates`' step: straight-through gated forward, the cost penalty, backward to the gate
logits only, with the teacher's logits served by the `TeacherCache` the pipeline uses (filled
beforehand, as it is after the first pass over the data; `--no-cache` runs the teacher every
step instead). Rounds interleave the two kinds so a neighbour's burst hits both; medians.
Goal (issue 8): ratio <= 0.8 on CPU. Timings never decide a test; run it on a quiet host.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawada.adapters.torchvision import build_model, get_adapter
from hawada.core.cost import make_cost_model
from hawada.core.data import DataBundle, TensorBundle, load_data
from hawada.core.gates import Gates, attach
from hawada.core.recipe import Recipe, parse_recipe
from hawada.core.train import HistoryRow, TeacherCache, train_classifier, train_gates

WARMUP_STEPS = 2


def _stamps() -> tuple[list[float], Callable[[HistoryRow], None]]:
    stamps = [time.perf_counter()]
    return stamps, lambda _row: stamps.append(time.perf_counter())


def _times(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)][WARMUP_STEPS:]


def plain_steps(model: torch.nn.Module, data: DataBundle, batch: int, steps: int) -> list[float]:
    """Seconds per step of ordinary supervised training of a copy of `model`."""
    stamps, cb = _stamps()
    student = copy.deepcopy(model)
    train_classifier(
        student, data, steps=steps, lr=0.01, device="cpu", batch_size=batch, on_step=cb
    )
    return _times(stamps)


def gate_steps(
    model: torch.nn.Module, data: DataBundle, recipe: Recipe, steps: int, cache: TeacherCache | None
) -> list[float]:
    """Seconds per step of gate training (fresh gates, attached for the run only)."""
    adapter = get_adapter(recipe.model.arch)
    cost = make_cost_model("flops", adapter.layers(model, recipe.model.input_size))
    gates = Gates(adapter.gate_groups(model, recipe.gates))
    handle = attach(model, gates)
    r = recipe.model_copy(deep=True)
    r.train.steps = steps
    r.train.log_every = 1  # on_step (the timestamps) fires on logged steps only
    stamps, cb = _stamps()
    try:
        train_gates(model, gates, cost, data, r, device="cpu", on_step=cb, teacher_cache=cache)
    finally:
        handle.remove()
    return _times(stamps)


def filled_cache(model: torch.nn.Module, data: DataBundle, batch: int) -> TeacherCache:
    """A teacher cache holding the logits of one epoch of training batches (steady state)."""
    assert isinstance(data, TensorBundle)  # in memory: samples have indices
    cache = TeacherCache(len(data.images), 10, "cpu")
    model.eval()
    epoch = data.train_batches_indexed(batch, 0, device="cpu")
    for idx, x, _y in itertools.islice(epoch, data.batches_per_epoch(batch)):
        cache(model, idx, x)
    return cache


def main() -> None:
    """Print one ratio row per repeat."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--timed", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cache", action="store_true", help="run the teacher every step")
    parser.add_argument("--quick", action="store_true", help="16x16, 512 images, 3 timed steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size, limit = (16, 512) if args.quick else (32, 2000)
    timed = 3 if args.quick else args.timed
    recipe = parse_recipe(
        {
            "model": {
                "arch": "resnet18",
                "num_classes": 10,
                "stem": "cifar",
                "input_size": [3, size, size],
            },
            "data": {"source": "fashion-mnist", "limit": limit, "batch_size": args.batch},
        }
    )
    data = load_data(recipe)
    model = build_model("resnet18", num_classes=10, stem="cifar").eval()
    cache = None if args.no_cache else filled_cache(model, data, args.batch)
    steps = WARMUP_STEPS + timed
    print(
        f"teacher cache: {'off' if cache is None else 'on (filled)'}, batch {args.batch}, "
        f"{size}x{size}"
    )
    print("| run | plain step ms | gate step ms | ratio |\n|---|---:|---:|---:|")
    for i in range(args.repeat):
        plain: list[float] = []
        gated: list[float] = []
        for _ in range(1 if args.quick else args.rounds):
            plain += plain_steps(model, data, args.batch, steps)
            gated += gate_steps(model, data, recipe, steps, cache)
        p, g = statistics.median(plain), statistics.median(gated)
        print(f"| {i + 1} | {p * 1e3:.0f} | {g * 1e3:.0f} | {g / p:.3f} |", flush=True)


if __name__ == "__main__":
    main()
