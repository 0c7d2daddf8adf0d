"""Matching a state dict's names and shapes to a model's, torch-free (the API uses it too).

One definition of "these weights fit this architecture": the worker matches real tensors
(`hawada.core.weights.map_state_dict`), the API matches the shapes a safetensors header declares
against the architecture's shape table (`hawada.core.architectures.expected_state_dict`), and
both go through `match_shapes` here, so a file the API accepts is one the worker can load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MappingSummary", "Shape", "match_shapes", "mismatch_message"]

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


# --- matching ------------------------------------------------------------------------------


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


def match_shapes(
    expected: Mapping[str, Shape], got: Mapping[str, Shape]
) -> tuple[dict[str, str], MappingSummary]:
    """Match the file's keys (`got`, name -> shape) to the model's (`expected`).

    Strips `module.`/`model.`/`_orig_mod.` prefixes, maps timm's `head.fc.*` to `fc.*`, and
    counts missing `num_batches_tracked` buffers as filled from the model. Returns
    {file key: model key} for the keys that fit, plus the summary.
    """
    targets: dict[str, str] = {}
    mismatched: list[tuple[str, Shape, Shape]] = []
    unexpected: list[str] = []
    renamed: dict[str, str] = {}
    taken: set[str] = set()
    for key, shape in got.items():
        target = next((n for n in _candidate_names(key) if n in expected and n not in taken), None)
        if target is None:
            unexpected.append(key)
            continue
        taken.add(target)
        if target != key:
            renamed[key] = target
        want = tuple(expected[target])
        if tuple(shape) != want:
            mismatched.append((target, want, tuple(shape)))
            continue
        targets[key] = target
    fitted = set(targets.values())
    mapped: list[str] = []  # in the model's own order, which reads better than the file's
    missing: list[str] = []
    filled: list[str] = []
    for name in expected:
        if name in taken:
            if name in fitted:
                mapped.append(name)
            continue
        if name.endswith(_OPTIONAL_SUFFIX):
            filled.append(name)
        else:
            missing.append(name)
    return targets, MappingSummary(mapped, mismatched, missing, unexpected, filled, renamed)


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


def mismatch_message(summary: MappingSummary, arch: str) -> str:
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
