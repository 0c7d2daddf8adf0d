"""The differentiable latency cost: a `CostModel` over a latency table.

Between measured grid points the table is interpolated bilinearly, which makes it
differentiable in the (expected) widths so gate training can descend on it; a scale and offset
fitted to whole-model timings (`core.lut.calibration`) map the per-layer sum to a model's ms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hawada.core.layers import LayerSpec, Width, check_groups, group_widths, input_parts
from hawada.core.lut.table import LatencyTable, LutEntry, layer_shape


class LatencyCost:
    """``CostModel`` over a LatencyTable: ms = scale * sum_layers interp(cin, cout) + offset.

    ``cost(widths)`` is differentiable in the widths (bilinear interpolation between measured
    points, linear extrapolation past the ends so the gradient never vanishes at full width).
    All layers are evaluated in one batched gather — no per-layer Python in the training step.
    """

    metric = "latency"

    def __init__(self, layers: Sequence[LayerSpec], table: LatencyTable) -> None:
        self.table = table
        batch = int(table.meta.get("batch_size", 1))
        full = group_widths(layers)
        self.groups: list[str] = list(full)
        self.full_widths: dict[str, int] = full
        gidx = {g: i for i, g in enumerate(self.groups)}
        const = len(self.groups)  # index of the "use the full width" slot

        shapes = [layer_shape(layer, batch) for layer in layers]
        missing = [s.signature for s in shapes if s.signature not in table.entries]
        if missing:
            raise ValueError(
                f"latency table {table.key or '?'} lacks {len(missing)} layer(s), e.g. {missing[0]}"
            )
        grids = [self._padded(table.entries[s.signature]) for s in shapes]
        pi = max(len(g[0]) for g in grids)
        pj = max(len(g[1]) for g in grids)
        n = len(shapes)
        xi = torch.empty(n, pi, dtype=torch.float64)
        xj = torch.empty(n, pj, dtype=torch.float64)
        v = torch.zeros(n, pi, pj, dtype=torch.float64)
        ni = torch.empty(n, dtype=torch.long)
        nj = torch.empty(n, dtype=torch.long)
        for k, (ci, co, ms) in enumerate(grids):
            # pad axes with increasing values so searchsorted stays valid past a layer's last point
            xi[k] = torch.tensor(
                ci + [ci[-1] + 1 + t for t in range(pi - len(ci))], dtype=torch.float64
            )
            xj[k] = torch.tensor(
                co + [co[-1] + 1 + t for t in range(pj - len(co))], dtype=torch.float64
            )
            v[k, : len(ci), : len(co)] = torch.tensor(ms, dtype=torch.float64)
            ni[k], nj[k] = len(ci), len(co)
        tied = [s.groups_mode.startswith("tied:") for s in shapes]
        # cin = in_mat @ widths + in_const: concatenated and flattened inputs sum their parts.
        in_mat = torch.zeros(n, len(self.groups), dtype=torch.float64)
        in_const = torch.zeros(n, dtype=torch.float64)
        for k, (la, t, s) in enumerate(zip(layers, tied, shapes, strict=True)):
            if t:
                in_const[k] = float(s.cin)
                continue
            for g, c, block in input_parts(la):
                if g is None:
                    in_const[k] += float(c * block)
                else:
                    in_mat[k, gidx[g]] += float(block)
        out_slot = torch.tensor(
            [gidx[la.out_group] if la.out_group is not None else const for la in layers]
        )
        self._cpu: dict[str, Tensor] = {
            "xi": xi,
            "xj": xj,
            "v": v,
            "ni": ni,
            "nj": nj,
            "in_mat": in_mat,
            "in_const": in_const,
            "out_slot": out_slot,
            "rows": torch.arange(n),
            "cout_full": torch.tensor([float(s.cout) for s in shapes], dtype=torch.float64),
            "full": torch.tensor([float(full[g]) for g in self.groups], dtype=torch.float64),
        }
        self._on: dict[torch.device, dict[str, Tensor]] = {}
        self._slots: dict[tuple[torch.device, tuple[str, ...]], Tensor] = {}

    @staticmethod
    def _padded(e: LutEntry) -> tuple[list[float], list[float], list[list[float]]]:
        """A one-point (fixed) axis becomes two equal points: zero slope, same interpolation."""
        ci, co = [float(v) for v in e.cin], [float(v) for v in e.cout]
        ms = [list(r) for r in e.ms]
        if len(ci) == 1:
            ci, ms = [ci[0], ci[0] + 1.0], [ms[0], list(ms[0])]
        if len(co) == 1:
            co, ms = [co[0], co[0] + 1.0], [[r[0], r[0]] for r in ms]
        return ci, co, ms

    def _buffers(self, device: torch.device) -> dict[str, Tensor]:
        # Grids and index tensors move to the widths' device once, not once per step.
        if device not in self._on:
            self._on[device] = {k: v.to(device) for k, v in self._cpu.items()}
        return self._on[device]

    def _width_vector(self, widths: Mapping[str, Width], device: torch.device) -> Tensor:
        """(groups + 1,) float64 widths in table order; absent groups at full width."""
        b = self._buffers(device)
        if not any(isinstance(v, Tensor) for v in widths.values()):
            # plain numbers (budget fitting): one tensor, no autograd graph to keep
            vals = [float(widths.get(g, self.full_widths[g])) for g in self.groups] + [0.0]
            return torch.tensor(vals, dtype=torch.float64, device=device)
        full = b["full"]

        def one(i: int, g: str) -> Tensor:
            value = widths.get(g)
            if isinstance(value, Tensor):
                return value.to(device, torch.float64).reshape(())
            if value is None:
                return full[i]
            return torch.tensor(float(value), dtype=torch.float64, device=device)

        w = torch.stack([one(i, g) for i, g in enumerate(self.groups)])
        return torch.cat([w, w.new_zeros(1)])

    @staticmethod
    def _interp_axis(x: Tensor, axes: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        """Interval index per row and layer of `x` (rows, layers), and the (unclamped, so
        extrapolating) position in it."""
        idx = torch.searchsorted(axes, x.detach().T.contiguous(), right=True).T - 1
        idx = torch.minimum(idx.clamp_min(0), n - 2)
        x0 = axes.gather(1, idx.T).T
        x1 = axes.gather(1, (idx + 1).T).T
        return idx, (x - x0) / (x1 - x0)

    def _raw_rows(self, w: Tensor) -> Tensor:
        """Uncalibrated per-layer sums for every row of `w` ((rows, groups + 1) widths in table
        order, the last column unused): one batched gather, differentiable in `w`."""
        b = self._buffers(w.device)
        const = len(self.groups)
        cin = w[:, :const] @ b["in_mat"].T + b["in_const"]
        cout = torch.where(b["out_slot"] == const, b["cout_full"], w[:, b["out_slot"]])
        i, t = self._interp_axis(cin, b["xi"], b["ni"])
        j, u = self._interp_axis(cout, b["xj"], b["nj"])
        v = b["v"]
        rows = b["rows"]
        per_layer = (
            (1 - t) * (1 - u) * v[rows, i, j]
            + t * (1 - u) * v[rows, i + 1, j]
            + (1 - t) * u * v[rows, i, j + 1]
            + t * u * v[rows, i + 1, j + 1]
        )
        return per_layer.clamp_min(0.0).sum(1)

    def raw(self, widths: Mapping[str, Width]) -> Tensor:
        """Uncalibrated sum of per-layer interpolated ms (what the calibration maps to a model)."""
        check_groups(widths, self.full_widths)
        device = next(
            (w.device for w in widths.values() if isinstance(w, Tensor)), torch.device("cpu")
        )
        return self._raw_rows(self._width_vector(widths, device)[None])[0]

    def cost_rows(self, names: Sequence[str], widths: Tensor) -> Tensor:
        """`CostModel.cost_rows`: predicted ms of every row, in one batched gather."""
        check_groups(names, self.full_widths)
        b = self._buffers(widths.device)
        full = torch.cat([b["full"], b["full"].new_zeros(1)])
        w = full.expand(widths.shape[0], -1).clone()
        key = (widths.device, tuple(names))
        if key not in self._slots:  # the projection asks for the same groups every round
            slots = [self.groups.index(g) for g in names]
            self._slots[key] = torch.tensor(slots, device=widths.device)
        w[:, self._slots[key]] = widths.to(torch.float64)
        return self.table.scale * self._raw_rows(w) + self.table.offset

    def cost(self, widths: Mapping[str, Width]) -> Tensor:
        """Predicted whole-model ms at ``widths`` (kept channels per group; absent = full).

        float64 0-dim tensor like the analytic cost models, differentiable in tensor widths.
        """
        return self.table.scale * self.raw(widths) + self.table.offset

    def baseline(self) -> float:
        """Predicted ms of the unpruned model."""
        return float(self.cost({}))
