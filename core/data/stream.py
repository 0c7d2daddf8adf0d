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
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hawada.core.data.bundle import Batch, DataBundle
from hawada.core.data.folder import FolderIndex, decode_image
from hawada.core.errors import DataError

__all__ = [
    "FolderSamples",
    "FolderSource",
    "StreamBundle",
    "StreamSource",
    "children_allowed",
    "default_workers",
]

PREFETCH = 4  # batches per worker in flight
#: (uint8 3×H×W image, label, "" or the name of a file that did not decode)
Item = tuple[Tensor, int, str]


class StreamSource(Protocol):
    """One set of samples a StreamBundle reads: a folder index or WebDataset shards."""

    #: True for map-style datasets (the DataLoader shuffles); iterable ones shuffle themselves.
    loader_shuffles: bool
    where: str  # for messages

    def __len__(self) -> int: ...

    def dataset(
        self, size: tuple[int, int], *, augment: bool, crop: float, shuffle: bool, seed: int
    ) -> Dataset[Item]: ...


def default_workers(requested: int) -> int:
    """`requested` DataLoader workers, at most the CPUs this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(requested, cpus))


@contextmanager
def children_allowed() -> Iterator[None]:
    """Let DataLoader workers start inside a daemonic process (a Celery prefork child).

    multiprocessing refuses children to a daemon so that none outlive it. DataLoader workers are
    daemons themselves, are joined by their DataLoader and exit when their parent dies (torch's
    watchdog polls it), so the flag is lifted only while they start; without this a service job
    would decode every image in its training process.
    """
    proc = multiprocessing.current_process()
    config: dict[str, Any] = proc._config  # type: ignore[attr-defined]  # stdlib private
    lifted = bool(config.get("daemon"))
    if lifted:
        config["daemon"] = False
    try:
        yield
    finally:
        if lifted:
            config["daemon"] = True


class FolderSamples(Dataset[Item]):
    """`(uint8 3×H×W image, label, "")` per file; `(zeros, label, relative path)` for a file that
    does not decode, so the training process decides what a corrupt file means."""

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
            name = str(self.index.paths[i].decode("utf-8"))
            return torch.zeros((3, *self.size), dtype=torch.uint8), label, name
        return img, label, ""


class FolderSource:
    """A folder index as a StreamSource (map-style: the DataLoader shuffles)."""

    loader_shuffles = True

    def __init__(self, index: FolderIndex) -> None:
        self.index = index
        self.where = str(index.root)

    def __len__(self) -> int:
        return len(self.index)

    def dataset(
        self, size: tuple[int, int], *, augment: bool, crop: float, shuffle: bool, seed: int
    ) -> Dataset[Item]:
        return FolderSamples(self.index, size, augment=augment, crop=crop)


class StreamBundle(DataBundle):
    """Training and held-out sets (folders, subsets of one, or shards) streamed through
    DataLoaders."""

    def __init__(
        self,
        train: StreamSource,
        heldout: StreamSource,
        *,
        workers: int,
        on_corrupt: str,
        crop: float,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.train_source = train
        self.heldout_source_set = heldout
        self.workers = default_workers(workers)
        self.on_corrupt = on_corrupt
        self.crop = crop
        self.skipped_files: list[str] = []  # the first few, for the log and the report
        self._skipped_names: set[str] = set()
        _, h, w = self.input_size
        self._size = (h, w)

    @property
    def n_train(self) -> int:
        return len(self.train_source)

    @property
    def n_heldout(self) -> int:
        return len(self.heldout_source_set)

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
        source: StreamSource,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        device: torch.device,
    ) -> DataLoader[Item]:
        workers = self.workers
        dataset = source.dataset(
            self._size, augment=train and self.augment, crop=self.crop, shuffle=train, seed=seed
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and source.loader_shuffles,
            drop_last=train and len(source) >= batch_size,  # a batch of one breaks train BN
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=PREFETCH if workers else None,
            persistent_workers=workers > 0 and train,  # endless training streams reuse them
            # Seeds the shuffle and each worker's augmentation: the same run twice is the same.
            generator=torch.Generator().manual_seed(seed),
        )

    def _batch(self, item: list[Any], source: StreamSource, device: torch.device) -> Batch | None:
        x, y, names = item
        if any(names):  # a short list of strings per batch
            broken = [n for n in names if n]
            if self.on_corrupt == "fail":
                raise DataError(
                    f"cannot decode {broken[0]} in {source.where} (set data.on_corrupt: skip "
                    "to skip and count unreadable files)"
                )
            fresh = [n for n in broken if n not in self._skipped_names]
            self._skipped_names.update(fresh)
            self.skipped = len(self._skipped_names)  # distinct files, not skips per pass
            self.skipped_files.extend(fresh[: max(0, 10 - len(self.skipped_files))])
            keep = torch.tensor([not n for n in names])
            x, y = x[keep], y[keep]
            if len(y) == 0:
                return None
        if len(y) and int(y.max()) >= self.num_classes:  # CPU tensor: no device sync
            raise DataError(
                f"label {int(y.max())} in {source.where} is out of range: model.num_classes is "
                f"{self.num_classes}"
            )
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        return self.normalize(x), y

    def _serve(
        self, loader: DataLoader[Item], source: StreamSource, device: torch.device
    ) -> Iterator[Batch]:
        """One pass over `loader`: its batches that kept at least one image, on `device`."""
        with children_allowed():
            items = iter(loader)  # starts (or, persistent, reuses) the workers
        for item in items:
            batch = self._batch(item, source, device)
            if batch is not None:
                yield batch

    def _train(
        self, batch_size: int, seed: int, device: torch.device, *, endless: bool
    ) -> Iterator[Batch]:
        source = self.train_source
        loader = self._loader(source, batch_size, train=True, seed=seed, device=device)
        epoch = 0
        while True:  # each pass reshuffles (the loader's generator moves on)
            if epoch and not source.loader_shuffles:
                # Shards shuffle inside the stream, seeded: a new seed gives a new order.
                loader = self._loader(
                    source, batch_size, train=True, seed=seed + epoch, device=device
                )
            epoch += 1
            empty = True
            for batch in self._serve(loader, source, device):
                empty = False
                yield batch
            if not endless:
                return
            if empty:
                raise DataError(f"no training images could be read from {source.where}")

    def _heldout(self, batch_size: int, device: torch.device) -> Iterator[Batch]:
        source = self.heldout_source_set
        loader = self._loader(source, batch_size, train=False, seed=0, device=device)
        yield from self._serve(loader, source, device)
