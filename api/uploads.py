"""Receiving uploaded files: streamed to disk under a size cap, then sanity-checked without torch.

The API never deserialises weights: it only checks that a file looks like what its extension
says, so an obviously wrong upload fails at submit time instead of minutes later in the worker.
The worker loads `.pt` files with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import ast
import json
import math
import struct
import zipfile
from pathlib import Path, PurePath
from typing import Any, BinaryIO

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from hawada.api.errors import ApiError
from hawada.api.weights_check import check_finite, check_fits_recipe, check_pickle_globals
from hawada.core.recipe import Recipe
from hawada.store.artifacts import ArtifactStore, UploadTooLarge

WEIGHT_SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}
DATASET_SUFFIXES = (".npz",)
# A safetensors header is a JSON index of tensors, ~100 bytes each: ResNet-152's is ~90 KB. The
# caps bound what one request can make the API parse (a header becomes ~10x its size in objects).
MAX_SAFETENSORS_HEADER = 4 * 1024 * 1024
MAX_SAFETENSORS_ENTRIES = 20_000


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


def check_safetensors(path: Path) -> tuple[dict[str, Any], int]:
    """8-byte little-endian header length, then a JSON object of tensors inside the file.

    Returns the tensor entries (name -> dtype, shape, data_offsets) and where the data starts.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ApiError(400, "bad_weights", "not a safetensors file: shorter than its header")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise ApiError(
                400,
                "bad_weights",
                f"not a safetensors file: header length {n} is not between 2 and "
                f"{MAX_SAFETENSORS_HEADER} bytes within the file",
            )
        raw = fh.read(n)
    # Bounded on the raw bytes before parsing: an entry (name, dtype, shape, offsets) has about
    # a dozen separators, so this caps the number of objects json.loads could build.
    if raw.count(b",") + raw.count(b":") > 16 * MAX_SAFETENSORS_ENTRIES:
        raise ApiError(
            400,
            "bad_weights",
            f"safetensors header lists more than {MAX_SAFETENSORS_ENTRIES} tensors",
        )
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "bad_weights", "not a safetensors file: header is not JSON") from None
    except RecursionError:
        raise ApiError(400, "bad_weights", "safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ApiError(400, "bad_weights", "not a safetensors file: header is not an object")
    data_len = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise ApiError(400, "bad_weights", "safetensors file holds no tensors")
    if len(tensors) > MAX_SAFETENSORS_ENTRIES:
        raise ApiError(
            400,
            "bad_weights",
            f"safetensors header lists more than {MAX_SAFETENSORS_ENTRIES} tensors",
        )
    for name, info in tensors.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
            or not isinstance(info.get("dtype"), str)
            or not isinstance(info.get("shape"), list)
            or not all(isinstance(d, int) and d >= 0 for d in info["shape"])
        ):
            raise ApiError(
                400, "bad_weights", f"safetensors entry {name!r} is malformed or truncated"
            )
    return tensors, 8 + n


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


def check_weights(path: Path, fmt: str) -> dict[str, Any] | None:
    """Raise a 4xx ApiError unless `path` is a safe weights file of format `fmt`.

    Safetensors: a well-formed header and only finite floats; returns the tensor entries.
    `.pt`/`.pth`: torch's zip whose pickle imports only weights-only globals; returns None.
    """
    if fmt == "safetensors":
        header, data_start = check_safetensors(path)
        check_finite(path, header, data_start)
        return header
    check_torch_zip(path)
    check_pickle_globals(path)
    return None


_NPY_MAGIC = b"\x93NUMPY"
_NPY_KINDS = frozenset("biuf")  # bool, integers, floats: what a dataset's x and y can hold
_MAX_NPY_HEADER = 64 * 1024


def _npy_declared_bytes(zf: zipfile.ZipFile, member: str) -> int:
    """Bytes the array in `member` declares (shape x itemsize), read from its header only."""
    with zf.open(member) as fh:
        head = fh.read(10)
        if len(head) < 10 or not head.startswith(_NPY_MAGIC):
            raise ValueError("not a .npy array")
        if head[6] == 1:
            hlen = struct.unpack("<H", head[8:10])[0]
        else:
            hlen = struct.unpack("<I", head[8:10] + fh.read(2))[0]
        if hlen > _MAX_NPY_HEADER:
            raise ValueError("array header too long")
        meta = ast.literal_eval(fh.read(hlen).decode("latin-1"))
    descr, shape = meta.get("descr"), meta.get("shape")
    if not isinstance(descr, str) or not isinstance(shape, tuple):
        raise ValueError("structured or malformed array")
    kind, digits = descr.lstrip("<>|=")[:1], descr.lstrip("<>|=")[1:]
    if kind not in _NPY_KINDS or not digits.isdigit():
        raise ValueError(f"dtype {descr!r} is not numeric (object arrays are refused)")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError("bad array shape")
    return math.prod(shape) * int(digits)


def check_dataset(path: Path, filename: str | None, max_bytes: int, field: str = "dataset") -> None:
    """Uploaded datasets (`dataset`, `heldout`) are `.npz` archives (numpy's zip of `x`, `y`).

    The arrays' declared sizes (from their headers, nothing decompressed) must add up to at
    most `max_bytes`, so a small archive cannot make the worker allocate gigabytes.
    """
    if _suffix(filename) not in DATASET_SUFFIXES or not zipfile.is_zipfile(path):
        raise ApiError(400, "bad_dataset", f"{field} must be an .npz file with arrays x and y")
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith(".npy")]
            if len(members) > 16:
                raise ValueError("more than 16 arrays")
            declared = sum(_npy_declared_bytes(zf, n) for n in members)
    except (zipfile.BadZipFile, ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ApiError(400, "bad_dataset", f"{field} .npz is not readable: {exc}") from None
    if declared > max_bytes:
        raise ApiError(
            413,
            "dataset_too_large",
            f"{field} arrays declare {declared} bytes decompressed; the limit is {max_bytes}",
        )


class _CappedMultiPartParser(MultiPartParser):
    """Starlette's multipart parser with a byte cap per file part, checked as data arrives."""

    def __init__(self, *args: Any, max_file_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_file_bytes = max_file_bytes
        self._file_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._file_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            self._file_bytes += end - start
            if self._file_bytes > self.max_file_bytes:
                name = self._current_part.field_name or "file"
                raise ApiError(
                    413,
                    "upload_too_large",
                    f"{name}: upload exceeds the limit of {self.max_file_bytes} bytes",
                )
        super().on_part_data(data, start, end)


async def read_form(
    request: Request, *, max_files: int, max_fields: int, max_file_bytes: int
) -> FormData:
    """Parse a multipart body, refusing (413) any file part past `max_file_bytes` as it streams.

    Nothing of a refused request stays on disk: the parser closes the parts it had spooled.
    Malformed multipart data is a 400.
    """
    if not request.headers.get("content-type", "").lower().startswith("multipart/"):
        # url-encoded: text fields only, within the body cap of api/limits.py
        return await request.form(max_files=max_files, max_fields=max_fields)
    parser = _CappedMultiPartParser(
        request.headers,
        request.stream(),
        max_files=max_files,
        max_fields=max_fields,
        max_file_bytes=max_file_bytes,
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc.message}") from None


def parse_json_body(body: bytes) -> Any:
    """A request body as JSON; 400 for anything that is not (too deep, huge integers included)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(
            400, "bad_request", "body is not valid JSON (or is nested too deeply)"
        ) from None


def check_recipe_weights(recipe: Recipe, path: Path) -> None:
    """422 `weights_mismatch` unless a stored safetensors file fits the recipe's model.

    (`.pt` shapes are only known once torch loads them: the worker checks those.)
    """
    if _suffix(path.name) == ".safetensors":
        header, _ = check_safetensors(path)
        check_fits_recipe(recipe, header)
