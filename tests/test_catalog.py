"""The torch-free architecture catalogue is generated from the one registry and says why an
architecture cannot be used."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hawada.adapters.torchvision import get_arch, list_architectures
from hawada.adapters.torchvision.catalog import build_catalogue, catalogue_path, main, render
from hawada.core.architectures import (
    CATALOGUE_FORMAT,
    arch_problem,
    catalogue,
    parse_catalogue,
    supported_architectures,
)


def test_checked_in_catalogue_is_what_the_registry_generates() -> None:
    # Fails after registering a builder without running
    # `python -m hawada.adapters.torchvision.catalog --write`.
    assert catalogue_path().read_text(encoding="utf-8") == render(build_catalogue())
    assert main(["--check"]) == 0


def test_supported_entries_are_exactly_the_registry() -> None:
    supported = supported_architectures()
    assert list(supported) == list_architectures()
    for name, family in supported.items():
        assert get_arch(name).family == family


def test_other_torchvision_architectures_are_listed_with_a_reason() -> None:
    entries = catalogue()
    assert entries["mobilenet_v2"].supported is False
    assert "mobilenetv2" in (entries["mobilenet_v2"].reason or "")
    assert arch_problem("mobilenet_v2") is not None and "not supported" in arch_problem(
        "mobilenet_v2"
    )
    assert arch_problem("resnet18") is None
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
