"""Receiving uploaded files: streamed to disk under a size cap, then sanity-checked without torch.

The API never deserialises weights: it only checks that a file looks like what its extension
says, so an obviously wrong upload fails at submit time instead of minutes later in the worker.
The worker loads `.pt` files with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path, PurePath
from typing import BinaryIO

from hawada.api.errors import ApiError
from hawada.store.artifacts import ArtifactStore, UploadTooLarge

WEIGHT_SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}
DATASET_SUFFIXES = (".npz",)
# A safetensors header is a JSON index of tensor names; 100 MB would be millions of tensors.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def _suffix(filename: str | None) -> str:
    return PurePath(filename or "").suffix.lower()


def weights_format(filename: str | None) -> str:
    """`safetensors` or `pt` from the file name; 400 for anything else."""
    fmt = WEIGHT_SUFFIXES.get(_suffix(filename))
    if fmt is None:
        raise ApiError(400, "bad_weights", "weights must be a .safetensors, .pt or .pth file")
    return fmt


def save_capped(
    store: ArtifactStore, kind: str, stream: BinaryIO, max_bytes: int, suffix: str
) -> tuple[Path, int, str]:
    """Stream an upload into the store; 413 (nothing kept) past `max_bytes`."""
    try:
        return store.save_upload(kind, stream, max_bytes, suffix)
    except UploadTooLarge as exc:
        raise ApiError(413, "upload_too_large", str(exc)) from None


def check_safetensors(path: Path) -> None:
    """8-byte little-endian header length, then a JSON object of tensors inside the file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ApiError(400, "bad_weights", "not a safetensors file: shorter than its header")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise ApiError(400, "bad_weights", "not a safetensors file: bad header length")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(
                400, "bad_weights", "not a safetensors file: header is not JSON"
            ) from None
    if not isinstance(header, dict):
        raise ApiError(400, "bad_weights", "not a safetensors file: header is not an object")
    data_len = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise ApiError(400, "bad_weights", "safetensors file holds no tensors")
    for name, info in tensors.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
            or "dtype" not in info
            or "shape" not in info
        ):
            raise ApiError(
                400, "bad_weights", f"safetensors entry {name!r} is malformed or truncated"
            )


def check_torch_zip(path: Path) -> None:
    """A `.pt/.pth` must be torch's zip format (holding `data.pkl`); raw pickle is refused."""
    if not zipfile.is_zipfile(path):
        raise ApiError(
            400,
            "bad_weights",
            "a .pt/.pth upload must be torch's zip format (torch.save since 1.6) holding a state "
            "dict; legacy pickle files are refused — re-save it or use .safetensors",
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        raise ApiError(400, "bad_weights", "corrupt .pt zip archive") from None
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise ApiError(400, "bad_weights", "the .pt archive is not a torch.save file (no data.pkl)")


def check_weights(path: Path, fmt: str) -> None:
    """Raise a 400 ApiError unless `path` looks like a weights file of format `fmt`."""
    if fmt == "safetensors":
        check_safetensors(path)
    else:
        check_torch_zip(path)


def check_dataset(path: Path, filename: str | None) -> None:
    """Datasets are `.npz` archives (numpy's zip of arrays `x`, `y`)."""
    if _suffix(filename) not in DATASET_SUFFIXES or not zipfile.is_zipfile(path):
        raise ApiError(400, "bad_dataset", "dataset must be an .npz file with arrays x and y")
