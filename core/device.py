"""Which torch device a job runs on, and the name latency tables and reports give it."""

from __future__ import annotations

import functools
import platform

import torch

from hawada.core.errors import JobError

__all__ = ["device_name", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto`/`None` -> CUDA when available, else the CPU; otherwise the device asked for.

    A CUDA device comes back with an explicit index (so "is the model already there" compares
    equal to the `cuda:N` of its tensors). Asking for CUDA on a machine without it raises
    `JobError` (code `no_device`) instead of failing later inside torch.
    """
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise JobError("device cuda requested but CUDA is not available", code="no_device")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: str | torch.device | None) -> str:
    """Human-readable name of the device latency is measured on.

    CUDA: the board name (`NVIDIA H100 80GB HBM3`). CPU: `cpu:<model> x<threads>`: the
    thread count is part of the name because it changes every timing.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu:{_cpu_model()} x{torch.get_num_threads()}"
