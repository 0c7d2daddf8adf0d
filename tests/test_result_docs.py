"""docs/result.md's "Load the result without HawAda" works as written: its code, run in a
process where `hawada` cannot be imported, rebuilds the pruned model from pruned.json and
pruned.safetensors with the same outputs as `load_pruned`; the pruned.pt2 snippet loads too."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hawada.adapters.torchvision import build_model, get_adapter, load_pruned
from hawada.core.gates import Gates, keep_from_gates
from hawada.core.recipe import GatesSpec, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "result.md").read_text(encoding="utf-8")
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _section(title: str) -> list[str]:
    body = DOC.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return _BLOCK.findall(body)


def _pruned_files(folder: Path, arch: str, stem: str, size: int) -> None:
    """pruned.json + pruned.safetensors (+ pruned.pt2) of `arch` with random channels removed."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, stem=stem).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong channel would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    adapter = get_adapter(arch)
    gates = Gates(adapter.gate_groups(model, GatesSpec(round_to=8, min_channels=8)))
    with torch.no_grad():
        for p in gates.parameters():
            p.uniform_(-1.0, 1.0)
    keep = keep_from_gates(gates)
    pruned = adapter.export_pruned(model, keep).eval()
    recipe = parse_recipe(
        {
            "model": {"arch": arch, "num_classes": 7, "stem": stem, "input_size": [3, size, size]},
            "data": {"source": "synthetic"},
        }
    )
    config = adapter.pruned_config(model, keep, recipe)
    (folder / "pruned.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in pruned.state_dict().items()}, folder / "pruned.safetensors"
    )
    x = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(pruned, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "pruned.pt2"))


def _run_without_hawada(code: str, folder: Path) -> None:
    prelude = "import sys\nsys.modules['hawada'] = None  # any `import hawada...` fails\n"
    script = prelude + code.replace('"result/', f'"{folder}/')
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize(
    ("arch", "stem", "size"), [("resnet18", "cifar", 16), ("resnext50_32x4d", "imagenet", 32)]
)
def test_plain_torchvision_rebuild_equals_load_pruned(
    tmp_path: Path, arch: str, stem: str, size: int
) -> None:
    _pruned_files(tmp_path, arch, stem, size)
    config = json.loads((tmp_path / "pruned.json").read_text())
    if arch.startswith("resnext"):
        assert config["groups"], "the example should cover convs whose groups changed"
    rebuild, use = _section("Load the result without HawAda")
    x = torch.rand(3, 3, size, size)
    save_file({"x": x}, tmp_path / "x.safetensors")
    check = (
        f'x = load_file("{tmp_path}/x.safetensors")["x"]\n'
        "with torch.no_grad():\n"
        "    y = model(x)\n"
        f'torch.save({{"y": y, "cls": type(model).__name__}}, "{tmp_path}/y.pt")\n'
    )
    _run_without_hawada(rebuild + use + check, tmp_path)
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    expected_model = load_pruned(tmp_path / "pruned.json", tmp_path / "pruned.safetensors")
    with torch.no_grad():
        expected = expected_model(x)
    assert got["cls"] == type(expected_model).__name__ == "ResNet"
    assert torch.allclose(got["y"], expected, atol=1e-6, rtol=0)


def test_pt2_snippet_loads_the_exported_program(tmp_path: Path) -> None:
    _pruned_files(tmp_path, "resnet18", "imagenet", 32)
    (snippet,) = _section("`pruned.pt2`: no Python class at all")
    check = f'torch.save({{"logits": logits}}, "{tmp_path}/y.pt")\n'
    _run_without_hawada(snippet + check, tmp_path)
    logits = torch.load(tmp_path / "y.pt", weights_only=True)["logits"]
    assert logits.shape == (8, 7) and torch.isfinite(logits).all()
    state = load_file(tmp_path / "pruned.safetensors")
    assert state["fc.weight"].shape[0] == 7
