"""One compression job end to end: the phases of the job lifecycle, artifacts written atomically.

This is where the engine (`hawada.core`) and the model families (`hawada.adapters`) are wired
together. `run_job(ctx)` is what the worker's task calls; `run_local(...)` is `hawada run` (same
code, same artifacts, in this process). Everything a phase needs comes from the recipe and the
context; progress leaves through `ctx.on_event` only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hawada.adapters.torchvision import FamilyAdapter, build_model, get_adapter
from hawada.core import baselines
from hawada.core.budget import BudgetResult, fit_to_budget, gated_like
from hawada.core.cost import make_cost_model
from hawada.core.data import DataBundle, TensorBundle, load_data
from hawada.core.device import device_name, resolve_device
from hawada.core.errors import JobCancelled, JobError
from hawada.core.evaluate import accuracy, count_flops, count_params
from hawada.core.gates import GateGroup, Gates, attach
from hawada.core.latency import measure_latency, measure_latency_interleaved
from hawada.core.layers import CostModel, LayerSpec
from hawada.core.lut import (
    FolderLutCache,
    LatencyTable,
    LutCache,
    get_or_build_lut,
    make_width_measurer,
)
from hawada.core.profile import module_costs
from hawada.core.recipe import Recipe, parse_recipe, recipe_to_dict
from hawada.core.report import build_report, heldout_block, model_block, target_block
from hawada.core.train import (
    INIT_LOGIT,
    HistoryRow,
    NormStats,
    TeacherCache,
    TrainState,
    finetune,
    train_gates,
)
from hawada.core.weights import load_weights
from hawada.lifecycle import PHASES
from hawada.worker.checkpoint import (
    clear_checkpoint,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from hawada.worker.files import write_artifacts, write_json

Event = dict[str, Any]
EventSink = Callable[[Event], None]

# Gate-training checkpoints: every this many seconds or steps, whichever comes first.
CHECKPOINT_EVERY_S = 10.0
CHECKPOINT_EVERY_STEPS = 50


def _ignore(_event: Event) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class JobContext:
    """Everything one job needs from its runner (the worker's task or `hawada run`)."""

    recipe: Recipe
    weights: Path
    out_dir: Path
    dataset: Path | None = None
    device: str = "auto"
    heldout: Path | None = None  # the job's uploaded held-out set (.npz), if any
    on_event: EventSink = field(default=_ignore)
    should_cancel: Callable[[], bool] = field(default=_never)
    checkpoint_dir: Path | None = None
    lut_cache: LutCache | None = None
    # None: `data.path` may name any folder (`hawada run`, a local user); the worker passes the
    # service's HAWADA_DATA_ROOTS so remote recipes cannot read arbitrary worker files.
    data_roots: list[Path] | None = None
    # Bound on what an .npz may declare decompressed (None: core's MAX_DATASET_BYTES, 8 GiB);
    # the worker passes HAWADA_MAX_DATASET_BYTES, the limit uploads get at submission.
    max_dataset_bytes: int | None = None
    # Folder of teacher-logit caches shared by jobs (None: each job computes its own). A cache
    # is used only by a job with the same weights file, recipe model block, images and device.
    teacher_dir: Path | None = None


# ----------------------------------------------------------------------------------- phases


class _Phases:
    """Announces each phase once and times it (seconds land in report["phases"])."""

    def __init__(self, on_event: EventSink) -> None:
        self.on_event = on_event
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        assert name in PHASES, name
        self.on_event({"kind": "phase", "phase": name})
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t0

    def log(self, message: str) -> None:
        self.on_event({"kind": "log", "message": message})


def _progress_emitter(
    ctx: JobContext, phase: str, log_every: int, target_ratio: float | None = None
) -> Callable[[HistoryRow], None]:
    """on_step callback turning train rows into progress events: one every `log_every` steps
    and one at the phase's last step (docs/events.md)."""

    def emit(row: HistoryRow) -> None:
        step, steps = int(row["step"]), int(row["steps"])
        if step % log_every and step != steps:
            return
        ev: Event = {
            "kind": "progress",
            "phase": phase,
            "progress": step / steps,
            "step": step,
            "steps": steps,
            "loss": row.get("loss"),
        }
        for k in ("cost_ratio", "target", "temperature", "multiplier", "lr"):
            if k in row:
                ev[k] = row[k]
        if target_ratio is not None:
            ev["target_ratio"] = target_ratio
        ctx.on_event(ev)

    return emit


def teacher_store(
    folder: Path, weights: Path, recipe: Recipe, data: TensorBundle, device: torch.device
) -> tuple[Path, str]:
    """The file in `folder` and the key a stored teacher-logit cache must match: sha256 of the
    weights file, the model block of the recipe (architecture, classes, stem, normalisation),
    the device type and every stored image and label. Equal keys mean equal teacher logits,
    row for row."""
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    model_block = recipe_to_dict(recipe)["model"]
    digest.update(json.dumps([model_block, device.type], sort_keys=True).encode())
    for t in (data.images, data.labels):
        digest.update(t.contiguous().cpu().numpy().tobytes())
    key = digest.hexdigest()[:32]
    return folder / f"{key}.safetensors", key


def heldout_key(data: TensorBundle) -> str:
    """Meta key of the teacher's accuracy on exactly these held-out rows."""
    rows = data.heldout_idx.to(torch.int64).cpu().numpy().astype("<i8").tobytes()
    return f"heldout_accuracy:{hashlib.sha256(rows).hexdigest()[:16]}"


def _heldout_accuracy(
    model: nn.Module, data: DataBundle, recipe: Recipe, device: torch.device
) -> float | None:
    """Top-1 on the held-out split; None when the labels are noise (synthetic data)."""
    if not data.labelled:
        return None
    return accuracy(model, data.heldout_batches(recipe.data.batch_size, device=device), device)


def _target(recipe: Recipe, baseline: Mapping[str, Any]) -> dict[str, Any]:
    metric = recipe.target.metric
    base_value = {
        "flops": baseline["flops"],
        "params": baseline["params"],
        "latency": baseline["latency_ms"],
    }[metric]
    return target_block(
        metric,
        baseline_value=base_value,
        ratio=recipe.target.ratio,
        latency_ms=recipe.target.latency_ms,
    )


def _layers_rows(gates: Gates, budget: BudgetResult) -> list[dict[str, Any]]:
    """Per coupling group: full width, width at the end of training, exported width and keep."""
    rows = []
    for name, g in gates.groups.items():
        kept = budget[name].tolist()
        rows.append(
            {
                "name": name,
                "modules": list(g.covers or g.modules),
                "before": g.channels,
                "trained": int(budget.trained.get(name, g.channels)),
                "after": len(kept),
                "kept": kept,
            }
        )
    return rows


def _gated_accuracy(
    model: nn.Module, gates: Gates, data: DataBundle, recipe: Recipe, device: torch.device
) -> float | None:
    """Held-out top-1 of `model` with `gates` attached in hard mode (what export produces)."""
    handle = attach(model, gates)
    try:
        with gates.using("hard"):
            return _heldout_accuracy(model, data, recipe, device)
    finally:
        handle.remove()


def _correction_block(
    budget: BudgetResult,
    baseline_cost: float,
    accuracy_before: float | None,
    accuracy_after: float | None,
) -> dict[str, Any]:
    """What the final budget correction changed, and what it cost in held-out accuracy."""
    return {
        "cost_ratio_trained": budget.history[0]["predicted"] / baseline_cost,
        "cost_ratio_after": budget.predicted / baseline_cost,
        "closed_channels": budget.closed_channels,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
    }


def _train(
    ctx: JobContext,
    model: nn.Module,
    gates: Gates,
    cost_model: CostModel,
    data: DataBundle,
    target_ratio: float,
    device: torch.device,
    phase: _Phases,
    teacher_cache: TeacherCache | None,
    norm_stats: NormStats,
) -> list[HistoryRow]:
    """Gate training with checkpoints in `ctx.checkpoint_dir`, resuming from one if present."""
    recipe = ctx.recipe
    start_step, state = 0, None
    job_print = fingerprint(recipe, Path(ctx.weights))
    on_checkpoint: Callable[[TrainState], None] | None = None
    if ctx.checkpoint_dir is not None:
        ckpt_dir = Path(ctx.checkpoint_dir)
        resumed = load_checkpoint(ckpt_dir, job_print)
        if resumed is not None:
            start_step, state = resumed["step"], resumed
            phase.log(f"resuming gate training at step {start_step}")

        def on_checkpoint(snapshot: TrainState) -> None:
            save_checkpoint(ckpt_dir, snapshot, job_print)

    handle = attach(model, gates)
    try:
        return train_gates(
            model,
            gates,
            cost_model,
            data,
            recipe,
            device=device,
            on_step=_progress_emitter(ctx, "training", recipe.train.log_every, target_ratio),
            should_stop=ctx.should_cancel,
            start_step=start_step,
            state=state,
            target_ratio=target_ratio,
            on_checkpoint=on_checkpoint,
            checkpoint_every_s=CHECKPOINT_EVERY_S,
            checkpoint_every_steps=CHECKPOINT_EVERY_STEPS,
            teacher_cache=teacher_cache,
            norm_stats=norm_stats,
        )
    finally:
        handle.remove()  # export and fine-tune see the plain model


def _baseline(
    ctx: JobContext,
    model: nn.Module,
    gates: Gates,
    cost_model: CostModel,
    data: DataBundle,
    target_cost: float,
    device: torch.device,
    teacher_cache: TeacherCache | None,
) -> tuple[nn.Module, Gates, list[HistoryRow]]:
    """A baseline method's keep set as gates: (weights to cut, gates, history)."""
    method = ctx.recipe.method
    if method == "l1":
        return model, baselines.select_l1(model, gates, cost_model, target_cost), []
    if method == "uniform":
        return model, baselines.select_uniform(model, gates, cost_model, target_cost), []
    slim = copy.deepcopy(model)
    history = baselines.slimming_train(
        slim,
        gates,
        model,
        data,
        ctx.recipe,
        device=device,
        on_step=_progress_emitter(ctx, "training", ctx.recipe.train.log_every),
        should_stop=ctx.should_cancel,
        teacher_cache=teacher_cache,
    )
    scores = baselines.bn_scores(slim, gates)
    return slim, baselines.select_threshold(gates, scores, cost_model, target_cost), history


def _latency_table(
    ctx: JobContext,
    adapter: FamilyAdapter,
    model: nn.Module,
    layers: list[LayerSpec],
    groups: list[GateGroup],
    device: torch.device,
) -> LatencyTable:
    """The per-layer latency table for this model on `device` (cached, calibrated)."""
    recipe = ctx.recipe
    input_size = tuple(recipe.model.input_size)
    # Calibrating against whole-model timings makes the table's sum match measurement.
    measurer = make_width_measurer(
        model, adapter.export_pruned, groups, input_size, recipe.latency, device
    )
    key_parts = {
        "arch": recipe.model.arch,
        "input_size": list(input_size),
        "num_classes": recipe.model.num_classes,
        "stem": recipe.model.stem,
    }
    return get_or_build_lut(
        layers,
        recipe.latency,
        device,
        round_to=recipe.gates.round_to,
        cache=ctx.lut_cache,
        key_parts=key_parts,
        calibrate_with=measurer,
    )


def _data_summary(data: DataBundle) -> str:
    held = {"split": "a seeded split", "heldout_path": "data.heldout_path", "upload": "the upload"}
    return (
        f"data: {data.n_train} training / {data.n_heldout} held-out images "
        f"(held-out set: {held.get(data.heldout_source, data.heldout_source)}), "
        f"{data.loader} loader, augmentation {'standard' if data.augment else 'none'}"
    )


def _data_block(recipe: Recipe, data: DataBundle) -> dict[str, Any]:
    block = data.describe()
    block.update(
        {"source": recipe.data.source, "n_train": data.n_train, "n_heldout": data.n_heldout}
    )
    return block


def check_export_formats(recipe: Recipe) -> None:
    """Fail before any training when the recipe asks for an export this worker cannot write."""
    if "onnx" in recipe.export.formats:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise JobError(
                "ONNX export needs the onnx and onnxscript packages, which this worker "
                "does not have; drop 'onnx' from export.formats",
                code="export_unavailable",
            ) from None


# ---------------------------------------------------------------------------------- run_job


def run_job(ctx: JobContext) -> dict[str, Any]:
    """Run every phase for `ctx`, write all artifacts into `ctx.out_dir`, return the report.

    Raises `HawadaError` subclasses (weights, data, arch, export problems) for user-caused
    failures and `JobCancelled` when `ctx.should_cancel()` turns true.
    """
    recipe = ctx.recipe
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(ctx.device)
    lat_device = (
        device if recipe.latency.device == "auto" else resolve_device(recipe.latency.device)
    )
    input_size = tuple(recipe.model.input_size)
    phase = _Phases(ctx.on_event)

    def check_cancel() -> None:
        if ctx.should_cancel():
            raise JobCancelled("cancelled")

    # -- loading
    with phase("loading"):
        check_export_formats(recipe)
        adapter = get_adapter(recipe.model.arch)
        model = build_model(
            recipe.model.arch, num_classes=recipe.model.num_classes, stem=recipe.model.stem
        )
        mapping = load_weights(model, Path(ctx.weights))
        data = load_data(
            recipe,
            upload=ctx.dataset,
            heldout=ctx.heldout,
            allowed_roots=ctx.data_roots,
            max_dataset_bytes=ctx.max_dataset_bytes,
        )
        phase.log(_data_summary(data))
        if data.num_classes > recipe.model.num_classes:
            raise JobError(
                f"the dataset has {data.num_classes} classes but model.num_classes is "
                f"{recipe.model.num_classes}",
                code="bad_dataset",
            )
        model.to(device).eval().requires_grad_(False)
        # Without augmentation the teacher (the frozen input model) sees each in-memory
        # training sample as it is stored, so its logits are computed once per sample for gate
        # training, slimming and fine-tuning alike; augmented or streamed data runs the teacher
        # every step. With `ctx.teacher_dir` the logits persist across jobs on the same
        # weights, images and device (e.g. one model compressed with several methods).
        teacher_cache: TeacherCache | None = None
        store: tuple[Path, str] | None = None
        acc_key = ""  # the teacher's held-out accuracy in the cache's meta
        if isinstance(data, TensorBundle) and not data.augment:
            teacher_cache = TeacherCache(len(data.images), recipe.model.num_classes, device)
            acc_key = heldout_key(data)
            if ctx.teacher_dir is not None:
                folder, weights = Path(ctx.teacher_dir), Path(ctx.weights)
                store = teacher_store(folder, weights, recipe, data, device)
                reused = teacher_cache.load(*store)
                phase.log(f"teacher logits of {reused} training samples reused from earlier jobs")
    check_cancel()

    # -- baseline
    with phase("baseline"):
        # The teacher's held-out accuracy is one of the facts a stored cache keeps (keyed by
        # the held-out rows); a job on the same teacher and images skips that pass.
        known = None if teacher_cache is None else teacher_cache.number(acc_key)
        if known is not None:
            base_acc: float | None = known
        else:
            base_acc = _heldout_accuracy(model, data, recipe, device)
            if teacher_cache is not None and base_acc is not None:
                teacher_cache.meta[acc_key] = repr(base_acc)
        base_params = count_params(model)
        base_flops = count_flops(model, input_size)
    check_cancel()

    # -- profiling
    lut_summary = None
    with phase("profiling"):
        base_lat = measure_latency(model, input_size, recipe.latency, lat_device)
        baseline = model_block(
            params=base_params, flops=base_flops, accuracy=base_acc, latency=base_lat.to_dict()
        )
        target = _target(recipe, baseline)
        layers = adapter.layers(model, input_size)
        groups = adapter.gate_groups(model, recipe.gates)
        lut = None
        if recipe.target.metric == "latency":
            lut = _latency_table(ctx, adapter, model, layers, groups, lat_device)
            lut_summary = lut.summary()
        cost_model = make_cost_model(recipe.target.metric, layers, lut=lut)
    check_cancel()
    # Latency targets are absolute ms (the calibrated table predicts ms); FLOPs/params targets
    # are a share of the analytic baseline, which equals the counted one.
    if recipe.target.metric == "latency":
        target_cost = float(target["value"])
    else:
        target_cost = float(target["ratio"]) * float(cost_model.baseline())
    ratio = min(1.0, target_cost / float(cost_model.baseline()))

    # -- training (gates), or a baseline method's selection (and slimming's sparsity training)
    with phase("training"):
        gates = Gates(groups, init_logit=INIT_LOGIT).to(device)
        base = model  # the weights export cuts; slimming trains a copy, the teacher stays
        # The gated student's own BN statistics (gates only): installed below to evaluate and
        # export what was trained; the model's own stay the teacher's.
        trained_norms: NormStats | None = None
        if recipe.method == "gates":
            trained_norms = NormStats(model)
            history = _train(
                ctx, model, gates, cost_model, data, ratio, device, phase, teacher_cache,
                trained_norms,
            )  # fmt: skip
        else:
            base, gates, history = _baseline(
                ctx, model, gates, cost_model, data, target_cost, device, teacher_cache
            )
        gates.requires_grad_(False)

    # -- exporting
    with phase("exporting"):
        measure = None
        if recipe.target.metric == "latency":

            def measure(keep: Mapping[str, Tensor]) -> float:
                exported = adapter.export_pruned(base, keep)
                return measure_latency(exported, input_size, recipe.latency, lat_device).median_ms

        keepall = model.state_dict()  # the frozen input weights, bit for bit
        with nullcontext() if trained_norms is None else trained_norms.installed():
            budget = fit_to_budget(gates, cost_model, target_cost, measure=measure)
            keep = {k: v.to("cpu") for k, v in budget.items()}
            # `gates` keeps the trained logits (gates.safetensors); the exported keep set may be
            # a little narrower after the correction: these gates express exactly that.
            exported_gates = gated_like(gates, keep)
            pruned = adapter.export_pruned(base, keep).to(device).eval()
            export_diff = _export_check(base, exported_gates, pruned, data, recipe, device)
            # The hard-gated model after the correction *is* the export (equal outputs, checked
            # just above), so its held-out accuracy is measured on the narrow model; the
            # full-width masked model runs only when the correction changed the keep set.
            corrected_acc = _heldout_accuracy(pruned, data, recipe, device)
            trained_acc = (
                corrected_acc
                if budget.closed_channels == 0
                else _gated_accuracy(base, gates, data, recipe, device)
            )
            correction = _correction_block(
                budget, float(cost_model.baseline()), trained_acc, corrected_acc
            )
            phase.log(
                f"budget correction closed {budget.closed_channels} channels; hard-gated held-out "
                f"accuracy {trained_acc} -> {corrected_acc}"
            )
        phase.log(f"hard-gated vs exported max abs diff {export_diff:.3g}")
    check_cancel()

    # -- finetuning
    ft_history: list[HistoryRow] = []
    if recipe.finetune.epochs > 0:
        with phase("finetuning"):
            ft_history = finetune(
                pruned,
                model,
                data,
                recipe,
                device=device,
                on_step=_progress_emitter(ctx, "finetuning", recipe.train.log_every),
                should_stop=ctx.should_cancel,
                teacher_cache=teacher_cache,
            )
    pruned.eval().requires_grad_(False)
    if store is not None and teacher_cache is not None:
        try:  # a cache that cannot be written costs later jobs time, never this job its result
            teacher_cache.save(*store)
        except OSError as exc:
            phase.log(f"teacher logits not stored for later jobs: {exc}")
    check_cancel()

    # -- evaluating
    with phase("evaluating"):
        # Baseline and pruned timed in one interleaved run, so host noise hits both alike and
        # the speed-up is their ratio under the same conditions; the profiling phase's baseline
        # timing (which set a latency target) stays in `latency_profiling`.
        base_lat, pruned_lat = measure_latency_interleaved(
            [model, pruned], input_size, recipe.latency, lat_device
        )
        baseline["latency_profiling"] = baseline.get("latency")
        baseline.update(latency_ms=base_lat.median_ms, latency=base_lat.to_dict())
        if recipe.target.metric == "latency" and recipe.target.latency_ms is None:
            # A latency target given as a share of the baseline is judged against the baseline
            # timed in the same interleaved run as the pruned model, so noise cancels; the
            # profiling-time value that training aimed at stays in `value_profiling`.
            target = {**_target(recipe, baseline), "value_profiling": target["value"]}
        pruned_block = model_block(
            params=count_params(pruned),
            flops=count_flops(pruned, input_size),
            accuracy=_heldout_accuracy(pruned, data, recipe, device),
            latency=pruned_lat.to_dict(),
        )
        layer_costs = {
            name: module_costs(m, input_size, recipe.latency, lat_device)
            for name, m in (("baseline", model), ("pruned", pruned))
        }
    check_cancel()

    # -- packaging
    with phase("packaging"):
        report = build_report(
            recipe=recipe_to_dict(recipe),
            baseline=baseline,
            pruned=pruned_block,
            target=target,
            history=history,
            layers=_layers_rows(gates, budget),
            weights_mapping=mapping.to_dict(),
            data=_data_block(recipe, data),
            phases=phase.seconds,
            device=device_name(device),
            lut=lut_summary,
            finetune_history=ft_history,
            target_hint=budget.reason,
            extra={
                "export_max_abs_diff": export_diff,
                "latency_device": device_name(lat_device),
                "method": recipe.method,
                "budget": budget.to_dict(),
                "layer_costs": layer_costs,
                "correction": correction,
                "heldout": heldout_block(
                    **data.heldout_info(),
                    fingerprint=data.heldout_fingerprint(),
                    accuracy=pruned_block["accuracy"],
                    baseline_accuracy=baseline["accuracy"],
                ),
            },
        )
        write_artifacts(
            out, recipe, adapter, model, pruned, keep, keepall, gates, report,
            norm_stats=None if trained_norms is None else trained_norms.state(),
        )  # fmt: skip
    # Packaging time is known only now; rewrite report.json with it (small file).
    report["phases"] = {k: round(v, 4) for k, v in phase.seconds.items()}
    write_json(out / "report.json", report)
    if ctx.checkpoint_dir is not None:
        clear_checkpoint(Path(ctx.checkpoint_dir))
    return report


def _export_check(
    model: nn.Module,
    gates: Gates,
    pruned: nn.Module,
    data: DataBundle,
    recipe: Recipe,
    device: torch.device,
) -> float:
    """Max abs difference between the hard-gated model and the export on one held-out batch.

    Both derive from the same `kept` definition, so this is ~1e-6; a large value is an engine bug
    worth seeing in the report.
    """
    x, _ = next(iter(data.heldout_batches(min(16, recipe.data.batch_size))))
    x = x.to(device)
    handle = attach(model, gates)
    # True float32 on GPU: TF32 convolutions alone differ by ~1e-3 between two conv shapes.
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), torch.inference_mode():
            with gates.using("hard"):
                ref = model(x)
            handle.remove()
            got = pruned.eval()(x)
    finally:
        handle.remove()
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    return float((ref - got).abs().max().item())


# -------------------------------------------------------------------------------- run_local


def run_local(
    recipe: Recipe | str | Path,
    weights: Path | str,
    out_dir: Path | str,
    dataset: Path | str | None = None,
    device: str = "auto",
    on_event: EventSink | None = None,
    should_cancel: Callable[[], bool] | None = None,
    lut_dir: Path | None = None,
    heldout: Path | str | None = None,
    teacher_dir: Path | str | None = None,
) -> dict[str, Any]:
    """`hawada run`: one job in this process with a folder LUT cache and a local checkpoint.

    `recipe` is a parsed Recipe or a path to a YAML/JSON file. Re-running the same command after
    an interruption resumes gate training from `out_dir/.checkpoint`. Latency tables are cached
    in `lut_dir` (default: the settings' `lut_dir`, `HAWADA_LUT_DIR`); `teacher_dir` keeps the
    teacher's logits for later runs on the same weights and data (`JobContext.teacher_dir`).
    """
    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(Path(recipe).read_text(encoding="utf-8"))
    if lut_dir is None:
        from hawada.settings import get_settings

        lut_dir = Path(get_settings().lut_dir)
    out = Path(out_dir)
    ctx = JobContext(
        recipe=recipe,
        weights=Path(weights),
        out_dir=out,
        dataset=Path(dataset) if dataset is not None else None,
        heldout=Path(heldout) if heldout is not None else None,
        device=device,
        on_event=on_event or _ignore,
        should_cancel=should_cancel or _never,
        checkpoint_dir=out / ".checkpoint",
        lut_cache=FolderLutCache(lut_dir),
        teacher_dir=Path(teacher_dir) if teacher_dir is not None else None,
    )
    return run_job(ctx)
