"""Image folders (ImageFolder layout): scanning, the class-order rule, and decoding one image.

Layout: `root/<class name>/<image>`; classes are the sub-folder names sorted as strings, and
label `i` is the `i`-th of them (torchvision's rule). Decoding is per file with Pillow, shared
by the in-memory path (decode everything once) and the streaming path (DataLoader workers).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from hawada.core.errors import DataError

__all__ = [
    "EVAL_CROP",
    "IMAGE_SUFFIXES",
    "FolderIndex",
    "decode_image",
    "scan_folder",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Held-out crop when training is augmented: resize to size / 0.875, centre-crop `size`
#: (ImageNet's 256 -> 224). Without augmentation the image is resized to cover `size` exactly.
EVAL_CROP = 0.875


@dataclass(frozen=True)
class FolderIndex:
    """The files of an image folder: relative paths (one numpy byte-string array, so forked
    DataLoader workers share it instead of copying Python objects) and int64 labels."""

    root: Path
    classes: tuple[str, ...]
    paths: np.ndarray  # dtype S: paths relative to root, UTF-8
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.labels)

    def file(self, i: int) -> Path:
        return self.root / str(self.paths[i].decode("utf-8"))

    def subset(self, idx: np.ndarray) -> FolderIndex:
        return FolderIndex(self.root, self.classes, self.paths[idx], self.labels[idx])


def scan_folder(root: Path, what: str = "data.path") -> FolderIndex:
    """List `root/<class>/<image>` files (any depth below the class folder), classes sorted.

    Raises DataError naming the folder when it is missing, has no class folders, or a class
    folder holds no image.
    """
    if not root.is_dir():
        raise DataError(f"{what} {str(root)!r} is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"{what} {str(root)!r} has no class folder: lay images out as "
            "<folder>/<class name>/<image> (one sub-folder per class)"
        )
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        before = len(paths)
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            paths.extend(
                os.path.join(rel, f)
                for f in sorted(filenames)
                if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")
            )
        labels.extend([label] * (len(paths) - before))
        if len(paths) == before:
            empty.append(name)
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(
            f"{what} {str(root)!r}: class folder(s) without images: {shown} "
            f"(image suffixes: {', '.join(IMAGE_SUFFIXES)}); remove them or add images"
        )
    encoded = np.array([p.encode("utf-8") for p in paths])
    return FolderIndex(root, tuple(classes), encoded, np.asarray(labels, dtype=np.int64))


def _cover_box(
    width: int, height: int, size: tuple[int, int], crop: float
) -> tuple[int, int, int, int]:
    """Centre box of the image that, scaled to cover `size / crop`, is cropped to `size`."""
    h, w = size
    scale = max(h / crop / height, w / crop / width)  # image px -> resized px
    bw, bh = min(width, w / scale), min(height, h / scale)
    left, top = (width - bw) / 2.0, (height - bh) / 2.0
    return (round(left), round(top), round(left + bw), round(top + bh))


def _random_box(
    width: int, height: int, generator: torch.Generator | None
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: 8-100% of the area, aspect 3/4..4/3 (10 tries)."""
    area = width * height
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (0.08 + 0.92 * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        bw = round(math.sqrt(target * aspect))
        bh = round(math.sqrt(target / aspect))
        if 0 < bw <= width and 0 < bh <= height:
            left = int(u[2] * (width - bw + 1))
            top = int(u[3] * (height - bh + 1))
            return (left, top, left + bw, top + bh)
    side = min(width, height)  # fallback: centre square
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def decode_image(
    file: Path | str | BinaryIO,
    size: tuple[int, int],
    *,
    augment: bool = False,
    crop: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One image file (a path or an open binary file) -> uint8 3×H×W at `size` (height, width).

    `augment`: a random resized crop and a random horizontal flip (training). Otherwise the
    image is resized to cover `size / crop` and centre-cropped to `size` (deterministic).
    JPEGs are decoded at a reduced scale when that still covers the output (Pillow's draft
    mode): most of the decode cost of a large photo goes away. Raises OSError/ValueError from
    Pillow for a file that is not a readable image.
    """
    from PIL import Image

    h, w = size
    with Image.open(file) as im:
        full_w, full_h = im.size
        if augment:
            box = _random_box(full_w, full_h, generator)
        else:
            box = _cover_box(full_w, full_h, size, crop)
            bw, bh = max(1, box[2] - box[0]), max(1, box[3] - box[1])
            # draft never goes below the requested size; it scales JPEG decoding by 1/2..1/8.
            im.draft("RGB", (math.ceil(full_w * w / bw), math.ceil(full_h * h / bh)))
        fx, fy = im.width / full_w, im.height / full_h  # 1.0 unless draft reduced the decode
        scaled = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        rgb = im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR, box=scaled)
    if augment and bool(torch.rand(1, generator=generator) < 0.5):
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
