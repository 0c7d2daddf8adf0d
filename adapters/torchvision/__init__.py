"""Torchvision model families: the architecture registry, family adapters and `load_pruned`.

    from hawada.adapters.torchvision import build_model, get_adapter, load_pruned

Importing the package registers every family (`resnet` today); a new family is a module that
decorates its builders with `@register_arch(name, family=...)` and its adapter class with
`@register_family(family)`, imported here.
"""

from __future__ import annotations

from hawada.adapters.torchvision import families as _families  # noqa: F401  (registers them)
from hawada.adapters.torchvision import resnet as _resnet  # noqa: F401  (registers the family)
from hawada.adapters.torchvision.pruned import load_pruned
from hawada.adapters.torchvision.registry import (
    STEMS,
    ArchEntry,
    FamilyAdapter,
    build_model,
    build_skeleton,
    family_of,
    get_adapter,
    get_arch,
    list_architectures,
    model_meta,
    register_arch,
    register_family,
)
from hawada.core.errors import UnsupportedArch

__all__ = [
    "STEMS",
    "ArchEntry",
    "FamilyAdapter",
    "UnsupportedArch",
    "build_model",
    "build_skeleton",
    "family_of",
    "get_adapter",
    "get_arch",
    "list_architectures",
    "load_pruned",
    "model_meta",
    "register_arch",
    "register_family",
]
