"""Baseline compression methods through the same pipeline as gate training (recipe `method`).

Each method picks the kept channels of every coupling group for the cost target and returns them
as `Gates` whose hard mask is that choice (kept units positive, removed ones negative, ordered by
the method's importance score), so export, fine-tune, evaluation, report and artifacts are the
ones `gates` uses and a user can compare methods on the same inputs:

* `l1` — L1-norm magnitude of each coupling group's filters (every conv/linear whose output
  channels the group decides), normalised by the group's mean so groups of different fan-in
  compare, and one global threshold (with the per-layer floors) lowered until the target holds;
* `uniform` — one width multiplier for every group (the largest that meets the target, widths
  snapped and floored), keeping each group's highest-L1 units;
* `slimming` — network slimming: `train.steps` steps of training the weights with an L1
  penalty on the BN scales of the gated norms (the job's loss plus `SLIMMING_L1` x sum |gamma|),
  then one global threshold on |gamma| (no per-group normalisation) with the per-layer floors,
  lowered until the target holds. The slimmed weights are what export cuts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from hawada.core.budget import gated_like
from hawada.core.data import DataBundle
from hawada.core.errors import JobCancelled
from hawada.core.gates import GateGroup, Gates, snap_units
from hawada.core.layers import CostModel
from hawada.core.recipe import Recipe
from hawada.core.train import (
    HistoryRow,
    StepCallback,
    StopCheck,
    TeacherCache,
    cosine_lr,
    distill_objective,
    indexed_batches,
    log_step,
    teacher_logits,
)

#: Weight of sum |gamma| in slimming's sparsity training (Liu et al. 2017 use 1e-4 to 1e-5).
SLIMMING_L1 = 1e-4
_BISECT_ROUNDS = 40


def l1_scores(model: nn.Module, gates: Gates) -> dict[str, Tensor]:
    """Per unit: the L1 norm of every conv/linear filter producing the group's channels."""
    out: dict[str, Tensor] = {}
    for name, g in gates.groups.items():
        score = torch.zeros(g.channels)
        for mod_name in g.covers or g.modules:
            mod = model.get_submodule(mod_name)
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.weight.shape[0] == g.channels:
                score += mod.weight.detach().abs().flatten(1).sum(1).float().cpu()
        out[name] = score.view(g.units, g.unit_width).sum(1)
    return out


def bn_scores(model: nn.Module, gates: Gates) -> dict[str, Tensor]:
    """Per unit: mean |gamma| over the group's gated norm layers (not normalised per group)."""
    out: dict[str, Tensor] = {}
    for name, g in gates.groups.items():
        score, count = torch.zeros(g.channels), 0
        for mod_name in g.modules:
            weight = getattr(model.get_submodule(mod_name), "weight", None)
            if isinstance(weight, Tensor) and weight.numel() == g.channels:
                score += weight.detach().abs().float().cpu()
                count += 1
        out[name] = score.view(g.units, g.unit_width).sum(1) / max(1, count)
    return out


def _gates_from_scores(gates: Gates, scores: Mapping[str, Tensor]) -> Gates:
    """Gates whose logits are `scores` (all positive: every unit open, ranked by score)."""
    out = Gates(list(gates.groups.values())).to(next(iter(gates.parameters())).device)
    with torch.no_grad():
        for n in out.groups:
            s = scores[n].to(out.logit(n).device)
            out.logit(n).copy_(s.clamp_min(1e-12))
    return out


def _keep_top(
    groups: Mapping[str, GateGroup], scores: Mapping[str, Tensor], units: Mapping[str, int]
) -> dict[str, Tensor]:
    keep: dict[str, Tensor] = {}
    for n, g in groups.items():
        top = torch.sort(scores[n], descending=True, stable=True).indices[: units[n]].sort().values
        w = g.unit_width
        keep[n] = top if w == 1 else (top[:, None] * w + torch.arange(w)).reshape(-1)
    return keep


def _cost_of(cost: CostModel, groups: Mapping[str, GateGroup], units: Mapping[str, int]) -> float:
    return float(cost.cost({n: float(units[n] * g.unit_width) for n, g in groups.items()}))


def _largest_fitting(
    units_at: Callable[[float], dict[str, int]],
    cost: CostModel,
    groups: Mapping[str, GateGroup],
    target: float,
) -> dict[str, int]:
    """Bisect a monotone knob x in [0, 1] (0 = floors, 1 = full) for the widest that fits."""
    lo, hi = 0.0, 1.0
    if _cost_of(cost, groups, units_at(hi)) <= target:
        return units_at(hi)
    for _ in range(_BISECT_ROUNDS):
        mid = 0.5 * (lo + hi)
        if _cost_of(cost, groups, units_at(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return units_at(lo)


def select_l1(model: nn.Module, gates: Gates, cost: CostModel, target: float) -> Gates:
    """`l1`: one global threshold on the L1 scores normalised by each group's mean."""
    scores = {n: s / s.mean().clamp_min(1e-12) for n, s in l1_scores(model, gates).items()}
    return select_threshold(gates, scores, cost, target)


def select_uniform(model: nn.Module, gates: Gates, cost: CostModel, target: float) -> Gates:
    """`uniform`: one width multiplier for every group, highest-L1 units kept."""
    groups = gates.groups

    def units_at(m: float) -> dict[str, int]:
        return {n: snap_units(math.floor(m * g.units + 0.5), g) for n, g in groups.items()}

    units = _largest_fitting(units_at, cost, groups, target)
    scores = l1_scores(model, gates)
    return gated_like(_gates_from_scores(gates, scores), _keep_top(groups, scores, units))


def select_threshold(
    gates: Gates, scores: Mapping[str, Tensor], cost: CostModel, target: float
) -> Gates:
    """One global threshold on `scores` (floored, snapped per group), lowered until it fits."""
    groups = gates.groups
    values = torch.cat([s.flatten() for s in scores.values()]).sort().values

    def units_at(x: float) -> dict[str, int]:
        # x = 1 keeps everything; x = 0 keeps only what is above the largest score (the floors)
        t = float(values[min(len(values) - 1, int((1.0 - x) * len(values)))]) if x < 1 else -1.0
        return {
            n: snap_units(int((scores[n] >= t).sum()) if x > 0 else 0, g) for n, g in groups.items()
        }

    units = _largest_fitting(units_at, cost, groups, target)
    return gated_like(_gates_from_scores(gates, scores), _keep_top(groups, scores, units))


def slimming_train(
    model: nn.Module,
    gates: Gates,
    teacher: nn.Module,
    data: DataBundle,
    recipe: Recipe,
    *,
    device: torch.device,
    on_step: StepCallback | None = None,
    should_stop: StopCheck | None = None,
    teacher_cache: TeacherCache | None = None,
) -> list[HistoryRow]:
    """Sparsity training of `model`'s weights (the job's loss + SLIMMING_L1 x sum |gamma| of
    the gated norms), `train.steps` steps of SGD at `finetune.lr`; `teacher` is not touched."""
    steps = int(recipe.train.steps)
    lr = float(recipe.finetune.lr)
    alpha, kd_t = float(recipe.train.kd.alpha), float(recipe.train.kd.temperature)
    norms = [
        w
        for g in gates.groups.values()
        for name in g.modules
        if isinstance(w := getattr(model.get_submodule(name), "weight", None), Tensor)
    ]
    model.requires_grad_(True)
    model.train()
    teacher.eval()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    batches = indexed_batches(data, recipe.data.batch_size, recipe.data.seed, device, teacher_cache)
    history: list[HistoryRow] = []
    log_every = recipe.train.log_every
    for step in range(steps):
        if should_stop is not None and should_stop():
            raise JobCancelled(f"cancelled at sparsity-training step {step}")
        cosine_lr(opt, lr, step, steps)
        idx, x, y = next(batches)
        x = x.to(device, non_blocking=True)
        labels = y.to(device, non_blocking=True) if data.labelled else None
        t_logits = teacher_logits(teacher_cache, teacher, idx, x)
        loss, kd, ce = distill_objective(model(x), t_logits, labels, alpha, kd_t)
        l1 = torch.stack([w.abs().sum() for w in norms]).sum()
        total = loss + SLIMMING_L1 * l1
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if (step + 1) % log_every == 0 or step == steps - 1:  # host sync on logging steps only
            log_step(
                history, on_step, step, steps, {"loss": total, "kd": kd, "ce": ce, "bn_l1": l1}
            )
    model.eval().requires_grad_(False)
    return history


__all__ = [
    "SLIMMING_L1",
    "bn_scores",
    "l1_scores",
    "select_l1",
    "select_threshold",
    "select_uniform",
    "slimming_train",
]
