"""Analytic cost models (FLOPs, parameters) as functions of per-group kept widths, and the
choice of cost model for a recipe's metric (`make_cost_model`; latency: `core.lut`).

Every conv/linear contributes `coef * in_factor * out_factor`, where each factor is either a
gate group's (expected) width or a constant. The cost is therefore one vectorised gather and
dot product per call, differentiable in the widths, with no per-layer Python work per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hawada.core.layers import (
    CostModel,
    LayerSpec,
    Width,
    check_groups,
    group_widths,
    input_parts,
)
from hawada.core.lut.cost import LatencyCost
from hawada.core.lut.table import LatencyTable

#: One factor of a cost term: a gate group's width, or (None, constant).
_Factor = tuple[str | None, float]
#: coefficient * in factor * out factor.
_Term = tuple[float, _Factor, _Factor]


class _BilinearCost:
    """cost = sum_t coef_t * v[in_t] * v[out_t], v = [group widths..., 1]."""

    metric = "abstract"

    def __init__(self, layers: Sequence[LayerSpec]) -> None:
        self.layers = list(layers)
        self.full = group_widths(self.layers)
        self.group_names = list(self.full)
        index = {g: i for i, g in enumerate(self.group_names)}
        one = len(self.group_names)  # slot holding the constant 1
        coefs: list[float] = []
        ins: list[int] = []
        outs: list[int] = []
        for spec in self.layers:
            for coef, (in_g, in_c), (out_g, out_c) in self._terms(spec):
                # A fixed factor folds into the coefficient and reads the constant slot.
                coefs.append(
                    coef
                    * (1.0 if in_g is not None else in_c)
                    * (1.0 if out_g is not None else out_c)
                )
                ins.append(one if in_g is None else index[in_g])
                outs.append(one if out_g is None else index[out_g])
        self._coef = torch.tensor(coefs, dtype=torch.float64)
        self._in = torch.tensor(ins, dtype=torch.long)
        self._out = torch.tensor(outs, dtype=torch.long)
        self._full = torch.tensor([*self.full.values(), 1.0], dtype=torch.float64)
        self._on: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._slots: dict[tuple[torch.device, tuple[str, ...]], Tensor] = {}
        self._index = index
        self._baseline = float(self.cost({}))

    @staticmethod
    def _terms(spec: LayerSpec) -> list[_Term]:
        raise NotImplementedError

    def _buffers(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # Constant tensors are moved once per device, not once per step.
        if device not in self._on:
            coef, ins, outs, full = (
                t.to(device) for t in (self._coef, self._in, self._out, self._full)
            )
            self._on[device] = (coef, ins, outs, full)
        return self._on[device]

    def _slot_index(self, device: torch.device, names: tuple[str, ...]) -> Tensor:
        # The trainer passes the same groups every step: build each index tensor once.
        key = (device, names)
        if key not in self._slots:
            self._slots[key] = torch.tensor([self._index[g] for g in names], device=device)
        return self._slots[key]

    def _vector(self, widths: Mapping[str, Width], device: torch.device, full: Tensor) -> Tensor:
        """[width of every group..., 1] with the given widths placed over the full ones."""
        v = full
        fixed = tuple(g for g, w in widths.items() if not isinstance(w, Tensor))
        if fixed:
            values = torch.tensor(
                [float(widths[g]) for g in fixed], dtype=torch.float64, device=device
            )
            v = v.index_put((self._slot_index(device, fixed),), values)
        learned = {g: w for g, w in widths.items() if isinstance(w, Tensor)}
        if learned:
            values = torch.stack([w.reshape(()) for w in learned.values()]).to(torch.float64)
            v = v.index_put((self._slot_index(device, tuple(learned)),), values)
        return v

    def cost(self, widths: Mapping[str, Width]) -> Tensor:
        """Cost at `widths` (float64 0-dim tensor, differentiable in tensor widths)."""
        check_groups(widths, self.full)
        device = next(
            (w.device for w in widths.values() if isinstance(w, Tensor)), torch.device("cpu")
        )
        coef, ins, outs, full = self._buffers(device)
        v = self._vector(widths, device, full)
        return (coef * v[ins] * v[outs]).sum()

    def cost_rows(self, names: Sequence[str], widths: Tensor) -> Tensor:
        """`CostModel.cost_rows`: one gather and product over every row."""
        check_groups(names, self.full)
        coef, ins, outs, full = self._buffers(widths.device)
        v = full.expand(widths.shape[0], -1).clone()
        v[:, self._slot_index(widths.device, tuple(names))] = widths.to(torch.float64)
        return (coef * v[:, ins] * v[:, outs]).sum(1)

    def baseline(self) -> float:
        """Cost at full width."""
        return self._baseline


def _in_factors(spec: LayerSpec) -> list[tuple[float, _Factor]]:
    """(coefficient part, input factor) pairs summing to the input features (conv: / groups)."""
    if spec.tied_groups:
        # Groups shrink with the gate: in-channels per group is a constant.
        return [(float(spec.in_channels // spec.groups), (None, 1.0))]
    per = 1.0 / spec.groups if spec.kind == "conv" else 1.0
    return [(per * block, (g, float(c))) for g, c, block in input_parts(spec)]


class FlopsCost(_BilinearCost):
    """2 x multiply-accumulates of convs and linears, as `FlopCounterMode` counts at batch 1."""

    metric = "flops"

    @staticmethod
    def _terms(spec: LayerSpec) -> list[_Term]:
        out = (spec.out_group, float(spec.out_channels))
        if spec.kind == "linear":  # out_hw: positions it runs at (ConvNeXt's channels-last MLP)
            positions = spec.out_hw[0] * spec.out_hw[1]
            return [(2.0 * positions * part, f, out) for part, f in _in_factors(spec)]
        spatial = spec.out_hw[0] * spec.out_hw[1] * spec.kernel[0] * spec.kernel[1]
        return [(2.0 * spatial * part, f, out) for part, f in _in_factors(spec)]


class ParamsCost(_BilinearCost):
    """Weights and biases of convs/linears plus the affine parameters of their norms."""

    metric = "params"

    @staticmethod
    def _terms(spec: LayerSpec) -> list[_Term]:
        out = (spec.out_group, float(spec.out_channels))
        one: _Factor = (None, 1.0)
        k = 1.0 if spec.kind == "linear" else float(spec.kernel[0] * spec.kernel[1])
        terms = [(k * part, f, out) for part, f in _in_factors(spec)]
        if spec.bias:
            terms.append((1.0, one, out))
        if spec.norm is not None:
            terms.append((2.0, one, out))  # norm weight + bias
        return terms


def make_cost_model(
    metric: str, layers: Sequence[LayerSpec], lut: LatencyTable | None = None
) -> CostModel:
    """Cost model for a recipe's `target.metric`: "flops", "params" or "latency" (needs `lut`)."""
    if metric == "flops":
        return FlopsCost(layers)
    if metric == "params":
        return ParamsCost(layers)
    if metric == "latency":
        if lut is None:
            raise ValueError("metric latency needs a latency lookup table (lut)")
        return LatencyCost(layers, lut)
    raise ValueError(f"unknown cost metric {metric!r}; expected flops, params or latency")
