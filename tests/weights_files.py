"""Weights files for API tests, built without torch from the catalogue's shape table.

The API checks at submission that a safetensors file fits the recipe's architecture, so tests
that submit jobs need a file with the right names and shapes. Its values are zero bytes (dtype
U8: a quarter of float32's size); the API never reads values it has no reason to (only floats
are checked for NaN), and these tests' workers are fakes.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

from hawada.core.architectures import expected_state_dict


@lru_cache(maxsize=8)
def fitting_safetensors(
    arch: str = "resnet18", num_classes: int = 10, stem: str = "cifar"
) -> bytes:
    """A safetensors file whose tensors have `arch`'s state-dict names and shapes."""
    shapes = expected_state_dict(arch, num_classes, stem)
    assert shapes is not None, arch
    header: dict[str, dict] = {}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        header[name] = {
            "dtype": "U8",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + bytes(offset)
