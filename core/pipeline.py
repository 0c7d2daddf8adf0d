"""One compression job end to end: the phases of DESIGN.md, artifacts written atomically.

`run_job(ctx)` is what the worker calls; `run_local(...)` is `hawada run`. Everything a phase needs
comes from the recipe and the context; progress leaves through `ctx.on_event` only.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hawada.core.errors import JobCancelled, JobError
from hawada.core.evaluate import accuracy, count_flops, count_params
from hawada.core.recipe import Recipe, parse_recipe, recipe_hash, recipe_to_dict
from hawada.core.report import build_report, model_block, target_block, write_report_html
from hawada.core.train import INIT_LOGIT, finetune, train_gates

PHASES = ("loading", "baseline", "profiling", "training", "exporting", "finetuning", "evaluating",
          "packaging")
# A training progress event at most this often (seconds) besides every log_every steps.
PROGRESS_EVERY_S = 2.0
# Gate-training checkpoints: every this many seconds or steps, whichever comes first.
CHECKPOINT_EVERY_S = 10.0
CHECKPOINT_EVERY_STEPS = 50


def _ignore(_event: dict[str, Any]) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class JobContext:
    """Everything one job needs from its runner (worker or `hawada run`)."""

    recipe: Recipe
    weights: Path
    out_dir: Path
    dataset: Path | None = None
    device: str = "auto"
    on_event: Callable[[dict[str, Any]], None] = field(default=_ignore)
    should_cancel: Callable[[], bool] = field(default=_never)
    checkpoint_dir: Path | None = None
    lut_cache: Any | None = None
    # None: `data.path` may name any folder (`hawada run`, a local user); the worker passes the
    # service's HAWADA_DATA_ROOTS so remote recipes cannot read arbitrary worker files.
    data_roots: list[Path] | None = None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise JobError("device cuda requested but CUDA is not available", code="no_device")
    return dev


# ------------------------------------------------------------------------------ atomic files


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp)` then rename over `path`: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # some writers (safetensors) create 0600 files; artifacts are shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """JSON file written atomically."""
    _atomic(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8"))


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """safetensors file (CPU, contiguous) written atomically; CPU tensors are not copied."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic(path, lambda p: save_file(flat, str(p), metadata=dict(metadata or {})))


# ----------------------------------------------------------------------------------- phases


class _Phases:
    """Announces each phase once and times it (seconds land in report["phases"])."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None]) -> None:
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


def _progress_emitter(ctx: JobContext, phase: str, log_every: int) -> Callable[[dict], None]:
    """on_step callback turning train rows into throttled progress events."""
    last = [0.0]

    def emit(row: dict[str, Any]) -> None:
        now = time.monotonic()
        step, steps = int(row["step"]), int(row["steps"])
        if step % log_every and step != steps and now - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = now
        ev = {"kind": "progress", "phase": phase, "progress": step / steps, "step": step,
              "loss": row.get("loss")}
        for k in ("cost_ratio", "temperature", "multiplier"):
            if k in row:
                ev[k] = row[k]
        ctx.on_event(ev)
    return emit


def _heldout_accuracy(model: nn.Module, data: Any, recipe: Recipe,
                      device: torch.device) -> float | None:
    """Top-1 on the held-out split; None when the labels are noise (synthetic data)."""
    if not getattr(data, "labelled", True):
        return None
    return accuracy(model, data.heldout_batches(recipe.data.batch_size), device)


def _target(recipe: Recipe, baseline: Mapping[str, Any]) -> dict[str, Any]:
    metric = recipe.target.metric
    base_value = {"flops": baseline["flops"], "params": baseline["params"],
                  "latency": baseline["latency_ms"]}[metric]
    return target_block(metric, baseline_value=base_value, ratio=recipe.target.ratio,
                        latency_ms=recipe.target.latency_ms)


def _layers_rows(gates: Any, keep: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    rows = []
    for name, g in gates.groups.items():
        kept = keep[name].tolist()
        rows.append({"name": name, "modules": list(g.covers or g.modules), "before": g.channels,
                     "after": len(kept), "kept": kept})
    return rows


def _train(ctx: JobContext, model: nn.Module, gates: Any, cost_model: Any, data: Any,
           target_ratio: float, device: torch.device, phase: _Phases) -> list[dict[str, Any]]:
    """Gate training with checkpoints in `ctx.checkpoint_dir`, resuming from one if present."""
    from hawada.core.gates import attach

    recipe = ctx.recipe
    start_step, state = 0, None
    fingerprint = _fingerprint(recipe, Path(ctx.weights))
    on_checkpoint = None
    if ctx.checkpoint_dir is not None:
        ckpt_dir = Path(ctx.checkpoint_dir)
        resumed = load_checkpoint(ckpt_dir, fingerprint)
        if resumed is not None:
            start_step, state = resumed["step"], resumed
            phase.log(f"resuming gate training at step {start_step}")

        def on_checkpoint(snapshot: dict[str, Any]) -> None:
            save_checkpoint(ckpt_dir, snapshot, fingerprint)

    handle = attach(model, gates)
    try:
        return train_gates(
            model, gates, cost_model, data, recipe, device=device,
            on_step=_progress_emitter(ctx, "training", recipe.train.log_every),
            should_stop=ctx.should_cancel, start_step=start_step, state=state,
            target_ratio=target_ratio, on_checkpoint=on_checkpoint,
            checkpoint_every_s=CHECKPOINT_EVERY_S, checkpoint_every_steps=CHECKPOINT_EVERY_STEPS)
    finally:
        handle.remove()  # export and fine-tune see the plain model


def _latency_table(ctx: JobContext, adapter: Any, model: nn.Module, layers: Any, groups: Any,
                   device: torch.device) -> Any:
    """The per-layer latency table for this model on `device` (cached, calibrated)."""
    from hawada.core.lut import get_or_build_lut, make_width_measurer

    recipe = ctx.recipe
    input_size = tuple(recipe.model.input_size)
    # Calibrating against whole-model timings makes the table's sum match measurement.
    measurer = make_width_measurer(model, adapter.export_pruned, groups, input_size,
                                   recipe.latency, device)
    return get_or_build_lut(layers, recipe.latency, device, round_to=recipe.gates.round_to,
                            cache=ctx.lut_cache,
                            key_parts={"arch": recipe.model.arch, "input_size": list(input_size),
                                       "num_classes": recipe.model.num_classes,
                                       "stem": recipe.model.stem},
                            calibrate_with=measurer)


def _data_block(recipe: Recipe, data: Any) -> dict[str, Any]:
    block = dict(data.describe()) if hasattr(data, "describe") else {}
    block.update({"source": recipe.data.source, "n_train": int(data.n_train),
                  "n_heldout": int(data.n_heldout)})
    return block


def _fingerprint(recipe: Recipe, weights: Path) -> str:
    st = weights.stat()
    return f"{recipe_hash(recipe)}:{st.st_size}"


# ---------------------------------------------------------------------------------- run_job


def run_job(ctx: JobContext) -> dict[str, Any]:
    """Run every phase for `ctx`, write all artifacts into `ctx.out_dir`, return the report.

    Raises `HawadaError` subclasses (weights, data, arch, export problems) for user-caused
    failures and `JobCancelled` when `ctx.should_cancel()` turns true.
    """
    from hawada.adapters.torchvision import build_model, get_adapter
    from hawada.core.budget import fit_to_budget
    from hawada.core.cost import make_cost_model
    from hawada.core.data import load_data
    from hawada.core.gates import Gates
    from hawada.core.latency import device_name, measure_latency
    from hawada.core.weights import load_weights

    recipe = ctx.recipe
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(ctx.device)
    lat_device = device if recipe.latency.device == "auto" else resolve_device(recipe.latency.device)
    input_size = tuple(recipe.model.input_size)
    phase = _Phases(ctx.on_event)

    def check_cancel() -> None:
        if ctx.should_cancel():
            raise JobCancelled("cancelled")

    # -- loading
    with phase("loading"):
        check_export_formats(recipe)
        adapter = get_adapter(recipe.model.arch)
        model = build_model(recipe.model.arch, num_classes=recipe.model.num_classes,
                            stem=recipe.model.stem)
        mapping = load_weights(model, Path(ctx.weights))
        data = load_data(recipe, upload=ctx.dataset, allowed_roots=ctx.data_roots)
        if data.num_classes > recipe.model.num_classes:
            raise JobError(f"the dataset has {data.num_classes} classes but model.num_classes is "
                           f"{recipe.model.num_classes}", code="bad_dataset")
        model.to(device).eval().requires_grad_(False)
    check_cancel()

    # -- baseline
    with phase("baseline"):
        base_acc = _heldout_accuracy(model, data, recipe, device)
        base_params = count_params(model)
        base_flops = count_flops(model, input_size)
    check_cancel()

    # -- profiling
    lut_summary = None
    with phase("profiling"):
        base_lat = measure_latency(model, input_size, recipe.latency, lat_device)
        baseline = model_block(params=base_params, flops=base_flops, accuracy=base_acc,
                               latency=base_lat.to_dict())
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

    # -- training
    with phase("training"):
        gates = Gates(groups, init_logit=INIT_LOGIT).to(device)
        history = _train(ctx, model, gates, cost_model, data, ratio, device, phase)
        gates.requires_grad_(False)

    # -- exporting
    with phase("exporting"):
        measure = None
        if recipe.target.metric == "latency":
            def measure(keep: Mapping[str, torch.Tensor]) -> float:
                return measure_latency(adapter.export_pruned(model, keep), input_size,
                                       recipe.latency, lat_device).median_ms
        budget = fit_to_budget(gates, cost_model, target_cost, measure=measure)
        keep = {k: v.to("cpu") for k, v in budget.items()}
        keepall = model.state_dict()  # the frozen input weights, bit for bit
        pruned = adapter.export_pruned(model, keep).to(device).eval()
        export_diff = _export_check(model, gates, pruned, data, recipe, device)
        phase.log(f"hard-gated vs exported max abs diff {export_diff:.3g}")
    check_cancel()

    # -- finetuning
    ft_history: list[dict[str, Any]] = []
    if recipe.finetune.epochs > 0:
        with phase("finetuning"):
            ft_history = finetune(pruned, model, data, recipe, device=device,
                                  on_step=_progress_emitter(ctx, "finetuning",
                                                            recipe.train.log_every),
                                  should_stop=ctx.should_cancel)
    pruned.eval().requires_grad_(False)
    check_cancel()

    # -- evaluating
    with phase("evaluating"):
        pruned_block = model_block(
            params=count_params(pruned), flops=count_flops(pruned, input_size),
            accuracy=_heldout_accuracy(pruned, data, recipe, device),
            latency=measure_latency(pruned, input_size, recipe.latency, lat_device).to_dict())
    check_cancel()

    # -- packaging
    with phase("packaging"):
        layers_rows = _layers_rows(gates, keep)
        report = build_report(
            recipe=recipe_to_dict(recipe), baseline=baseline, pruned=pruned_block, target=target,
            history=history, layers=layers_rows,
            weights_mapping=mapping.to_dict() if hasattr(mapping, "to_dict") else None,
            data=_data_block(recipe, data),
            phases=phase.seconds, device=device_name(device), lut=lut_summary,
            finetune_history=ft_history, target_hint=getattr(budget, "reason", None),
            extra={"export_max_abs_diff": export_diff, "latency_device": device_name(lat_device),
                   "budget": budget.to_dict() if hasattr(budget, "to_dict") else None})
        _write_artifacts(out, recipe, adapter, model, pruned, keep, keepall, gates, report)
    # Packaging time is known only now; rewrite report.json with it (small file).
    report["phases"] = {k: round(v, 4) for k, v in phase.seconds.items()}
    write_json(out / "report.json", report)
    if ctx.checkpoint_dir is not None:
        _clear_checkpoint(Path(ctx.checkpoint_dir))
    return report


def _export_check(model: nn.Module, gates: Any, pruned: nn.Module, data: Any, recipe: Recipe,
                  device: torch.device) -> float:
    """Max abs difference between the hard-gated model and the export on one held-out batch.

    Both derive from the same `kept` definition, so this is ~1e-6; a large value is an engine bug
    worth seeing in the report.
    """
    from hawada.core.gates import attach

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


def _write_artifacts(out: Path, recipe: Recipe, adapter: Any, model: nn.Module, pruned: nn.Module,
                     keep: Mapping[str, torch.Tensor], keepall: Mapping[str, torch.Tensor],
                     gates: Any, report: dict[str, Any]) -> None:
    """Every DESIGN.md artifact, each written atomically."""
    write_safetensors(out / "pruned.safetensors", pruned.state_dict())
    write_json(out / "pruned.json", adapter.pruned_config(model, keep, recipe))
    write_safetensors(out / "keepall.safetensors", keepall)
    groups_meta = [{"name": n, "units": g.units, "unit_width": g.unit_width,
                    "min_units": g.min_units, "round_units": g.round_units,
                    "modules": list(g.modules), "covers": list(g.covers),
                    "kept": keep[n].tolist()} for n, g in gates.groups.items()]
    write_safetensors(out / "gates.safetensors", gates.named_logits(),
                      metadata={"groups": json.dumps(groups_meta),
                                "temperature": str(gates.temperature),
                                "format": "hawada.gates.v1"})
    write_json(out / "report.json", report)
    write_report_html(report, out / "report.html")
    formats = set(recipe.export.formats)
    if "onnx" in formats or "pt2" in formats:
        _export_graphs(out, pruned, recipe, formats)


def check_export_formats(recipe: Recipe) -> None:
    """Fail before any training when the recipe asks for an export this worker cannot write."""
    if "onnx" in recipe.export.formats:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise JobError("ONNX export needs the onnx and onnxscript packages, which this worker "
                           "does not have; drop 'onnx' from export.formats",
                           code="export_unavailable") from None


def _export_graphs(out: Path, pruned: nn.Module, recipe: Recipe, formats: set[str]) -> None:
    """pruned.pt2 / pruned.onnx traced on CPU with a dynamic batch dimension.

    Runs last in the job, so moving the pruned model to the CPU in place costs nothing later.
    """
    cpu_model = pruned.to("cpu").eval()
    # Batch 2, not 1: torch.export specialises size-1 dimensions, which would pin the batch.
    x = torch.zeros(2, *recipe.model.input_size)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    if "pt2" in formats:
        program = torch.export.export(cpu_model, (x,), dynamic_shapes=dynamic)
        _atomic(out / "pruned.pt2", lambda p: torch.export.save(program, str(p)))
    if "onnx" in formats:
        _atomic(out / "pruned.onnx", lambda p: torch.onnx.export(
            cpu_model, (x,), str(p), input_names=["input"], output_names=["logits"],
            dynamo=True, external_data=False, dynamic_shapes=dynamic))


# ------------------------------------------------------------------------------- checkpoint

_CKPT_TENSORS = "train_state.safetensors"
_CKPT_JSON = "train_state.json"


def save_checkpoint(directory: Path, snapshot: Mapping[str, Any], fingerprint: str) -> None:
    """Gate-training state: tensors (gates, Adam moments) in safetensors, scalars in JSON.

    The JSON is written last and names the step the tensors hold, so a crash between the two
    writes leaves a pair that `load_checkpoint` recognises as inconsistent and ignores.
    """
    directory.mkdir(parents=True, exist_ok=True)
    step = int(snapshot["step"])
    tensors = {f"gates/{k}": v for k, v in snapshot["gates"].items()}
    opt = snapshot["optimizer"]
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{pid}/{k}"] = v
            else:
                opt_scalars.setdefault(str(pid), {})[k] = v
    write_safetensors(directory / _CKPT_TENSORS, tensors, metadata={"step": str(step)})
    write_json(directory / _CKPT_JSON, {
        "fingerprint": fingerprint, "step": step, "multiplier": float(snapshot["multiplier"]),
        "start_ratio": snapshot.get("start_ratio"),
        "history": snapshot.get("history", []), "param_groups": opt["param_groups"],
        "opt_scalars": opt_scalars})


def load_checkpoint(directory: Path, fingerprint: str) -> dict[str, Any] | None:
    """The state `save_checkpoint` wrote, or None when absent, stale or from another job."""
    meta_path, tensor_path = directory / _CKPT_JSON, directory / _CKPT_TENSORS
    if not (meta_path.is_file() and tensor_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        with safe_open(str(tensor_path), framework="pt") as f:
            tensor_step = int((f.metadata() or {}).get("step", -1))
        if meta.get("fingerprint") != fingerprint or tensor_step != int(meta["step"]):
            return None
        tensors = load_file(str(tensor_path))
    except (OSError, ValueError, KeyError):
        return None  # unreadable checkpoint: start over rather than fail the job
    gates_sd = {k[len("gates/"):]: v for k, v in tensors.items() if k.startswith("gates/")}
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, pid, name = k.split("/", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for pid, scalars in meta.get("opt_scalars", {}).items():
        opt_state.setdefault(int(pid), {}).update(scalars)
    return {"step": int(meta["step"]), "gates": gates_sd, "multiplier": meta["multiplier"],
            "start_ratio": meta.get("start_ratio"),
            "history": meta.get("history", []),
            "optimizer": {"state": opt_state, "param_groups": meta["param_groups"]}}


def _clear_checkpoint(directory: Path) -> None:
    """The job finished: its checkpoint must not resume a later run."""
    for name in (_CKPT_JSON, _CKPT_TENSORS):
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            pass


# -------------------------------------------------------------------------------- run_local


def run_local(recipe: Recipe | str | Path, weights: Path | str, out_dir: Path | str,
              dataset: Path | str | None = None, device: str = "auto",
              on_event: Callable[[dict[str, Any]], None] | None = None,
              should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """`hawada run`: one job in this process with a folder LUT cache and a local checkpoint.

    `recipe` is a parsed Recipe or a path to a YAML/JSON file. Re-running the same command after
    an interruption resumes gate training from `out_dir/.checkpoint`.
    """
    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(Path(recipe).read_text(encoding="utf-8"))
    out = Path(out_dir)
    lut_cache = None
    try:
        from hawada.core.config import get_settings
        from hawada.core.lut import FolderLutCache
        lut_cache = FolderLutCache(Path(get_settings().lut_dir))
    except ImportError:  # pragma: no cover - only while core.lut is absent
        lut_cache = None
    ctx = JobContext(recipe=recipe, weights=Path(weights), out_dir=out,
                     dataset=Path(dataset) if dataset is not None else None, device=device,
                     on_event=on_event or _ignore, should_cancel=should_cancel or _never,
                     checkpoint_dir=out / ".checkpoint", lut_cache=lut_cache)
    return run_job(ctx)
