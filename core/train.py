"""Training loops: gate training on a frozen model, fine-tuning after export, plain baselines.

Gate training (`train_gates`) learns only the gate logits. The base model is frozen and in eval
mode, so its BN statistics never move (the student keeps its own, `NormStats`); the teacher is
the same model with gates "off" (no copy), the student the same model with straight-through
gates ("ste"): the forward pass is the hard 0/1-gated model that export produces, gradients flow
through sigmoid(logit / T). Logits start positive, so at step 0 the student *is* the teacher
(KD 0, agreement 100%). The cost is measured on the snapped, floored widths export keeps, and
`BudgetProjection` closes the least important units after any step that leaves it over the
gliding target, so training ends at the target rather than trailing it. The logits learn from
distillation (+ labels); the augmented-Lagrangian penalty on the cost is logged, and reaches
the logits only with `COST_GRADIENT` (off: see there).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from hawada.atomic import atomic_write
from hawada.core.data import Batch, DataBundle, TensorBundle
from hawada.core.errors import JobCancelled
from hawada.core.gates import Gates
from hawada.core.layers import CostModel
from hawada.core.recipe import Recipe

#: One logged step: step, steps, loss, kd, ce and, for gate training, cost_ratio, target,
#: multiplier, temperature (fine-tuning: lr).
HistoryRow = dict[str, float]
StepCallback = Callable[[HistoryRow], None]
StopCheck = Callable[[], bool]


class TrainState(TypedDict):
    """Everything gate training needs to continue exactly where it stopped (a checkpoint)."""

    step: int
    gates: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    multiplier: float
    start_ratio: float | None
    history: list[HistoryRow]
    norm_stats: NotRequired[dict[str, torch.Tensor]]  # the gated student's BN statistics


CheckpointCallback = Callable[[TrainState], None]

# Augmented-Lagrangian controller on the hard (exported) cost ratio.
DUAL_STEP = 0.2  # eta: multiplier += eta * (ratio - target) each step
PENALTY_RHO = 20.0  # rho: the quadratic (proportional) term reacts at once; the multiplier
# only fills in the rest, so it never winds up while gates are in transit
TARGET_WARMUP = 0.6  # the target glides from the initial ratio to target.ratio over this share
INIT_LOGIT = 1.0  # mean initial logit; every logit starts > 0: all gates open, student = teacher
INIT_SPREAD = 0.5  # initial logits span INIT_LOGIT * (1 +- INIT_SPREAD), ordered by |BN gamma|
CHECKPOINT_EVERY_S = 10.0
# Whether the cost penalty's gradient reaches the logits. Off: `BudgetProjection` holds the hard
# cost on the schedule, so the logits learn only from distillation + labels (a Taylor-like
# importance) and the projection closes the least important. With it on, the penalty pushes each
# unit down in proportion to its cost, so the early high-resolution layers of a ResNet-18 cut to
# 0.1 FLOPs ended at the 8-channel floor (held-out 0.839 / 0.8185 after fine-tuning, seeds 0/1);
# off: 0.8585 / 0.859 (bench/RESULTS.md; benchmark-selected). The penalty and its multiplier
# are still computed and logged: they say how far the hard cost is from the schedule.
COST_GRADIENT = False
CHECKPOINT_EVERY_STEPS = 50
RECALIBRATE_BATCHES = 50


#: Teacher-logit caches larger than this are not kept (recomputed every step instead).
TEACHER_CACHE_MAX_BYTES = 512 * 1024**2


class TeacherCache:
    """Teacher logits per training sample, computed once and reused by every later step.

    Valid only when a sample always looks the same (no data augmentation) and the teacher does
    not change (frozen, eval mode): then gate training and fine-tuning, which distil from the
    same model on the same images, need each sample's teacher pass once. Keyed by the sample
    indices `TensorBundle.train_batches_indexed` yields (CPU tensors): which samples are missing
    is known on the host without reading anything back from the device, and only those go
    through the teacher (eval-mode BN makes a sub-batch give the same logits). Memory is
    bounded: `n_samples * num_classes` floats, refused over `max_bytes` (`enabled` is False).
    """

    def __init__(
        self,
        n_samples: int,
        num_classes: int,
        device: torch.device | str,
        max_bytes: int = TEACHER_CACHE_MAX_BYTES,
    ) -> None:
        self.enabled = n_samples * num_classes * 4 <= max_bytes
        self.device = torch.device(device)
        shape = (n_samples, num_classes) if self.enabled else (0, num_classes)
        self.logits = torch.empty(shape, device=self.device)
        self.filled = torch.zeros(shape[0], dtype=torch.bool)  # host side: no device sync
        self.computed = 0  # samples the teacher actually ran on (for tests and benchmarks)
        #: Small facts about the same teacher on the same images (str -> str), stored by `save`.
        self.meta: dict[str, str] = {}

    def __call__(
        self, teacher: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """Teacher logits for the batch `x` whose sample indices are `idx`."""
        if not self.enabled:
            self.computed += len(idx)
            with torch.no_grad():
                return teacher(x)
        missing = (~self.filled[idx]).nonzero().reshape(-1)
        if len(missing):
            with torch.no_grad():
                out = teacher(x if len(missing) == len(idx) else x[missing.to(x.device)])
            self.logits[idx[missing].to(self.device)] = out.to(self.logits.dtype)
            self.filled[idx[missing]] = True
            self.computed += len(missing)
        return self.logits[idx.to(self.device)]

    def number(self, name: str) -> float | None:
        """The number stored as `meta[name]`, or None when absent or unreadable (the caller
        then measures it again)."""
        try:
            return float(self.meta[name])
        except (KeyError, ValueError):
            return None

    def load(self, path: Path, key: str) -> int:
        """Take the logits a `save` with the same `key` stored (an earlier job on the same
        teacher, images and device); returns how many samples that supplied. A missing file,
        another key or another shape supplies none; nothing here raises on a bad cache file.
        The file's `meta` entries join this cache's (its own win)."""
        if not self.enabled or not path.is_file():
            return 0
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key:
                    return 0
                logits, filled = f.get_tensor("logits"), f.get_tensor("filled").bool()
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
            return 0
        if logits.shape != self.logits.shape or filled.shape != self.filled.shape:
            return 0
        self.meta = {**{k: v for k, v in meta.items() if k != "key"}, **self.meta}
        new = filled & ~self.filled
        self.logits[new.nonzero().reshape(-1).to(self.device)] = logits[new].to(self.device)
        self.filled |= new
        return int(new.sum())

    def save(self, path: Path, key: str) -> None:
        """Store the filled logits (and `meta`) under `key`, merged with what the file already
        holds for that key, so jobs that share a teacher and images share its passes."""
        if not self.enabled or not bool(self.filled.any()):
            return
        self.load(path, key)  # merge in rows (and meta) another job stored meanwhile
        tensors = {"logits": self.logits.cpu().contiguous(), "filled": self.filled.to(torch.uint8)}
        metadata = {**self.meta, "key": key}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


IndexedBatch = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]


def indexed_batches(
    data: DataBundle,
    batch_size: int,
    seed: int,
    device: torch.device,
    cache: TeacherCache | None,
) -> Iterator[IndexedBatch]:
    """Training batches as (sample indices or None, x, y): indexed where a teacher cache needs
    them (in-memory data without augmentation), plain otherwise; the same batches either way."""
    if cache is not None and isinstance(data, TensorBundle) and not data.augment:
        yield from data.train_batches_indexed(batch_size, seed, device=device)
        return
    for x, y in data.train_batches(batch_size, seed, device=device):
        yield None, x, y


def teacher_logits(
    cache: TeacherCache | None,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    idx: torch.Tensor | None,
    x: torch.Tensor,
) -> torch.Tensor:
    """The teacher's logits for batch `x`: from the cache when there is one and the batch is
    indexed, else one teacher pass without autograd."""
    if cache is not None and idx is not None:
        return cache(teacher, idx, x)
    with torch.no_grad():
        return teacher(x)


def temperature_at(step: int, steps: int, start: float, end: float) -> float:
    """Geometric anneal: `start` at step 0, `end` at the last step (steps - 1)."""
    if steps <= 1 or start == end:
        return end if steps <= 1 else start
    return float(start * (end / start) ** (step / (steps - 1)))


def target_at(
    step: int, steps: int, target: float, start: float = 1.0, warmup: float = TARGET_WARMUP
) -> float:
    """Target schedule: linear from `start` (the initial cost ratio) to `target` over the first
    `warmup` share of the steps, then constant.

    Asking for the whole cut at step 0 makes the multiplier wind up while the gates are still
    soft; a gliding target lets distillation keep up and the multiplier stay small.
    """
    span = max(1, round(steps * warmup))
    if step >= span or start <= target:
        return target
    return start + (target - start) * step / span


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation: T^2 * KL(teacher || student) on temperature-softened logits."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def distill_objective(
    student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor | None, alpha: float, kd_t: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha * KD + (1 - alpha) * CE; CE only when labels exist. Returns (objective, kd, ce)."""
    kd = kd_loss(student, teacher, kd_t)
    if y is not None and alpha < 1.0:
        ce = F.cross_entropy(student, y)
    else:
        ce = torch.zeros((), device=student.device)
        alpha = 1.0
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


class _WidthReader:
    """Kept channels per group as export will keep them, from all gate logits in one fused pass.

    The value is the snapped, floored count of positive logits (exactly `Gates.hard_unit_mask`'s
    count); the gradient is that of sum(sigmoid(logit / T)) (straight-through). Concatenates
    every group's logits, so the cost does not grow with the number of groups and nothing is
    read back to the host.
    """

    def __init__(self, gates: Gates, device: torch.device) -> None:
        self.gates = gates
        self.names = list(gates.groups)
        groups = [gates.groups[n] for n in self.names]
        sizes = torch.tensor([g.units for g in groups], device=device)
        self.segment = torch.repeat_interleave(torch.arange(len(groups), device=device), sizes)
        self.unit_width = torch.tensor([float(g.unit_width) for g in groups], device=device)
        self.units = torch.tensor([float(g.units) for g in groups], device=device)
        self.step = torch.tensor([float(g.round_units) for g in groups], device=device)
        self.floor = torch.tensor(
            [float(-(-g.min_units // g.round_units) * g.round_units) for g in groups],
            device=device,
        )

    def snap(self, count: torch.Tensor) -> torch.Tensor:
        """`gates.snap_units` for every group at once (float tensors, same tie rules)."""
        # per-group parameters broadcast over any trailing dimensions of `count`
        shape = (-1,) + (1,) * (count.dim() - 1)
        r, units, floor = (t.view(shape) for t in (self.step, self.units, self.floor))
        below = torch.div(count, r, rounding_mode="floor") * r
        up = below + r
        best = torch.where((up <= units) & (up - count <= count - below), up, below)
        best = torch.where(units - count <= (count - best).abs(), units, best)
        return torch.minimum(torch.maximum(best, floor), units)

    def __call__(self, temperature: float) -> dict[str, torch.Tensor]:
        flat = torch.cat([self.gates.logit(n) for n in self.names])
        probs = torch.sigmoid(flat / temperature)
        soft = torch.zeros_like(self.unit_width).index_add(0, self.segment, probs)
        positive = torch.zeros_like(self.unit_width).index_add(
            0, self.segment, (flat.detach() > 0).to(probs.dtype)
        )
        units = self.snap(positive) + (soft - soft.detach())
        return dict(zip(self.names, (units * self.unit_width).unbind(), strict=True))


NORM_MOMENTUM = 0.1  # the student's BN statistics follow its batches like BN's own default


class NormStats:
    """BatchNorm statistics of the gated student, kept apart from the model's own.

    Closing channels changes what every later BatchNorm sees; with the input model's running
    statistics a frozen ResNet-18 cut to 10% FLOPs is at chance, so distillation gets no useful
    signal and the gate-trained model is no better a start for fine-tuning than magnitude
    pruning. The student therefore normalises with its own running mean and variance: they start
    as the model's (so step 0 is still exactly the teacher), and after each step move towards
    the batch statistics of the gated forward pass (an exponential average, `momentum`, like
    BN's own running statistics). The model's buffers, weights and the teacher are untouched:
    `active()` swaps the student's tensors in for the student's forward and records each BN
    input's batch mean and variance (no extra forward pass, no host sync); `installed()` swaps
    them in for evaluation and export, so the exported model carries them.
    """

    def __init__(self, model: nn.Module, momentum: float = NORM_MOMENTUM) -> None:
        self.norms: dict[str, nn.modules.batchnorm._BatchNorm] = {}
        self.mean: dict[str, torch.Tensor] = {}
        self.var: dict[str, torch.Tensor] = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                mean, var = m.running_mean, m.running_var
                if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
                    self.norms[name] = m
                    self.mean[name] = mean.detach().clone()
                    self.var[name] = var.detach().clone()
        self.momentum = momentum
        # The last forward's batch mean and variance per norm: buffers allocated once and
        # rewritten every step; `_recorded` names those the last forward pass wrote.
        self._batch = {n: (self.mean[n].clone(), self.var[n].clone()) for n in self.norms}
        self._recorded: set[str] = set()

    def _record(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        mean, var = self._batch[name]

        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            # BatchNorm's own statistics kernel: with momentum 1 it writes the batch mean and
            # unbiased variance into the buffers (4-5x faster than torch.var_mean over N, H, W
            # on a CPU, where var_mean was 17% of a gate-training step).
            torch.batch_norm_update_stats(inputs[0].detach(), mean, var, 1.0)
            self._recorded.add(name)

        return hook

    @contextmanager
    def installed(self, record: bool = False) -> Iterator[NormStats]:
        """The model normalises with the student's statistics inside the block."""
        saved = {n: (m.running_mean, m.running_var) for n, m in self.norms.items()}
        hooks = []
        try:
            for n, m in self.norms.items():
                m.running_mean, m.running_var = self.mean[n], self.var[n]
                if record:
                    hooks.append(m.register_forward_pre_hook(self._record(n)))
            yield self
        finally:
            for h in hooks:
                h.remove()
            for n, m in self.norms.items():
                m.running_mean, m.running_var = saved[n]

    def active(self) -> Any:
        """`installed()` that also records the batch statistics `update()` then folds in."""
        return self.installed(record=True)

    @torch.no_grad()
    def update(self) -> None:
        """Move the statistics towards those of the last recorded forward pass."""
        for n in self._recorded:
            mean, var = self._batch[n]
            self.mean[n].lerp_(mean, self.momentum)
            self.var[n].lerp_(var, self.momentum)
        self._recorded.clear()

    def state(self) -> dict[str, torch.Tensor]:
        """CPU copies for a checkpoint (`load` restores them)."""
        out = {f"{n}.running_mean": t.detach().cpu() for n, t in self.mean.items()}
        out.update({f"{n}.running_var": t.detach().cpu() for n, t in self.var.items()})
        return out

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n in self.norms:
                self.mean[n].copy_(tensors[f"{n}.running_mean"])
                self.var[n].copy_(tensors[f"{n}.running_var"])


class BudgetProjection:
    """Keeps the hard (exported) cost on the target schedule: after each optimiser step, while
    the snapped widths cost more than the scheduled target, narrow groups by one step of their
    staircase, least important first (least mean softplus(logit) of the units it closes).

    The Lagrangian penalty alone trails a steep schedule (closing a unit takes many steps of
    normalised SGD, and the cosine learning rate shrinks as the cut deepens: a 0.1 FLOPs target
    ended training at 0.245). The projection makes the trained gates meet the schedule each
    step, so the final budget correction has at most the rest of one round left. Each round
    lowers chosen groups to their next snapped width (closing exactly the units that takes,
    their least important open ones; never below the floor) until the summed savings, each
    measured with the other groups as they are, cover the excess; `rounds` rounds per step.
    It only closes (a logit becomes at most -`closed`, as far below zero as the initial logits
    spread, so noise alone does not re-open it); distillation may re-open a unit later, and a
    later projection then closes the least important.
    Vectorised over all groups on the device: no host sync.
    """

    def __init__(
        self,
        reader: _WidthReader,
        cost_model: CostModel,
        baseline: torch.Tensor,
        margin: float = 1e-3,
        closed: float = INIT_LOGIT * INIT_SPREAD,
        rounds: int = 4,
    ) -> None:
        self.reader = reader
        self.cost_model = cost_model
        self.baseline = baseline
        self.margin = margin
        self.closed = closed
        self.rounds = rounds
        self.sizes = [reader.gates.groups[n].units for n in reader.names]  # host ints
        sizes = reader.units.long()
        self.start = torch.cumsum(sizes, 0) - sizes  # first flat index of each group
        self.position = torch.arange(int(sum(self.sizes)), device=sizes.device)
        # candidate counts below the current one: the next staircase step is within 2 * round
        depth = 2 * max(int(reader.gates.groups[n].round_units) for n in reader.names) + 1
        self.below = torch.arange(1, depth + 1, device=sizes.device, dtype=reader.units.dtype)

    def _cost_and_savings(
        self, kept: torch.Tensor, lower: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cost at the `kept` units per group (snapped), and per group what lowering it to
        `lower` saves, the others as they are: exactly (one `cost_rows` call), or, where more,
        that step's share of what going down to its floor saves. A measured latency table is
        not monotone everywhere (a 64-channel conv can time slower at 56); with the share, a
        group whose next step is such a bump still closes when going lower pays, where the
        tangent (the earlier d cost / d unit) left it open for good: a 0.25 latency target
        stalled at 0.43 on a CPU's table. For FLOPs and parameters (linear in one group's
        width) both equal the tangent's saving."""
        r = self.reader
        eye = torch.eye(len(self.sizes), dtype=torch.bool, device=kept.device)
        floor = torch.minimum(r.floor, kept)
        rows = torch.cat(
            [kept[None], torch.where(eye, lower[None], kept), torch.where(eye, floor[None], kept)]
        )
        costs = self.cost_model.cost_rows(r.names, rows * r.unit_width)
        cost = costs[0]
        step, to_floor = (cost - costs[1:]).split(len(self.sizes))
        share = to_floor * (kept - lower) / (kept - floor).clamp_min(1.0)
        return cost, torch.maximum(step, share)

    def _flat(self) -> torch.Tensor:
        """Every group's logits, concatenated in the reader's order (detached)."""
        return torch.cat([self.reader.gates.logit(n).detach() for n in self.reader.names])

    def _write(self, flat: torch.Tensor) -> None:
        """Inverse of `_flat`: copy the concatenated logits back into each group."""
        for name, part in zip(self.reader.names, flat.split(self.sizes), strict=True):
            self.reader.gates.logit(name).copy_(part)

    @torch.no_grad()
    def open_units(self) -> torch.Tensor:
        """Which units are open now (flat, all groups): pass it to the call after the step."""
        return self._flat() > 0

    @torch.no_grad()
    def __call__(self, target_ratio: float, was_open: torch.Tensor | None = None) -> None:
        """Project onto the schedule's `target_ratio`. `was_open` (from `open_units()` before
        the optimiser step): those units stay open (logit at least `margin`) unless this
        projection closes them, so only the projection closes; the optimiser only reorders,
        and re-opens what distillation wants back."""
        r = self.reader
        flat = self._flat()
        if was_open is not None:
            flat = torch.where(was_open, flat.clamp_min(self.margin), flat)
        goal = target_ratio * (1.0 + 1e-5) * self.baseline  # equal in float32 is not over
        for _ in range(self.rounds):  # on `flat` in memory; written back once at the end
            is_open = flat > 0
            n_open = torch.zeros_like(r.units).index_add(0, r.segment, is_open.to(r.units.dtype))
            kept = r.snap(n_open)
            # The largest open count below the current one whose snapped width is narrower:
            # closing n_open - that count units lowers the group one staircase step.
            counts = (n_open[:, None] - self.below[None, :]).clamp_min(0.0)
            lower = r.snap(counts)
            steps_down = lower < kept[:, None]
            can = steps_down.any(1)
            first = torch.argmax(steps_down.to(torch.int8), 1)
            close_n = torch.where(can, self.below[first], 0.0)
            new_kept = torch.where(can, lower.gather(1, first[:, None]).squeeze(1), kept)
            cost, saving = self._cost_and_savings(kept, new_kept)
            excess = (cost - goal).clamp_min(0.0)
            saving = torch.where(can, saving, 0.0).clamp_min(0.0)
            # Units in (group, ascending logit) order: a group's closed units first, then its
            # open ones from the least important: the lowest `close_n` open ones would close.
            by_logit = torch.argsort(flat, stable=True)
            order = by_logit[torch.argsort(r.segment[by_logit], stable=True)]
            seg = r.segment[order]
            open_rank = self.position - self.start[seg] - (r.units - n_open)[seg]
            would = (open_rank >= 0) & (open_rank < close_n[seg])
            lost = torch.zeros_like(r.units).index_add(
                0, seg, torch.where(would, F.softplus(flat[order]), 0.0)
            )
            usable = can & (saving > 0)
            # Least mean importance per unit closed first, not per cost saved: per cost saved,
            # the cost penalty's own bias (the early, high-resolution layers save the most per
            # channel) is counted twice and a 0.1 FLOPs ResNet-18 had layer1 and layer2 at the
            # 8-channel floor and layer4 at 65% (held-out 0.82 after fine-tuning, uniform
            # widths 0.88). With COST_GRADIENT off the logits carry no cost at all; the
            # greedy's cumulative saving below still decides how many steps a round takes.
            score = torch.where(usable, lost / close_n.clamp_min(1.0), math.inf)
            pick = torch.argsort(score, stable=True)
            saved = torch.cumsum(torch.where(usable[pick], saving[pick], 0.0), 0)
            chosen = torch.zeros_like(usable)
            chosen[pick] = usable[pick] & (saved - saving[pick] < excess)
            close = torch.zeros_like(is_open)
            close[order] = would & chosen[seg]
            flat = torch.where(close, flat.clamp_max(-self.closed), flat)
        self._write(flat)


class NormalizedSGD(torch.optim.Optimizer):
    """SGD whose step is scaled by the root-mean-square of all gradients of the group.

    Straight-through gradients vary by orders of magnitude over training (they scale with the
    multiplier and 1/T); normalising keeps the per-step movement of the logits at about `lr`
    while their *relative* sizes still decide which gates move most (Adam would move every
    logit by ~lr, whatever its gradient). No state, no host sync.
    """

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            total = torch.stack([g.pow(2).sum() for g in grads]).sum()
            count = sum(g.numel() for g in grads)
            scale = group["lr"] / ((total / count).sqrt() + 1e-12)
            for p, g in zip(params, grads, strict=True):
                p.sub_(g * scale)
        return None


def init_gate_logits(
    gates: Gates, model: nn.Module, init_logit: float = INIT_LOGIT, spread: float = INIT_SPREAD
) -> None:
    """Spread the initial logits by channel importance (|BN gamma| summed over the group).

    Equal logits move in lockstep under Adam and would all cross zero at once, so the cost
    would jump from full to empty. Ranked logits cross one by one, least important first,
    which lets the cost glide down to the target; distillation then reorders them.
    """
    with torch.no_grad():
        for name, g in gates.groups.items():
            logit = gates.logit(name)
            score = torch.zeros(g.channels, device=logit.device)
            for mod_name in g.modules:
                weight = getattr(model.get_submodule(mod_name), "weight", None)
                if weight is not None and weight.numel() == g.channels:
                    score += weight.detach().abs().to(score.device)
            units = score.view(g.units, g.unit_width).sum(1)
            rank = torch.empty_like(units)
            rank[torch.argsort(units, stable=True)] = torch.linspace(
                -1.0, 1.0, g.units, device=units.device
            )
            logit.copy_(init_logit * (1.0 + spread * rank))


def _move_optimizer_state(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """After `load_state_dict` Adam state sits wherever it was saved; bring it to `device`."""
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                st[k] = v.to(device)


def train_gates(
    model: nn.Module,
    gates: Gates,
    cost_model: CostModel,
    data: DataBundle,
    recipe: Recipe,
    *,
    device: torch.device | str,
    on_step: StepCallback | None = None,
    should_stop: StopCheck | None = None,
    start_step: int = 0,
    state: TrainState | None = None,
    target_ratio: float | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
    checkpoint_every_steps: int = CHECKPOINT_EVERY_STEPS,
    teacher_cache: TeacherCache | None = None,
    norm_stats: NormStats | None = None,
) -> list[dict[str, float]]:
    """Train the gate logits of `gates` (already attached to `model`) towards the cost target.

    Only `gates` change: `model` is frozen and kept in eval mode; the student normalises with
    its own BN statistics (`NormStats`), the model's buffers and the teacher do not change. A
    fresh run (no `state`) first sets the logits with `init_gate_logits` (all positive, ranked
    by BN scale), so step 0 is the teacher. The student's forward pass and the
    penalty use the hard widths export keeps (straight-through gates); the learning rate of the
    normalised SGD follows a cosine to zero so the widths settle, and `BudgetProjection` keeps
    the hard cost on the gliding target after every step. `target_ratio` defaults to
    `recipe.target.ratio` (the pipeline passes it for absolute latency targets). `state` (from a
    checkpoint: gates state dict, multiplier, optimizer state, history) resumes at `start_step`.
    `on_checkpoint(state)` receives such a state every `checkpoint_every_s` seconds or
    `checkpoint_every_steps` steps. Returns history rows (every `train.log_every` steps + last);
    `on_step` receives the same rows (values are read back from the device only then).
    `teacher_cache` (no augmentation only) serves the teacher's logits per sample.
    `norm_stats` (made here when not given) holds the student's BN statistics, which the
    caller installs to evaluate and export what was trained (see `NormStats`).
    Raises `JobCancelled` as soon as `should_stop()` turns true.
    """
    device = torch.device(device)
    tr = recipe.train
    steps = int(tr.steps)
    log_every = tr.log_every
    alpha = float(tr.kd.alpha)
    kd_t = float(tr.kd.temperature)
    t_start = float(recipe.gates.temperature.start)
    t_end = float(recipe.gates.temperature.end)
    if target_ratio is None:
        if recipe.target.ratio is None:
            raise ValueError("a latency_ms target needs target_ratio (the pipeline converts it)")
        target_ratio = recipe.target.ratio
    target = float(target_ratio)

    model.requires_grad_(False)
    model.eval()
    gates.requires_grad_(True)
    opt = NormalizedSGD(gates.parameters(), lr=float(tr.lr))
    history: list[dict[str, float]] = []
    multiplier = torch.zeros((), device=device)
    norms = norm_stats if norm_stats is not None else NormStats(model)
    if state is None:
        init_gate_logits(gates, model)
    else:
        gates.load_state_dict(state["gates"])
        opt.load_state_dict(state["optimizer"])
        _move_optimizer_state(opt, device)
        multiplier.fill_(float(state["multiplier"]))
        history = [dict(r) for r in state["history"]]
        if "norm_stats" in state:
            norms.load(state["norm_stats"])
    start_ratio = None if state is None else state["start_ratio"]

    labelled = data.labelled  # synthetic labels are noise: KD only
    widths_of = _WidthReader(gates, device)
    penalty_scale = math.sqrt(float(sum(g.units for g in gates.groups.values())))
    baseline = torch.as_tensor(cost_model.baseline(), dtype=torch.float32, device=device)
    project = BudgetProjection(widths_of, cost_model, baseline)
    batches = indexed_batches(data, recipe.data.batch_size, recipe.data.seed, device, teacher_cache)
    # A resumed run sees the batches the interrupted one would have seen: exact continuation.
    batches = itertools.islice(batches, start_step, None)
    last_ckpt = time.monotonic()

    def teacher_fn(inputs: torch.Tensor) -> torch.Tensor:
        with gates.using("off"):  # the same frozen model, ungated: the teacher, bit for bit
            out: torch.Tensor = model(inputs)
        return out

    def snapshot(step_done: int) -> TrainState:
        return {
            "step": step_done,
            "gates": {k: v.detach().cpu() for k, v in gates.state_dict().items()},
            "optimizer": opt.state_dict(),
            "multiplier": float(multiplier.item()),
            "start_ratio": start_ratio,
            "history": list(history),
            "norm_stats": norms.state(),
        }

    for step in range(start_step, steps):
        if should_stop is not None and should_stop():
            raise JobCancelled(f"cancelled at gate-training step {step}")
        temperature = temperature_at(step, steps, t_start, t_end)
        gates.temperature = temperature
        cosine_lr(opt, float(tr.lr), step, steps)
        idx, x, y = next(batches)
        x = x.to(device, non_blocking=True)
        labels = y.to(device, non_blocking=True) if labelled else None

        teacher = teacher_logits(teacher_cache, teacher_fn, idx, x)
        with gates.using("ste"), norms.active():
            student = model(x)
            ratio = (cost_model.cost(widths_of(temperature)) / baseline).float()
        if start_ratio is None:
            start_ratio = float(ratio.item())  # once per run: where the target schedule starts
        tgt = target_at(step, steps, target, start_ratio)
        objective, kd, ce = distill_objective(student, teacher, labels, alpha, kd_t)
        gap = (ratio if COST_GRADIENT else ratio.detach()) - tgt
        # Augmented Lagrangian; the multiplier is a constant within the step. The sqrt(units)
        # scale gives the penalty's gradient (over all logits) a norm of order one, like the
        # KD gradient's, whatever the model size, so one eta/rho fits ResNet-18 and -152.
        # By default (COST_GRADIENT off) it is only logged; the projection enforces the cost.
        loss = objective + penalty_scale * (multiplier * gap + 0.5 * PENALTY_RHO * gap * gap)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        was_open = project.open_units()
        opt.step()
        with torch.no_grad():
            multiplier += DUAL_STEP * gap.detach()
        norms.update()
        # Only the projection closes: normalised SGD moves every logit by about lr, so tiny
        # distillation gradients would otherwise walk logits across zero at random.
        project(target_at(step + 1, steps, target, start_ratio), was_open)

        last = step == steps - 1
        if (step + 1) % log_every == 0 or last:
            # The only host sync, on logging steps only: all logged scalars in one transfer.
            values: dict[str, torch.Tensor | float] = {
                "loss": loss,
                "kd": kd,
                "ce": ce,
                "cost_ratio": ratio,
                "target": tgt,
                "multiplier": multiplier,
                "temperature": temperature,
            }
            log_step(history, on_step, step, steps, values)
        if on_checkpoint is not None and not last:
            now = time.monotonic()
            if (step + 1) % checkpoint_every_steps == 0 or now - last_ckpt >= checkpoint_every_s:
                on_checkpoint(snapshot(step + 1))
                last_ckpt = now
    return history


def cosine_lr(
    opt: torch.optim.Optimizer, base_lr: float, step: int, steps: int, warmup: int = 0
) -> None:
    """Set the learning rate for `step` of `steps`: linear warm-up, then cosine to zero."""
    if step < warmup:
        lr = base_lr * (step + 1) / warmup
    else:
        lr = 0.5 * base_lr * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    for group in opt.param_groups:
        group["lr"] = lr


def _steps_for_epochs(data: DataBundle, batch_size: int, epochs: float) -> int:
    """Optimiser steps in `epochs` (may be fractional) passes over the train split; at least 1."""
    return max(1, math.ceil(epochs * data.n_train / batch_size))


def log_step(
    history: list[HistoryRow],
    on_step: StepCallback | None,
    step: int,
    steps: int,
    values: Mapping[str, torch.Tensor | float],
) -> None:
    """Append the row of (0-based) logging step `step` to `history` and pass it to `on_step`.

    The row is ``{"step": step + 1, "steps": steps, **values}`` in that order, with every
    tensor value read back in one transfer: the step's only host sync (call it on logging
    steps only).
    """
    tensors = [v.detach() for v in values.values() if isinstance(v, torch.Tensor)]
    host = iter(torch.stack(tensors).tolist())
    row: HistoryRow = {"step": step + 1, "steps": steps}
    row.update({k: next(host) if isinstance(v, torch.Tensor) else v for k, v in values.items()})
    history.append(row)
    if on_step is not None:
        on_step(row)


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    data: DataBundle,
    recipe: Recipe,
    *,
    device: torch.device | str,
    on_step: StepCallback | None = None,
    should_stop: StopCheck | None = None,
    teacher_cache: TeacherCache | None = None,
) -> list[dict[str, float]]:
    """Fine-tune the pruned `student`'s weights with KD from the unpruned `teacher` (+ CE).

    SGD with momentum, cosine learning rate from `finetune.lr` over `finetune.epochs` epochs
    (fractional allowed); BN statistics are recalibrated afterwards when the recipe asks.
    The teacher runs in eval mode without autograd and is not modified; `teacher_cache` (no
    augmentation only) serves its logits per sample. Returns history rows.
    """
    device = torch.device(device)
    ft = recipe.finetune
    bs = int(recipe.data.batch_size)
    steps = _steps_for_epochs(data, bs, float(ft.epochs))
    log_every = recipe.train.log_every
    alpha = float(recipe.train.kd.alpha)
    kd_t = float(recipe.train.kd.temperature)
    labelled = data.labelled
    teacher_was_training = teacher.training
    teacher.eval()
    student.requires_grad_(True)
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=float(ft.lr), momentum=0.9, nesterov=True)
    # not training's order
    batches = indexed_batches(data, bs, recipe.data.seed + 7919, device, teacher_cache)
    history: list[dict[str, float]] = []
    try:
        for step in range(steps):
            if should_stop is not None and should_stop():
                raise JobCancelled(f"cancelled at fine-tune step {step}")
            cosine_lr(opt, float(ft.lr), step, steps)
            idx, x, y = next(batches)
            x = x.to(device, non_blocking=True)
            labels = y.to(device, non_blocking=True) if labelled else None
            t_logits = teacher_logits(teacher_cache, teacher, idx, x)
            loss, kd, ce = distill_objective(student(x), t_logits, labels, alpha, kd_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = step == steps - 1
            if (step + 1) % log_every == 0 or last:  # host sync on logging steps only
                lr = opt.param_groups[0]["lr"]
                log_step(
                    history, on_step, step, steps, {"loss": loss, "kd": kd, "ce": ce, "lr": lr}
                )
    finally:
        teacher.train(teacher_was_training)
    if ft.recalibrate_bn:
        recalibrate_bn(
            student,
            data,
            min(RECALIBRATE_BATCHES, _steps_for_epochs(data, bs, 1.0)),
            device=device,
            batch_size=bs,
            seed=recipe.data.seed + 104729,
        )
    student.eval()
    return history


def recalibrate_bn(
    model: nn.Module,
    data: DataBundle,
    batches: int,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> None:
    """Recompute BN running statistics as a plain average over `batches` train batches.

    Fine-tuning leaves running stats as an EMA over weights that kept moving; resetting them and
    averaging (momentum=None) over the final weights matches what eval mode will see.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    saved = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        it = data.train_batches(batch_size, seed, device=device)
        with torch.no_grad():
            for _ in range(batches):
                x, _y = next(it)
                model(x.to(device, non_blocking=True))
    finally:
        for m, mom in zip(norms, saved, strict=True):
            m.momentum = mom
        model.train(was_training)


def train_classifier(
    model: nn.Module,
    data: DataBundle,
    *,
    steps: int,
    lr: float,
    device: torch.device | str,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 5e-4,
    on_step: StepCallback | None = None,
) -> list[dict[str, float]]:
    """Plain supervised training (SGD momentum, cosine lr) used to make baselines.

    Returns history rows every 10 steps and at the end ({step, steps, loss}).
    """
    device = torch.device(device)
    model.to(device).train()
    model.requires_grad_(True)
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    batches: Iterator[Batch] = data.train_batches(batch_size, seed, device=device)
    history: list[dict[str, float]] = []
    for step in range(steps):
        # From scratch full-size first steps blow the loss up: warm up over ~20 steps (5% of
        # long runs, at most a quarter of short ones).
        cosine_lr(opt, lr, step, steps, warmup=min(steps // 4, max(steps // 20, 20)))
        x, y = next(batches)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = step == steps - 1
        if on_step is not None or (step + 1) % 10 == 0 or last:
            row = {"step": step + 1, "steps": steps, "loss": float(loss.item())}
            if (step + 1) % 10 == 0 or last:
                history.append(row)
            if on_step is not None:
                on_step(row)
    model.eval()
    return history
