"""Per-layer cost of a model: FLOPs and measured forward time of every leaf module.

The report's per-layer table shows which share of the model's FLOPs and time each layer carries
before and after pruning; this module measures both for one model. FLOPs come from torch's
``FlopCounterMode`` (the counter `count_flops` uses, so the shares add up to the report's
total); times from forward hooks around every leaf module during a few timed passes (CUDA
events on GPU, read after one synchronize; the monotonic clock on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter_ns
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hawada.core.device import resolve_device
from hawada.core.latency import DTYPES, effective_dtype, prepare_model, summarize
from hawada.core.recipe import LatencySpec

#: Timed passes per model: per-layer shares need far fewer repeats than the headline latency.
PROFILE_REPEATS = 10


def module_flops(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """FLOPs (2 x MACs, batch 1) per leaf module name, as `count_flops` counts them."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    leaves = {name for name, m in model.named_modules() if name and not any(m.children())}
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(torch.zeros((1, *input_size), device=device, dtype=dtype))
    finally:
        model.train(was_training)
    root = type(model).__name__ + "."
    out: dict[str, int] = {}
    for key, per_op in counter.get_flop_counts().items():
        name = key[len(root) :] if key.startswith(root) else key
        if name in leaves:
            out[name] = int(sum(per_op.values()))
    return out


def module_times(
    model: nn.Module,
    input_size: Sequence[int],
    spec: LatencySpec,
    device: str | torch.device | None,
    *,
    repeats: int = PROFILE_REPEATS,
) -> dict[str, float]:
    """Median forward time (ms, at the recipe's latency batch size and dtype) per leaf module.

    The hooks themselves cost a little per module, so these are shares to compare layers
    with, not a latency to quote; the headline latency is `measure_latency`'s.
    """
    dev = resolve_device(device)
    dtype = DTYPES[effective_dtype(spec.dtype, dev)[0]]
    m = prepare_model(model, dev, dtype, spec.channels_last)
    x = torch.randn(spec.batch_size, *[int(v) for v in input_size], device=dev, dtype=dtype)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [(n, mod) for n, mod in m.named_modules() if n and not any(mod.children())]
    cuda = dev.type == "cuda"
    marks: dict[str, list[Any]] = {n: [] for n, _ in leaves}

    def stamp() -> Any:
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return perf_counter_ns()

    def hooks(name: str) -> tuple[Any, Any]:
        def before(_m: nn.Module, _args: Any) -> None:
            marks[name].append(stamp())

        def after(_m: nn.Module, _args: Any, _out: Any) -> None:
            marks[name].append(stamp())

        return before, after

    handles = []
    for name, mod in leaves:
        before, after = hooks(name)
        handles += [mod.register_forward_pre_hook(before), mod.register_forward_hook(after)]
    was_training = m.training
    m.eval()
    try:
        with torch.inference_mode():
            m(x)  # warm-up, not recorded
            for name in marks:
                marks[name].clear()
            for _ in range(max(1, repeats)):
                m(x)
        if cuda:
            torch.cuda.synchronize(dev)
    finally:
        for h in handles:
            h.remove()
        m.train(was_training)
    out: dict[str, float] = {}
    for name, seq in marks.items():
        pairs = list(zip(seq[0::2], seq[1::2], strict=True))
        if not pairs:
            continue  # a module the forward pass never calls
        if cuda:
            ms = [float(a.elapsed_time(b)) for a, b in pairs]
        else:
            ms = [(b - a) / 1e6 for a, b in pairs]
        # A module called several times per pass (a shared ReLU) adds up within a pass.
        calls = len(pairs) // max(1, repeats)
        per_pass = [sum(ms[i * calls : (i + 1) * calls]) for i in range(len(ms) // max(1, calls))]
        out[name] = summarize(per_pass)[0]
    return out


def module_costs(
    model: nn.Module,
    input_size: Sequence[int],
    spec: LatencySpec,
    device: str | torch.device | None,
) -> dict[str, dict[str, float]]:
    """``{module name: {"flops": FLOPs at batch 1, "ms": median time}}`` for every leaf module
    (report.json's ``layer_costs.baseline`` / ``layer_costs.pruned``)."""
    flops = module_flops(model, input_size)
    times = module_times(model, input_size, spec, device)
    return {
        name: {"flops": float(flops.get(name, 0)), "ms": round(times[name], 6)} for name in times
    }
