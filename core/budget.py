"""Fit the trained gates' widths to the cost budget before export: a small final correction.

Gate training already penalises the widths export keeps, so its hard-gated cost lands near the
target; the snapped staircase (and, for latency, only a measurement) can leave it a little over.
``fit_to_budget`` corrects that without undoing training:

* it starts from the trained widths (``Gates.kept_units``) and never goes above them: a unit that
  training closed is never re-opened;
* cut: while the predicted cost is over the target, close open units, least important (lowest
  logit) first within a group. Between groups it takes the cut that loses the least gate
  importance per unit of cost saved, and as soon as one step suffices, the sufficient step
  that loses the least importance (the smallest sufficient cut, not the biggest cost drop).
  On a latency staircase a one-step cut may buy nothing; the search looks a few steps further
  down that group for the first width where the cost actually drops;
* refill (``fill``): slack left under the target is spent re-opening units this correction
  closed (most important per cost first), never beyond the trained width;
* measure (optional): re-measure the exported model; while it is over the target, shrink the
  predicted goal by the measured/predicted ratio and cut again, undoing cuts that did not make
  the measured latency drop.

The gates are not modified: ``gates.safetensors`` keeps what training learned. The result is the
exported keep set; ``gated_like(gates, keep)`` gives a copy of the gates whose hard mask is that
keep set (for the hard-gated model after the correction).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hawada.core.gates import GateGroup, Gates
from hawada.core.layers import CostModel

#: A plain `widths -> cost` function (group -> kept channels; absent groups are full width).
CostFn = Callable[[Mapping[str, float]], Tensor | float]
#: Measures the exported model for a `keep` (group -> kept channel indices); returns ms.
Measure = Callable[[Mapping[str, Tensor]], float]

_LOOKAHEAD = 6  # steps down one group to search for a width where the cost actually drops
_MARGIN = 0.01  # |logit| written back for units whose side of 0 had to change


@dataclass
class BudgetResult(Mapping[str, Tensor]):
    """The fitted ``keep`` (group -> kept channel indices), readable as that dict itself.

    ``predicted``/``measured`` are the final costs (``measured`` only with a ``measure``
    callable), ``met`` whether the target holds for the measured value when there is one, and
    ``reason`` says why not when it does not.
    """

    keep: dict[str, Tensor]
    widths: dict[str, int]
    target: float
    predicted: float
    measured: float | None = None
    met: bool = True
    reason: str | None = None
    measure_rounds: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    #: widths (channels) at the end of gate training, before this correction
    trained: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Tensor:
        return self.keep[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keep)

    def __len__(self) -> int:
        return len(self.keep)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no indices)."""
        return {
            "target": self.target,
            "predicted": self.predicted,
            "measured": self.measured,
            "met": self.met,
            "reason": self.reason,
            "widths": dict(self.widths),
            "trained": dict(self.trained),
            "closed_channels": self.closed_channels,
            "measure_rounds": self.measure_rounds,
        }

    @property
    def closed_channels(self) -> int:
        """Channels the correction closed on top of training (0: training alone met it)."""
        return sum(self.trained.get(n, w) - w for n, w in self.widths.items())


def ladder(group: GateGroup) -> list[int]:
    """Allowed kept-unit counts of a group, ascending: the staircase ``snap_units`` can emit."""
    r = max(1, int(group.round_units))
    floor = -(-int(group.min_units) // r) * r
    steps = list(range(floor, int(group.units), r)) if floor < group.units else []
    return [*steps, int(group.units)]


class _State:
    """Current unit counts per group, their removal order, and the predicted cost."""

    def __init__(self, gates: Gates, groups: Sequence[GateGroup], cost_fn: CostFn) -> None:
        self.groups = {g.name: g for g in groups}
        self.cost_fn = cost_fn
        self.order: dict[str, Tensor] = {}
        self.importance: dict[str, Tensor] = {}
        self.units: dict[str, int] = {}
        self.ladders: dict[str, list[int]] = {}
        self.trained: dict[str, int] = {}
        for n, g in self.groups.items():
            logit = gates.logit(n).detach().float().cpu()
            # highest logit first (stable: ties resolve to the lower index, as Gates does), so
            # the first k of `order` are exactly the trained hard mask when k is the kept count
            order = torch.sort(logit, descending=True, stable=True).indices
            self.order[n] = order
            # softplus: ~logit for confident units, ~0 for units barely open (snapped up);
            # suffix sums with a trailing 0: units at positions a..b-1 weigh S[a] - S[b]
            suffix = torch.cumsum(F.softplus(logit[order].double()).flip(0), 0).flip(0)
            self.importance[n] = torch.cat([suffix, suffix.new_zeros(1)])
            k = len(gates.kept_units(n))
            self.trained[n] = k
            # the trained width is the ceiling: nothing training closed comes back
            self.ladders[n] = [v for v in ladder(g) if v < k] + [k]
            self.units[n] = k
        self.cost = self.predict(self.units)

    def widths(self, units: Mapping[str, int]) -> dict[str, int]:
        return {n: units[n] * int(self.groups[n].unit_width) for n in self.groups}

    def predict(self, units: Mapping[str, int]) -> float:
        return float(self.cost_fn({n: float(w) for n, w in self.widths(units).items()}))

    def with_units(self, name: str, k: int) -> float:
        return self.predict({**self.units, name: k})

    def lost(self, name: str, k_new: int) -> float:
        """Importance of the units between the current count and ``k_new`` (cut or regrown)."""
        s = self.importance[name]
        a, b = sorted((self.units[name], k_new))
        return float(s[a] - s[b])

    def keep(self) -> dict[str, Tensor]:
        """Kept channel indices per group (ascending): the top ``units`` logits of each."""
        out: dict[str, Tensor] = {}
        for n, g in self.groups.items():
            units = self.order[n][: self.units[n]].sort().values
            w = int(g.unit_width)
            out[n] = units if w == 1 else (units[:, None] * w + torch.arange(w)).reshape(-1)
        return out


def _cut_candidates(st: _State, banned: set[str]) -> Iterator[tuple[float, str, int, float]]:
    """(score, group, new units, new cost) of the first width per group where the cost drops."""
    for n, lad in st.ladders.items():
        if n in banned:
            continue
        i = lad.index(st.units[n])
        for s in range(1, _LOOKAHEAD + 1):
            if i - s < 0:
                break
            k_new = lad[i - s]
            c = st.with_units(n, k_new)
            drop = st.cost - c
            if drop > 1e-12 * max(1.0, abs(st.cost)):
                yield drop / (st.lost(n, k_new) + 1e-6), n, k_new, c
                break


def _cut_to(
    st: _State, goal: float, banned: AbstractSet[str] = frozenset(), at_least_one: bool = False
) -> list[tuple[str, int]]:
    """Greedy cuts until the predicted cost is <= goal; returns the (group, old units) undo log.

    Each round: if some candidate alone reaches the goal, the one losing the least importance;
    otherwise the one losing the least importance per cost saved.
    """
    undo: list[tuple[str, int]] = []
    while st.cost > goal or (at_least_one and not undo):
        candidates = list(_cut_candidates(st, set(banned)))
        if not candidates:
            break
        sufficient = [c for c in candidates if c[3] <= goal]
        if sufficient:
            _, n, k_new, c = min(sufficient, key=lambda t: (st.lost(t[1], t[2]), t[3]))
        else:
            _, n, k_new, c = max(candidates)
        undo.append((n, st.units[n]))
        st.units[n], st.cost = k_new, c
    return undo


def _grow(st: _State, target: float, plateau_tol: float, fill: bool) -> None:
    """Staircase rule, then optional slack filling; never above target."""
    # 1. equal cost -> keep the widest: grow while the predicted cost does not increase
    for n, lad in st.ladders.items():
        i = lad.index(st.units[n])
        ceiling = min(target, st.cost + plateau_tol * abs(st.cost))  # tolerance not compounded
        while i + 1 < len(lad):
            c = st.with_units(n, lad[i + 1])
            if c > ceiling:
                break
            i += 1
            st.units[n], st.cost = lad[i], c
    if not fill:
        return
    # 2. spend slack: add the step with the most importance per cost increase that still fits
    while True:
        best: tuple[float, str, int, float] | None = None
        for n, lad in st.ladders.items():
            i = lad.index(st.units[n])
            if i + 1 >= len(lad):
                continue
            k_new = lad[i + 1]
            c = st.with_units(n, k_new)
            if c > target:
                continue
            gain = st.lost(n, k_new)
            score = gain / max(c - st.cost, 1e-12 * max(1.0, abs(st.cost)))
            if best is None or score > best[0]:
                best = (score, n, k_new, c)
        if best is None:
            return
        _, n, k_new, c = best
        st.units[n], st.cost = k_new, c


def gated_like(gates: Gates, keep: Mapping[str, Tensor]) -> Gates:
    """A copy of ``gates`` whose hard mask keeps exactly ``keep`` (group -> channel indices).

    Kept units get logits >= +margin, the others <= -margin; the trained logits in ``gates``
    are untouched. Used to evaluate the hard-gated model after the budget correction.
    """
    out = copy.deepcopy(gates)
    with torch.no_grad():
        for n, g in out.groups.items():
            p = out.logit(n)
            mask = torch.zeros(g.units, dtype=torch.bool, device=p.device)
            units = keep[n].to(p.device).div(g.unit_width, rounding_mode="floor")
            mask[units] = True
            p.copy_(torch.where(mask, p.clamp_min(_MARGIN), p.clamp_max(-_MARGIN)))
    for n in out.groups:  # the one definition of kept must agree with the keep set
        if not torch.equal(out.kept_channels(n).cpu(), keep[n].cpu()):
            raise RuntimeError(f"group {n}: the keep set is not a width the gates can express")
    return out


def _as_cost_fn(cost_model: CostModel | CostFn) -> CostFn:
    if isinstance(cost_model, CostModel):
        return cost_model.cost
    return cost_model


def fit_to_budget(
    gates: Gates,
    cost_fn: CostModel | CostFn,
    target_value: float,
    measure: Measure | None = None,
    *,
    groups: Sequence[GateGroup] | None = None,
    max_rounds: int = 8,
    fill: bool = True,
    plateau_tol: float | None = None,
    margin: float | None = None,
) -> BudgetResult:
    """Fit kept widths under ``target_value`` (in the cost's unit); returns the keep.

    ``gates``: ``core.gates.Gates`` (its hard mask is the starting point and the ceiling, its
    logits the removal order; it is not modified; ``groups`` defaults to ``gates.groups``).
    ``cost_fn``: a CostModel (its ``metric`` picks the defaults below) or a plain
    ``widths -> cost`` function (treated as an analytic cost). ``measure(keep) -> ms`` enables
    the measured loop of at most ``max_rounds`` re-measurements. ``fill`` spends slack under the
    target re-opening the most important units this correction closed. ``plateau_tol`` is the
    relative cost increase still counted as "equal" by the staircase rule (default 0.5% for
    latency — timing noise — and 0 otherwise). ``margin``: the fit aims this fraction under the
    target (default 2% for latency, so that the independent final measurement of the job also
    lands under it; 0 otherwise); ``met`` is judged against the target itself. The returned
    BudgetResult is a
    Mapping group -> kept channel indices with ``met``/``reason``/costs and the ``trained``
    widths; ``gated_like(gates, result)`` expresses it as gates.
    """
    groups = list(groups) if groups is not None else list(gates.groups.values())
    # The metric sets the defaults below; a bare function counts as an analytic cost.
    metric = cost_fn.metric if isinstance(cost_fn, CostModel) else ""
    if plateau_tol is None:
        plateau_tol = 0.005 if metric == "latency" else 0.0
    if margin is None:
        margin = 0.02 if metric == "latency" else 0.0
    target = float(target_value)
    aim = target * (1.0 - margin)
    with torch.no_grad():
        st = _State(gates, groups, _as_cost_fn(cost_fn))
        history: list[dict[str, Any]] = [{"stage": "gates", "predicted": st.cost}]
        _cut_to(st, aim)
        _grow(st, aim, plateau_tol, fill)
        history.append({"stage": "fitted", "predicted": st.cost})

        measured: float | None = None
        rounds = 0
        reason: str | None = None
        if st.cost > target:
            reason = (
                f"target {target:.6g} is below the smallest reachable predicted cost "
                f"{st.cost:.6g} (no narrower width of any group lowers it)"
            )
        if measure is not None:
            keep = st.keep()
            measured = float(measure(keep))
            history.append({"stage": "measured", "predicted": st.cost, "measured": measured})
            banned: set[str] = set()
            while measured > aim and rounds < max_rounds:
                rounds += 1
                # the prediction is off by measured/predicted here; aim the prediction lower by that
                goal = st.cost * aim / measured
                undo = _cut_to(st, goal, banned, at_least_one=True)
                if not undo:
                    if banned:  # every useful group was banned: give them another chance
                        banned.clear()
                        continue
                    reason = (
                        f"measured {measured:.4g} ms is over the target {target:.4g} ms and "
                        f"no narrower width of any group lowers the predicted latency"
                    )
                    break
                keep = st.keep()
                m = float(measure(keep))
                history.append({"stage": "measured", "predicted": st.cost, "measured": m})
                if m >= measured and len(banned) + 1 < len(st.groups):
                    # this cut did not make the model faster: undo it, try other groups first
                    for n, k in reversed(undo):
                        st.units[n] = k
                    st.cost = st.predict(st.units)
                    banned.update(n for n, _ in undo)
                    continue
                measured = m
            if measured > target and reason is None:
                reason = (
                    f"measured {measured:.4g} ms is still over the target {target:.4g} ms "
                    f"after {rounds} re-measured rounds"
                )
            elif measured <= target:
                reason = None
    keep = st.keep()
    final = measured if measured is not None else st.cost
    met = final <= target
    if met:
        reason = None
    else:
        if reason is None:
            reason = f"cost {final:.6g} over the target {target:.6g}"
        # What the user can ask for instead: the narrowest model the cost model knows of.
        floor = cost_floor(groups, cost_fn)
        unit = " ms" if metric == "latency" else ""
        reason += f"; with every group at its minimum width it is predicted at {floor:.4g}{unit}"
    return BudgetResult(
        keep=keep,
        widths=st.widths(st.units),
        target=target,
        predicted=st.cost,
        measured=measured,
        met=met,
        reason=reason,
        measure_rounds=rounds,
        history=history,
        trained=st.widths(st.trained),
    )


def cost_floor(groups: Sequence[GateGroup], cost_model: CostModel | CostFn) -> float:
    """Predicted cost with every group at its minimum width (the lowest reachable target)."""
    fn = _as_cost_fn(cost_model)
    with torch.no_grad():
        return float(fn({g.name: float(ladder(g)[0] * int(g.unit_width)) for g in groups}))


__all__ = ["BudgetResult", "cost_floor", "fit_to_budget", "gated_like", "ladder"]
