"""core/latency.py: timing statistics on the running device, caller's model left untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hawada.core.device import device_name
from hawada.core.latency import (
    LatencyStats,
    effective_dtype,
    measure_latency,
    measure_latency_interleaved,
    summarize,
)
from hawada.core.recipe import LatencySpec

SPEC = LatencySpec(batch_size=2, dtype="float32", repeats=5, warmup=1, channels_last=False)
INPUT = (3, 16, 16)


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and after[k].device == v.device, k
        assert torch.equal(after[k], v), k


def test_stats_are_ordered_and_describe_the_run() -> None:
    stats = measure_latency(_small_cnn(), INPUT, SPEC, "cpu")
    assert isinstance(stats, LatencyStats)
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.batch_size == 2 and stats.repeats == 5
    assert stats.dtype == "float32" and stats.channels_last is False
    assert stats.device == device_name("cpu")
    d = stats.to_dict()
    assert {
        "median_ms",
        "p10_ms",
        "p90_ms",
        "device",
        "batch_size",
        "dtype",
        "channels_last",
        "repeats",
    } <= d.keys()


def test_model_is_not_modified() -> None:
    model = _small_cnn().train()
    before = _snapshot(model)
    measure_latency(model, INPUT, SPEC, "cpu")
    _assert_same(model, before)
    assert model.training  # the train/eval flag is restored


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_and_channels_last_run_on_a_copy(dtype: str) -> None:
    model = _small_cnn().eval()
    before = _snapshot(model)
    stats = measure_latency(
        model, INPUT, SPEC.model_copy(update={"dtype": dtype, "channels_last": True}), "cpu"
    )
    # measured in the requested dtype when the CPU supports it, else float32 with a note saying so
    assert stats.dtype == dtype or (stats.dtype == "float32" and stats.note and dtype in stats.note)
    assert stats.channels_last is True and stats.median_ms > 0
    _assert_same(model, before)
    assert next(model.parameters()).is_contiguous()  # caller's memory format unchanged


def test_recipe_latency_block_is_accepted() -> None:
    from hawada.core.recipe import LatencySpec

    spec = LatencySpec(batch_size=1, repeats=3, warmup=0)
    stats = measure_latency(_small_cnn(), INPUT, spec, "cpu")
    assert stats.batch_size == 1 and stats.repeats == 3


def test_cpu_time_clock_is_labelled() -> None:
    stats = measure_latency(_small_cnn(), INPUT, SPEC, "cpu", clock="cpu")
    assert stats.median_ms > 0 and "CPU time" in (stats.note or "")
    with pytest.raises(ValueError, match="clock"):
        measure_latency(_small_cnn(), INPUT, SPEC, "cpu", clock="sundial")


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        LatencySpec(dtype="int8")  # the recipe schema refuses it first
    with pytest.raises(ValueError, match="dtype"):
        effective_dtype("int8", torch.device("cpu"))


def test_summarize_percentiles() -> None:
    med, p10, p90 = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert med == 3.0
    assert p10 == pytest.approx(1.4)
    assert p90 == pytest.approx(4.6)


def test_cpu_device_name_names_model_and_threads() -> None:
    name = device_name("cpu")
    assert name.startswith("cpu:") and name.endswith(f"x{torch.get_num_threads()}")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_cuda_event_timing_on_gpu() -> None:
    model = _small_cnn()
    before = _snapshot(model)
    stats = measure_latency(model, INPUT, SPEC.model_copy(update={"repeats": 10}), "cuda")
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.device == torch.cuda.get_device_name(0)
    _assert_same(model, before)  # still on the CPU in float32
    assert torch.backends.cudnn.benchmark is False  # restored after timing


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_profiling_on_gpu(dtype: str) -> None:
    model = _small_cnn().cuda()
    stats = measure_latency(
        model, INPUT, SPEC.model_copy(update={"dtype": dtype, "channels_last": True}), "cuda"
    )
    assert stats.dtype == dtype and stats.note is None
    assert next(model.parameters()).dtype == torch.float32


class _Recorder(nn.Module):
    """Appends its tag to a shared log on every forward pass."""

    def __init__(self, tag: str, log: list[str]) -> None:
        super().__init__()
        self.tag, self.log = tag, log
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.tag)
        return self.conv(x)


def test_interleaved_measurement_alternates_the_models() -> None:
    log: list[str] = []
    a, b = _Recorder("a", log), _Recorder("b", log)
    before = _snapshot(a)
    stats = measure_latency_interleaved([a, b], INPUT, SPEC, "cpu")
    # warm-up of each, then rounds A B, B A, ...: each model first as often as last
    assert log == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert len(stats) == 2 and all(s.repeats == 5 for s in stats)
    assert all(0 < s.p10_ms <= s.median_ms <= s.p90_ms for s in stats)
    assert "interleaved" in (stats[0].note or "")
    _assert_same(a, before)
    assert a.training  # the caller's train/eval flag is restored


def test_single_model_measurement_is_the_interleaved_one_of_one() -> None:
    log: list[str] = []
    stats = measure_latency(_Recorder("a", log), INPUT, SPEC, "cpu")
    assert log == ["a"] * (1 + 5) and stats.note is None


def test_module_costs_add_up_to_the_model() -> None:
    from torchvision.models import resnet18

    from hawada.core.evaluate import count_flops
    from hawada.core.profile import module_costs

    model = resnet18(num_classes=4).eval()
    costs = module_costs(model, INPUT, SPEC, "cpu")
    assert sum(c["flops"] for c in costs.values()) == count_flops(model, INPUT)
    assert {"conv1", "bn1", "layer1.0.conv1", "layer4.1.bn2", "fc"} <= costs.keys()
    assert costs["layer1.0.conv1"]["flops"] == 2 * 64 * 64 * 9 * 4 * 4  # 16x16 in, /4 by stem
    assert all(c["ms"] >= 0 for c in costs.values())
    assert costs["relu"]["ms"] > 0  # called several times per pass (shared ReLU), all counted
