"""The torch-free architecture catalogue is generated from the one registry and says why an
architecture cannot be used."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hawada.adapters.torchvision import get_arch, list_architectures
from hawada.adapters.torchvision.catalog import build_catalogue, catalogue_path, render
from hawada.core.architectures import (
    CATALOGUE_FORMAT,
    arch_problem,
    catalogue,
    parse_catalogue,
    supported_architectures,
)

#: Architectures whose coupling groups are re-derived here (all of them: `catalog --check`).
SAMPLE = ["resnet18", "resnext50_32x4d", "mobilenet_v3_small", "efficientnet_b0", "densenet121"]


def test_checked_in_catalogue_is_what_the_registry_generates() -> None:
    # Fails after registering a builder or changing the graph analysis without running
    # `python -m hawada.adapters.torchvision.catalog --write`. Groups and state-dict tables are
    # re-derived for a sample (all of them take minutes: `--check` does that).
    stored = json.loads(catalogue_path().read_text(encoding="utf-8"))
    fresh = build_catalogue(SAMPLE)
    for entry in stored["architectures"]:
        if entry["name"] not in SAMPLE:
            for key in ("groups", "state_dict", "stems"):
                entry.pop(key, None)
    assert stored == fresh
    assert json.loads(render(fresh)) == fresh


def test_supported_entries_list_their_groups() -> None:
    entries = catalogue()
    for name in supported_architectures():
        groups = entries[name].details["groups"]
        assert groups and all(
            g["channels"] >= g["unit_width"] >= 1 and g["modules"] for g in groups
        )
    by_name = {g["name"]: g for g in entries["resnet18"].details["groups"]}
    assert by_name["stream.layer1"]["residual"] is True
    assert by_name["stream.layer1"]["modules"][:2] == ["conv1", "bn1"]


def test_supported_entries_are_exactly_the_registry() -> None:
    supported = supported_architectures()
    assert list(supported) == list_architectures()
    for name, family in supported.items():
        assert get_arch(name).family == family


def test_other_torchvision_architectures_are_listed_with_a_reason() -> None:
    entries = catalogue()
    assert entries["vit_b_16"].supported is False
    assert "transformer" in (entries["vit_b_16"].reason or "")
    problem = arch_problem("swin_t")
    assert problem is not None and "not supported" in problem and "attention" in problem
    assert arch_problem("resnet18") is None
    assert arch_problem("mobilenet_v3_small") is None
    assert "unknown architecture" in (arch_problem("../etc/passwd") or "")


def test_catalogue_keeps_unknown_per_arch_fields_for_later_growth() -> None:
    doc = {
        "format": CATALOGUE_FORMAT,
        "architectures": [
            {"name": "resnet18", "family": "resnet", "supported": True, "groups": {"x": 1}}
        ],
    }
    (entry,) = parse_catalogue(json.dumps(doc)).values()
    assert entry.details == {"groups": {"x": 1}}
    with pytest.raises(ValueError, match="catalogue"):
        parse_catalogue(json.dumps({**doc, "format": "other"}))


def test_reading_the_catalogue_needs_no_torch() -> None:
    code = (
        "import sys, hawada.core.architectures as a; a.catalogue(); "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
