"""Weights checked at submission, without torch: shapes, finiteness, and what a pickle would load.

- `.safetensors`: the header's shapes must fit the recipe's architecture (the catalogue's
  torch-free shape table, matched by the worker's own rules in `core.state_dict_match`), and
  every floating-point tensor must be finite. Finiteness is read with numpy from a read-only
  memory map of the file, a bounded chunk at a time: an exponent with every bit set is an
  infinity or a NaN, which covers float16, bfloat16 (numpy has no such dtype), float32 and
  float64 alike.
- `.pt`/`.pth`: the pickle inside torch's zip is scanned opcode by opcode (`pickletools`; it is
  never executed) and every global it would import must be on the weights-only allow-list.

Numpy is the only numeric library the API process imports, and only here.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hawada.api.errors import ApiError
from hawada.core.architectures import expected_state_dict
from hawada.core.recipe import Recipe
from hawada.core.state_dict_match import match_shapes, mismatch_message

#: dtype code -> (unsigned view, exponent mask): value & mask == mask means inf or NaN.
_EXPONENT: dict[str, tuple[Any, int]] = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}
_CHUNK = 16 * 1024 * 1024  # bytes examined per numpy operation
_SHOW = 5

# What torch's weights-only unpickler needs for a state dict or a training checkpoint of one.
_STORAGE = (
    r"(Float|Double|Half|BFloat16|Long|Int|Short|Char|Byte|Bool|ComplexFloat|ComplexDouble)Storage"
)
_ALLOWED_GLOBAL = re.compile(
    r"^(collections OrderedDict"
    r"|torch\._utils _rebuild_(tensor|tensor_v2|tensor_v3|parameter|parameter_with_state)"
    r"|torch\._tensor _rebuild_from_type_v2"
    rf"|torch {_STORAGE}|torch\.cuda {_STORAGE}|torch UntypedStorage"
    r"|torch Size"
    r"|torch (float|double|half|bfloat16|float16|float32|float64|int8|int16|int32|int64|uint8"
    r"|bool|long|int|short|complex64|complex128)"
    r"|_codecs encode|builtins (set|bytearray|complex))$"
)
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"}
)
_STRING_OPS |= {"SHORT_BINSTRING"}
_MEMO_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
MAX_PICKLE_BYTES = 64 * 1024 * 1024  # a state dict's pickle is ~200 bytes per tensor


def _pickle_globals(data: bytes) -> Iterator[str]:
    """Every `module name` the pickle would import, in order; ValueError when undecidable."""
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # values pushed by the latest ops (strings or None for others)
    next_memo = 0
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST"):
            yield str(arg)
            recent.append(None)
        elif name == "STACK_GLOBAL":
            if len(recent) < 2 or not all(isinstance(v, str) for v in recent[-2:]):
                raise ValueError("a global whose name the scan cannot follow")
            yield f"{recent[-2]} {recent[-1]}"
            recent.append(None)
        elif name in ("EXT1", "EXT2", "EXT4"):
            raise ValueError("a global from the copyreg extension registry")
        elif name in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else None)
        elif name in _MEMO_PUT:
            index = next_memo if name == "MEMOIZE" else int(str(arg))
            memo[index] = recent[-1] if recent else None
            next_memo = max(next_memo, index + 1) if name == "MEMOIZE" else next_memo
            if name == "MEMOIZE":
                continue
        elif name in _MEMO_GET:
            recent.append(memo.get(int(str(arg))))
        else:
            recent.append(None)
        del recent[:-2]


def check_pickle_globals(path: Path) -> None:
    """422 `unsafe_weights` unless every global in the `.pt` archive's pickle is allowed."""
    with zipfile.ZipFile(path) as zf:
        pickles = [i for i in zf.infolist() if i.filename.endswith(".pkl")]
        for info in pickles:
            if info.file_size > MAX_PICKLE_BYTES:
                raise ApiError(400, "bad_weights", f"{info.filename} is larger than a state dict's")
            with zf.open(info) as fh:
                data = fh.read(MAX_PICKLE_BYTES + 1)
            try:
                refused = [g for g in _pickle_globals(data) if not _ALLOWED_GLOBAL.match(g)]
            except ValueError as exc:
                raise ApiError(
                    422, "unsafe_weights", f"the .pt file's pickle was refused: {exc}"
                ) from None
            if refused:
                shown = ", ".join(sorted({g.replace(" ", ".") for g in refused})[:_SHOW])
                raise ApiError(
                    422,
                    "unsafe_weights",
                    f"the .pt file would import {shown} when loaded; only tensors and plain "
                    "containers are accepted. Save model.state_dict() or use .safetensors.",
                )


def nonfinite_tensors(path: Path, header: Mapping[str, Any], data_start: int) -> list[str]:
    """Names of floating-point tensors holding an infinity or a NaN."""
    size = path.stat().st_size
    if size <= data_start:
        return []
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
    bad: list[str] = []
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in _EXPONENT:
            continue
        view, mask = _EXPONENT[info["dtype"]]
        step = _CHUNK - _CHUNK % np.dtype(view).itemsize
        start, end = info["data_offsets"]
        for lo in range(start, end, step):
            hi = min(end, lo + step)
            words = raw[lo:hi]
            words = words[: len(words) - len(words) % np.dtype(view).itemsize].view(view)
            exponent = np.bitwise_and(words, view(mask))
            if bool(np.any(exponent == view(mask))):
                bad.append(name)
                break
    del raw
    return bad


def check_finite(path: Path, header: Mapping[str, Any], data_start: int) -> None:
    """422 `nonfinite_weights` naming the tensors that hold NaN or infinite values."""
    bad = nonfinite_tensors(path, header, data_start)
    if bad:
        more = f" (+{len(bad) - _SHOW} more)" if len(bad) > _SHOW else ""
        raise ApiError(
            422,
            "nonfinite_weights",
            f"{len(bad)} tensors hold NaN or infinite values: {', '.join(bad[:_SHOW])}{more}",
        )


def check_fits_recipe(recipe: Recipe, header: Mapping[str, Any]) -> None:
    """422 `weights_mismatch` unless the tensors fit the recipe's arch, num_classes and stem."""
    model = recipe.model
    expected = expected_state_dict(model.arch, model.num_classes, model.stem)
    if expected is None:  # no shape table for this arch: the worker checks when it loads
        return
    got = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    _, summary = match_shapes(expected, got)
    if not summary.ok:
        raise ApiError(422, "weights_mismatch", mismatch_message(summary, model.arch))
