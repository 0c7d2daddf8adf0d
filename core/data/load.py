"""`load_data`: the recipe's `data` block -> a `DataBundle`, held-out set fixed before training.

The held-out set is `data.heldout_path` or the job's `heldout` upload when given, otherwise a
seeded split of the source (`val_fraction`, `seed`). Small sources are decoded once into
memory; folders whose decoded size exceeds `data.memory_limit_mb` (or `loader: stream`) stream
through DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hawada.core.data.arrays import (
    DEFAULT_FASHION_MNIST_DIR,
    SYNTHETIC_SAMPLES,
    digits,
    fashion_mnist,
    mnist_5k,
    npz,
    resize,
    synthetic,
    to_nchw,
)
from hawada.core.data.bundle import DataBundle, TensorBundle
from hawada.core.data.folder import EVAL_CROP, FolderIndex, decode_image, scan_folder
from hawada.core.data.stream import StreamBundle
from hawada.core.errors import DataError
from hawada.core.paths import resolve_within
from hawada.core.recipe import DataSpec, Recipe

__all__ = ["AUGMENT_ABOVE_PX", "load_data", "resolve_augment"]

#: `data.augment: auto` augments training batches for inputs larger than this (in pixels).
AUGMENT_ABOVE_PX = 64
HELDOUT_MISMATCH = "heldout_mismatch"


def resolve_augment(spec: DataSpec, size: tuple[int, int]) -> bool:
    """Whether training batches get random resized crops and flips."""
    if spec.augment == "auto":
        return max(size) > AUGMENT_ABOVE_PX
    return spec.augment == "standard"


def _resolve(path_text: str, allowed_roots: Sequence[Path] | None, field: str) -> Path:
    path = resolve_within(path_text, allowed_roots)
    if path is None:
        roots = ", ".join(str(r) for r in allowed_roots or ()) or "none"
        raise DataError(
            f"{field} {path_text!r} is outside the allowed data folders "
            f"(HAWADA_DATA_ROOTS: {roots})"
        )
    return path


def _subset(n: int, limit: int | None, generator: torch.Generator) -> Tensor | None:
    """Seeded subset of indices when `limit` caps the sample count; None means all."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=generator)[:limit]


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    n_held = max(1, round(n * val_fraction))
    if n - n_held < 1:
        raise DataError(f"{n} samples are too few to split into training and held-out sets")
    perm = torch.randperm(n, generator=generator)
    return perm[n_held:], perm[:n_held].sort().values


def _check_classes(data_classes: int, recipe: Recipe) -> None:
    if data_classes > recipe.model.num_classes:
        raise DataError(
            f"the dataset has {data_classes} classes but model.num_classes is "
            f"{recipe.model.num_classes}"
        )


def load_data(
    recipe: Recipe,
    upload: Path | None = None,
    *,
    heldout: Path | None = None,
    allowed_roots: Sequence[Path] | None = None,
) -> DataBundle:
    """Load the recipe's data source and fix the held-out set.

    `upload` is the job's uploaded dataset (an .npz), used by `source: upload` and by
    `source: npz` without `data.path`; `heldout` the job's uploaded held-out set (an .npz).
    `allowed_roots`, when given, confines `data.path` and `data.heldout_path` to those folders
    (a service should not read arbitrary server paths for remote users).
    Raises DataError(code="bad_dataset", or "heldout_mismatch" when the held-out set's classes
    are not the training set's) with a message naming the problem.
    """
    spec = recipe.data
    size = (recipe.model.input_size[1], recipe.model.input_size[2])
    generator = torch.Generator().manual_seed(spec.seed)
    augment = resolve_augment(spec, size)
    held_path: Path | None = None
    held_source = "split"
    if spec.heldout_path is not None:
        held_path = _resolve(spec.heldout_path, allowed_roots, "data.heldout_path")
        held_source = "heldout_path"
    elif heldout is not None:
        held_path, held_source = Path(heldout), "upload"
    common: dict[str, Any] = {
        "input_size": recipe.model.input_size,
        "mean": recipe.model.normalize.mean,
        "std": recipe.model.normalize.std,
        "source": spec.source,
        "batch_size": spec.batch_size,
        "augment": augment,
        "heldout_source": held_source,
    }
    if spec.source == "folder":
        assert spec.path is not None  # the recipe schema requires it
        root = _resolve(spec.path, allowed_roots, "data.path")
        return _load_folder(recipe, root, held_path, generator, common)
    if spec.source == "webdataset":
        raise DataError("data.source 'webdataset' is not available in this version")
    return _load_arrays(recipe, upload, held_path, allowed_roots, generator, common)


# --- folders ---------------------------------------------------------------------------------


def _load_folder(
    recipe: Recipe,
    root: Path,
    held_path: Path | None,
    generator: torch.Generator,
    common: dict[str, Any],
) -> DataBundle:
    spec = recipe.data
    index = scan_folder(root, "data.path")
    _check_classes(len(index.classes), recipe)
    pick = _subset(len(index), spec.limit, generator)
    if pick is not None:
        index = index.subset(pick.numpy())
    if held_path is not None:
        if not held_path.is_dir():
            raise DataError(
                f"the held-out set {held_path.name!r} must be a folder like data.path "
                "(one sub-folder per class) when data.source is 'folder'"
            )
        held = scan_folder(held_path, "data.heldout_path")
        if held.classes != index.classes:
            only_train = sorted(set(index.classes) - set(held.classes))
            only_held = sorted(set(held.classes) - set(index.classes))
            raise DataError(
                "the held-out folder's classes differ from the training folder's "
                f"(only in training: {only_train[:10]}, only held out: {only_held[:10]}); "
                "labels follow the sorted class-folder names, so both need the same classes",
                code=HELDOUT_MISMATCH,
            )
        held_pick = _subset(len(held), spec.limit, generator)
        if held_pick is not None:
            held = held.subset(held_pick.numpy())
        train = index
    else:
        if len(index) < 2:
            raise DataError(f"{root.name}: needs at least 2 images, found {len(index)}")
        train_idx, held_idx = _split(len(index), spec.val_fraction, generator)
        train, held = index.subset(train_idx.numpy()), index.subset(held_idx.numpy())
    crop = EVAL_CROP if common["augment"] else 1.0
    _, h, w = recipe.model.input_size
    decoded = (len(train) + len(held)) * 3 * h * w
    stream = spec.loader == "stream" or (
        spec.loader == "auto" and decoded > spec.memory_limit_mb * 2**20
    )
    if stream:
        return StreamBundle(
            train,
            held,
            workers=spec.workers,
            on_corrupt=spec.on_corrupt,
            crop=crop,
            num_classes=len(index.classes),
            **common,
        )
    x_train, y_train, bad_train = _decode_all(train, (h, w), 1.0, spec.on_corrupt)
    x_held, y_held, bad_held = _decode_all(held, (h, w), crop, spec.on_corrupt)
    bundle = _tensor_bundle(
        x_train, y_train, x_held, y_held, num_classes=len(index.classes), common=common
    )
    bundle.skipped = bad_train + bad_held
    return bundle


def _decode_all(
    index: FolderIndex, size: tuple[int, int], crop: float, on_corrupt: str
) -> tuple[Tensor, Tensor, int]:
    """Every image of `index` decoded once (centre crop), unreadable ones failed or skipped."""
    images = torch.empty((len(index), 3, *size), dtype=torch.uint8)
    ok = torch.ones(len(index), dtype=torch.bool)
    for i in range(len(index)):  # decoding is inherently per file
        try:
            images[i] = decode_image(index.file(i), size, crop=crop)
        except (OSError, ValueError, SyntaxError) as exc:
            if on_corrupt == "fail":
                name = index.paths[i].decode("utf-8")
                raise DataError(
                    f"cannot decode {name}: {exc} (set data.on_corrupt: skip to skip and "
                    "count unreadable files)"
                ) from None
            ok[i] = False
    labels = torch.from_numpy(index.labels)
    skipped = int((~ok).sum())
    if skipped:
        images, labels = images[ok], labels[ok]
    return images, labels, skipped


def _tensor_bundle(
    x_train: Tensor,
    y_train: Tensor,
    x_held: Tensor | None,
    y_held: Tensor | None,
    *,
    num_classes: int,
    common: dict[str, Any],
    split: tuple[Tensor, Tensor] | None = None,
    labelled: bool = True,
) -> TensorBundle:
    """One image tensor for both sets (the held-out rows after the training rows)."""
    if x_held is None or y_held is None:
        assert split is not None
        train_idx, held_idx = split
        images, labels = x_train, y_train
    else:
        if x_train.shape[1] != x_held.shape[1]:  # grayscale next to RGB: store both as RGB
            x_train, x_held = x_train.expand(-1, 3, -1, -1), x_held.expand(-1, 3, -1, -1)
        images, labels = torch.cat([x_train, x_held]), torch.cat([y_train, y_held])
        n = len(y_train)
        train_idx, held_idx = torch.arange(n), torch.arange(n, len(labels))
    if len(train_idx) == 0 or len(held_idx) == 0:
        raise DataError(
            f"the training set has {len(train_idx)} and the held-out set {len(held_idx)} "
            "usable samples; both need at least one"
        )
    return TensorBundle(
        images,
        labels,
        train_idx,
        held_idx,
        num_classes=num_classes,
        labelled=labelled,
        **common,
    )


# --- array sources ---------------------------------------------------------------------------


def _arrays(
    recipe: Recipe, upload: Path | None, allowed_roots: Sequence[Path] | None
) -> tuple[np.ndarray, np.ndarray]:
    spec = recipe.data
    if spec.source == "digits":
        return digits()
    if spec.source == "mnist-5k":
        return mnist_5k()
    if spec.source == "fashion-mnist":
        directory = (
            _resolve(spec.path, allowed_roots, "data.path")
            if spec.path
            else DEFAULT_FASHION_MNIST_DIR
        )
        return fashion_mnist(directory)
    # npz | upload
    if spec.source == "npz" and spec.path:
        path = _resolve(spec.path, allowed_roots, "data.path")
    elif upload is not None:
        path = Path(upload)
    else:
        raise DataError(
            f"data.source {spec.source!r} needs an uploaded dataset (.npz) or data.path"
        )
    return npz(path)


def _load_arrays(
    recipe: Recipe,
    upload: Path | None,
    held_path: Path | None,
    allowed_roots: Sequence[Path] | None,
    generator: torch.Generator,
    common: dict[str, Any],
) -> DataBundle:
    spec = recipe.data
    size = (recipe.model.input_size[1], recipe.model.input_size[2])
    if spec.source == "synthetic":
        n = spec.limit or SYNTHETIC_SAMPLES
        images, labels = synthetic(n, size, recipe.model.num_classes, generator)
        held_x = held_y = None
        split = None
        if held_path is None:
            split = _split(len(images), spec.val_fraction, generator)
        else:
            hx, hy = npz(held_path)
            held_x, held_y = resize(to_nchw(hx), size), torch.from_numpy(hy)
        return _tensor_bundle(
            images,
            labels,
            held_x,
            held_y,
            num_classes=recipe.model.num_classes,
            common=common,
            split=split,
            labelled=False,
        )
    x, y = _arrays(recipe, upload, allowed_roots)
    if len(x) < (1 if held_path is not None else 2):
        raise DataError(f"the dataset has {len(x)} samples; at least 2 are needed")
    data_classes = int(y.max()) + 1  # of the whole dataset: a `limit` subset may miss some
    _check_classes(data_classes, recipe)
    x, y = _take(x, y, _subset(len(x), spec.limit, generator))
    images = resize(to_nchw(x), size)
    labels = torch.from_numpy(np.ascontiguousarray(y))
    if held_path is None:
        split = _split(len(images), spec.val_fraction, generator)
        return _tensor_bundle(
            images, labels, None, None, num_classes=data_classes, common=common, split=split
        )
    if held_path.is_dir():
        raise DataError(
            f"the held-out set for data.source {spec.source!r} must be an .npz file "
            f"(arrays x and y), not the folder {held_path.name!r}"
        )
    hx, hy = npz(held_path)
    unknown = sorted(set(np.unique(hy).tolist()) - set(np.unique(y).tolist()))
    if unknown:
        raise DataError(
            f"the held-out set has labels the training data never has: {unknown[:10]} "
            "(both sets must use the same class indices)",
            code=HELDOUT_MISMATCH,
        )
    hx, hy = _take(hx, hy, _subset(len(hx), spec.limit, generator))
    held_x = resize(to_nchw(hx), size)
    return _tensor_bundle(
        images,
        labels,
        held_x,
        torch.from_numpy(np.ascontiguousarray(hy)),
        num_classes=data_classes,
        common=common,
    )


def _take(x: np.ndarray, y: np.ndarray, pick: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    if pick is None:
        return x, y
    idx = pick.numpy()
    return x[idx], y[idx]
