"""Gate-training step time / plain training step time, alone (no baseline, no job).

    .venv/bin/python bench/step_ratio.py [--batch 64] [--timed 8] [--rounds 2] [--repeat 2]

ResNet-18 (cifar stem) on Fashion-MNIST at 32x32: the same `step_time_ratio` that
`bench/engine.py` prints, without the long baseline training and job around it, so it can be
re-run quickly on a quiet host. Goal (issue 2): ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import step_time_ratio

from hawada.adapters.torchvision import build_model
from hawada.core.data import load_data
from hawada.core.recipe import parse_recipe


def main() -> None:
    """Print one ratio row per repeat."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--timed", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = parse_recipe(
        {
            "model": {
                "arch": "resnet18",
                "num_classes": 10,
                "stem": "cifar",
                "input_size": [3, 32, 32],
            },
            "data": {"source": "fashion-mnist", "limit": 2000, "batch_size": args.batch},
        }
    )
    data = load_data(recipe)
    model = build_model("resnet18", num_classes=10, stem="cifar")
    print("| run | plain step ms | gate step ms | ratio |\n|---|---:|---:|---:|")
    for i in range(args.repeat):
        r = step_time_ratio(model, data, recipe, timed=args.timed, rounds=args.rounds)
        print(
            f"| {i + 1} | {r['plain_s'] * 1e3:.0f} | {r['gate_s'] * 1e3:.0f} | {r['ratio']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
