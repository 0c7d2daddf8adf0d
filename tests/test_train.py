"""Gate training, fine-tuning and BN recalibration on tiny models (CPU, a few seconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hawada.adapters.torchvision import build_model, get_adapter
from hawada.core.cost import FlopsCost, make_cost_model
from hawada.core.data import load_data
from hawada.core.errors import JobCancelled
from hawada.core.gates import GateGroup, Gates, attach, keep_from_gates
from hawada.core.layers import LayerSpec
from hawada.core.lut import LatencyCost, LatencyTable, LutEntry, layer_shape
from hawada.core.recipe import parse_recipe
from hawada.core.train import (
    BudgetProjection,
    NormStats,
    TeacherCache,
    _WidthReader,
    finetune,
    init_gate_logits,
    recalibrate_bn,
    temperature_at,
    train_classifier,
    train_gates,
)


def _recipe(**over):
    spec = {
        "model": {"arch": "resnet18", "num_classes": 4, "stem": "cifar", "input_size": [3, 16, 16]},
        "data": {"source": "synthetic", "limit": 48, "batch_size": 8},
        "target": {"metric": "flops", "ratio": 0.5},
        "train": {"steps": 3, "log_every": 1},
        "finetune": {"epochs": 0.25, "lr": 0.01},
    }
    for key, value in over.items():
        spec[key] = {**spec.get(key, {}), **value}
    return parse_recipe(spec)


class Tiny(nn.Module):
    """Two gated conv layers: fast enough to train gates for hundreds of steps in a test."""

    def __init__(self, classes: int = 4, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _tiny_setup(width: int = 32, hw: int = 8):
    torch.manual_seed(0)
    model = Tiny(width=width).eval()
    with torch.no_grad():  # trained-looking BN scales, so importance differs per channel
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.2, 2.0)
    groups = [
        GateGroup.from_channels(
            n, width, modules=[bn], covers=[conv, bn], round_to=4, min_channels=4
        )
        for n, conv, bn in (("g1", "conv1", "bn1"), ("g2", "conv2", "bn2"))
    ]
    layers = [
        LayerSpec("conv1", "conv", None, "g1", 3, width, 1, False, (3, 3), (hw, hw)),
        LayerSpec("conv2", "conv", "g1", "g2", width, width, 1, False, (3, 3), (hw, hw)),
        LayerSpec("fc", "linear", "g2", None, width, 4, 1, False, (1, 1), (1, 1)),
    ]
    gates = Gates(groups)
    attach(model, gates)
    return model, gates, FlopsCost(layers)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_temperature_schedule_endpoints() -> None:
    assert temperature_at(0, 10, 1.0, 0.05) == pytest.approx(1.0)
    assert temperature_at(9, 10, 1.0, 0.05) == pytest.approx(0.05)
    mid = temperature_at(5, 11, 1.0, 0.04)
    assert mid == pytest.approx(0.2)  # geometric: sqrt(1 * 0.04)


def test_only_gates_train_base_bit_identical() -> None:
    recipe = _recipe()
    model = build_model("resnet18", num_classes=4, stem="cifar")
    adapter = get_adapter("resnet18")
    gates = Gates(adapter.gate_groups(model, recipe.gates))
    cost = make_cost_model("flops", adapter.layers(model, (3, 16, 16)))
    before = _snapshot(model)
    logits_before = {k: v.clone() for k, v in gates.named_logits().items()}
    handle = attach(model, gates)
    rows: list[dict] = []
    history = train_gates(
        model, gates, cost, load_data(recipe), recipe, device="cpu", on_step=rows.append
    )
    handle.remove()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"base tensor {k} changed"
    assert all(not p.requires_grad for p in model.parameters())
    assert any(not torch.equal(logits_before[k], v) for k, v in gates.named_logits().items())
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["temperature"] == pytest.approx(recipe.gates.temperature.start)
    assert history[-1]["temperature"] == pytest.approx(recipe.gates.temperature.end)
    for key in ("loss", "kd", "ce", "cost_ratio", "multiplier", "temperature", "steps"):
        assert isinstance(rows[-1][key], (int, float))


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_cost_lands_near_target(ratio: float) -> None:
    model, gates, cost = _tiny_setup()
    recipe = _recipe(
        model={"input_size": [3, 8, 8]},
        data={"limit": 256, "batch_size": 32},
        target={"ratio": ratio},
        train={"steps": 200, "log_every": 10},
    )
    history = train_gates(model, gates, cost, load_data(recipe), recipe, device="cpu")
    kept = {n: float(len(k)) for n, k in keep_from_gates(gates).items()}
    hard = float(cost.cost(kept)) / cost.baseline()
    # The exported widths meet the target, at most one staircase step under it: on this tiny
    # model one step of g1 (4 of 32 channels) is 12.5% of the cost, and (16, 32) costs 0.5001.
    assert ratio - 0.13 <= hard <= ratio * (1 + 1e-5)
    assert history[-1]["cost_ratio"] == pytest.approx(hard, abs=0.13)  # logged before the last


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_trained_gates_meet_a_steep_target_without_help(ratio: float) -> None:
    """A ResNet-18 cut to 10% / 30% FLOPs in 12 steps: the hard widths training ends with (what
    export keeps, before any correction) cost the target within 2%."""
    recipe = _recipe(target={"ratio": ratio}, train={"steps": 12, "log_every": 4})
    model = build_model("resnet18", num_classes=4, stem="cifar")
    adapter = get_adapter("resnet18")
    gates = Gates(adapter.gate_groups(model, recipe.gates))
    cost = make_cost_model("flops", adapter.layers(model, (3, 16, 16)))
    attach(model, gates)
    history = train_gates(model, gates, cost, load_data(recipe), recipe, device="cpu")
    kept = {n: float(len(k)) for n, k in keep_from_gates(gates).items()}
    hard = float(cost.cost(kept)) / cost.baseline()
    assert hard == pytest.approx(ratio, rel=0.02)
    # the logged ratios follow the gliding target (each row is measured before its projection)
    ratios = [r["cost_ratio"] for r in history]
    assert ratios == sorted(ratios, reverse=True)


def test_student_norm_stats_follow_the_gated_batches_and_leave_the_model_alone() -> None:
    model, gates, cost = _tiny_setup()
    with torch.no_grad():  # trained-looking running statistics
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1.0, 1.0)
            bn.running_var.uniform_(0.5, 2.0)
    before = _snapshot(model)
    recipe = _recipe(
        model={"input_size": [3, 8, 8]},
        data={"limit": 256, "batch_size": 32},
        target={"ratio": 0.3},
        train={"steps": 20, "log_every": 10},
    )
    stats = NormStats(model)
    torch.testing.assert_close(stats.mean["bn2"], model.bn2.running_mean)  # starts as the model's
    train_gates(model, gates, cost, load_data(recipe), recipe, device="cpu", norm_stats=stats)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the teacher is untouched
    # the student's statistics moved towards what the gated network actually feeds bn2
    assert not torch.allclose(stats.mean["bn2"], before["bn2.running_mean"])
    x = torch.randn(64, 3, 8, 8)
    with stats.installed():
        assert model.bn2.running_mean is stats.mean["bn2"]
        with gates.using("hard"):
            gated = model(x)
    assert torch.equal(model.bn2.running_mean, before["bn2.running_mean"])
    with gates.using("hard"):
        stale = model(x)
    assert not torch.allclose(gated, stale)  # evaluation sees the student's statistics
    restored = NormStats(model)
    restored.load(stats.state())
    assert all(torch.equal(restored.var[n], stats.var[n]) for n in stats.var)


def test_student_norm_stats_update_is_a_momentum_step_to_the_batch_statistics() -> None:
    model, _gates, _cost = _tiny_setup()
    stats = NormStats(model, momentum=0.1)
    old_mean, old_var = stats.mean["bn2"].clone(), stats.var["bn2"].clone()
    seen: dict[str, torch.Tensor] = {}
    handle = model.bn2.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0].detach()))
    x = torch.randn(16, 3, 8, 8)
    with stats.active():
        model(x)
    handle.remove()
    var, mean = torch.var_mean(seen["x"], dim=[0, 2, 3], correction=1)
    stats.update()
    torch.testing.assert_close(stats.mean["bn2"], old_mean + 0.1 * (mean - old_mean))
    torch.testing.assert_close(stats.var["bn2"], old_var + 0.1 * (var - old_var))
    stats.update()  # no forward since: nothing more moves
    torch.testing.assert_close(stats.mean["bn2"], old_mean + 0.1 * (mean - old_mean))


def test_projection_only_closes_the_least_important_units_and_keeps_floors() -> None:
    _model, gates, cost = _tiny_setup()
    with torch.no_grad():
        gates.logit("g1").copy_(torch.linspace(0.1, 3.2, 32))
        gates.logit("g2").copy_(torch.linspace(0.1, 3.2, 32).flip(0))
    before = {n: v.clone() for n, v in gates.named_logits().items()}
    reader = _WidthReader(gates, torch.device("cpu"))
    project = BudgetProjection(reader, cost, torch.tensor(cost.baseline()))
    project(1.0)  # at the target already: nothing moves
    assert all(torch.equal(before[n], v) for n, v in gates.named_logits().items())
    for _ in range(8):  # a few staircase steps per call: training calls it every step
        project(0.25)
    kept = {n: float(len(k)) for n, k in keep_from_gates(gates).items()}
    assert 0.2 < float(cost.cost(kept)) / cost.baseline() <= 0.25 * (1 + 1e-5)
    for n, logit in gates.named_logits().items():
        moved = logit != before[n]
        assert bool((logit[moved] <= -1e-3).all())  # closed, never opened or raised
        # the ones closed are the group's lowest logits
        if moved.any():
            assert float(before[n][moved].max()) < float(before[n][~moved].min())
        assert len(gates.kept_units(n)) >= 1  # floor (4 channels = 4 units at round_to 4)
    for _ in range(16):
        project(0.0)  # unreachable: every group stops at its floor, nothing below
    assert {n: len(k) for n, k in keep_from_gates(gates).items()} == {"g1": 4, "g2": 4}


def test_projection_closes_past_a_bump_in_a_measured_latency_table() -> None:
    """A measured table need not be monotone: here g1's layer times slower at 24 channels than
    at 32, so the tangent at 32 says narrowing costs time, and a projection that trusted it
    never closed g1 (latency targets stalled far above their value). Going down to 8 pays, so
    g1 closes, least important first; g2 saves nothing and keeps every channel."""
    ladder = [8.0, 16.0, 24.0, 32.0]
    layers = [
        LayerSpec("a", "conv", None, "g1", 3, 32, 1, False, (3, 3), (8, 8)),
        LayerSpec("b", "conv", "g1", "g2", 32, 32, 1, False, (3, 3), (8, 8)),
        LayerSpec("fc", "linear", "g2", None, 32, 4, 1, False, (1, 1), (1, 1)),
    ]
    sa, sb, sf = (layer_shape(la, 1).signature for la in layers)
    table = LatencyTable(
        key="bump",
        device="cpu:test",
        entries={
            sa: LutEntry([3.0], ladder, [[1.0, 1.5, 3.0, 2.5]]),
            sb: LutEntry(ladder, ladder, [[0.1] * 4 for _ in ladder]),
            sf: LutEntry(ladder, [4.0], [[0.1] for _ in ladder]),
        },
        meta={"batch_size": 1, "round_to": 8},
    )
    cost = LatencyCost(layers, table)
    gates = Gates(
        [
            GateGroup.from_channels(n, 32, modules=[], covers=[], round_to=8, min_channels=8)
            for n in ("g1", "g2")
        ]
    )
    with torch.no_grad():
        gates.logit("g1").copy_(torch.linspace(0.1, 3.2, 32))
        gates.logit("g2").copy_(torch.linspace(0.1, 3.2, 32))
    before = gates.logit("g1").clone()
    project = BudgetProjection(_WidthReader(gates, torch.device("cpu")), cost, torch.tensor(2.7))
    for _ in range(4):
        project(0.5)  # 1.35 ms: only g1 at 8 channels (1.2 ms) fits
    kept = {n: len(k) for n, k in keep_from_gates(gates).items()}
    assert kept == {"g1": 8, "g2": 32}
    assert float(cost.cost({"g1": 8.0})) <= 0.5 * 2.7
    assert torch.equal(gates.logit("g1")[24:], before[24:])  # the 8 most important stay


def test_cancellation_raises_job_cancelled() -> None:
    model, gates, cost = _tiny_setup()
    recipe = _recipe(model={"input_size": [3, 8, 8]}, train={"steps": 50})
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    rows: list[dict] = []
    with pytest.raises(JobCancelled):
        train_gates(
            model,
            gates,
            cost,
            load_data(recipe),
            recipe,
            device="cpu",
            on_step=rows.append,
            should_stop=should_stop,
        )
    assert [r["step"] for r in rows] == [1, 2]


def test_resume_continues_exactly() -> None:
    recipe = _recipe(model={"input_size": [3, 8, 8]}, train={"steps": 8, "log_every": 2})
    data = load_data(recipe)
    model, gates, cost = _tiny_setup()
    full = train_gates(model, gates, cost, data, recipe, device="cpu")
    expected = gates.named_logits()

    model2, gates2, cost2 = _tiny_setup()
    saved: list[dict] = []

    def stop_after_checkpoint() -> bool:
        return bool(saved)

    with pytest.raises(JobCancelled):
        train_gates(
            model2,
            gates2,
            cost2,
            data,
            recipe,
            device="cpu",
            should_stop=stop_after_checkpoint,
            on_checkpoint=saved.append,
            checkpoint_every_steps=4,
            checkpoint_every_s=1e9,
        )
    state = saved[0]
    assert state["step"] == 4
    model3, gates3, cost3 = _tiny_setup()
    rows: list[dict] = []
    resumed = train_gates(
        model3,
        gates3,
        cost3,
        data,
        recipe,
        device="cpu",
        on_step=rows.append,
        start_step=state["step"],
        state=state,
    )
    assert [r["step"] for r in rows] == [6, 8]  # on_step gets the logged rows only
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for name, logits in gates3.named_logits().items():
        torch.testing.assert_close(logits, expected[name])
    assert resumed[-1]["multiplier"] == pytest.approx(full[-1]["multiplier"], rel=1e-5)


def test_finetune_moves_student_not_teacher_and_recalibrates_bn() -> None:
    recipe = _recipe(model={"input_size": [3, 8, 8]}, data={"limit": 64, "batch_size": 8})
    data = load_data(recipe)
    teacher, _, _ = _tiny_setup()
    student, _, _ = _tiny_setup(width=16)
    teacher_before = _snapshot(teacher)
    student_before = _snapshot(student)
    rows = finetune(student, teacher, data, recipe, device="cpu")
    assert rows and rows[-1]["step"] == rows[-1]["steps"]
    for k, v in teacher_before.items():
        assert torch.equal(v, teacher.state_dict()[k])
    assert not torch.equal(student_before["conv1.weight"], student.conv1.weight)
    assert not student.training
    # Recalibrated stats equal a plain average of per-batch statistics of bn1's input.
    recalibrate_bn(student, data, 3, batch_size=8, seed=5)
    it = data.train_batches(8, 5)
    with torch.no_grad():
        means = torch.stack([student.conv1(next(it)[0]).mean((0, 2, 3)) for _ in range(3)])
    torch.testing.assert_close(student.bn1.running_mean, means.mean(0), rtol=1e-4, atol=1e-5)
    assert student.bn1.momentum == 0.1


def test_train_classifier_learns_separable_data() -> None:
    recipe = _recipe(
        model={"input_size": [3, 8, 8], "num_classes": 10},
        data={"source": "digits", "limit": 400, "batch_size": 32},
    )
    data = load_data(recipe)
    torch.manual_seed(0)
    model = Tiny(classes=10)
    history = train_classifier(model, data, steps=60, lr=0.1, device="cpu", batch_size=32)
    assert history[-1]["loss"] < history[0]["loss"]
    from hawada.core.evaluate import accuracy

    assert accuracy(model, data.heldout_batches(64), "cpu") > 0.5


def test_step_zero_is_the_teacher() -> None:
    """Gate training starts at the teacher: KD 0 and 100% top-1 agreement at step 0."""
    torch.manual_seed(0)
    recipe = _recipe(
        model={"num_classes": 10},
        data={"source": "digits", "limit": 64, "batch_size": 16},
        train={"steps": 1, "log_every": 1},
    )
    data = load_data(recipe)
    model = build_model("resnet18", 10, stem="cifar").eval()
    with torch.no_grad():  # trained-looking, non-trivial outputs
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    gates = Gates(get_adapter("resnet18").gate_groups(model, recipe.gates))
    init_gate_logits(gates, model)
    handle = attach(model, gates)
    x, _ = next(data.train_batches(16, seed=0))
    with torch.no_grad():
        with gates.using("off"):
            teacher = model(x)
        with gates.using("ste"):
            student = model(x)
    assert torch.equal(student, teacher)
    assert bool((student.argmax(1) == teacher.argmax(1)).all())
    cost = make_cost_model("flops", get_adapter("resnet18").layers(model, (3, 16, 16)))
    rows: list[dict] = []
    train_gates(model, gates, cost, data, recipe, device="cpu", on_step=rows.append)
    handle.remove()
    assert rows[0]["kd"] == pytest.approx(0.0, abs=1e-6)  # the loss of step 0, before its update
    assert rows[0]["cost_ratio"] == pytest.approx(1.0)


def test_penalty_sees_the_exported_widths() -> None:
    """The width reader's value is the snapped hard count, its gradient that of sum(sigmoid)."""
    _model, gates, cost = _tiny_setup()
    with torch.no_grad():
        gates.logit("g1").copy_(torch.linspace(-2.0, 2.0, 32))  # 16 positive -> snapped 16
        gates.logit("g2").copy_(torch.linspace(-3.0, 0.2, 32))  # 2 positive -> floor 4
    reader = _WidthReader(gates, torch.device("cpu"))
    widths = reader(0.5)
    kept = {n: float(len(k)) for n, k in keep_from_gates(gates).items()}
    assert {n: float(w.detach()) for n, w in widths.items()} == kept == {"g1": 16.0, "g2": 4.0}
    widths["g2"].backward()
    expected = torch.autograd.grad(torch.sigmoid(gates.logit("g2") / 0.5).sum(), gates.logit("g2"))
    torch.testing.assert_close(gates.logit("g2").grad, expected[0])
    ratio = float(cost.cost(widths).detach()) / cost.baseline()
    assert ratio == pytest.approx(float(cost.cost(kept)) / cost.baseline())


@pytest.mark.parametrize("count", range(33))
def test_width_reader_snaps_like_the_gates(count: int) -> None:
    _model, gates, _cost = _tiny_setup()
    with torch.no_grad():
        for n in ("g1", "g2"):
            logit = torch.full((32,), -1.0)
            logit[:count] = 1.0
            gates.logit(n).copy_(logit)
    widths = _WidthReader(gates, torch.device("cpu"))(1.0)
    for n in ("g1", "g2"):
        assert float(widths[n]) == float(len(gates.kept_channels(n)))


def test_teacher_cache_runs_the_teacher_once_per_sample_with_the_same_logits() -> None:
    model, gates, cost = _tiny_setup()
    recipe = _recipe(
        model={"input_size": [3, 8, 8]},
        data={"limit": 40, "batch_size": 8, "val_fraction": 0.2},  # 32 train: 4 batches/epoch
        train={"steps": 12, "log_every": 4},  # three epochs
    )
    data = load_data(recipe)
    cache = TeacherCache(len(data.images), 4, "cpu")
    cached = train_gates(model, gates, cost, data, recipe, device="cpu", teacher_cache=cache)
    assert cache.computed == data.n_train  # 96 samples seen, the teacher ran on 32
    model2, gates2, cost2 = _tiny_setup()
    plain = train_gates(model2, gates2, cost2, data, recipe, device="cpu")
    for a, b in zip(cached, plain, strict=True):  # the same training, step for step
        assert a["kd"] == pytest.approx(b["kd"], abs=1e-5)
        assert a["cost_ratio"] == pytest.approx(b["cost_ratio"])
    # fine-tuning distils from the same teacher on the same samples: nothing new to compute
    recipe.finetune.epochs = 1.0
    finetune(Tiny(), model, data, recipe, device="cpu", teacher_cache=cache)
    assert cache.computed == data.n_train
    teacher = Tiny().eval()
    refill = TeacherCache(len(data.images), 4, "cpu")
    x = data.images[:8].float()
    first = refill(teacher, torch.arange(8), x)
    again = refill(teacher, torch.arange(8), torch.zeros_like(x))  # served, not recomputed
    assert torch.equal(first, again) and refill.computed == 8


def test_teacher_cache_over_its_memory_bound_is_off() -> None:
    cache = TeacherCache(1000, 1000, "cpu", max_bytes=1024)
    assert not cache.enabled
    teacher = nn.Linear(3, 1000)
    x = torch.randn(4, 3)
    out = cache(teacher, torch.arange(4), x)
    assert torch.equal(out, teacher(x).detach()) and cache.computed == 4


def test_teacher_cache_persists_per_key_and_merges_rows(tmp_path) -> None:
    teacher = nn.Linear(3, 4).eval()
    x = torch.randn(10, 3)
    path = tmp_path / "t" / "k.safetensors"
    first = TeacherCache(10, 4, "cpu")
    first(teacher, torch.arange(4), x[:4])
    first.meta["heldout_accuracy:ab"] = "0.5"
    first.save(path, "key-a")
    other = TeacherCache(10, 4, "cpu")  # a second job, rows 4..7, saved after the first
    other(teacher, torch.arange(4, 8), x[4:8])
    other.save(path, "key-a")
    later = TeacherCache(10, 4, "cpu")
    assert later.load(path, "key-a") == 8  # both jobs' rows, and the first one's meta
    assert later.meta == {"heldout_accuracy:ab": "0.5"}
    assert later.number("heldout_accuracy:ab") == 0.5 and later.number("absent") is None
    out = later(teacher, torch.arange(8), torch.zeros(8, 3))  # served, not recomputed
    assert later.computed == 0
    with torch.no_grad():
        assert torch.equal(out, teacher(x[:8]))
    # another key, another shape or a damaged file supply nothing, and never raise
    assert TeacherCache(10, 4, "cpu").load(path, "key-b") == 0
    assert TeacherCache(11, 4, "cpu").load(path, "key-a") == 0
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    assert TeacherCache(10, 4, "cpu").load(bad, "key-a") == 0
    assert TeacherCache(10, 4, "cpu").load(tmp_path / "missing.safetensors", "key-a") == 0
