"""Calibrating a latency table against whole-model timings.

Per-layer timings miss what happens between layers (residual adds, pooling, launch gaps); a
scale and offset fitted to the measured latency of the exported model at a few random widths
absorb it, so the table's sum predicts a whole model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from hawada.core.gates import GateGroup
from hawada.core.latency import measure_latency
from hawada.core.layers import LayerSpec
from hawada.core.lut.cost import LatencyCost
from hawada.core.lut.table import LatencyTable
from hawada.core.recipe import LatencySpec

#: An adapter's `export_pruned`: (model, keep: group -> kept channel indices) -> pruned model.
ExportFn = Callable[[nn.Module, Mapping[str, Tensor]], nn.Module]


def fit_calibration(
    table: LatencyTable, samples: Sequence[tuple[float, float]]
) -> tuple[float, float]:
    """Least-squares ``measured ≈ scale * predicted_raw + offset``; stored on the table.

    ``samples`` are (raw per-layer sum, measured whole-model ms) pairs, e.g. the baseline plus a
    few random-width exported models. The offset stands for per-model overhead (pooling, launch
    gaps), so it is kept in [0, 25% of the fastest measurement]: a handful of noisy samples over
    a narrow range would otherwise trade scale for a wild offset. One sample: scale only.
    """
    pts = [(float(x), float(y)) for x, y in samples if x > 0 and y > 0]
    if not pts:
        raise ValueError("fit_calibration needs at least one positive (predicted, measured) pair")
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    offset = my - sxy / sxx * mx if n >= 2 and sxx > 1e-12 * mx * mx else 0.0
    offset = min(max(offset, 0.0), 0.25 * min(y for _, y in pts))
    # best scale for that offset (least squares through the point (0, offset))
    scale = sum(x * (y - offset) for x, y in pts) / sum(x * x for x, _ in pts)
    if scale <= 0:  # only possible with absurd samples; fall back to the plain ratio
        scale, offset = sum(y for _, y in pts) / sum(x for x, _ in pts), 0.0
    table.scale, table.offset = float(scale), float(offset)
    errs = [abs(scale * x + offset - y) / y for x, y in pts]
    table.meta["calibration_samples"] = n
    table.meta["calibration_max_rel_err"] = max(errs)
    return table.scale, table.offset


def random_widths(
    full_widths: Mapping[str, int],
    step: Mapping[str, int] | int,
    rng: random.Random,
    low: float = 0.25,
) -> dict[str, int]:
    """A random width per group: a multiple of its step in [low * full, full], or full."""
    out: dict[str, int] = {}
    for g, full in full_widths.items():
        st = step[g] if isinstance(step, Mapping) else step
        ladder = [w for w in range(st, full, st) if w >= low * full] + [full]
        out[g] = rng.choice(ladder)
    return out


class WidthMeasurer:
    """``widths -> measured ms``: keeps the first channels of each group, exports, times.

    ``export_fn`` is the adapter's ``export_pruned``; ``groups`` the GateGroups being pruned
    (name, units, unit_width, min_units, round_units). Which channels survive does not change
    latency, only how many, so the first ones are kept.
    """

    def __init__(
        self,
        model: nn.Module,
        export_fn: ExportFn,
        groups: Sequence[GateGroup],
        input_size: Sequence[int],
        spec: LatencySpec,
        device: str | torch.device | None,
        clock: str = "wall",
    ) -> None:
        self.model, self.export_fn, self.clock = model, export_fn, clock
        self.groups = {g.name: g for g in groups}
        self.input_size, self.spec, self.device = tuple(input_size), spec, device

    def keep_for(self, widths: Mapping[str, int]) -> dict[str, Tensor]:
        """First-channels keep realising ``widths`` (snapped up to whole units, floored)."""
        keep: dict[str, Tensor] = {}
        for name, g in self.groups.items():
            uw = int(g.unit_width)
            w = int(widths.get(name, g.units * uw))
            units = min(int(g.units), max(int(g.min_units), -(-w // uw)))
            keep[name] = torch.arange(units * uw)
        return keep

    def __call__(self, widths: Mapping[str, int]) -> float:
        pruned = self.export_fn(self.model, self.keep_for(widths))
        return measure_latency(
            pruned, self.input_size, self.spec, self.device, clock=self.clock
        ).median_ms

    def random_widths(self, rng: random.Random, low: float = 0.25) -> dict[str, int]:
        """Random exportable widths of the pruned groups (multiples of each group's step)."""
        full = {n: int(g.units) * int(g.unit_width) for n, g in self.groups.items()}
        step = {n: max(1, int(g.round_units)) * int(g.unit_width) for n, g in self.groups.items()}
        return random_widths(full, step, rng, low)


def make_width_measurer(
    model: nn.Module,
    export_fn: ExportFn,
    groups: Sequence[GateGroup],
    input_size: Sequence[int],
    spec: LatencySpec,
    device: str | torch.device | None,
) -> WidthMeasurer:
    """The ``calibrate_with`` callable of ``get_or_build_lut`` for one model (see WidthMeasurer)."""
    return WidthMeasurer(model, export_fn, groups, input_size, spec, device)


def calibrate(
    table: LatencyTable,
    layers: Sequence[LayerSpec],
    measure_widths: Callable[[Mapping[str, int]], float],
    n_random: int = 4,
    seed: int = 0,
    passes: int = 2,
) -> tuple[float, float]:
    """Fit the table's scale/offset to the full model plus ``n_random`` random-width models.

    ``measure_widths(widths)`` exports the model at those channel counts and returns its
    measured median ms; when it is a WidthMeasurer only the groups it prunes are varied.
    """
    cost = LatencyCost(layers, table)
    rng = random.Random(seed)
    round_to = int(table.meta.get("round_to", 8))
    configs: list[dict[str, int]] = [{}]
    for _ in range(n_random):
        if isinstance(measure_widths, WidthMeasurer):
            configs.append(measure_widths.random_widths(rng))
        else:
            configs.append(random_widths(cost.full_widths, round_to, rng))
    # interleaved passes, fastest per config: a burst of host load hits one pass, not every one
    runs = [[float(measure_widths(w)) for w in configs] for _ in range(max(1, passes))]
    samples = [(float(cost.raw(w)), min(r[i] for r in runs)) for i, w in enumerate(configs)]
    return fit_calibration(table, samples)
