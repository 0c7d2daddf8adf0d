"""Wall-clock latency of a model on the device that runs it.

GPU: CUDA events around every timed repeat, after a warm-up with ``cudnn.benchmark`` on so the
autotuner has picked its kernels. CPU: ``time.perf_counter_ns`` around every repeat. Both report
the median and the 10th/90th percentiles, because a mean is dragged by the one repeat that a
neighbour's process interrupted.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from time import perf_counter_ns, process_time_ns
from typing import Any

import torch
from torch import nn

from hawada.core.device import device_name, resolve_device
from hawada.core.recipe import LatencySpec

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class LatencyStats:
    """Summary of timed forward passes (milliseconds per batch)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    device: str
    batch_size: int
    dtype: str
    channels_last: bool
    repeats: int
    note: str | None = None  # e.g. why the requested dtype was not the measured one

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (report.json's ``latency`` block)."""
        return asdict(self)


def _percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending list (q in [0, 1])."""
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> tuple[float, float, float]:
    """(median, p10, p90) of per-repeat times."""
    s = sorted(times_ms)
    return _percentile(s, 0.5), _percentile(s, 0.1), _percentile(s, 0.9)


def time_callable(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int, clock: str = "wall"
) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; ms per repeat.

    On CUDA each repeat is bracketed by its own pair of events on the current stream and one
    synchronize at the end reads them all, so host overhead between launches is not counted
    twice and the GPU queue stays full as in serving. On CPU ``clock="wall"`` is the monotonic
    clock (latency); ``clock="cpu"`` is this process's CPU time, which a busy neighbour does not
    inflate — a stand-in for uncontended latency that is only meaningful with one torch thread.
    """
    repeats = max(1, int(repeats))
    for _ in range(max(0, int(warmup))):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for s, e in zip(starts, ends, strict=True):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    now = perf_counter_ns if clock == "wall" else process_time_ns
    out: list[float] = []
    for _ in range(repeats):
        t0 = now()
        fn()
        out.append((now() - t0) / 1e6)
    return out


def _placed_like(
    model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool
) -> bool:
    """True when the model already lives on ``device`` in ``dtype`` and the memory format asked."""
    for p in model.parameters():
        if p.device != device or (p.is_floating_point() and p.dtype != dtype):
            return False
        if (
            channels_last
            and p.dim() == 4
            and not p.is_contiguous(memory_format=torch.channels_last)
        ):
            return False
    return all(b.device == device for b in model.buffers())


def prepare_model(
    model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool
) -> nn.Module:
    """The model placed for timing, without mutating the caller's model.

    ``nn.Module.to`` works in place, so when the placement differs the timing runs on a deep
    copy; when it already matches (the usual case in the worker) the model itself is used.
    """
    if _placed_like(model, device, dtype, channels_last):
        return model
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


@functools.cache
def _cpu_dtype_works(dtype: torch.dtype) -> bool:
    """Whether this CPU build runs a conv in ``dtype`` (half/bf16 kernels are optional)."""
    try:
        conv = nn.Conv2d(4, 4, 3, padding=1).to(dtype)
        with torch.inference_mode():
            conv(torch.zeros(1, 4, 4, 4, dtype=dtype))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def effective_dtype(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The dtype latency will actually be measured in, and a note when it differs."""
    if requested not in DTYPES:
        raise ValueError(f"latency.dtype must be one of {sorted(DTYPES)}, got {requested!r}")
    if device.type == "cpu" and requested != "float32" and not _cpu_dtype_works(DTYPES[requested]):
        return "float32", f"{requested} is not supported on this CPU; measured in float32"
    return requested, None


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int],
    spec: LatencySpec,
    device: str | torch.device | None,
    *,
    clock: str = "wall",
) -> LatencyStats:
    """Median/p10/p90 forward latency of ``model`` at the recipe's latency settings.

    ``input_size`` is (C, H, W); ``spec`` is the recipe's ``latency`` block (batch_size, dtype,
    repeats, warmup, channels_last; its defaults are the recipe schema's). The model is timed in
    eval mode under inference_mode; its parameters, dtype, device and train/eval flag are
    unchanged afterwards. ``clock="cpu"``
    (CPU only, benchmarks on shared hosts) times process CPU time instead of wall time.
    """
    return measure_latency_interleaved([model], input_size, spec, device, clock=clock)[0]


def _time_interleaved(
    calls: Sequence[Callable[[], Any]], device: torch.device, repeats: int, clock: str
) -> list[list[float]]:
    """ms per repeat for each call, the calls alternating A B, B A, A B, ... (one round each).

    Reversing the order every round puts each call first as often as last, so a slow drift
    (a neighbour's load, clocks, caches) costs every call alike. On CUDA every call is bracketed
    by its own events and one synchronize at the end reads them all.
    """
    n = len(calls)
    orders = [range(n) if r % 2 == 0 else range(n - 1, -1, -1) for r in range(repeats)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events: list[list[tuple[Any, Any]]] = [[] for _ in calls]
        for order in orders:
            for i in order:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                calls[i]()
                end.record()
                events[i].append((start, end))
        torch.cuda.synchronize(device)
        return [[s.elapsed_time(e) for s, e in per_call] for per_call in events]
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    now = perf_counter_ns if clock == "wall" else process_time_ns
    out: list[list[float]] = [[] for _ in calls]
    for order in orders:
        for i in order:
            t0 = now()
            calls[i]()
            out[i].append((now() - t0) / 1e6)
    return out


def measure_latency_interleaved(
    models: Sequence[nn.Module],
    input_size: Sequence[int],
    spec: LatencySpec,
    device: str | torch.device | None,
    *,
    clock: str = "wall",
) -> list[LatencyStats]:
    """`measure_latency` of several models (e.g. the baseline and the pruned one) in one run.

    After each model's warm-up the timed forward passes alternate between the models (order
    reversed every round), so host noise during the measurement hits all of them and their
    ratio, the reported speed-up, stays meaningful on a shared machine. Same settings, same
    input and the same guarantees as `measure_latency` (no model is mutated).
    """
    if not models:
        return []
    dev = resolve_device(device)
    batch, repeats, warmup = spec.batch_size, max(1, int(spec.repeats)), max(1, spec.warmup)
    channels_last = spec.channels_last
    dtype_name, note = effective_dtype(spec.dtype, dev)
    dtype = DTYPES[dtype_name]

    prev_benchmark = torch.backends.cudnn.benchmark
    if dev.type == "cuda":
        # let cuDNN pick the fastest algorithm for these shapes during warm-up
        torch.backends.cudnn.benchmark = True
    prepared = [prepare_model(m, dev, dtype, channels_last) for m in models]
    was_training = [m.training for m in prepared]
    x = torch.randn(batch, *[int(v) for v in input_size], device=dev, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        for m in prepared:
            m.eval()
        with torch.inference_mode():
            for m in prepared:
                for _ in range(warmup):
                    m(x)
            calls = [functools.partial(m, x) for m in prepared]
            times = _time_interleaved(calls, dev, repeats, clock)
    finally:
        for m, flag in zip(prepared, was_training, strict=True):
            m.train(flag)
        torch.backends.cudnn.benchmark = prev_benchmark
    if clock == "cpu" and dev.type == "cpu":
        note = "; ".join(filter(None, [note, "process CPU time, not wall clock"]))
    if len(models) > 1:
        note = "; ".join(filter(None, [note, f"interleaved with {len(models) - 1} other model(s)"]))
    out = []
    for per_model in times:
        med, p10, p90 = summarize(per_model)
        out.append(
            LatencyStats(
                median_ms=med,
                p10_ms=p10,
                p90_ms=p90,
                device=device_name(dev),
                batch_size=batch,
                dtype=dtype_name,
                channels_last=channels_last,
                repeats=repeats,
                note=note,
            )
        )
    return out
