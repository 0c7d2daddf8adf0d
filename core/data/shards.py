"""WebDataset shards: tar files of samples (`<key>.jpg` + `<key>.cls`), read by `webdataset`.

`data.path` names a folder of `.tar` shards or a brace pattern (`/data/train-{000000..000146}.tar`).
Each sample needs one image member (`jpg`, `jpeg`, `png`, `webp`, ...) and its integer label in
`cls` (text). Shards are listed once (tar headers only, nothing decoded) to count the samples and,
without a separate held-out set, to hold out a seeded hash of the sample keys: the same keys are
held out on every run, and the split needs no index file.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from hawada.core.data.folder import IMAGE_SUFFIXES, decode_image
from hawada.core.errors import DataError

__all__ = ["ShardSource", "list_shards", "scan_shards"]

IMAGE_EXTS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)
SHUFFLE_BUFFER = 2000  # samples held for shuffling within the shard stream (per worker)
_SPLIT_BUCKETS = 1_000_000


def list_shards(path: Path, what: str = "data.path") -> list[str]:
    """The shard files of `path`: every `*.tar` in a folder, or a brace pattern expanded."""
    from braceexpand import braceexpand  # webdataset's own dependency

    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise DataError(f"{what} {str(path)!r} holds no .tar shards")
        return shards
    shards = list(braceexpand(str(path)))
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise DataError(f"{what}: {len(missing)} shard(s) not found, e.g. {missing[0]!r}")
    return shards


def _key_ext(name: str) -> tuple[str, str]:
    # WebDataset's grouping rule: the key is the path up to the first dot of the base name.
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :].lower())


def scan_shards(shards: Sequence[str]) -> list[str]:
    """Keys of the samples that have an image, in shard order (tar headers only)."""
    keys: list[str] = []
    for shard in shards:
        try:
            with tarfile.open(shard, mode="r:") as tar:  # seeks over member data
                seen: dict[str, bool] = {}
                for member in tar:
                    if member.isfile():
                        key, ext = _key_ext(member.name)
                        seen[key] = seen.get(key, False) or ext in IMAGE_EXTS
                keys.extend(k for k, has_image in seen.items() if has_image)
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"cannot read shard {Path(shard).name}: {exc}") from None
    return keys


def in_heldout(key: str, seed: int, fraction: float) -> bool:
    """The seeded hash split: stable across runs and workers, no index needed."""
    bucket = zlib.crc32(f"{seed}:{key}".encode()) % _SPLIT_BUCKETS
    return bucket < fraction * _SPLIT_BUCKETS


def _select(sample: dict[str, Any], *, seed: int, fraction: float, heldout: bool) -> bool:
    return in_heldout(sample["__key__"], seed, fraction) == heldout


def _decode(
    sample: dict[str, Any], *, size: tuple[int, int], augment: bool, crop: float
) -> tuple[torch.Tensor, int, str]:
    """A raw sample (bytes per extension) -> (uint8 image, label, "" or its key if broken)."""
    key = str(sample["__key__"])
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    try:
        label = int(bytes(sample["cls"]).decode("ascii").strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        label, ext = 0, None  # no usable label: treated like an unreadable file
    if ext is not None:
        try:
            img = decode_image(io.BytesIO(sample[ext]), size, augment=augment, crop=crop)
            return img, label, ""
        except (OSError, ValueError, SyntaxError):
            pass
    return torch.zeros((3, *size), dtype=torch.uint8), label, key


class ShardSource:
    """Shards (or the held-out / training side of their hash split) as a StreamSource."""

    loader_shuffles = False  # an iterable stream: shards and a buffer are shuffled inside

    def __init__(
        self,
        shards: list[str],
        count: int,
        *,
        split: tuple[int, float, bool] | None = None,
        where: str = "",
    ) -> None:
        self.shards = shards
        self.count = count
        self.split = split  # (seed, fraction, heldout side) or None for every sample
        self.where = where or str(Path(shards[0]).parent)

    def __len__(self) -> int:
        return self.count

    def dataset(
        self, size: tuple[int, int], *, augment: bool, crop: float, shuffle: bool, seed: int
    ) -> Dataset[Any]:
        import webdataset as wds

        ds = wds.WebDataset(
            self.shards,
            shardshuffle=len(self.shards) if shuffle else False,
            seed=seed,
            nodesplitter=None,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        if self.split is not None:
            split_seed, fraction, heldout = self.split
            ds = ds.select(partial(_select, seed=split_seed, fraction=fraction, heldout=heldout))
        if shuffle:
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed)
        out: Dataset[Any] = ds.map(partial(_decode, size=size, augment=augment, crop=crop))
        return out
