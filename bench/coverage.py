"""Coverage of the torchvision CNN constructors: what the graph analysis finds and what export
reaches, per constructor, written to docs/architectures.md.

    python bench/coverage.py                 # every registered constructor (CPU: long)
    python bench/coverage.py --quick         # one constructor per family
    python bench/coverage.py --only mobilenet_v2 efficientnet_b0 --out -   # print only

Per constructor: coupling groups (and how many join a residual add), prunable channels, trace +
analysis time, the export's max abs difference to the hard-gated model (float32, calibrated and
perturbed norm statistics, random gates of both signs), whether the keep-all export is
bit-exact, FLOPs and parameters reached when the budget fit aims at 0.5 of the FLOPs (measured
on the exported model with torch's FLOP counter), and the class `load_pruned` returns.
Constructors above `--max-params` are checked on the meta device only (shapes, no numbers:
their FLOPs/params columns then come from the cost model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import save_file

from hawada.adapters.torchvision import (
    build_model,
    build_skeleton,
    family_of,
    get_adapter,
    list_architectures,
    load_pruned,
)
from hawada.adapters.torchvision.graph import analyse
from hawada.adapters.torchvision.testing import gated_output, random_gates, randomize
from hawada.core.budget import fit_to_budget
from hawada.core.cost import FlopsCost
from hawada.core.evaluate import count_flops
from hawada.core.recipe import GatesSpec, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
SPEC = GatesSpec(round_to=8, min_channels=8, prune_residual=True)
SIZES = {"inception_v3": (96, "imagenet")}  # its reductions need >= 75 pixels


@dataclass
class Row:
    arch: str
    family: str
    groups: int
    residual: int
    channels: int
    analysis_s: float
    max_diff: float | None
    keepall_exact: bool | None
    flops_ratio: float
    params_ratio: float
    load_class: str
    mode: str
    seconds: float = 0.0  # wall time of the whole row (measure + checks)


def measure(arch: str, max_params: float) -> Row:
    size, stem = SIZES.get(arch, (32, "cifar"))
    adapter = get_adapter(arch)
    skeleton = build_skeleton(arch, 10, stem)
    n_params = sum(p.numel() for p in skeleton.parameters())
    start = time.perf_counter()
    found = analyse(skeleton, getattr(adapter, "trace_size", (3, 64, 64)))
    analysis_s = time.perf_counter() - start
    numeric = n_params <= max_params
    gen = torch.Generator().manual_seed(0)
    model = build_model(arch, 10, stem) if numeric else skeleton
    if numeric:
        randomize(model, size, gen)
    groups = adapter.gate_groups(model, SPEC)
    gates = random_gates(groups, gen, extremes=False)
    max_diff = keepall = None
    load_class = type(model).__name__
    if numeric:
        flops_model = FlopsCost(adapter.layers(model, (3, size, size)))
        x = torch.randn(2, 3, size, size, generator=gen)
        keep = {n: gates.kept_channels(n) for n in gates.groups}
        expected = gated_output(model, gates, x)
        pruned = adapter.export_pruned(model, keep)
        with torch.no_grad():
            max_diff = float((pruned(x) - expected).abs().max())
        full = {n: torch.arange(g.channels) for n, g in gates.groups.items()}
        with torch.no_grad(), gates.using("off"):
            keepall = bool(
                torch.equal(adapter.export_pruned(model, full)(x), gated_output(model, gates, x))
            )
        # The fit starts from every unit open (random positive logits = random importances):
        # it never re-opens a closed unit, so from the random both-sign gates above (about 60%
        # closed) it would only report what those gates already cut.
        with torch.no_grad():
            for name in gates.groups:
                logit = gates.logit(name)
                logit.copy_(torch.rand(logit.shape, generator=gen) + 0.1)
        fit = fit_to_budget(gates, flops_model, 0.5 * flops_model.baseline())
        fitted = adapter.export_pruned(model, dict(fit.keep))
        flops_ratio = count_flops(fitted, (3, size, size)) / count_flops(model, (3, size, size))
        params_ratio = sum(p.numel() for p in fitted.parameters()) / n_params
        recipe = parse_recipe(
            {
                "model": {
                    "arch": arch,
                    "num_classes": 10,
                    "stem": stem,
                    "input_size": [3, size, size],
                },
                "data": {"source": "synthetic"},
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            config = adapter.pruned_config(model, dict(fit.keep), recipe)
            (Path(tmp) / "pruned.json").write_text(json.dumps(config))
            save_file(fitted.state_dict(), str(Path(tmp) / "pruned.safetensors"))
            reloaded = load_pruned(Path(tmp) / "pruned.json", Path(tmp) / "pruned.safetensors")
            with torch.no_grad():
                # Same weights and modules; the reloaded tensors live elsewhere in memory, which
                # can change the kernels' rounding (seen: 3e-7 on EfficientNet), so not bitwise.
                # Relative to the largest logit (Inception-v3's reach 37 after activations of 190:
                # 4.6e-5 absolute there is 1.2e-6 relative).
                out = fitted(x)
                reload_diff = float((reloaded(x) - out).abs().max() / out.abs().max().clamp(min=1))
            load_class = type(reloaded).__name__ + (
                "" if reload_diff <= 1e-5 else f" (outputs differ by {reload_diff:.1e}!)"
            )
        mode = "numeric"
    else:
        # Meta device: export shapes == skeleton shapes; ratios from the cost models.
        keep = {n: gates.kept_channels(n) for n in gates.groups}
        pruned = adapter.export_pruned(model, keep)
        with torch.no_grad():
            pruned.eval()(torch.zeros(1, 3, size, size, device="meta"))
        flops_ratio = params_ratio = float("nan")
        mode = "meta (shapes)"
    residual = sum(g.stream for g in found.groups)
    return Row(
        arch=arch,
        family=family_of(arch),
        groups=len(groups),
        residual=residual,
        channels=sum(g.channels for g in groups),
        analysis_s=analysis_s,
        max_diff=max_diff,
        keepall_exact=keepall,
        flops_ratio=flops_ratio,
        params_ratio=params_ratio,
        load_class=load_class,
        mode=mode,
    )


def quick_set() -> list[str]:
    """The smallest constructor of each family (by parameter count)."""
    best: dict[str, tuple[int, str]] = {}
    for arch in list_architectures():
        n = sum(p.numel() for p in build_skeleton(arch, 10, "imagenet").parameters())
        fam = family_of(arch)
        if fam not in best or n < best[fam][0]:
            best[fam] = (n, arch)
    return sorted(a for _, a in best.values())


def render(rows: list[Row], command: str, load: str, elapsed: float) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "" if v is None or v != v else format(v, fmt)

    lines = [
        "# Architectures: coverage of the torchvision CNN constructors",
        "",
        "Generated by `bench/coverage.py` (do not edit by hand). Coupling groups are derived from",
        "each model's traced graph (`adapters/torchvision/graph.py`); ResNets use their",
        "hand-written adapter, which the graph analysis reproduces exactly. Columns: coupling",
        "groups (of which joined by a residual add), prunable channels, trace + analysis time",
        "(meta device, fake-tensor shapes), the pruned export's max abs difference to the",
        "hard-gated model (float32, random gates, calibrated and perturbed norm statistics; 32",
        "px with the cifar stem, Inception-v3 96 px), whether the keep-all export is bit-exact,",
        "FLOPs and parameters of the exported model when the budget fit aims at 0.5 of the",
        "FLOPs (counted by torch on the exported model), and the class `load_pruned` returns",
        "(its outputs equal the export's within 1e-5 of the largest logit).",
        "",
        f"Run: `{command}` on {platform.node() or 'this host'} ({platform.machine()},"
        f" {os.cpu_count()} CPUs, torch {torch.__version__}),"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M} UTC,"
        f" load average at start {load}, {elapsed:.0f} s in all.",
        "",
        "| constructor | family | groups (residual) | prunable channels | analysis s"
        " | export max diff | keep-all exact | FLOPs at 0.5 | params at 0.5 | load_pruned class |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        exact = "" if r.keepall_exact is None else ("yes" if r.keepall_exact else "NO")
        diff = num(r.max_diff, ".1e") if r.mode == "numeric" else r.mode
        lines.append(
            f"| {r.arch} | {r.family} | {r.groups} ({r.residual}) | {r.channels} |"
            f" {r.analysis_s:.2f} | {diff} | {exact} | {num(r.flops_ratio, '.3f')} |"
            f" {num(r.params_ratio, '.3f')} | {r.load_class} |"
        )
    lines += [
        "",
        "## What stays at full width, and why",
        "",
        "Every torchvision classification CNN is supported. Within a model, the analysis pins",
        "(keeps at full width, which is always exact) the channels it cannot remove exactly:",
        "",
        "- the input and the classifier output;",
        "- ConvNeXt's residual streams: LayerNorm normalises over the channels and",
        "  `layer_scale` multiplies them, so only the 4x MLP inside each block is pruned;",
        "- DenseNet's concatenated features: the pre-activation BatchNorm after each concat would",
        "  turn a zeroed channel into its bias, so only the bottleneck inside each dense layer is",
        "  pruned (its parameters model then undercounts those norms);",
        "- ShuffleNetV2's split and channel shuffle: only the branch-internal channels are pruned;",
        "- GoogLeNet and Inception-v3 are exported without their auxiliary heads (built with",
        "  `aux_logits=False`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one constructor per family")
    parser.add_argument("--only", nargs="+", help="these constructors")
    parser.add_argument("--max-params", type=float, default=150e6, help="numeric up to this")
    parser.add_argument("--out", default=str(ROOT / "docs" / "architectures.md"), help="or -")
    parser.add_argument(
        "--cache",
        type=Path,
        help="keep each measured row here as JSON and reuse it: an interrupted run resumes, and "
        "runs over parts of the list (--only, in parallel) combine into one table",
    )
    args = parser.parse_args(argv)
    archs = args.only or (quick_set() if args.quick else list_architectures())
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    load = load.split("load average:")[-1].strip() if "load average" in load else "?"
    start = time.perf_counter()
    rows = []
    for arch in archs:
        t = time.perf_counter()
        cached = args.cache / f"{arch}.json" if args.cache else None
        if cached is not None and cached.exists():
            rows.append(Row(**json.loads(cached.read_text())))
            continue
        rows.append(measure(arch, args.max_params))
        r = rows[-1]
        r.seconds = time.perf_counter() - t
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(asdict(r)))
        print(
            f"{arch:22s} groups {r.groups:4d} channels {r.channels:6d} diff {r.max_diff}"
            f" flops {r.flops_ratio:.3f} params {r.params_ratio:.3f} {r.load_class}"
            f" ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    command = "python bench/coverage.py" + " ".join(
        ["", *(argv if argv is not None else sys.argv[1:])]
    )
    elapsed = sum(r.seconds for r in rows) if args.cache else time.perf_counter() - start
    text = render(rows, command.strip(), load, elapsed)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
