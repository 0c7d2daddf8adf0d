"""Issue acceptance: on real data (sklearn digits) a ResNet-18 compressed to 50% FLOPs keeps its
held-out accuracy within 5 points of the baseline, with pruned FLOPs at most 55% of baseline.

Everything runs through the public path: `hawada.worker.baseline` trains the input weights on the
train split only, `run_job` compresses them and the numbers are read from the job's report. About a
minute on one CPU core.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hawada.adapters.torchvision import load_pruned
from hawada.core.data import load_data
from hawada.core.evaluate import accuracy
from hawada.core.recipe import parse_recipe
from hawada.worker.baseline import save_weights, train_baseline
from hawada.worker.pipeline import JobContext, run_job

RECIPE = {
    "model": {
        "arch": "resnet18",
        "num_classes": 10,
        "stem": "cifar",
        "input_size": [3, 16, 16],
        "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    },
    "data": {"source": "digits", "batch_size": 32, "val_fraction": 0.2, "seed": 0},
    "target": {"metric": "flops", "ratio": 0.5},
    "train": {"steps": 80, "lr": 0.05, "log_every": 10},
    "finetune": {"epochs": 0.5, "lr": 0.01, "recalibrate_bn": True},
    "latency": {"batch_size": 1, "repeats": 3, "warmup": 1},
}


# A whole job (baseline, profiling, 80 gate steps, fine-tune, latency) on CPU: minutes when the
# machine is shared, so it gets more than the suite's 600 s per-test limit (timing is not checked).
@pytest.mark.timeout(2400)
def test_digits_resnet18_half_flops_keeps_accuracy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recipe = parse_recipe(RECIPE)
    data = load_data(recipe)
    model, base_acc, _ = train_baseline(recipe, steps=80, lr=0.05, device="cpu", data=data)
    assert base_acc > 0.85  # a real baseline, not a chance-level one
    weights = tmp_path / "digits_r18.safetensors"
    save_weights(model, weights)

    report = run_job(
        JobContext(recipe=recipe, weights=weights, out_dir=tmp_path / "job", device="cpu")
    )

    baseline, pruned = report["baseline"], report["pruned"]
    numbers = (
        f"accuracy {baseline['accuracy']:.4f} -> {pruned['accuracy']:.4f}, FLOPs ratio "
        f"{pruned['flops'] / baseline['flops']:.3f}"
    )
    assert baseline["accuracy"] == base_acc  # the job measured the same held-out split
    assert pruned["flops"] <= 0.55 * baseline["flops"], numbers
    assert pruned["accuracy"] >= baseline["accuracy"] - 0.05, numbers
    assert report["target_met"] is True, report["target_reason"]
    # The downloaded artifacts give exactly the reported held-out accuracy.
    pruned_model = load_pruned(
        tmp_path / "job" / "pruned.json", tmp_path / "job" / "pruned.safetensors"
    )
    assert accuracy(pruned_model, data.heldout_batches(64), "cpu") == pruned["accuracy"]
