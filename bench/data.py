"""Folder loader throughput against the gate-training step rate it must feed, and its memory.

    python bench/data.py [--quick] [--images 20000] [--workers 2] [--batch 64] [--size 224]
                         [--arch resnet50] [--steps 6] [--device auto] [--root var/bench-data]

1. A JPEG ImageFolder is built once (cached under --root): Fashion-MNIST images (the official
   train set, real pictures) upscaled to 500x375 RGB, ImageNet's typical size, 10 classes.
2. Loader: the streaming folder loader of a job (`loader: stream`, standard augmentation at
   --size, --workers DataLoader workers) over every image once; images/s, and the peak resident
   memory of the training process (VmHWM) and of the largest worker against the decoded size.
3. Step rate (the anchor, measured in the same run): gate training of --arch on --device on
   in-memory batches of the same shape, so no loader is involved; images/s it consumes.
4. Fed run: gate training fed by the folder stream; the share of wall time the step loop
   waits for the next batch (on CUDA the step is synchronised, so this is the GPU's idle share).

The loader keeps up when its images/s exceed the step's and the fed run's wait share is small.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from hawada.adapters.torchvision import build_model, get_adapter
from hawada.core.cost import make_cost_model
from hawada.core.data import load_data
from hawada.core.data.arrays import DEFAULT_FASHION_MNIST_DIR, fashion_mnist
from hawada.core.device import resolve_device
from hawada.core.gates import Gates, attach
from hawada.core.recipe import parse_recipe
from hawada.core.train import train_gates

SOURCE_SIZE = (500, 375)  # width, height of the JPEGs on disk
FULL = {"images": 20_000, "steps": 6, "batch": 64, "arch": "resnet50"}
QUICK = {"images": 400, "steps": 2, "batch": 8, "arch": "resnet18"}


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def build_folder(root: Path, n: int) -> Path:
    """N JPEGs in 10 class folders (cached: reused when it already holds N images)."""
    folder = root / f"fmnist-jpeg-{n}"
    done = folder / ".complete"
    if done.exists():
        return folder
    x, y = fashion_mnist(DEFAULT_FASHION_MNIST_DIR)
    for c in range(10):
        (folder / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        gray = Image.fromarray(x[i % len(x)]).resize(SOURCE_SIZE, Image.Resampling.BILINEAR)
        rgb = Image.merge("RGB", (gray, gray.point(lambda v: 255 - v), gray))
        rgb.save(folder / f"class{int(y[i % len(y)]):02d}" / f"{i:06d}.jpg", quality=90)
    done.write_text(str(n))
    return folder


def _recipe(folder: Path, args: argparse.Namespace, **data: Any) -> Any:
    return parse_recipe(
        {
            "model": {
                "arch": args.arch,
                "num_classes": 10,
                "stem": "imagenet",
                "input_size": [3, args.size, args.size],
            },
            "data": {
                "source": "folder",
                "path": str(folder),
                "loader": "stream",
                "augment": "standard",
                "workers": args.workers,
                "batch_size": args.batch,
                "val_fraction": 0.05,
                **data,
            },
            "train": {"steps": args.steps, "log_every": 1},
        }
    )


def loader_pass(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """Every image once through the streaming loader (train epoch + held-out pass)."""
    # Warm-up on a few batches: first-use allocations (thread pools, modules) are not data.
    warm = load_data(_recipe(folder, args, limit=4 * args.batch))
    sum(len(y) for _, y in warm.train_epoch(args.batch, seed=0))
    del warm
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # peak RSS from here on
    before = _status("VmRSS")
    t0 = time.perf_counter()
    data = load_data(_recipe(folder, args))
    scan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in data.train_epoch(args.batch, seed=0))
    n += sum(len(y) for _, y in data.heldout_batches(args.batch))
    seconds = time.perf_counter() - t0
    del data
    return {
        "images": n,
        "seconds": seconds,
        "scan_s": scan_s,
        "per_s": n / seconds,
        "main_peak_growth": _status("VmHWM") - before,
        "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


class _WaitTimed:
    """A DataBundle stand-in for train_gates that times how long each next batch takes."""

    def __init__(self, data: Any, device: torch.device) -> None:
        self.data, self.device, self.wait_s = data, device, 0.0
        self.labelled = data.labelled

    def train_batches(self, *args: Any, **kw: Any) -> Any:
        it = self.data.train_batches(*args, **kw)
        while True:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # bench only: charge the GPU's work to it
            t0 = time.perf_counter()
            batch = next(it)
            self.wait_s += time.perf_counter() - t0
            yield batch


def gate_steps(data: Any, recipe: Any, device: torch.device, steps: int) -> dict[str, float]:
    """Gate training for `steps` steps on `data`; seconds per step after the first."""
    model = build_model(recipe.model.arch, num_classes=10, stem="imagenet").to(device).eval()
    adapter = get_adapter(recipe.model.arch)
    cost = make_cost_model("flops", adapter.layers(model, recipe.model.input_size))
    gates = Gates(adapter.gate_groups(model, recipe.gates)).to(device)
    handle = attach(model, gates)
    stamps: list[float] = []
    timed = _WaitTimed(data, device)
    try:
        train_gates(
            model,
            gates,
            cost,
            timed,  # type: ignore[arg-type]
            recipe,
            device=device,
            on_step=lambda _row: stamps.append(time.perf_counter()),
        )
    finally:
        handle.remove()
    per_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return {"step_s": per_step, "wait_s": timed.wait_s, "total_s": stamps[-1] - stamps[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="400 images, resnet18, batch 8")
    parser.add_argument("--images", type=int)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--arch")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("var/bench-data"))
    parser.add_argument(
        "--loader-only", action="store_true", help="the loader pass and memory, no gate steps"
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    t0 = time.perf_counter()
    folder = build_folder(args.root, args.images)
    print(f"folder {folder} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    loader = loader_pass(folder, args)
    decoded = args.images * 3 * args.size * args.size
    print(f"loader pass done: {loader['per_s']:.0f} images/s", flush=True)
    if args.loader_only:
        _print_table(args, device, loader, decoded, None, None)
        return

    # The anchor: the same gate training on in-memory synthetic batches (no decoding at all).
    synthetic = _recipe(folder, args, source="synthetic", path=None, limit=4 * args.batch)
    synthetic_data = load_data(synthetic)
    anchor = gate_steps(synthetic_data, synthetic, device, args.steps)
    need = args.batch / anchor["step_s"]
    print(f"gate step {anchor['step_s']:.2f} s = {need:.1f} images/s", flush=True)
    fed = gate_steps(load_data(_recipe(folder, args)), _recipe(folder, args), device, args.steps)
    _print_table(args, device, loader, decoded, anchor, fed)


def _print_table(
    args: argparse.Namespace,
    device: torch.device,
    loader: dict[str, float],
    decoded: int,
    anchor: dict[str, float] | None,
    fed: dict[str, float] | None,
) -> None:
    load1, load5, _ = os.getloadavg()
    print(
        f"\nMachine: {platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} CPUs visible, torch {torch.__version__}, device "
        f"{device}, load average {load1:.2f} / {load5:.2f} (1 / 5 min)"
    )
    print(
        f"Folder: {args.images} JPEGs {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]}, decoded at "
        f"{args.size}px = {decoded / 2**30:.2f} GiB; {args.workers} workers, batch {args.batch}, "
        "standard augmentation"
        + ("" if anchor is None else f"; gate training {args.arch}, {args.steps} steps")
    )
    print("\n| measure | value |\n|---|---:|")
    rows = [
        ("folder scan (s)", f"{loader['scan_s']:.2f}"),
        ("loader images/s (every image once)", f"{loader['per_s']:.0f}"),
    ]
    if anchor is not None and fed is not None:
        need = args.batch / anchor["step_s"]
        rows += [
            ("gate-training images/s, in-memory batches (anchor)", f"{need:.1f}"),
            ("loader / gate-training rate", f"{loader['per_s'] / need:.1f}x"),
            ("fed run: s per step (anchor)", f"{fed['step_s']:.2f} ({anchor['step_s']:.2f})"),
            ("fed run: share of time waiting for data", f"{fed['wait_s'] / fed['total_s']:.1%}"),
        ]
    rows += [
        ("peak RSS growth, training process (MiB)", f"{loader['main_peak_growth'] / 2**20:.0f}"),
        ("peak RSS, largest worker (MiB)", f"{loader['worker_peak_rss'] / 2**20:.0f}"),
        ("decoded dataset (MiB)", f"{decoded / 2**20:.0f}"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
