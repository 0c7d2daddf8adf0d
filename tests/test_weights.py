"""Safe weight loading: round trips, wrapper/timm layouts, refusals that never execute code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18, resnet34

from hawada.core.errors import WeightsError
from hawada.core.weights import load_weights, map_state_dict, read_state_dict


def _source(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = resnet18(num_classes=10)
    # Non-default BN statistics, so a load that skipped buffers would show.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    return _source()


def test_safetensors_roundtrip(tmp_path: Path, source: torch.nn.Module) -> None:
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    target = resnet18(num_classes=10)
    summary = load_weights(target, path)
    assert summary.ok and len(summary.mapped) == len(source.state_dict())
    assert _same_outputs(source, target)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".PT"])
def test_pt_roundtrip(tmp_path: Path, source: torch.nn.Module, suffix: str) -> None:
    path = tmp_path / f"w{suffix}"
    torch.save(source.state_dict(), path)
    target = resnet18(num_classes=10)
    load_weights(target, path)
    assert _same_outputs(source, target)


def test_checkpoint_dict_with_metadata_is_unwrapped(
    tmp_path: Path, source: torch.nn.Module
) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "lr": 0.1, "state_dict": source.state_dict()}, path)
    target = resnet18(num_classes=10)
    load_weights(target, path)
    assert _same_outputs(source, target)


@pytest.mark.parametrize("prefix", ["module.", "model.", "model.module."])
def test_wrapper_prefixes_stripped(tmp_path: Path, source: torch.nn.Module, prefix: str) -> None:
    path = tmp_path / "w.safetensors"
    save_file({prefix + k: v for k, v in source.state_dict().items()}, str(path))
    target = resnet18(num_classes=10)
    summary = load_weights(target, path)
    assert _same_outputs(source, target)
    assert summary.renamed[prefix + "fc.weight"] == "fc.weight"
    assert summary.to_dict()["counts"]["renamed"] == len(source.state_dict())


def test_timm_layout_head_fc_and_missing_num_batches_tracked(
    tmp_path: Path, source: torch.nn.Module
) -> None:
    sd = {}
    for k, v in source.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # timm checkpoints often lack these
        sd[("head." + k) if k.startswith("fc.") else k] = v
    path = tmp_path / "timm.safetensors"
    save_file(sd, str(path))
    target = resnet18(num_classes=10)
    summary = load_weights(target, path)
    assert _same_outputs(source, target)
    assert summary.ok
    assert summary.renamed == {"head.fc.weight": "fc.weight", "head.fc.bias": "fc.bias"}
    assert "bn1.num_batches_tracked" in summary.filled
    assert summary.to_dict()["counts"]["filled"] == 20


def test_wrong_architecture_names_keys(tmp_path: Path) -> None:
    path = tmp_path / "r34.safetensors"
    save_file(resnet34(num_classes=10).state_dict(), str(path))
    with pytest.raises(WeightsError) as info:
        load_weights(resnet18(num_classes=10), path, arch="resnet18")
    err = info.value
    assert err.code == "weights_mismatch"
    assert err.message.startswith("weights do not fit resnet18")
    assert "unexpected keys: layer1.2.bn1.bias" in err.message  # parameters before BN counters
    assert "deeper architecture" in err.message


def test_wrong_num_classes_names_shapes(tmp_path: Path, source: torch.nn.Module) -> None:
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    with pytest.raises(WeightsError) as info:
        load_weights(resnet18(num_classes=7), path)
    message = info.value.message
    assert info.value.code == "weights_mismatch"
    assert "fc.weight expects [7, 512], got [10, 512]" in message
    assert "10 classes" in message


def test_missing_keys_named(tmp_path: Path, source: torch.nn.Module) -> None:
    sd = dict(source.state_dict())
    del sd["layer4.1.bn2.weight"]
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    target = resnet18(num_classes=10)
    before = target.conv1.weight.clone()
    with pytest.raises(WeightsError, match=r"1 missing keys: layer4\.1\.bn2\.weight"):
        load_weights(target, path)
    assert torch.equal(target.conv1.weight, before)  # nothing half-loaded


def test_map_state_dict_reports_without_loading(source: torch.nn.Module) -> None:
    sd = dict(source.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    sd["fc.bias"] = torch.zeros(3)
    tensors, summary = map_state_dict(resnet18(num_classes=10), sd)
    assert summary.unexpected == ["extra.weight"]
    assert summary.mismatched == [("fc.bias", (10,), (3,))]
    assert "fc.bias" not in tensors and not summary.ok
    d = summary.to_dict()
    assert d["counts"]["mismatched"] == 1 and d["mismatched"][0] == {
        "key": "fc.bias",
        "expected": [10],
        "got": [3],
    }


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_without_executing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # Both torch's zip format and a bare legacy pickle stream.
    zip_path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Evil(marker)}, zip_path)
    raw_path = tmp_path / "evil.pth"
    raw_path.write_bytes(pickle.dumps({"payload": _Evil(marker)}))
    for path in (zip_path, raw_path):
        with pytest.raises(WeightsError) as info:
            read_state_dict(path)
        assert info.value.code == "bad_weights"
        assert "weights_only=False" not in info.value.message
        assert not marker.exists()
    # The refusal names what it refused.
    with pytest.raises(WeightsError, match="system"):
        read_state_dict(zip_path)


def test_whole_module_pickle_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(resnet18(num_classes=2), path)
    with pytest.raises(WeightsError, match="state_dict"):
        read_state_dict(path)


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_garbage_bytes_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(os.urandom(1024))
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    assert info.value.code == "bad_weights"


@pytest.mark.parametrize("name", ["w.bin", "w.onnx", "w", "w.pkl"])
def test_wrong_extension_refused(tmp_path: Path, source: torch.nn.Module, name: str) -> None:
    path = tmp_path / name
    torch.save(source.state_dict(), path)
    with pytest.raises(WeightsError, match="unsupported weights file"):
        read_state_dict(path)


def test_missing_file_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_non_tensor_values_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"conv1.weight": torch.zeros(1), "note": "hello", "n": 3}, path)
    with pytest.raises(WeightsError, match="not named tensors") as info:
        read_state_dict(path)
    assert "'note'" in info.value.message


def test_empty_and_non_mapping_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    with pytest.raises(WeightsError, match="no tensors"):
        read_state_dict(empty)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(WeightsError, match="not a state dict"):
        read_state_dict(listed)
