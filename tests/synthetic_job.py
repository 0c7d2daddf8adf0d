"""The small job the pipeline and baseline tests run: ResNet-18 (cifar stem, 4 classes) at
16x16 on 48 synthetic images, and seeded input weights whose BN scales give the gates an order.
Used by test_pipeline.py and test_baselines.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hawada.adapters.torchvision import build_model
from hawada.core.recipe import Recipe, parse_recipe

#: ResNet-18 with the CIFAR stem, 4 classes, 16x16 inputs.
MODEL = {"arch": "resnet18", "num_classes": 4, "stem": "cifar", "input_size": [3, 16, 16]}
#: 48 synthetic images in batches of 8.
DATA = {"source": "synthetic", "limit": 48, "batch_size": 8}


def synthetic_recipe(**sections: Any) -> Recipe:
    """MODEL on DATA; `sections` are the rest of the recipe (`target`, `train`, `method`, ...)."""
    return parse_recipe({"model": MODEL, "data": DATA, **sections})


def save_resnet18_weights(path: Path, num_classes: int = 4, *, running_var: bool = False) -> Path:
    """Seeded ResNet-18 (cifar stem) weights at `path` with BN scales drawn from 0.2..2.0 (and,
    with `running_var`, running variances from 0.5..2.0)."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=num_classes, stem="cifar")
    with torch.no_grad():  # distinct BN scales so the gates have an order to find
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 2.0)
                if running_var:
                    m.running_var.uniform_(0.5, 2.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
