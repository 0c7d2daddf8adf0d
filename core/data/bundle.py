"""What the engine trains and evaluates on: a `DataBundle` serving normalised float batches.

Two kinds: `TensorBundle` keeps every image decoded in one uint8 tensor (small sources: the
fast path, batches gathered with index tensors) and `StreamBundle` (`hawada.core.data.stream`)
decodes only the images each batch needs in DataLoader workers. Both hand out uint8 on the
way to the device and normalise there: 4x less host-to-device traffic than float.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Batch", "DataBundle", "Normalizer", "TensorBundle", "random_resized_crop_flip"]

Batch = tuple[Tensor, Tensor]
#: Where batches go: a device, its name, or None for the CPU.
Device = torch.device | str | None

# RandomResizedCrop's defaults (torchvision): 8%..100% of the area, aspect 3/4..4/3.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class Normalizer:
    """uint8 NCHW (1 or 3 channels) -> float32 normalised 3-channel batches, on any device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        # (x/255 - mean)/std == x*scale - shift: one fused op per batch.
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = mean_t / std_t
        self._consts: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, x: Tensor) -> Tensor:
        dev = x.device
        if dev not in self._consts:
            self._consts[dev] = (self._scale.to(dev), self._shift.to(dev))
        scale, shift = self._consts[dev]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # a view; the multiply below materialises 3 channels
        return torch.addcmul(-shift, x.to(torch.float32), scale)


def random_resized_crop_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """RandomResizedCrop + horizontal flip for a whole float batch in one `grid_sample`.

    Every sample gets its own crop box (area and aspect drawn like torchvision's) and flip;
    the random numbers come from `generator` on the CPU (a few floats per sample), so the
    augmentation is seeded and the same on every device.
    """
    n = x.shape[0]
    u = torch.rand((5, n), generator=generator)
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[0]
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.sqrt(area * aspect).clamp_(max=1.0)  # crop width / image width
    h = torch.sqrt(area / aspect).clamp_(max=1.0)
    cx = (2.0 * u[2] - 1.0) * (1.0 - w)  # crop centre in [-1, 1] coordinates
    cy = (2.0 * u[3] - 1.0) * (1.0 - h)
    flip = torch.where(u[4] < 0.5, -1.0, 1.0)
    theta = torch.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(x.device, non_blocking=True)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class DataBundle(ABC):
    """Training and held-out data of one job, fixed before anything trains.

    `train_batches` is endless and reshuffled every epoch (seeded), `train_epoch` one pass,
    `heldout_batches` every held-out sample once in a fixed order; each yields
    `(float32 N×3×H×W normalised images, int64 labels)` on `device`.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_size: tuple[int, int, int],
        mean: Sequence[float],
        std: Sequence[float],
        source: str,
        labelled: bool = True,
        batch_size: int = 64,
        augment: bool = False,
        heldout_source: str = "split",
    ) -> None:
        self.num_classes = num_classes
        self.input_size = input_size
        self.source = source
        #: False for synthetic data: its labels are noise, so no CE loss and no real accuracy.
        self.labelled = labelled
        self.batch_size = batch_size
        #: Training batches get random resized crops + flips (held-out batches never do).
        self.augment = augment
        #: `split` (a seeded split of the source), `heldout_path`, `upload` or `official-test`.
        self.heldout_source = heldout_source
        #: Files that could not be decoded and were skipped (`data.on_corrupt: skip`).
        self.skipped = 0
        self.normalize = Normalizer(mean, std)

    @property
    @abstractmethod
    def n_train(self) -> int:
        """Samples in the training split (gates and fine-tuning see only these)."""

    @property
    @abstractmethod
    def n_heldout(self) -> int:
        """Samples held out for accuracy."""

    @property
    def loader(self) -> str:
        """`memory` or `stream`."""
        return "memory"

    def describe(self) -> dict[str, Any]:
        """Sizes and provenance for the report."""
        return {
            "source": self.source,
            "loader": self.loader,
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
            "heldout_source": self.heldout_source,
            "num_classes": self.num_classes,
            "labelled": self.labelled,
            "input_size": list(self.input_size),
            "augment": "standard" if self.augment else "none",
            "skipped_files": self.skipped,
        }

    def heldout_info(self) -> dict[str, Any]:
        """Which held-out set accuracy was measured on, and its size (report `heldout`)."""
        return {"source": self.heldout_source, "size": self.n_heldout}

    def heldout_fingerprint(self) -> str | None:
        """A short hash of the held-out sample indices (None where samples stream by key)."""
        return None

    def batches_per_epoch(self, batch_size: int | None = None) -> int:
        """Batches one `train_epoch` yields (the last partial batch is dropped)."""
        bs = batch_size or self.batch_size
        return max(1, self.n_train // bs)

    def train_batches(
        self, batch_size: int | None = None, seed: int = 0, *, device: Device = None
    ) -> Iterator[Batch]:
        """Endless shuffled training batches, reshuffled every epoch (seeded)."""
        yield from self._train(batch_size or self.batch_size, seed, _device(device), endless=True)

    def train_epoch(
        self, batch_size: int | None = None, seed: int = 0, *, device: Device = None
    ) -> Iterator[Batch]:
        """One shuffled pass over the training split (seeded)."""
        yield from self._train(batch_size or self.batch_size, seed, _device(device), endless=False)

    def heldout_batches(
        self, batch_size: int | None = None, *, device: Device = None
    ) -> Iterator[Batch]:
        """Every held-out sample once, in a fixed order."""
        yield from self._heldout(batch_size or self.batch_size, _device(device))

    @abstractmethod
    def _train(
        self, batch_size: int, seed: int, device: torch.device, *, endless: bool
    ) -> Iterator[Batch]:
        """Shuffled training batches (seeded): one pass, or `endless` passes, each reshuffled."""

    @abstractmethod
    def _heldout(self, batch_size: int, device: torch.device) -> Iterator[Batch]:
        """Every held-out sample once, in a fixed order."""


def _device(device: Device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


class TensorBundle(DataBundle):
    """Images (uint8 NCHW) in memory, labels and a fixed train/held-out split of their rows.

    No DataLoader workers, no per-sample Python work per batch: batches are gathered with index
    tensors, moved as uint8 and normalised (and augmented) on the device.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        train_idx: Tensor,
        heldout_idx: Tensor,
        heldout_ids: Tensor | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.images = images
        self.labels = labels
        self.train_idx = train_idx
        self.heldout_idx = heldout_idx
        #: The held-out samples' indices in their source's own numbering (rows of a seeded
        #: split, or of the official test split): what the fingerprint hashes.
        self.heldout_ids = heldout_idx if heldout_ids is None else heldout_ids

    def heldout_fingerprint(self) -> str | None:
        """sha256 (16 hex digits) of the source, held-out set kind and sample indices: equal
        fingerprints mean accuracy was measured on the same images."""
        ids = self.heldout_ids.to(torch.int64).cpu().numpy().astype("<i8").tobytes()
        tag = f"{self.source}:{self.heldout_source}".encode()
        return hashlib.sha256(tag + b"\0" + ids).hexdigest()[:16]

    @property
    def n_train(self) -> int:
        return int(self.train_idx.numel())

    @property
    def n_heldout(self) -> int:
        return int(self.heldout_idx.numel())

    def _batch(self, idx: Tensor, dev: torch.device, aug: torch.Generator | None = None) -> Batch:
        x = self.images[idx].to(dev, non_blocking=True)
        y = self.labels[idx].to(dev, non_blocking=True)
        xf = self.normalize(x)
        if aug is not None:
            xf = random_resized_crop_flip(xf, aug)
        return xf, y

    def _epoch_orders(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        order = self.train_idx[torch.randperm(self.n_train, generator=generator)]
        full = self.n_train // batch_size
        if full == 0:  # fewer samples than one batch: the whole set is the batch
            yield order
            return
        # Drop the short remainder: tiny batches (size 1) break BatchNorm in train mode.
        yield from order[: full * batch_size].split(batch_size)

    def _aug_generator(self, seed: int) -> torch.Generator | None:
        # Its own stream: switching augmentation on does not change the batch order.
        return torch.Generator().manual_seed(seed + 1_000_003) if self.augment else None

    def train_batches_indexed(
        self, batch_size: int | None = None, seed: int = 0, *, device: Device = None
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """`train_batches` with each batch's row indices first (a CPU int64 tensor): the same
        batches in the same order; per-sample caches (teacher logits) key on them."""
        bs = batch_size or self.batch_size
        yield from self._indexed(bs, seed, _device(device), endless=True)

    def _indexed(
        self, batch_size: int, seed: int, device: torch.device, *, endless: bool
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        aug = self._aug_generator(seed)
        while True:
            for idx in self._epoch_orders(batch_size, generator):
                yield (idx, *self._batch(idx, device, aug))
            if not endless:
                return

    def _train(
        self, batch_size: int, seed: int, device: torch.device, *, endless: bool
    ) -> Iterator[Batch]:
        for _idx, x, y in self._indexed(batch_size, seed, device, endless=endless):
            yield x, y

    def _heldout(self, batch_size: int, device: torch.device) -> Iterator[Batch]:
        for idx in self.heldout_idx.split(batch_size):
            yield self._batch(idx, device)
