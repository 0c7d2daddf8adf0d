"""Per-unit channel gates applied as forward hooks on norm layers.

A gate multiplies a norm layer's output by a per-channel mask (after the norm, before the
activation or residual add). With a 0/1 mask the removed channels are exactly zero downstream,
which is why a hard-gated model and the physically pruned export give the same outputs. The
model itself stays a plain torchvision model; the teacher is the same model with mode "off".

One definition of "kept" (`Gates.hard_unit_mask`) is shared by training, penalty, evaluation and
export: the top-k logits where k is the snapped count of positive logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import Tensor, nn

GateMode = Literal["off", "soft", "hard", "ste"]
MODES: tuple[str, ...] = ("off", "soft", "hard", "ste")


#: Prefix of the BN running statistics stored beside the logits in a job's `gates.safetensors`
#: (`norm_stats:<module>.running_mean` / `.running_var`): what the gated model normalises with.
NORM_STATS_PREFIX = "norm_stats:"


@dataclass(frozen=True)
class GateGroup:
    """A coupling group: channels that must be kept or removed together.

    `units` gates of `unit_width` channels each (`unit_width` > 1 for grouped convs, where a
    unit is one conv group). `modules` are the norm layers whose outputs the mask multiplies;
    `covers` lists every conv/linear/norm whose output channels the group decides (report).
    Widths snap to multiples of `round_units` units and never go below `min_units`.
    `channels_last` names the `modules` whose outputs hold channels on the last dim (a linear
    inside ConvNeXt's channels-last block) rather than on dim 1.
    """

    name: str
    units: int
    unit_width: int
    modules: list[str]
    min_units: int
    round_units: int
    covers: list[str] = field(default_factory=list)
    channels_last: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        """Full width of the group in channels."""
        return self.units * self.unit_width

    @classmethod
    def from_channels(
        cls,
        name: str,
        channels: int,
        *,
        modules: list[str],
        covers: list[str],
        round_to: int,
        min_channels: int,
        unit_width: int = 1,
        channels_last: Sequence[str] = (),
    ) -> GateGroup:
        """Build a group from channel-level recipe settings (`gates.round_to`, `min_channels`).

        `round_units` is the smallest unit step whose width is a multiple of `round_to`
        (round_to / gcd(round_to, unit_width)); `min_units` = ceil(min_channels / unit_width).
        """
        if channels % unit_width:
            raise ValueError(f"group {name}: {channels} channels not divisible by {unit_width}")
        round_units = round_to // math.gcd(round_to, unit_width) if round_to > 0 else 1
        min_units = max(1, math.ceil(min_channels / unit_width))
        return cls(
            name,
            channels // unit_width,
            unit_width,
            list(modules),
            min_units,
            round_units,
            list(covers),
            tuple(channels_last),
        )


def snap_units(count: int, group: GateGroup) -> int:
    """Snap a unit count to the staircase: the nearest allowed width (ties up), where allowed
    = multiples of `round_units` and the full width, floored at the smallest multiple >=
    `min_units` and capped at full width."""
    r, units = group.round_units, group.units
    below = (count // r) * r
    allowed = [below, units] + ([below + r] if below + r <= units else [])
    snapped = min(allowed, key=lambda a: (abs(a - count), -a))
    floor = -(-group.min_units // r) * r
    return min(max(snapped, floor), units)


def _snap_tensor(count: Tensor, group: GateGroup) -> Tensor:
    """`snap_units` on a 0-dim device tensor (same rule, no host sync)."""
    r, units = group.round_units, group.units
    below = torch.div(count, r, rounding_mode="floor") * r
    up = below + r
    best = below
    # Candidates in ascending order with <= comparisons: ties go to the larger width.
    best = torch.where((up <= units) & (up - count <= count - best), up, best)
    best = torch.where(units - count <= (count - best).abs(), torch.full_like(best, units), best)
    floor = -(-group.min_units // r) * r
    return best.clamp(min=floor).clamp(max=units)


def _key(name: str) -> str:
    # ParameterDict keys cannot contain "."; group names can ("layer1.0.inner1").
    return name.replace(".", "__")


class Gates(nn.Module):
    """One logit per unit per group; masks are recomputed on every use (nothing goes stale).

    `temperature` is set by the trainer; `mode` is "off" (identity, the teacher), "soft"
    (sigmoid(logit / T)), "hard" (0/1 from `kept_units`) or "ste" (gate training: the forward
    value is exactly the hard 0/1 mask, the gradient is that of sigmoid(logit / T), a
    straight-through estimator, so training sees the model that export produces).
    """

    def __init__(
        self, groups: Sequence[GateGroup], init_logit: float = 3.0, temperature: float = 1.0
    ) -> None:
        super().__init__()
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError("gate group names must be unique")
        self.groups: dict[str, GateGroup] = {g.name: g for g in groups}
        self.logits = nn.ParameterDict(
            {_key(g.name): nn.Parameter(torch.full((g.units,), float(init_logit))) for g in groups}
        )
        self.temperature = float(temperature)
        self._mode: str = "soft"

    # --- mode -----------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """Current mask mode: "off", "soft" or "hard"."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"gate mode must be one of {MODES}, got {value!r}")
        self._mode = value

    @contextmanager
    def using(self, mode: GateMode) -> Iterator[Gates]:
        """Temporarily switch mode (e.g. `with gates.using("off"): teacher_out = model(x)`)."""
        previous = self._mode
        self.mode = mode
        try:
            yield self
        finally:
            self._mode = previous

    # --- per-group quantities ---------------------------------------------------------------
    def _group(self, g: str | GateGroup) -> GateGroup:
        return self.groups[g if isinstance(g, str) else g.name]

    def logit(self, g: str | GateGroup) -> nn.Parameter:
        """The trainable logits of group `g` (one per unit)."""
        return cast(nn.Parameter, self.logits[_key(self._group(g).name)])

    def probs(self, g: str | GateGroup) -> Tensor:
        """Keep probability per unit: sigmoid(logit / temperature)."""
        return torch.sigmoid(self.logit(g) / self.temperature)

    def hard_unit_mask(self, g: str | GateGroup) -> Tensor:
        """Boolean per-unit mask of the kept units: the top-k logits, k = snap(#logits > 0).

        This is the one definition of kept. It runs entirely on the logits' device (no host
        sync), so hard-mode forwards stay cheap on GPU.
        """
        group = self._group(g)
        logit = self.logit(group).detach()
        k = _snap_tensor((logit > 0).sum(), group)
        # Stable sort so equal logits resolve deterministically (lower index first).
        order = torch.sort(logit, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        return rank < k

    def kept_units(self, g: str | GateGroup) -> Tensor:
        """Indices (ascending) of the kept units (see `hard_unit_mask`)."""
        return self.hard_unit_mask(g).nonzero().reshape(-1)

    def kept_channels(self, g: str | GateGroup) -> Tensor:
        """Channel indices (ascending) of the kept units."""
        group = self._group(g)
        units = self.kept_units(group)
        w = group.unit_width
        if w == 1:
            return units
        offsets = torch.arange(w, device=units.device)
        return (units[:, None] * w + offsets[None, :]).reshape(-1)

    def unit_mask(self, g: str | GateGroup) -> Tensor | None:
        """Per-unit mask for the current mode (None when off)."""
        if self._mode == "off":
            return None
        if self._mode == "soft":
            return self.probs(g)
        hard = self.hard_unit_mask(g).to(self.logit(g).dtype)
        if self._mode == "ste":
            probs = self.probs(g)
            # value: exactly `hard` (probs - probs == 0); gradient: d probs / d logit
            return hard + (probs - probs.detach())
        return hard

    def channel_mask(self, g: str | GateGroup) -> Tensor | None:
        """Per-channel mask for the current mode (None when off)."""
        mask = self.unit_mask(g)
        w = self._group(g).unit_width
        return mask if mask is None or w == 1 else mask.repeat_interleave(w)

    def expected_units(self, g: str | GateGroup) -> Tensor:
        """Kept units as the cost model sees them: sum(probs) in soft mode, the snapped hard
        count otherwise; in "ste" mode that count carries the gradient of sum(probs)."""
        if self._mode == "soft":
            return self.probs(g).sum()
        hard = self.hard_unit_mask(g).sum().to(self.logit(g).dtype)
        if self._mode == "ste":
            probs = self.probs(g).sum()
            return hard + (probs - probs.detach())
        return hard

    def expected_widths(self) -> dict[str, Tensor]:
        """Expected kept channels per group, the `widths` a cost model takes."""
        return {n: self.expected_units(n) * g.unit_width for n, g in self.groups.items()}

    # --- saving -----------------------------------------------------------------------------
    def named_logits(self) -> dict[str, Tensor]:
        """{group name: logits} as contiguous CPU tensors, ready for safetensors."""
        return {n: self.logit(n).detach().cpu().contiguous() for n in self.groups}

    def load_logits(self, tensors: Mapping[str, Tensor]) -> None:
        """Inverse of `named_logits`; every group must be present with the right length.

        Keys under `NORM_STATS_PREFIX` (the BN statistics a job's `gates.safetensors` also
        holds) are not logits and are skipped.
        """
        tensors = {k: v for k, v in tensors.items() if not k.startswith(NORM_STATS_PREFIX)}
        missing = set(self.groups) - set(tensors)
        unexpected = set(tensors) - set(self.groups)
        if missing or unexpected:
            raise ValueError(
                f"gate logits mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        with torch.no_grad():
            for n in self.groups:
                p = self.logit(n)
                if tuple(tensors[n].shape) != tuple(p.shape):
                    raise ValueError(
                        f"gate logits {n}: shape {tuple(tensors[n].shape)}, "
                        f"expected {tuple(p.shape)}"
                    )
                p.copy_(tensors[n])


class GateHandle:
    """Removes the hooks that `attach` registered."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        self._handles = handles

    def remove(self) -> None:
        """Detach all gate hooks; the model is the plain model again."""
        for h in self._handles:
            h.remove()
        self._handles = []


def attach(model: nn.Module, gates: Gates) -> GateHandle:
    """Register forward hooks multiplying each group's norm outputs by its channel mask."""
    handles = []
    for name, group in gates.groups.items():
        for module_name in group.modules:
            module = model.get_submodule(module_name)
            last = module_name in group.channels_last
            handles.append(module.register_forward_hook(_make_hook(gates, name, last)))
    return GateHandle(handles)


Hook = Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor | None]


def _make_hook(gates: Gates, group: str, channels_last: bool = False) -> Hook:
    def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        mask = gates.channel_mask(group)
        if mask is None:
            return None  # mode off: leave the output untouched (bit-exact teacher)
        if channels_last:
            return output * mask.to(output.dtype)
        shape = (1, -1) + (1,) * (output.dim() - 2)
        return output * mask.to(output.dtype).view(shape)

    return hook


def keep_from_gates(gates: Gates) -> dict[str, Tensor]:
    """Kept channel indices per group (the export's `keep`)."""
    return {n: gates.kept_channels(n) for n in gates.groups}
