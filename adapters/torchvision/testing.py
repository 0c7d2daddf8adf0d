"""Helpers for checking exports numerically, shared by tests/ and bench/ (bench never imports
tests): models whose every channel matters, random hard gates, gated forwards.

Fresh torchvision models have unit batch-norm statistics and near-zero heads, so a wrongly
sliced channel would barely move the outputs; these helpers make every channel count and keep
outputs O(1), so a 1e-4 tolerance is tight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hawada.core.gates import GateGroup, Gates, attach


def randomize_norms(model: nn.Module, size: int, gen: torch.Generator) -> None:
    """Calibrate batch-norm statistics on one random batch of `size` x `size` images, then
    perturb the statistics and the affine parameters per channel; leaves `model` in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the stats
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size, generator=gen))
        for bn in bns:
            mean, var, weight, bias = bn.running_mean, bn.running_var, bn.weight, bn.bias
            if mean is None or var is None or weight is None or bias is None:
                raise TypeError("randomize_norms needs affine batch norms with running stats")
            n = bn.num_features
            bn.momentum = 0.1
            mean += 0.1 * torch.randn(n, generator=gen) * var.sqrt()
            var *= torch.empty(n).uniform_(0.7, 1.4, generator=gen)
            weight.copy_(torch.empty(n).uniform_(0.5, 1.2, generator=gen))
            bias.copy_(0.2 * torch.randn(n, generator=gen))
    model.eval()


def randomize(model: nn.Module, size: int, gen: torch.Generator) -> None:
    """`randomize_norms`, then O(1) linear weights and layer scales."""
    randomize_norms(model, size, gen)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):  # torchvision's N(0, 0.01) heads: outputs ~1e-2
                m.weight.normal_(0.0, m.in_features**-0.5, generator=gen)
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):  # ConvNeXt starts at 1e-6: blocks would not matter
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.0, generator=gen))


def random_gates(
    groups: Sequence[GateGroup], gen: torch.Generator, *, extremes: bool = True
) -> Gates:
    """Hard gates with logits of both signs; with `extremes`, every 5th group all negative
    (at its floor) and every 7th all positive (full)."""
    gates = Gates(groups)
    with torch.no_grad():
        for i, name in enumerate(gates.groups):
            logit = gates.logit(name)
            logit.copy_(torch.randn(logit.shape, generator=gen) - 0.3)
            if not extremes:
                continue
            if i % 5 == 3:
                logit.copy_(-logit.abs() - 0.1)
            elif i % 7 == 6:
                logit.copy_(logit.abs() + 0.1)
    gates.mode = "hard"
    return gates


def gated_output(model: nn.Module, gates: Gates, x: Tensor) -> Tensor:
    """`model(x)` without grad, with `gates` attached for this one forward."""
    handle = attach(model, gates)
    try:
        with torch.no_grad():
            out: Tensor = model(x)
            return out
    finally:
        handle.remove()
