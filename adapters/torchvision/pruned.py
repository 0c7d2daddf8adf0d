"""`load_pruned`: rebuild a pruned model from the two files a job produces.

The result is an instance of the plain torchvision class (e.g. `torchvision.models.ResNet`)
with narrowed layers; nothing of HawAda's training code is needed to use it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn

from hawada.adapters.torchvision.registry import get_adapter, tag_model

_REQUIRED = ("arch", "num_classes", "stem", "channels")


def load_pruned(json_path: str | Path, weights_path: str | Path) -> nn.Module:
    """Rebuild a pruned model from `pruned.json` + `pruned.safetensors` (CPU, eval mode).

    The plain torchvision class is built on the meta device, narrowed to the recorded widths
    and filled from the safetensors file with a strict load (shapes must match exactly).
    """
    config = json.loads(Path(json_path).read_text())
    missing = [k for k in _REQUIRED if not isinstance(config, dict) or k not in config]
    if missing:
        raise ValueError(f"{json_path}: not a pruned.json (missing {', '.join(missing)})")
    model = get_adapter(config["arch"]).pruned_skeleton(config)
    state = load_file(str(weights_path), device="cpu")
    # A safetensors file has no per-module version metadata; give the loader the skeleton's
    # own (MNASNet refuses a state dict without it).
    versioned: OrderedDict[str, Tensor] = OrderedDict(state)
    versioned._metadata = getattr(model.state_dict(), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    model.load_state_dict(versioned, strict=True, assign=True)
    unset = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if unset:
        raise ValueError(f"{weights_path}: no values for {unset[:5]}")
    tag_model(model, config["arch"], config["stem"])
    return model.eval()
