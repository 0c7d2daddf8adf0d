"""Writing a job's files: the artifacts of the public contract, each atomically.

`pruned.safetensors`, `pruned.json`, `keepall.safetensors`, `gates.safetensors`, `report.json`,
`report.html` and, when the recipe asks, `pruned.onnx` / `pruned.pt2` (docs/contract.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from hawada.adapters.torchvision import FamilyAdapter
from hawada.atomic import atomic_write
from hawada.core.gates import NORM_STATS_PREFIX, Gates
from hawada.core.recipe import Recipe
from hawada.core.report_html import write_report_html

GATES_FORMAT = "hawada.gates.v1"


def write_json(path: Path, data: Any) -> None:
    """JSON file written atomically."""
    text = json.dumps(data, indent=2, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_safetensors(
    path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """safetensors file (CPU, contiguous) written atomically; CPU tensors are not copied."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=dict(metadata or {})))


def gates_metadata(gates: Gates, keep: Mapping[str, Tensor]) -> dict[str, str]:
    """The `gates.safetensors` header: every group's shape, trained width and exported keep set
    (the tensors themselves are the trained logits), the temperature."""
    groups = [
        {
            "name": n,
            "units": g.units,
            "unit_width": g.unit_width,
            "min_units": g.min_units,
            "round_units": g.round_units,
            "modules": list(g.modules),
            "covers": list(g.covers),
            "trained": int(gates.kept_channels(n).numel()),  # width training ended with
            "kept": keep[n].tolist(),  # the exported keep set (after the budget correction)
        }
        for n, g in gates.groups.items()
    ]
    return {
        "groups": json.dumps(groups),
        "temperature": str(gates.temperature),
        "format": GATES_FORMAT,
    }


def write_artifacts(
    out: Path,
    recipe: Recipe,
    adapter: FamilyAdapter,
    model: nn.Module,
    pruned: nn.Module,
    keep: Mapping[str, Tensor],
    keepall: Mapping[str, Tensor],
    gates: Gates,
    report: dict[str, Any],
    norm_stats: Mapping[str, Tensor] | None = None,
) -> None:
    """Every artifact of a succeeded job into `out`, each written atomically.

    `norm_stats` (gate training: the BN running statistics the gated model normalises with,
    `module.running_mean` / `.running_var`) go into `gates.safetensors` under the prefix
    `core.gates.NORM_STATS_PREFIX`, so keepall + those statistics + the keep set reproduce
    the export.
    """
    write_safetensors(out / "pruned.safetensors", pruned.state_dict())
    write_json(out / "pruned.json", adapter.pruned_config(model, keep, recipe))
    write_safetensors(out / "keepall.safetensors", keepall)
    gate_tensors = gates.named_logits()
    gate_tensors.update({NORM_STATS_PREFIX + k: v for k, v in (norm_stats or {}).items()})
    write_safetensors(out / "gates.safetensors", gate_tensors, metadata=gates_metadata(gates, keep))
    write_json(out / "report.json", report)
    write_report_html(report, out / "report.html")
    formats = set(recipe.export.formats)
    if "onnx" in formats or "pt2" in formats:
        export_graphs(out, pruned, recipe, formats)


def export_graphs(out: Path, pruned: nn.Module, recipe: Recipe, formats: AbstractSet[str]) -> None:
    """pruned.pt2 / pruned.onnx traced on CPU with a dynamic batch dimension.

    Runs last in the job, so moving the pruned model to the CPU in place costs nothing later.
    """
    cpu_model = pruned.to("cpu").eval()
    # Batch 2, not 1: torch.export specialises size-1 dimensions, which would pin the batch.
    x = torch.zeros(2, *recipe.model.input_size)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    if "pt2" in formats:
        program = torch.export.export(cpu_model, (x,), dynamic_shapes=dynamic)
        atomic_write(out / "pruned.pt2", lambda tmp: torch.export.save(program, str(tmp)))
    if "onnx" in formats:

        def onnx_export(tmp: Path) -> None:
            torch.onnx.export(
                cpu_model,
                (x,),
                str(tmp),
                input_names=["input"],
                output_names=["logits"],
                dynamo=True,
                external_data=False,
                dynamic_shapes=dynamic,
            )

        atomic_write(out / "pruned.onnx", onnx_export)
