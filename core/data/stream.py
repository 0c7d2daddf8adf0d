"""Streaming: images decoded in DataLoader workers only when a batch needs them.

Memory stays bounded whatever the dataset size: the index of a folder is two numpy arrays, and
only `workers x prefetch` batches are decoded at any time. On CUDA the batches come in pinned
memory and are copied asynchronously; normalisation happens on the device, as in memory.

A file that cannot be decoded comes back flagged instead of raising inside a worker process;
the training process then fails the job naming the file (`data.on_corrupt: fail`) or drops the
sample and counts it (`skip`).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hawada.core.data.bundle import Batch, DataBundle
from hawada.core.data.folder import FolderIndex, decode_image
from hawada.core.errors import DataError

__all__ = ["FolderSamples", "StreamBundle", "default_workers"]

PREFETCH = 4  # batches per worker in flight
Item = tuple[Tensor, int, int]


def default_workers(requested: int) -> int:
    """`requested` DataLoader workers, at most the CPUs this process may use, and none inside a
    daemonic process (which may not start children)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    if multiprocessing.current_process().daemon:
        return 0
    return max(0, min(requested, cpus))


class FolderSamples(Dataset[Item]):
    """`(uint8 3×H×W image, label, -1)` per file; `(zeros, label, index)` for a file that does
    not decode, so the training process decides what a corrupt file means."""

    def __init__(
        self, index: FolderIndex, size: tuple[int, int], *, augment: bool, crop: float
    ) -> None:
        self.index = index
        self.size = size
        self.augment = augment
        self.crop = crop

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Item:
        label = int(self.index.labels[i])
        try:
            img = decode_image(self.index.file(i), self.size, augment=self.augment, crop=self.crop)
        except (OSError, ValueError, SyntaxError):  # Pillow's errors for unreadable files
            return torch.zeros((3, *self.size), dtype=torch.uint8), label, i
        return img, label, -1


class StreamBundle(DataBundle):
    """Training and held-out folders (or subsets of one) streamed through DataLoaders."""

    def __init__(
        self,
        train: FolderIndex,
        heldout: FolderIndex,
        *,
        workers: int,
        on_corrupt: str,
        crop: float,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.train_index = train
        self.heldout_index = heldout
        self.workers = default_workers(workers)
        self.on_corrupt = on_corrupt
        self.crop = crop
        self.skipped_files: list[str] = []  # the first few, for the log and the report
        _, h, w = self.input_size
        self._size = (h, w)

    @property
    def n_train(self) -> int:
        return len(self.train_index)

    @property
    def n_heldout(self) -> int:
        return len(self.heldout_index)

    @property
    def loader(self) -> str:
        return "stream"

    def describe(self) -> dict[str, Any]:
        block = super().describe()
        block["workers"] = self.workers
        if self.skipped_files:
            block["skipped_examples"] = self.skipped_files
        return block

    def _loader(
        self,
        dataset: FolderSamples,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        device: torch.device,
    ) -> DataLoader[Item]:
        workers = self.workers
        drop_last = shuffle and len(dataset) >= batch_size  # a batch of one breaks train BN
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=PREFETCH if workers else None,
            persistent_workers=workers > 0 and shuffle,  # endless training streams reuse them
            # Seeds the shuffle and each worker's augmentation: the same run twice is the same.
            generator=torch.Generator().manual_seed(seed),
        )

    def _batch(self, item: list[Tensor], index: FolderIndex, device: torch.device) -> Batch | None:
        x, y, bad = item
        broken = bad >= 0
        if bool(broken.any()):  # CPU tensors: no device sync
            names = [str(index.paths[int(i)].decode("utf-8")) for i in bad[broken].tolist()]
            if self.on_corrupt == "fail":
                raise DataError(
                    f"cannot decode {names[0]} in {index.root} (set data.on_corrupt: skip to "
                    "skip and count unreadable files)"
                )
            self.skipped += len(names)
            self.skipped_files.extend(names[: max(0, 10 - len(self.skipped_files))])
            keep = ~broken
            x, y = x[keep], y[keep]
            if len(y) == 0:
                return None
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        return self.normalize(x), y

    def _train_set(self) -> FolderSamples:
        return FolderSamples(self.train_index, self._size, augment=self.augment, crop=self.crop)

    def train_batches(
        self,
        batch_size: int | None = None,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
    ) -> Iterator[Batch]:
        bs = batch_size or self.batch_size
        dev = torch.device(device) if device is not None else torch.device("cpu")
        loader = self._loader(self._train_set(), bs, shuffle=True, seed=seed, device=dev)
        while True:  # each pass reshuffles (the loader's generator moves on)
            for item in loader:
                batch = self._batch(item, self.train_index, dev)
                if batch is not None:
                    yield batch

    def train_epoch(
        self,
        batch_size: int | None = None,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
    ) -> Iterator[Batch]:
        bs = batch_size or self.batch_size
        dev = torch.device(device) if device is not None else torch.device("cpu")
        for item in self._loader(self._train_set(), bs, shuffle=True, seed=seed, device=dev):
            batch = self._batch(item, self.train_index, dev)
            if batch is not None:
                yield batch

    def heldout_batches(
        self, batch_size: int | None = None, *, device: torch.device | str | None = None
    ) -> Iterator[Batch]:
        bs = batch_size or self.batch_size
        dev = torch.device(device) if device is not None else torch.device("cpu")
        dataset = FolderSamples(self.heldout_index, self._size, augment=False, crop=self.crop)
        for item in self._loader(dataset, bs, shuffle=False, seed=0, device=dev):
            batch = self._batch(item, self.heldout_index, dev)
            if batch is not None:
                yield batch
