"""What the cost models see of a network: one `LayerSpec` per conv/linear layer, the gate groups
that decide its channels, and the `CostModel` protocol they all implement.

Adapters produce the specs (`FamilyAdapter.layers`); the analytic cost models (`core.cost`) and
the latency lookup table (`core.lut`) consume them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

#: A kept channel count: a (differentiable) tensor during training, a number when fitting.
Width = Tensor | float | int


@dataclass(frozen=True)
class LayerSpec:
    """One conv or linear layer as the cost models and the latency LUT see it.

    `in_group`/`out_group` name the gate groups that decide its input/output channels (None:
    fixed). `tied_groups`: grouped conv whose group count shrinks with its gate, so the input
    channels per group stay constant. `norm` names the norm layer after it (its affine
    parameters count with the layer). Spatial sizes are from one forward at the job's input size.

    `in_block`: input elements per channel of `in_group` (a linear after flattening C x H x W
    reads H * W features per channel; `in_channels` counts features). `in_segments`: the input
    is a concatenation of (group or None, channels) segments; `in_group` is then None.
    """

    name: str
    kind: Literal["conv", "linear"]
    in_group: str | None
    out_group: str | None
    in_channels: int
    out_channels: int
    groups: int
    tied_groups: bool
    kernel: tuple[int, int]
    out_hw: tuple[int, int]
    in_hw: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    bias: bool = False
    norm: str | None = None
    in_block: int = 1
    in_segments: tuple[tuple[str | None, int], ...] = ()


def input_parts(spec: LayerSpec) -> list[tuple[str | None, int, int]]:
    """The input channels of a layer as (group or None, channels, features per channel) parts.

    Input features = sum(channels * features per channel); a part with a group varies with it.
    """
    if spec.in_segments:
        return [(g, int(c), 1) for g, c in spec.in_segments]
    block = max(1, int(spec.in_block))
    return [(spec.in_group, spec.in_channels // block, block)]


@runtime_checkable
class CostModel(Protocol):
    """Cost of a network as a function of kept channels per gate group."""

    @property
    def metric(self) -> str:
        """What is counted: "flops", "params" or "latency"."""
        ...

    def cost(self, widths: Mapping[str, Width]) -> Tensor:
        """Cost at `widths` (group -> kept channels; absent groups are full width)."""
        ...

    def baseline(self) -> float:
        """Cost at full width."""
        ...

    def cost_rows(self, names: Sequence[str], widths: Tensor) -> Tensor:
        """Cost of every row of `widths` ((rows, len(names)) kept channels of the groups
        `names`, the others at full width) as a (rows,) float64 tensor: many candidate
        widths in one vectorised call (the budget projection's exact savings)."""
        ...


def check_groups(names: Iterable[str], known: Mapping[str, int]) -> None:
    """KeyError naming every group of `names` that a cost model does not know."""
    unknown = set(names) - set(known)
    if unknown:
        raise KeyError(f"unknown gate groups: {sorted(unknown)}")


def group_widths(layers: Sequence[LayerSpec]) -> dict[str, int]:
    """Full channel count of every group the layers mention (checked for consistency)."""
    full: dict[str, int] = {}
    for spec in layers:
        parts = [(g, c) for g, c, _ in input_parts(spec)]
        for group, channels in (*parts, (spec.out_group, spec.out_channels)):
            if group is None:
                continue
            if full.setdefault(group, channels) != channels:
                raise ValueError(
                    f"group {group}: {channels} channels at {spec.name}, {full[group]} elsewhere"
                )
    return full
