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
    MAX_DATASET_BYTES,
    SYNTHETIC_SAMPLES,
    digits,
    fashion_mnist,
    fashion_mnist_splits,
    mnist_5k,
    npz,
    npz_limit,
    resize,
    synthetic,
    to_nchw,
)
from hawada.core.data.bundle import DataBundle, TensorBundle
from hawada.core.data.folder import EVAL_CROP, FolderIndex, decode_image, scan_folder
from hawada.core.data.shards import ShardSource, in_heldout, list_shards, scan_shards
from hawada.core.data.stream import FolderSource, StreamBundle
from hawada.core.errors import DataError
from hawada.core.paths import resolve_within
from hawada.core.recipe import DataSpec, Recipe

__all__ = ["AUGMENT_ABOVE_PX", "load_data", "resolve_augment"]

#: `data.augment: auto` augments training batches for inputs larger than this (in pixels).
AUGMENT_ABOVE_PX = 64
HELDOUT_MISMATCH = "heldout_mismatch"
#: `heldout_source` of Fashion-MNIST's held-out set drawn from its official test split.
OFFICIAL_TEST = "official-test"


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
    max_dataset_bytes: int | None = None,
) -> DataBundle:
    """Load the recipe's data source and fix the held-out set.

    `upload` is the job's uploaded dataset (an .npz), used by `source: upload` and by
    `source: npz` without `data.path`; `heldout` the job's uploaded held-out set (an .npz).
    `allowed_roots`, when given, confines `data.path` and `data.heldout_path` to those folders
    (a service should not read arbitrary server paths for remote users). `max_dataset_bytes`
    bounds what any .npz it reads may declare, before anything is inflated (default
    `MAX_DATASET_BYTES`; the service passes its `HAWADA_MAX_DATASET_BYTES`).
    Raises DataError(code="bad_dataset", or "heldout_mismatch" when the held-out set's classes
    are not the training set's) with a message naming the problem.
    """
    token = npz_limit.set(max_dataset_bytes or MAX_DATASET_BYTES)
    try:
        return _load_data(recipe, upload, heldout=heldout, allowed_roots=allowed_roots)
    finally:
        npz_limit.reset(token)


def _load_data(
    recipe: Recipe,
    upload: Path | None,
    *,
    heldout: Path | None,
    allowed_roots: Sequence[Path] | None,
) -> DataBundle:
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
        assert spec.path is not None  # the recipe schema requires it
        root = _resolve(spec.path, allowed_roots, "data.path")
        return _load_shards(recipe, root, held_path, common)
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
            FolderSource(train),
            FolderSource(held),
            workers=spec.workers,
            on_corrupt=spec.on_corrupt,
            crop=crop,
            num_classes=len(index.classes),
            **common,
        )
    # Both sets decoded into one tensor (held-out rows last): no concatenation copy.
    images, labels, n_train = _decode_all([(train, 1.0), (held, crop)], (h, w), spec.on_corrupt)
    bundle = _tensor_bundle(
        images,
        labels,
        (torch.arange(n_train), torch.arange(n_train, len(labels))),
        num_classes=len(index.classes),
        common=common,
    )
    bundle.skipped = len(train) + len(held) - len(labels)
    return bundle


def _decode_all(
    parts: list[tuple[FolderIndex, float]], size: tuple[int, int], on_corrupt: str
) -> tuple[Tensor, Tensor, int]:
    """Every image of the parts decoded once (centre crop `crop` each) into one uint8 tensor;
    unreadable ones fail the job or are skipped. Returns images, labels, usable rows of part 1."""
    total = sum(len(index) for index, _ in parts)
    images = torch.empty((total, 3, *size), dtype=torch.uint8)
    labels = torch.from_numpy(np.concatenate([index.labels for index, _ in parts]))
    ok = torch.ones(total, dtype=torch.bool)
    row = 0
    for index, crop in parts:
        for i in range(len(index)):  # decoding is inherently per file
            try:
                images[row] = decode_image(index.file(i), size, crop=crop)
            except (OSError, ValueError, SyntaxError) as exc:
                if on_corrupt == "fail":
                    name = index.paths[i].decode("utf-8")
                    raise DataError(
                        f"cannot decode {name}: {exc} (set data.on_corrupt: skip to skip and "
                        "count unreadable files)"
                    ) from None
                ok[row] = False
            row += 1
    first = int(ok[: len(parts[0][0])].sum())
    if not bool(ok.all()):
        images, labels = images[ok], labels[ok]
    return images, labels, first


def _tensor_bundle(
    images: Tensor,
    labels: Tensor,
    split: tuple[Tensor, Tensor],
    *,
    num_classes: int,
    common: dict[str, Any],
    labelled: bool = True,
) -> TensorBundle:
    train_idx, held_idx = split
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


def _stack(
    x_train: Tensor, held: np.ndarray, size: tuple[int, int]
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Training images (NCHW) and a held-out array, both resized straight into one tensor
    (held-out rows last; no concatenation copy); grey next to RGB is stored as RGB."""
    x_held = to_nchw(held)
    n, nh = len(x_train), len(x_held)
    channels = max(x_train.shape[1], x_held.shape[1])
    images = torch.empty((n + nh, channels, *size), dtype=torch.uint8)
    resize(x_train, size, out=images[:n])
    resize(x_held, size, out=images[n:])
    return images, (torch.arange(n), torch.arange(n, n + nh))


# --- WebDataset shards ----------------------------------------------------------------------


def _load_shards(
    recipe: Recipe, root: Path, held_path: Path | None, common: dict[str, Any]
) -> DataBundle:
    spec = recipe.data
    if spec.limit is not None:
        raise DataError("data.limit is not supported for webdataset shards; list fewer shards")
    shards = list_shards(root, "data.path")
    keys = scan_shards(shards)
    if held_path is not None:
        if held_path.suffix == ".npz" or common["heldout_source"] == "upload":
            raise DataError(
                "the held-out set for webdataset shards must be shards too (data.heldout_path: "
                "a folder of .tar files or a brace pattern), not an .npz"
            )
        held_shards = list_shards(held_path, "data.heldout_path")
        train = ShardSource(shards, len(keys))
        held = ShardSource(held_shards, len(scan_shards(held_shards)))
    else:
        n_held = sum(in_heldout(k, spec.seed, spec.val_fraction) for k in keys)
        if n_held == 0 or n_held == len(keys):
            raise DataError(
                f"{len(keys)} samples are too few to split into training and held-out sets "
                f"(val_fraction {spec.val_fraction}); give data.heldout_path"
            )
        train = ShardSource(shards, len(keys) - n_held, split=(spec.seed, spec.val_fraction, False))
        held = ShardSource(shards, n_held, split=(spec.seed, spec.val_fraction, True))
    if len(train) == 0 or len(held) == 0:
        raise DataError(f"no samples with an image in the shards of {str(root)!r}")
    return StreamBundle(
        train,
        held,
        workers=spec.workers,
        on_corrupt=spec.on_corrupt,
        crop=EVAL_CROP if common["augment"] else 1.0,
        num_classes=recipe.model.num_classes,  # labels are checked batch by batch
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
        if held_path is None:
            split = _split(len(images), spec.val_fraction, generator)
        else:
            hx, hy = npz(held_path)
            images, split = _stack(images, hx, size)
            labels = torch.cat([labels, torch.from_numpy(hy)])
        return _tensor_bundle(
            images,
            labels,
            split,
            num_classes=recipe.model.num_classes,
            common=common,
            labelled=False,
        )
    if spec.source == "fashion-mnist" and held_path is None:
        official = _fashion_mnist_official(recipe, allowed_roots, generator, common)
        if official is not None:
            return official
    x, y = _arrays(recipe, upload, allowed_roots)
    if len(x) < (1 if held_path is not None else 2):
        need = 1 if held_path is not None else 2
        raise DataError(f"the dataset has {len(x)} samples; at least {need} are needed")
    data_classes = int(y.max()) + 1  # of the whole dataset: a `limit` subset may miss some
    _check_classes(data_classes, recipe)
    x, y = _take(x, y, _subset(len(x), spec.limit, generator))
    labels = torch.from_numpy(np.ascontiguousarray(y))
    if held_path is None:
        images = resize(to_nchw(x), size)
        split = _split(len(images), spec.val_fraction, generator)
        return _tensor_bundle(images, labels, split, num_classes=data_classes, common=common)
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
    stacked, split = _stack(to_nchw(x), hx, size)
    labels = torch.cat([labels, torch.from_numpy(np.ascontiguousarray(hy))])
    return _tensor_bundle(stacked, labels, split, num_classes=data_classes, common=common)


def _fashion_mnist_official(
    recipe: Recipe,
    allowed_roots: Sequence[Path] | None,
    generator: torch.Generator,
    common: dict[str, Any],
) -> TensorBundle | None:
    """Fashion-MNIST never pooled: training samples from the official train split, held-out
    ones from the official test split (None when the t10k files are absent).

    `limit` caps the total and `val_fraction` is the held-out share of it, as for every source;
    only where the samples come from differs, so no held-out image is one that a model trained
    on the official split has seen.
    """
    spec = recipe.data
    directory = (
        _resolve(spec.path, allowed_roots, "data.path") if spec.path else DEFAULT_FASHION_MNIST_DIR
    )
    (x_tr, y_tr), test = fashion_mnist_splits(directory)
    if test is None:
        return None
    x_te, y_te = test
    data_classes = int(max(y_tr.max(), y_te.max())) + 1
    _check_classes(data_classes, recipe)
    available = len(x_tr) + len(x_te)
    total = min(spec.limit or available, available)
    n_held = min(len(x_te), max(1, round(total * spec.val_fraction)))
    n_train = min(len(x_tr), total - n_held)
    if n_train < 1:
        raise DataError(f"{total} samples are too few to split into training and held-out sets")
    tr_pick = torch.randperm(len(x_tr), generator=generator)[:n_train].sort().values.numpy()
    held_ids = torch.randperm(len(x_te), generator=generator)[:n_held].sort().values
    size = (recipe.model.input_size[1], recipe.model.input_size[2])
    images, split = _stack(to_nchw(x_tr[tr_pick]), x_te[held_ids.numpy()], size)
    labels = torch.from_numpy(np.concatenate([y_tr[tr_pick], y_te[held_ids.numpy()]]))
    return TensorBundle(
        images,
        labels,
        *split,
        heldout_ids=held_ids,
        num_classes=data_classes,
        **{**common, "heldout_source": OFFICIAL_TEST},
    )


def _take(x: np.ndarray, y: np.ndarray, pick: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    if pick is None:
        return x, y
    idx = pick.numpy()
    return x[idx], y[idx]
