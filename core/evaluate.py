"""Model measurements that need no training: held-out accuracy, parameter and FLOP counts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def accuracy(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
) -> float:
    """Top-1 accuracy of `model` over `batches` (eval mode, no autograd); 0.0 when empty.

    The model's train/eval flag is restored afterwards so callers can evaluate mid-training.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    try:
        with torch.inference_mode():
            for x, y in batches:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                # Accumulate on device: one host sync at the end, not one per batch.
                correct += (model(x).argmax(dim=1) == y).sum()
                total += y.numel()
    finally:
        model.train(was_training)
    return float(correct.item()) / total if total else 0.0


def count_params(model: nn.Module) -> int:
    """Number of parameters (weights, biases, norm affine); buffers are not counted."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: Sequence[int]) -> int:
    """FLOPs (2 x multiply-accumulates) of one forward pass at batch 1, as torch counts them."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        x = torch.zeros((1, *input_size), device=device, dtype=dtype)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)
