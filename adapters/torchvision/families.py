"""Every torchvision CNN family handled by the generic graph adapter: an allow-list of
constructors per family and the few declared overrides (builder arguments, trace size, stem).

Coupling groups come from the traced graph (`graph.py`); a family needs no code of its own
unless its constructor does (RegNet computes its widths with torch ops, so on the meta device
the width schedule is computed on the CPU first). ResNets keep their hand-written adapter
(`resnet.py`), which the graph analysis reproduces exactly (tests/test_graph.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.regnet import BlockParams, RegNet

from hawada.adapters.torchvision.generic import GraphAdapter, stride_one_stem
from hawada.adapters.torchvision.registry import Builder, register_adapter, register_arch

#: family -> constructors (names in torchvision.models).
FAMILIES: dict[str, tuple[str, ...]] = {
    "alexnet": ("alexnet",),
    "vgg": tuple(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    "squeezenet": ("squeezenet1_0", "squeezenet1_1"),
    "mobilenetv2": ("mobilenet_v2",),
    "mobilenetv3": ("mobilenet_v3_small", "mobilenet_v3_large"),
    "efficientnet": (
        *tuple(f"efficientnet_b{i}" for i in range(8)),
        "efficientnet_v2_s",
        "efficientnet_v2_m",
        "efficientnet_v2_l",
    ),
    "mnasnet": ("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"),
    "regnet": tuple(
        f"regnet_{k}_{s}"
        for k, sizes in (
            ("x", ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")),
            ("y", ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")),
        )
        for s in sizes
    ),
    "shufflenetv2": tuple(f"shufflenet_v2_x{s}" for s in ("0_5", "1_0", "1_5", "2_0")),
    "densenet": ("densenet121", "densenet161", "densenet169", "densenet201"),
    "convnext": tuple(f"convnext_{s}" for s in ("tiny", "small", "base", "large")),
    "googlenet": ("googlenet",),
    "inception": ("inception_v3",),
}

#: Builder arguments a family needs: no auxiliary heads (the exported model is the eval-mode
#: classifier), torchvision's init without its deprecation warning.
_EXTRA: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception": {"aux_logits": False, "init_weights": True},
}
#: Inception-v3's reductions need at least 75 x 75 pixels.
_TRACE_SIZE: dict[str, tuple[int, int, int]] = {"inception": (3, 96, 96)}

#: RegNet width schedules (torchvision's `BlockParams.from_init_params` arguments).
_REGNET: dict[str, dict[str, Any]] = {
    "regnet_x_400mf": {"depth": 22, "w_0": 24, "w_a": 24.48, "w_m": 2.54, "group_width": 16},
    "regnet_x_800mf": {"depth": 16, "w_0": 56, "w_a": 35.73, "w_m": 2.28, "group_width": 16},
    "regnet_x_1_6gf": {"depth": 18, "w_0": 80, "w_a": 34.01, "w_m": 2.25, "group_width": 24},
    "regnet_x_3_2gf": {"depth": 25, "w_0": 88, "w_a": 26.31, "w_m": 2.25, "group_width": 48},
    "regnet_x_8gf": {"depth": 23, "w_0": 80, "w_a": 49.56, "w_m": 2.88, "group_width": 120},
    "regnet_x_16gf": {"depth": 22, "w_0": 216, "w_a": 55.59, "w_m": 2.1, "group_width": 128},
    "regnet_x_32gf": {"depth": 23, "w_0": 320, "w_a": 69.86, "w_m": 2.0, "group_width": 168},
    "regnet_y_400mf": {"depth": 16, "w_0": 48, "w_a": 27.89, "w_m": 2.09, "group_width": 8},
    "regnet_y_800mf": {"depth": 14, "w_0": 56, "w_a": 38.84, "w_m": 2.4, "group_width": 16},
    "regnet_y_1_6gf": {"depth": 27, "w_0": 48, "w_a": 20.71, "w_m": 2.65, "group_width": 24},
    "regnet_y_3_2gf": {"depth": 21, "w_0": 80, "w_a": 42.63, "w_m": 2.66, "group_width": 24},
    "regnet_y_8gf": {"depth": 17, "w_0": 192, "w_a": 76.82, "w_m": 2.19, "group_width": 56},
    "regnet_y_16gf": {"depth": 18, "w_0": 200, "w_a": 106.23, "w_m": 2.48, "group_width": 112},
    "regnet_y_32gf": {"depth": 20, "w_0": 232, "w_a": 115.89, "w_m": 2.53, "group_width": 232},
    "regnet_y_128gf": {"depth": 27, "w_0": 456, "w_a": 160.83, "w_m": 2.52, "group_width": 264},
}


def vgg_cifar_stem(model: nn.Module) -> None:
    """`cifar` VGG: pool the 512 final channels to 1 x 1 and classify with 512-512-classes (the
    usual CIFAR VGG) instead of the 25088-4096-4096 ImageNet head; the class stays `VGG`."""
    head = model.get_submodule("classifier")
    last = head[-1] if isinstance(head, nn.Sequential) else None
    if not isinstance(last, nn.Linear):
        raise TypeError("VGG classifier must end with a Linear")
    device = last.weight.device
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    new = nn.Sequential(
        nn.Linear(512, 512, device=device),
        nn.ReLU(True),
        nn.Dropout(0.5),
        nn.Linear(512, 512, device=device),
        nn.ReLU(True),
        nn.Dropout(0.5),
        nn.Linear(512, last.out_features, device=device),
    )
    for m in new:
        if isinstance(m, nn.Linear):  # torchvision's VGG init
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    model.classifier = new


def _torchvision_builder(name: str, extra: Mapping[str, Any]) -> Builder:
    def build(*, num_classes: int) -> nn.Module:
        model: nn.Module = tvm.get_model(name, weights=None, num_classes=num_classes, **extra)
        return model

    build.__name__ = name
    build.__doc__ = f"torchvision {name} (no pretrained weights)."
    return build


def _regnet_builder(name: str) -> Builder:
    args = dict(_REGNET[name])
    if name.startswith("regnet_y"):
        args["se_ratio"] = 0.25

    def build(*, num_classes: int) -> nn.Module:
        # The width schedule uses torch ops that cannot run on the meta device.
        with torch.device("cpu"):
            params = BlockParams.from_init_params(**args)
        norm = partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1)
        return RegNet(params, num_classes=num_classes, norm_layer=norm)

    build.__name__ = name
    build.__doc__ = f"torchvision {name} (no pretrained weights)."
    return build


_STEM = {"vgg": vgg_cifar_stem}


def _register() -> None:
    for family, names in FAMILIES.items():
        register_adapter(
            GraphAdapter(
                family,
                trace_size=_TRACE_SIZE.get(family, (3, 64, 64)),
                stem=_STEM.get(family, stride_one_stem),
            )
        )
        for name in names:
            if family == "regnet":
                builder = _regnet_builder(name)
            else:
                builder = _torchvision_builder(name, _EXTRA.get(family, {}))
            register_arch(name, family=family)(builder)


_register()
