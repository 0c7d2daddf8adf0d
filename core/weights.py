"""Safe weight loading: user files become a state dict without ever running a full unpickle.

`.safetensors` files hold only tensors by construction. `.pt`/`.pth` files go through
`torch.load(weights_only=True)`, whose restricted unpickler refuses any global other than tensor
rebuilders and plain containers, so a malicious pickle fails before anything in it executes.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hawada.core.errors import WeightsError
from hawada.core.state_dict_match import MappingSummary, match_shapes, mismatch_message

__all__ = ["MappingSummary", "load_weights", "map_state_dict", "read_state_dict"]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth")

#: Keys under which training checkpoints keep the model's state dict.
_CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")
_SHOW = 10  # offending entries named in an error message

# --- reading ---------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _read_safetensors(path: Path) -> Any:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, header JSON errors: all "not a valid file"
        raise WeightsError(
            f"{path.name} is not a valid safetensors file: {_first_line(exc)}"
        ) from None


def _read_pickle(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # Older pickle protocols warn here; the outcome (load or refusal) is what matters.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        # The restricted unpickler names the global it refused; say that, never suggest
        # weights_only=False (torch's own message does).
        refused = re.search(r"unsupported (?:global|operand) [^\s]+", text, re.IGNORECASE)
        if refused or "Weights only load failed" in text:
            what = refused.group(0) if refused else "objects other than tensors"
            raise WeightsError(
                f"{path.name} was refused: it needs more than tensors and plain containers to load "
                f"({what}). Save model.state_dict() with torch.save or use .safetensors."
            ) from None
        raise WeightsError(
            f"{path.name} is not a readable PyTorch file: {_first_line(exc)}"
        ) from None


def _unwrap(obj: Any) -> Any:
    """Return the state dict inside a training checkpoint, or obj itself."""
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in _CHECKPOINT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
    return obj


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a `.safetensors` or weights-only `.pt`/`.pth` file into a CPU state dict.

    Raises WeightsError(code="bad_weights") for any other extension, an unreadable file, a
    pickle that needs more than tensors and containers, or values that are not tensors.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise WeightsError(f"unsupported weights file {path.name!r}: use .safetensors, .pt or .pth")
    if not path.is_file():
        raise WeightsError(f"weights file {path.name!r} not found")
    obj = _read_safetensors(path) if suffix in SAFETENSORS_SUFFIXES else _read_pickle(path)
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path.name} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        shown = ", ".join(f"{k!r} ({type(obj[k]).__name__})" for k in bad[:_SHOW])
        raise WeightsError(f"{path.name}: {len(bad)} entries are not named tensors: {shown}")
    if not obj:
        raise WeightsError(f"{path.name} holds no tensors")
    return dict(obj)


# --- mapping ---------------------------------------------------------------------------------


def map_state_dict(
    model: nn.Module, sd: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], MappingSummary]:
    """Match a user's state dict to `model`'s key names; nothing is loaded here.

    The rules are `hawada.core.state_dict_match.match_shapes` (prefixes, timm renames, missing
    `num_batches_tracked` filled from the model). Returns the tensors under the model's names
    plus a summary of what matched; callers decide whether mismatches are fatal.
    """
    expected = model.state_dict()
    targets, summary = match_shapes(
        {k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in sd.items()}
    )
    out = {target: sd[key] for key, target in targets.items()}
    for name in summary.filled:
        out[name] = expected[name]  # the model's own counter; no copy needed
    return out, summary


def load_weights(model: nn.Module, path: Path, *, arch: str | None = None) -> MappingSummary:
    """Read, map and load `path` into `model` (strictly). Returns the mapping summary.

    `arch` (e.g. "resnet18") only makes error messages clearer.

    Raises WeightsError(code="bad_weights") for an unreadable or unsafe file and
    WeightsError(code="weights_mismatch") naming the keys when anything is missing, has the
    wrong shape, or is left over.
    """
    sd = read_state_dict(path)
    tensors, summary = map_state_dict(model, sd)
    arch = arch or type(model).__name__
    if not summary.ok:
        raise WeightsError(mismatch_message(summary, arch), code="weights_mismatch")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # e.g. a tensor whose dtype cannot be copied into the parameter
        raise WeightsError(
            f"weights do not fit {arch}: {_first_line(exc)}", code="weights_mismatch"
        ) from None
    return summary
