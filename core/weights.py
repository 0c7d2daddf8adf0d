"""Safe weight loading: user files become a state dict without ever running a full unpickle.

`.safetensors` files hold only tensors by construction. `.pt`/`.pth` files go through
`torch.load(weights_only=True)`, whose restricted unpickler refuses any global other than tensor
rebuilders and plain containers, so a malicious pickle fails before anything in it executes.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hawada.core.errors import WeightsError

__all__ = ["MappingSummary", "load_weights", "map_state_dict", "read_state_dict"]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth")

#: Keys under which training checkpoints keep the model's state dict.
_CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")
#: Wrapper prefixes: DataParallel/DDP, Lightning modules, torch.compile.
_PREFIXES = ("module.", "model.", "_orig_mod.")
#: timm ResNet names that differ from torchvision's (newer timm puts the classifier in a head).
_RENAMES = (("head.fc.", "fc."),)
#: Buffers a checkpoint may lack without harm: they only count BN updates.
_OPTIONAL_SUFFIX = ".num_batches_tracked"

_SHOW = 10  # offending keys named in an error message
_LIST = 20  # names kept per list in MappingSummary.to_dict()

Shape = tuple[int, ...]


def _informative_first(names: list[str]) -> list[str]:
    # BN counters say nothing about a model; list parameters first (stable otherwise).
    return sorted(names, key=lambda n: n.endswith(_OPTIONAL_SUFFIX))


@dataclass
class MappingSummary:
    """How a user's state dict was matched to the model (goes into the report)."""

    mapped: list[str]
    mismatched: list[tuple[str, Shape, Shape]]  # (key, expected shape, got shape)
    missing: list[str]
    unexpected: list[str]
    filled: list[str] = field(default_factory=list)  # optional buffers taken from the model
    renamed: dict[str, str] = field(
        default_factory=dict
    )  # source key -> model key, where they differ

    @property
    def ok(self) -> bool:
        """True when every model key got a tensor of the right shape and nothing was left over."""
        return not (self.mismatched or self.missing or self.unexpected)

    def to_dict(self) -> dict[str, Any]:
        """Counts plus up to 20 names per list; JSON-compatible."""
        return {
            "counts": {
                "mapped": len(self.mapped),
                "mismatched": len(self.mismatched),
                "missing": len(self.missing),
                "unexpected": len(self.unexpected),
                "filled": len(self.filled),
                "renamed": len(self.renamed),
            },
            "mapped": _informative_first(self.mapped)[:_LIST],
            "mismatched": [
                {"key": k, "expected": list(e), "got": list(g)}
                for k, e, g in self.mismatched[:_LIST]
            ],
            "missing": _informative_first(self.missing)[:_LIST],
            "unexpected": _informative_first(self.unexpected)[:_LIST],
            "filled": self.filled[:_LIST],
            "renamed": dict(list(self.renamed.items())[:_LIST]),
        }


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


def _candidate_names(key: str) -> list[str]:
    """`key`, then with wrapper prefixes stripped one by one, each also with timm renames."""
    forms = [key]
    current = key
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if current.startswith(prefix):
                current = current[len(prefix) :]
                forms.append(current)
                stripped = True
                break
    out: list[str] = []
    for form in forms:
        out.append(form)
        for old, new in _RENAMES:
            if form.startswith(old):
                out.append(new + form[len(old) :])
    return out


def map_state_dict(
    model: nn.Module, sd: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], MappingSummary]:
    """Match a user's state dict to `model`'s key names; nothing is loaded here.

    Strips `module.`/`model.`/`_orig_mod.` prefixes, maps timm's `head.fc.*` to `fc.*`, and
    fills missing `num_batches_tracked` buffers from the model. Returns the tensors under the
    model's names plus a summary of what matched; callers decide whether mismatches are fatal.
    """
    expected = model.state_dict()
    out: dict[str, Tensor] = {}
    mismatched: list[tuple[str, Shape, Shape]] = []
    unexpected: list[str] = []
    renamed: dict[str, str] = {}
    taken: set[str] = set()
    for key, tensor in sd.items():
        target = next((n for n in _candidate_names(key) if n in expected and n not in taken), None)
        if target is None:
            unexpected.append(key)
            continue
        taken.add(target)
        if target != key:
            renamed[key] = target
        want = tuple(expected[target].shape)
        if tuple(tensor.shape) != want:
            mismatched.append((target, want, tuple(tensor.shape)))
            continue
        out[target] = tensor
    mapped: list[str] = []  # in the model's own order, which reads better than the file's
    missing: list[str] = []
    filled: list[str] = []
    for name in expected:
        if name in taken:
            if name in out:
                mapped.append(name)
            continue
        if name.endswith(_OPTIONAL_SUFFIX):
            out[name] = expected[name]  # the model's own counter; no copy needed
            filled.append(name)
        else:
            missing.append(name)
    summary = MappingSummary(mapped, mismatched, missing, unexpected, filled, renamed)
    return out, summary


def _hints(summary: MappingSummary) -> list[str]:
    """Plain-language guesses for the common causes of a mismatch."""
    hints = []
    for key, want, got in summary.mismatched:
        if key == "fc.weight" and len(want) == len(got) == 2 and want[1] == got[1]:
            hints.append(f"the weights have {got[0]} classes but model.num_classes is {want[0]}")
        if key == "conv1.weight" and len(want) == len(got) == 4 and want[2:] != got[2:]:
            stem = "cifar" if got[2:] == (3, 3) else "imagenet" if got[2:] == (7, 7) else None
            if stem:
                hints.append(
                    f"the weights' first conv is {got[2]}x{got[3]}: try model.stem: {stem}"
                )
    if summary.missing and summary.unexpected:
        hints.append("the weights look like a different architecture")
    elif summary.unexpected and not summary.mismatched:
        hints.append("the weights have layers the model lacks: a deeper architecture?")
    elif summary.missing and not summary.mismatched:
        hints.append("the model has layers the weights lack: a shallower architecture?")
    return hints


def _mismatch_message(summary: MappingSummary, arch: str) -> str:
    parts = []
    if summary.mismatched:
        shown = "; ".join(
            f"{k} expects {list(e)}, got {list(g)}" for k, e, g in summary.mismatched[:_SHOW]
        )
        parts.append(f"{len(summary.mismatched)} shape mismatches: {shown}")
    for label, names in (("missing", summary.missing), ("unexpected", summary.unexpected)):
        if names:
            more = f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else ""
            shown = ", ".join(_informative_first(names)[:_SHOW])
            parts.append(f"{len(names)} {label} keys: {shown}{more}")
    hints = _hints(summary)
    tail = f" Hint: {'; '.join(hints)}." if hints else ""
    return f"weights do not fit {arch}: " + ". ".join(parts) + "." + tail


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
        raise WeightsError(_mismatch_message(summary, arch), code="weights_mismatch")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # e.g. a tensor whose dtype cannot be copied into the parameter
        raise WeightsError(
            f"weights do not fit {arch}: {_first_line(exc)}", code="weights_mismatch"
        ) from None
    return summary
