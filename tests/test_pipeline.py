"""run_job end to end on synthetic data: ResNet-18 (cifar stem) at 16x16, a few gate steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from synthetic_job import save_resnet18_weights, synthetic_recipe

from hawada.adapters.torchvision import build_model, get_adapter, load_pruned
from hawada.core.budget import gated_like
from hawada.core.errors import HawadaError, JobCancelled, WeightsError
from hawada.core.gates import NORM_STATS_PREFIX, Gates, attach
from hawada.core.recipe import parse_recipe
from hawada.lifecycle import PHASES
from hawada.worker.checkpoint import load_checkpoint, save_checkpoint
from hawada.worker.pipeline import JobContext, run_job

ARTIFACTS = (
    "pruned.safetensors",
    "pruned.json",
    "keepall.safetensors",
    "gates.safetensors",
    "report.json",
    "report.html",
)


def _recipe(finetune: float = 0.0, formats: tuple[str, ...] = ("safetensors",)):
    return synthetic_recipe(
        target={"metric": "flops", "ratio": 0.5},
        train={"steps": 5, "log_every": 2},
        finetune={"epochs": finetune},
        latency={"batch_size": 2, "repeats": 3, "warmup": 1},
        export={"formats": list(formats)},
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("w") / "in.safetensors"
    return save_resnet18_weights(path, running_var=True)


def _run(weights: Path, out: Path, recipe, events: list[dict] | None = None, **kw) -> dict:
    ctx = JobContext(
        recipe=recipe,
        weights=weights,
        out_dir=out,
        device="cpu",
        on_event=(events.append if events is not None else (lambda e: None)),
        **kw,
    )
    return run_job(ctx)


@pytest.fixture(scope="module")
def plain_job(weights: Path, tmp_path_factory: pytest.TempPathFactory):
    """No fine-tune: the exported model must equal the hard-gated input model."""
    out = tmp_path_factory.mktemp("job")
    events: list[dict] = []
    report = _run(weights, out, _recipe(), events, checkpoint_dir=out.parent / "ckpt")
    return out, report, events


@pytest.fixture(scope="module")
def finetuned_job(weights: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("job_ft")
    events: list[dict] = []
    report = _run(weights, out, _recipe(finetune=0.5, formats=("safetensors", "pt2")), events)
    return out, report, events


def test_every_artifact_written(plain_job) -> None:
    out, _, _ = plain_job
    for name in ARTIFACTS:
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["target"] == plain_job[1]["target"]
    html = (out / "report.html").read_text()
    assert "<svg" in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")


def test_phases_announced_in_order(plain_job, finetuned_job) -> None:
    for (_, report, events), expect in (
        (plain_job, [p for p in PHASES if p != "finetuning"]),
        (finetuned_job, list(PHASES)),
    ):
        phases = [e["phase"] for e in events if e["kind"] == "phase"]
        assert phases == expect
        assert list(report["phases"]) == expect
        progress = [e for e in events if e["kind"] == "progress" and e["phase"] == "training"]
        assert progress[-1]["progress"] == 1.0 and progress[-1]["step"] == 5
        assert [e["step"] for e in progress] == [2, 4, 5]  # every log_every (2) steps + the last
        assert {"loss", "cost_ratio", "temperature", "multiplier"} <= progress[-1].keys()
        assert progress[-1]["steps"] == 5 and progress[-1]["target_ratio"] == 0.5


def test_report_fields_present_and_typed(plain_job) -> None:
    _, report, _ = plain_job
    for block in ("baseline", "pruned"):
        b = report[block]
        assert isinstance(b["params"], int) and isinstance(b["flops"], int)
        assert isinstance(b["latency_ms"], float) and b["latency_ms"] > 0
        assert b["latency"]["median_ms"] == b["latency_ms"]
        assert {
            "p10_ms",
            "p90_ms",
            "device",
            "batch_size",
            "dtype",
            "channels_last",
            "repeats",
        } <= b["latency"].keys()
        assert b["accuracy"] is None  # synthetic labels are noise: no accuracy is claimed
    t = report["target"]
    assert t["metric"] == "flops" and t["ratio"] == 0.5
    assert t["value"] == pytest.approx(0.5 * report["baseline"]["flops"])
    assert isinstance(report["target_met"], bool)
    assert report["history"][-1]["step"] == 5
    for row in report["history"]:
        assert {"step", "loss", "cost_ratio", "multiplier", "temperature"} <= row.keys()
    assert report["speedup"]["flops_ideal"] == pytest.approx(
        report["baseline"]["flops"] / report["pruned"]["flops"]
    )
    assert report["data"]["n_train"] + report["data"]["n_heldout"] == 48
    assert set(report["versions"]) >= {"torch", "torchvision", "hawada"}
    assert report["recipe"]["model"]["arch"] == "resnet18"
    assert report["lut"] is None
    assert report["weights_mapping"] is not None
    for layer in report["layers"]:
        assert layer["after"] == len(layer["kept"]) <= layer["trained"] <= layer["before"]
        assert layer["kept"] == sorted(layer["kept"]) and layer["modules"]
    closed = sum(r["trained"] - r["after"] for r in report["layers"])
    assert report["correction"]["closed_channels"] == closed
    assert report["correction"]["cost_ratio_after"] <= report["target"]["ratio"] + 1e-9
    for block in ("baseline", "pruned"):
        assert report[block]["macs"] * 2 == report[block]["flops"]
    held = report["heldout"]
    assert held["size"] == report["data"]["n_heldout"] and held["stderr"] is None
    assert held["source"] == "split" and len(held["fingerprint"]) == 16


def test_gates_file_holds_trained_logits_and_keep_separately(plain_job) -> None:
    out, report, _ = plain_job
    logits = load_file(str(out / "gates.safetensors"))
    with safe_open(str(out / "gates.safetensors"), "pt") as f:
        groups = {g["name"]: g for g in json.loads(f.metadata()["groups"])}
    for layer in report["layers"]:
        trained = logits[layer["name"]]
        g = groups[layer["name"]]
        assert g["kept"] == layer["kept"] and g["trained"] == layer["trained"]
        # the stored logits are what training left: their hard mask is the trained width
        gates = Gates([_group_of(g)])
        with torch.no_grad():
            gates.logit(layer["name"]).copy_(trained)
        assert len(gates.kept_channels(layer["name"])) == layer["trained"]


def _group_of(meta: dict):
    from hawada.core.gates import GateGroup

    return GateGroup(
        meta["name"],
        meta["units"],
        meta["unit_width"],
        meta["modules"],
        meta["min_units"],
        meta["round_units"],
        meta["covers"],
    )


def test_labelled_job_reports_hard_gated_accuracy_before_and_after_correction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Training normally ends at the target (the projection); without it, 4 steps stop short,
    # which is the case the correction and its report block exist for.
    monkeypatch.setattr("hawada.core.train.BudgetProjection.__call__", lambda *_args: None)
    weights = save_resnet18_weights(tmp_path / "w.safetensors", num_classes=10)
    recipe = parse_recipe(
        {
            "model": {
                "arch": "resnet18",
                "num_classes": 10,
                "stem": "cifar",
                "input_size": [3, 16, 16],
            },
            "data": {"source": "digits", "limit": 96, "batch_size": 16, "val_fraction": 0.25},
            "target": {"metric": "flops", "ratio": 0.3},
            "train": {"steps": 4, "log_every": 2},
            "finetune": {"epochs": 0},
            "latency": {"batch_size": 2, "repeats": 2, "warmup": 0},
        }
    )
    report = _run(weights, tmp_path / "out", recipe)
    corr = report["correction"]
    # 4 steps without the projection do not reach 30%: the correction closes channels, and
    # says what that cost
    assert corr["closed_channels"] > 0 and corr["cost_ratio_trained"] > 0.3
    assert 0.0 <= corr["accuracy_before"] <= 1.0 and 0.0 <= corr["accuracy_after"] <= 1.0
    # no fine-tune: the exported model is the corrected hard-gated model, same accuracy
    assert report["pruned"]["accuracy"] == pytest.approx(corr["accuracy_after"])
    assert report["target_met"] is True
    held = report["heldout"]
    acc = report["pruned"]["accuracy"]
    assert held["size"] == 24
    assert held["stderr"] == pytest.approx((acc * (1 - acc) / 24) ** 0.5)


def test_report_times_both_models_interleaved_and_costs_every_layer(plain_job) -> None:
    _, report, _ = plain_job
    for block in ("baseline", "pruned"):
        assert "interleaved" in report[block]["latency"]["note"]
    # the profiling phase's baseline timing (the one a latency target is set from) is kept
    assert report["baseline"]["latency_profiling"]["median_ms"] > 0
    for block in ("baseline", "pruned"):
        costs = report["layer_costs"][block]
        assert sum(c["flops"] for c in costs.values()) == report[block]["flops"]
    for layer in report["layers"]:
        assert set(layer["modules"]) <= report["layer_costs"]["baseline"].keys()
    assert isinstance(report["warnings"], list)


def test_target_met_matches_numbers(plain_job) -> None:
    _, report, _ = plain_job
    met = report["pruned"]["flops"] <= report["target"]["value"]
    assert report["target_met"] is met
    assert (report["target_reason"] is None) is met
    assert met  # the budget fit cuts below 50% FLOPs even after 5 steps


def test_keepall_equals_input_weights(plain_job, weights: Path) -> None:
    out, _, _ = plain_job
    given, kept = load_file(str(weights)), load_file(str(out / "keepall.safetensors"))
    assert given.keys() == kept.keys()
    for k in given:
        assert torch.equal(given[k], kept[k]), k


def test_load_pruned_equals_hard_gated_model(plain_job) -> None:
    """Exported artifacts reproduce keepall gated by the recorded keep set (one definition of
    kept)."""
    out, report, _ = plain_job
    pruned = load_pruned(out / "pruned.json", out / "pruned.safetensors")
    assert type(pruned).__name__ == "ResNet"
    model = build_model("resnet18", num_classes=4, stem="cifar")
    model.load_state_dict(load_file(str(out / "keepall.safetensors")))
    model.eval()
    recipe = _recipe()
    gates = Gates(get_adapter("resnet18").gate_groups(model, recipe.gates))
    with safe_open(str(out / "gates.safetensors"), framework="pt") as f:
        groups_meta = json.loads(f.metadata()["groups"])
        names = list(f.keys())  # safe_open is not iterable
        stored = {k: f.get_tensor(k) for k in names}
    gates.load_logits(stored)  # skips the BN statistics stored beside the logits
    # the gated model normalises with the BN statistics gate training kept for it
    stats = {
        k[len(NORM_STATS_PREFIX) :]: v for k, v in stored.items() if k.startswith(NORM_STATS_PREFIX)
    }
    assert stats and all(k.endswith(("running_mean", "running_var")) for k in stats)
    model.load_state_dict(stats, strict=False)
    assert {g["name"]: g["kept"] for g in groups_meta} == {
        r["name"]: r["kept"] for r in report["layers"]
    }
    # the stored logits are the trained ones; the exported keep set is recorded beside them
    gates = gated_like(gates, {g["name"]: torch.tensor(g["kept"]) for g in groups_meta})
    attach(model, gates)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), gates.using("hard"):
        ref = model(x)
    with torch.no_grad():
        got = pruned(x)
    assert (ref - got).abs().max().item() <= 1e-4
    assert report["export_max_abs_diff"] <= 1e-4
    assert sum(p.numel() for p in pruned.parameters()) == report["pruned"]["params"]


def test_finetuned_artifacts_load_and_match_pt2(finetuned_job) -> None:
    out, report, _ = finetuned_job
    pruned = load_pruned(out / "pruned.json", out / "pruned.safetensors")
    assert sum(p.numel() for p in pruned.parameters()) == report["pruned"]["params"]
    assert report["finetune_history"][-1]["step"] == report["finetune_history"][-1]["steps"]
    program = torch.export.load(str(out / "pruned.pt2"))
    x = torch.randn(3, 3, 16, 16)  # any batch: the exported batch dimension is dynamic
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), pruned(x), rtol=1e-4, atol=1e-4)


def test_cancel_raises(weights: Path, tmp_path: Path) -> None:
    with pytest.raises(JobCancelled):
        _run(weights, tmp_path, _recipe(), should_cancel=lambda: True)


def test_bad_weights_fail_as_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "w.safetensors"
    save_file({"conv1.weight": torch.zeros(3)}, str(bad))
    with pytest.raises(WeightsError) as err:
        _run(bad, tmp_path / "out", _recipe())
    assert isinstance(err.value, HawadaError)


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    gates = {"logits.a": torch.randn(5)}
    opt = {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5), "exp_avg_sq": torch.rand(5)}
        },
        "param_groups": [{"lr": 0.05, "params": [0]}],
    }
    snap = {
        "step": 3,
        "gates": gates,
        "optimizer": opt,
        "multiplier": 0.25,
        "start_ratio": 0.9,
        "history": [{"step": 2, "loss": 1.0}],
        "norm_stats": {"layer1.0.bn1.running_mean": torch.randn(4)},
    }
    save_checkpoint(tmp_path, snap, "fp")
    back = load_checkpoint(tmp_path, "fp")
    assert back is not None and back["step"] == 3 and back["multiplier"] == 0.25
    assert back["start_ratio"] == 0.9 and back["history"] == snap["history"]
    assert torch.equal(back["gates"]["logits.a"], gates["logits.a"])
    assert torch.equal(
        back["norm_stats"]["layer1.0.bn1.running_mean"],
        snap["norm_stats"]["layer1.0.bn1.running_mean"],
    )
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"] == opt["param_groups"]
    assert load_checkpoint(tmp_path, "another job") is None
    assert load_checkpoint(tmp_path / "missing", "fp") is None


def test_interrupted_job_resumes_from_checkpoint(
    plain_job, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job cancelled mid-training resumes from its checkpoint and ends as if never stopped."""
    from hawada.worker import pipeline

    monkeypatch.setattr(pipeline, "CHECKPOINT_EVERY_STEPS", 2)
    ckpt = tmp_path / "ckpt"
    stop = {"now": False}

    def on_event(event: dict) -> None:
        if event["kind"] == "progress" and event["phase"] == "training" and event["step"] >= 4:
            stop["now"] = True

    with pytest.raises(JobCancelled):
        run_job(
            JobContext(
                recipe=_recipe(),
                weights=weights,
                out_dir=tmp_path / "a",
                device="cpu",
                on_event=on_event,
                should_cancel=lambda: stop["now"],
                checkpoint_dir=ckpt,
            )
        )
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 4
    events: list[dict] = []
    report = _run(weights, tmp_path / "b", _recipe(), events, checkpoint_dir=ckpt)
    assert any("resuming gate training at step 4" in e.get("message", "") for e in events)
    steps = [e["step"] for e in events if e["kind"] == "progress" and e["phase"] == "training"]
    assert steps[0] == 5
    expected = plain_job[1]["history"]
    assert [r["step"] for r in report["history"]] == [r["step"] for r in expected]
    for got, want in zip(report["history"], expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-6)
    assert [r["kept"] for r in report["layers"]] == [r["kept"] for r in plain_job[1]["layers"]]
    assert not (ckpt / "train_state.json").exists()  # a finished job leaves no checkpoint


def test_onnx_without_packages_fails_before_training(weights: Path, tmp_path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401

        pytest.skip("onnx is installed here")
    except ImportError:
        pass
    events: list[dict] = []
    with pytest.raises(HawadaError) as err:
        _run(weights, tmp_path, _recipe(formats=("safetensors", "onnx")), events)
    assert err.value.code == "export_unavailable"
    assert [e["phase"] for e in events if e["kind"] == "phase"] == ["loading"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_job_on_gpu_matches_contract(weights: Path, tmp_path: Path) -> None:
    report = run_job(
        JobContext(recipe=_recipe(finetune=0.25), weights=weights, out_dir=tmp_path, device="cuda")
    )
    assert report["export_max_abs_diff"] <= 1e-4
    assert report["pruned"]["latency"]["device"] == torch.cuda.get_device_name()
    assert report["target_met"] is (report["pruned"]["flops"] <= report["target"]["value"])
    pruned = load_pruned(tmp_path / "pruned.json", tmp_path / "pruned.safetensors")
    assert sum(p.numel() for p in pruned.parameters()) == report["pruned"]["params"]


def test_run_local_reads_recipe_file(weights: Path, tmp_path: Path) -> None:
    from hawada.core.recipe import recipe_to_dict
    from hawada.worker.pipeline import run_local

    recipe_path = tmp_path / "r.json"
    recipe_path.write_text(json.dumps(recipe_to_dict(_recipe())))
    events: list[dict] = []
    report = run_local(recipe_path, weights, tmp_path / "out", device="cpu", on_event=events.append)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["pruned"] == report["pruned"]
    assert not (tmp_path / "out" / ".checkpoint" / "train_state.json").exists()
    assert events[0] == {"kind": "phase", "phase": "loading"}


def test_report_judges_target_from_measured_numbers() -> None:
    from hawada.core.report import build_report, model_block, target_block

    lat = {
        "median_ms": 10.0,
        "p10_ms": 9.0,
        "p90_ms": 11.0,
        "device": "cpu",
        "batch_size": 1,
        "dtype": "float32",
        "channels_last": False,
        "repeats": 5,
    }
    base = model_block(params=100, flops=1000, accuracy=0.9, latency=lat)

    def report(metric: str, flops: int, ms: float, **target) -> dict:
        pruned = model_block(
            params=60, flops=flops, accuracy=0.88, latency={**lat, "median_ms": ms}
        )
        value = {"flops": 1000, "params": 100, "latency": 10.0}[metric]
        return build_report(
            recipe={},
            baseline=base,
            pruned=pruned,
            target=target_block(metric, baseline_value=value, **target),
            history=[],
            layers=[],
            weights_mapping=None,
            data={},
            phases={},
            device="cpu",
            target_hint="every group at its floor",
        )

    missed = report("flops", 600, 6.0, ratio=0.5)
    assert missed["target_met"] is False
    assert (
        "600" in missed["target_reason"] and "every group at its floor" in missed["target_reason"]
    )
    assert report("flops", 500, 6.0, ratio=0.5)["target_met"] is True
    # Latency is measured, so a 5% slack absorbs timing noise, and no more.
    assert report("latency", 500, 5.2, latency_ms=5.0)["target_met"] is True
    late = report("latency", 500, 5.3, latency_ms=5.0)
    assert late["target_met"] is False and late["target"]["ratio"] == 0.5
    assert late["speedup"]["measured"] == pytest.approx(10.0 / 5.3)
    assert late["speedup"]["flops_ideal"] == 2.0


@pytest.mark.slow
def test_latency_target_job_uses_measured_table(weights: Path, tmp_path: Path) -> None:
    from hawada.core.lut import FolderLutCache

    recipe = synthetic_recipe(
        target={"metric": "latency", "ratio": 0.6},
        train={"steps": 5},
        finetune={"epochs": 0},
        latency={"batch_size": 1, "repeats": 5, "warmup": 1},
    )
    cache = FolderLutCache(tmp_path / "lut")
    report = run_job(
        JobContext(
            recipe=recipe, weights=weights, out_dir=tmp_path / "job", device="cpu", lut_cache=cache
        )
    )
    t = report["target"]
    assert t["unit"] == "ms" and t["value"] == pytest.approx(0.6 * report["baseline"]["latency_ms"])
    assert report["lut"]["key"] and cache.get(report["lut"]["key"]) is not None
    assert report["budget"]["measured"] is not None  # the exported model was timed, not predicted
    met = report["pruned"]["latency_ms"] <= t["value"] * (1 + t["tolerance"])
    assert report["target_met"] is met


@pytest.mark.slow
def test_onnx_export_matches_pruned_model(weights: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    run_job(
        JobContext(
            recipe=_recipe(formats=("safetensors", "onnx")),
            weights=weights,
            out_dir=tmp_path,
            device="cpu",
        )
    )
    graph = onnx.load(str(tmp_path / "pruned.onnx"))
    onnx.checker.check_model(graph)
    x = torch.randn(3, 3, 16, 16)
    (got,) = ReferenceEvaluator(graph).run(None, {"input": x.numpy()})
    pruned = load_pruned(tmp_path / "pruned.json", tmp_path / "pruned.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), pruned(x), rtol=1e-3, atol=1e-4)


def test_user_heldout_upload_is_what_the_report_measures(weights: Path, tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "train.npz", x=rng.integers(0, 256, (40, 16, 16), np.uint8), y=np.arange(40) % 4
    )
    np.savez(
        tmp_path / "held.npz", x=rng.integers(0, 256, (13, 16, 16), np.uint8), y=np.arange(13) % 4
    )
    recipe = _recipe().model_copy(deep=True)
    recipe.data = recipe.data.model_copy(update={"source": "upload", "limit": None})
    events: list[dict] = []
    report = _run(
        weights,
        tmp_path / "out",
        recipe,
        events,
        dataset=tmp_path / "train.npz",
        heldout=tmp_path / "held.npz",
    )
    assert report["heldout"]["source"] == "upload" and report["heldout"]["size"] == 13
    assert (report["data"]["n_train"], report["data"]["n_heldout"]) == (40, 13)
    assert report["baseline"]["accuracy"] is not None  # real labels: accuracy measured
    logs = [e["message"] for e in events if e["kind"] == "log"]
    assert any("40 training / 13 held-out" in m and "the upload" in m for m in logs)


@pytest.mark.slow
def test_job_streams_a_folder_through_every_phase(weights: Path, tmp_path: Path) -> None:
    """Gate training, fine-tuning, BN recalibration, the export check and held-out accuracy
    all read a streamed folder (DataLoader workers), and a corrupt file is skipped and counted."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / f"c{c}" / f"{i}.jpg")
    (tmp_path / "imgs" / "c1" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    recipe = _recipe(finetune=0.5).model_copy(deep=True)
    recipe.data = recipe.data.model_copy(
        update={
            "source": "folder",
            "path": str(tmp_path / "imgs"),
            "limit": None,
            "loader": "stream",
            "workers": 2,
            "on_corrupt": "skip",
            "val_fraction": 0.25,
        }
    )
    report = _run(weights, tmp_path / "out", recipe)
    data = report["data"]
    assert (data["loader"], data["n_train"] + data["n_heldout"]) == ("stream", 33)
    assert data["skipped_files"] == 1 and data["skipped_examples"] == ["c1/broken.jpg"]
    assert report["baseline"]["accuracy"] is not None and report["pruned"]["accuracy"] is not None
    assert report["export_max_abs_diff"] < 1e-3
    assert report["finetune_history"]


def _digits_8px(*, limit: int, steps: int, epochs: float) -> dict:
    """A labelled job small enough to run several times in one test (digits at 8x8)."""
    return {
        "model": {"arch": "resnet18", "num_classes": 10, "stem": "cifar", "input_size": [3, 8, 8]},
        "data": {"source": "digits", "limit": limit, "batch_size": 16, "val_fraction": 0.25},
        "target": {"metric": "flops", "ratio": 0.5},
        "train": {"steps": steps, "log_every": 1},
        "finetune": {"epochs": epochs},
        "latency": {"batch_size": 1, "repeats": 1, "warmup": 0},
    }


def test_teacher_dir_shares_the_teachers_passes_between_jobs(tmp_path: Path) -> None:
    weights = save_resnet18_weights(tmp_path / "w.safetensors", num_classes=10)
    spec = _digits_8px(limit=80, steps=2, epochs=1)
    store = tmp_path / "teacher"
    alone = _run(weights, tmp_path / "alone", parse_recipe(spec))
    events: list[dict] = []
    first = _run(weights, tmp_path / "a", parse_recipe(spec), events, teacher_dir=store)
    assert any("logits of 0 training samples reused" in e.get("message", "") for e in events)
    (stored,) = store.glob("*.safetensors")
    filled = int(load_file(str(stored))["filled"].sum())
    assert 0 < filled <= 60  # of the 60 training samples (the batch orders may miss a few)
    events.clear()
    second = _run(
        weights, tmp_path / "b", parse_recipe({**spec, "method": "l1"}), events, teacher_dir=store
    )
    reused = f"logits of {filled} training samples reused"
    assert any(reused in e.get("message", "") for e in events)
    # reused logits and accuracy change nothing a user sees
    for report in (first, second):
        assert report["baseline"]["accuracy"] == alone["baseline"]["accuracy"]
    assert first["pruned"]["accuracy"] == alone["pruned"]["accuracy"]
    # other weights (another key) neither read nor overwrite the stored file
    other = save_resnet18_weights(tmp_path / "w2.safetensors", num_classes=10, running_var=True)
    _run(other, tmp_path / "c", parse_recipe(spec), teacher_dir=store)
    assert len(list(store.glob("*.safetensors"))) == 2


def test_a_teacher_dir_that_cannot_be_written_costs_the_job_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("hawada.core.train.TeacherCache.save", refuse)
    weights = save_resnet18_weights(tmp_path / "w.safetensors", num_classes=10)
    spec = _digits_8px(limit=48, steps=1, epochs=0)
    events: list[dict] = []
    report = _run(weights, tmp_path / "out", parse_recipe(spec), events, teacher_dir=tmp_path)
    assert report["target_met"] is True and (tmp_path / "out" / "pruned.safetensors").is_file()
    assert any("teacher logits not stored" in e.get("message", "") for e in events)
