"""Memory stays bounded whatever the dataset size: a folder bigger than the memory cap the recipe
sets (`data.memory_limit_mb`) streams, and training through every image of it raises the peak
resident memory by far less than the decoded dataset would take. The in-memory path on the same
folder shows the measurement can tell the difference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

N_IMAGES = 6000
SIZE = 64
DECODED = N_IMAGES * 3 * SIZE * SIZE  # 74 MB as one uint8 tensor

SCRIPT = r"""
import json, sys
import torch
from torch import nn
from hawada.core.data import load_data
from hawada.core.recipe import parse_recipe
from hawada.core.train import train_classifier

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

root, loader = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
torch.set_num_threads(1)
recipe = parse_recipe({
    "model": {"arch": "resnet18", "num_classes": 4, "input_size": [3, 64, 64]},
    "data": {"source": "folder", "path": root, "loader": loader, "memory_limit_mb": 16,
             "workers": 0, "batch_size": 50, "val_fraction": 0.1, "augment": "none"},
})
model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 4))
# Warm up everything but the folder (the optimizer's first step imports ~150 MB of modules).
warm = {"source": "synthetic", "limit": 100}
warm = parse_recipe({"model": recipe.model.model_dump(), "data": warm})
train_classifier(model, load_data(warm), steps=2, lr=0.1, device="cpu", batch_size=50)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
data = load_data(recipe)
steps = data.batches_per_epoch(50)
train_classifier(model, data, steps=steps, lr=0.1, device="cpu", batch_size=50)  # every image
held = sum(len(y) for _, y in data.heldout_batches(50))
print(json.dumps({"loader": data.loader, "growth": status("VmHWM") - before,
                  "trained": steps * 50, "n_train": data.n_train, "held": held}))
"""


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8)
    for c in range(4):
        (root / f"class{c}").mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(tiles[i % 16]).save(root / f"class{i % 4}" / f"{i:05d}.jpg", quality=80)
    return root


def _measure(root: Path, loader: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root), loader],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streaming_folder_larger_than_the_cap_trains_in_bounded_memory(big_folder: Path) -> None:
    stream = _measure(big_folder, "auto")  # 74 MB decoded > memory_limit_mb 16: streams
    assert stream["loader"] == "stream"
    assert stream["trained"] == stream["n_train"] == 5400 and stream["held"] == 600
    assert stream["growth"] < DECODED / 4, stream  # measured ~ a few MB
    memory = _measure(big_folder, "memory")  # the same folder decoded into RAM
    assert memory["loader"] == "memory" and memory["growth"] > DECODED, memory
