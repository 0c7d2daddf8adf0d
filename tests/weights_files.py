"""Weights files for API tests, built without torch from the catalogue's shape table.

The API checks at submission that a safetensors file fits the recipe's architecture, so tests
that submit jobs need a file with the right names and shapes. Its values are zero bytes
(`hawada.core.architectures.placeholder_safetensors`, shared with bench/api.py); these tests'
workers are fakes.
"""

from __future__ import annotations

from functools import lru_cache

from hawada.core.architectures import expected_state_dict, placeholder_safetensors


@lru_cache(maxsize=8)
def fitting_safetensors(
    arch: str = "resnet18", num_classes: int = 10, stem: str = "cifar"
) -> bytes:
    """A safetensors file whose tensors have `arch`'s state-dict names and shapes."""
    shapes = expected_state_dict(arch, num_classes, stem)
    assert shapes is not None, arch
    return placeholder_safetensors(shapes)
