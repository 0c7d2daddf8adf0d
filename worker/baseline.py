"""Train a baseline model for a recipe:
`python -m hawada.worker.baseline --recipe R --out W --steps N`.

The demo, the benchmarks and the acceptance test need trained weights and downloads are not
allowed, so this trains the recipe's architecture on the recipe's data (train split only: the
held-out split stays unseen, as the job will measure accuracy on it) and saves a safetensors
state dict that `POST /v1/jobs` or `hawada run` accept as is.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hawada.adapters.torchvision import build_model
from hawada.atomic import atomic_write
from hawada.core.data import DataBundle, load_data
from hawada.core.device import resolve_device
from hawada.core.evaluate import accuracy
from hawada.core.recipe import Recipe, parse_recipe
from hawada.core.train import HistoryRow, train_classifier


def train_baseline(
    recipe: Recipe,
    *,
    steps: int,
    lr: float = 0.05,
    device: str = "auto",
    seed: int = 0,
    data: DataBundle | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, float, dict[str, float]]:
    """Train `recipe.model` on `recipe.data`; returns (model in eval mode, held-out accuracy,
    timings {"train_s", "eval_s"}). `data` may pass an already loaded DataBundle."""
    dev = resolve_device(device)
    torch.manual_seed(seed)
    data = data if data is not None else load_data(recipe)
    model = build_model(
        recipe.model.arch, num_classes=recipe.model.num_classes, stem=recipe.model.stem
    )
    every = max(1, steps // 10)

    def on_step(row: HistoryRow) -> None:
        if log is not None and (row["step"] % every == 0 or row["step"] == row["steps"]):
            log(f"step {row['step']:.0f}/{row['steps']:.0f} loss {row['loss']:.4f}")

    t0 = time.perf_counter()
    train_classifier(
        model,
        data,
        steps=steps,
        lr=lr,
        device=dev,
        batch_size=recipe.data.batch_size,
        seed=recipe.data.seed,
        on_step=on_step if log is not None else None,
    )
    t1 = time.perf_counter()
    acc = accuracy(model, data.heldout_batches(recipe.data.batch_size), dev)
    return model.eval(), acc, {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1}


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's state dict as safetensors (CPU, contiguous), written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # 0644: safetensors alone creates 0600; the weights are meant to be shared/uploaded.
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints progress and the held-out accuracy."""
    parser = argparse.ArgumentParser(prog="python -m hawada.worker.baseline", description=__doc__)
    parser.add_argument("--recipe", type=Path, required=True, help="recipe YAML/JSON file")
    parser.add_argument("--out", type=Path, required=True, help="weights to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=500, help="SGD steps (default 500)")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args.recipe.read_text(encoding="utf-8"))
    model, acc, timing = train_baseline(
        recipe,
        steps=args.steps,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        log=lambda m: print(m, flush=True),
    )
    save_weights(model, args.out)
    print(
        f"held-out accuracy {acc:.4f} ({recipe.data.source}); trained in "
        f"{timing['train_s']:.1f} s; weights written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
