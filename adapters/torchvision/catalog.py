"""Generate the torch-free architecture catalogue (`core/architectures.json`) from the registry.

    python -m hawada.adapters.torchvision.catalog --write   # regenerate the checked-in file
    python -m hawada.adapters.torchvision.catalog --check   # exit 1 when it is out of date

Registered architectures are listed as supported with their family, their state-dict shape
table (the API's upload checks) and their coupling groups (name, full width, unit width,
whether a residual add joins it, member layers), derived on the meta device; every other
torchvision classification architecture is listed as unsupported, with the reason, so that a
recipe naming one gets a precise error instead of "unknown". Run `--write` after registering a
builder or changing the graph analysis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from torchvision import models as tvm

from hawada.adapters.torchvision.registry import (
    STEMS,
    build_skeleton,
    get_adapter,
    get_arch,
    list_architectures,
)
from hawada.atomic import atomic_write
from hawada.core import architectures
from hawada.core.architectures import CATALOGUE_FILE, CATALOGUE_FORMAT
from hawada.core.recipe import GatesSpec

GENERATOR = "python -m hawada.adapters.torchvision.catalog --write"

#: Why the torchvision classification models without an adapter are not supported.
_NOT_CNN = {
    "vision_transformer": "a vision transformer: HawAda prunes CNN channels, not attention heads",
    "swin_transformer": "a windowed-attention transformer: HawAda prunes CNN channels only",
    "maxvit": "mixes convolutions with attention blocks whose heads HawAda cannot prune",
}
#: All residual-free gates spec: what `gate_groups` lists with `prune_residual: true`.
_ALL_GROUPS = GatesSpec(round_to=1, min_channels=1, prune_residual=True)


def arch_groups(name: str) -> list[dict[str, Any]]:
    """The coupling groups of `name` (built on the meta device, imagenet stem)."""
    model = build_skeleton(name, 1000, "imagenet")
    adapter = get_adapter(name)
    residual = {g.name for g in adapter.gate_groups(model, _ALL_GROUPS)} - {
        g.name
        for g in adapter.gate_groups(
            model, _ALL_GROUPS.model_copy(update={"prune_residual": False})
        )
    }
    return [
        {
            "name": g.name,
            "channels": g.channels,
            "unit_width": g.unit_width,
            "residual": g.name in residual,
            "modules": list(g.covers),
        }
        for g in adapter.gate_groups(model, _ALL_GROUPS)
    ]


def build_catalogue(names: list[str] | None = None) -> dict[str, Any]:
    """The catalogue document the registry implies (what `--write` stores); `names` limits the
    state-dict tables and coupling groups to those architectures (tests)."""
    entries: dict[str, dict[str, Any]] = {}
    for name in tvm.list_models(module=tvm):
        family = tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        entries[name] = {
            "name": name,
            "family": family,
            "supported": False,
            "reason": _NOT_CNN.get(family, f"no HawAda adapter for the {family} family"),
        }
    for name in list_architectures():
        entries[name] = {"name": name, "family": get_arch(name).family, "supported": True}
        if names is None or name in names:
            entries[name].update(state_dict_table(name))
            entries[name]["groups"] = arch_groups(name)
    return {
        "format": CATALOGUE_FORMAT,
        "generated_by": GENERATOR,
        "architectures": [entries[n] for n in sorted(entries)],
    }


def _shapes(arch: str, num_classes: int, stem: str) -> dict[str, tuple[int, ...]]:
    model = build_skeleton(arch, num_classes, stem)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def state_dict_table(arch: str) -> dict[str, Any]:
    """The arch's state-dict shapes for `architectures.expected_state_dict` (API checks).

    `state_dict`: key -> shape as "64x3x7x7" ("" for a scalar) with `C` where the size is
    `num_classes`, for the imagenet stem; `stems`: per other stem, the keys whose shape differs
    (null where the key is absent).
    """

    def encode(shape: tuple[int, ...], other: tuple[int, ...]) -> str:
        # Built with 7 and 11 classes: a dimension that follows num_classes is C.
        return "x".join(
            "C" if (a, b) == (7, 11) else str(a) for a, b in zip(shape, other, strict=True)
        )

    base, other = _shapes(arch, 7, "imagenet"), _shapes(arch, 11, "imagenet")
    table = {k: encode(v, other[k]) for k, v in base.items()}
    stems: dict[str, dict[str, str | None]] = {}
    for stem in STEMS:
        if stem == "imagenet":
            continue
        shapes, shapes11 = _shapes(arch, 7, stem), _shapes(arch, 11, stem)
        diff: dict[str, str | None] = {k: None for k in table if k not in shapes}
        for k, v in shapes.items():
            code = encode(v, shapes11[k])
            if table.get(k) != code:
                diff[k] = code
        stems[stem] = diff
    return {"state_dict": table, "stems": stems}


def render(doc: dict[str, Any]) -> str:
    """The file text: per architecture one line of names, one per table, one per coupling group
    (compact, yet a change shows as a small diff)."""

    def dump(value: Any) -> str:
        return json.dumps(value, separators=(", ", ": "))

    lines = ["{"]
    lines += [f"  {dump(k)}: {dump(v)}," for k, v in doc.items() if k != "architectures"]
    lines.append('  "architectures": [')
    entries = doc["architectures"]
    for i, entry in enumerate(entries):
        head = {k: v for k, v in entry.items() if not isinstance(v, (dict, list))}
        parts = [f"{dump(k)}: {dump(v)}" for k, v in head.items()]
        text = "    {" + ", ".join(parts)
        for key, value in entry.items():
            if key in head:
                continue
            if key == "groups":
                rows = ",\n".join("      " + dump(g) for g in value)
                text += f",\n     {dump(key)}: [\n{rows}\n     ]"
            else:
                text += f",\n     {dump(key)}: {dump(value)}"
        lines.append(text + "}" + ("," if i < len(entries) - 1 else ""))
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def catalogue_path() -> Path:
    """The checked-in catalogue next to `hawada.core.architectures`."""
    return Path(architectures.__file__).with_name(CATALOGUE_FILE)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m hawada.adapters.torchvision.catalog", description=__doc__
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the catalogue file")
    mode.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    args = parser.parse_args(argv)
    text, path = render(build_catalogue()), catalogue_path()
    if args.write:
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        print(f"wrote {path}")
        return 0
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    if current != text:
        print(f"{path} is out of date; run: {GENERATOR}", file=sys.stderr)
        return 1
    print(f"{path} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
