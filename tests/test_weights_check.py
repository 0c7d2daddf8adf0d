"""Weights are validated at submission, before anything is queued, without torch in the API.

Another architecture's weights, wrong num_classes or stem, NaN/infinite values and pickles that
would import anything but tensor rebuilders answer 422; nothing is kept or enqueued.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors
from weights_files import fitting_safetensors

from hawada.adapters.torchvision import build_model
from hawada.api.main import create_app
from hawada.api.weights_check import _pickle_globals
from hawada.core.architectures import expected_state_dict, supported_architectures

RECIPE = {
    "model": {"arch": "resnet18", "num_classes": 10, "stem": "cifar"},
    "data": {"source": "synthetic"},
}


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    """SQLite only: nothing here depends on the database."""
    from hawada.settings import Settings

    return Settings(var_dir=tmp_path / "var", database_url=f"sqlite:///{tmp_path / 'h.db'}")


@pytest.fixture
def api(settings: Any, enqueued: Any) -> Any:
    with TestClient(
        create_app(settings, enqueue=enqueued), raise_server_exceptions=False
    ) as client:
        yield client


def submit(client: TestClient, weights: bytes, name: str = "w.safetensors", **model: Any) -> Any:
    recipe = json.loads(json.dumps(RECIPE))
    recipe["model"].update(model)
    return client.post(
        "/v1/jobs", data={"recipe": json.dumps(recipe)}, files={"weights": (name, weights)}
    )


def uploads(settings: Any) -> list[Path]:
    root = Path(settings.artifacts_dir) / "uploads"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def refused(resp: Any, code: str, enqueued: Any, settings: Any) -> str:
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == code
    assert enqueued.job_ids == []
    assert uploads(settings) == []
    return str(error["message"])


@pytest.mark.parametrize("arch", sorted(supported_architectures()))
@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_shape_table_matches_the_real_model(arch: str, stem: str) -> None:
    """The torch-free table equals the state dict torch builds, for an unusual num_classes."""
    from hawada.adapters.torchvision.registry import build_skeleton

    real = {k: tuple(v.shape) for k, v in build_skeleton(arch, 13, stem).state_dict().items()}
    assert expected_state_dict(arch, 13, stem) == real


def test_real_weights_pass(api: TestClient, enqueued: Any, settings: Any, tmp_path: Path) -> None:
    model = build_model("resnet18", num_classes=10, stem="cifar")
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}  # DataParallel prefix is fine
    assert submit(api, save_safetensors(sd)).status_code == 202
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, buf)  # a training checkpoint
    assert submit(api, buf.getvalue(), name="w.pth").status_code == 202
    assert len(enqueued.job_ids) == 2


def test_other_architecture_is_422(api: TestClient, enqueued: Any, settings: Any) -> None:
    message = refused(
        submit(api, fitting_safetensors("resnet34", 10, "cifar")),
        "weights_mismatch",
        enqueued,
        settings,
    )
    assert "resnet18" in message and "unexpected" in message


def test_wrong_num_classes_and_stem_are_422(api: TestClient, enqueued: Any, settings: Any) -> None:
    message = refused(
        submit(api, fitting_safetensors("resnet18", 100, "cifar")),
        "weights_mismatch",
        enqueued,
        settings,
    )
    assert "fc.weight expects [10, 512], got [100, 512]" in message
    assert "100 classes" in message
    message = refused(
        submit(api, fitting_safetensors("resnet18", 10, "imagenet")),
        "weights_mismatch",
        enqueued,
        settings,
    )
    assert "conv1.weight" in message and "stem" in message


@pytest.mark.parametrize(
    ("dtype", "bad"),
    [
        (torch.float32, float("nan")),
        (torch.float16, float("inf")),
        (torch.bfloat16, float("nan")),
        (torch.float64, float("-inf")),
    ],
)
def test_nonfinite_weights_are_422(
    api: TestClient, enqueued: Any, settings: Any, dtype: torch.dtype, bad: float
) -> None:
    sd = build_model("resnet18", num_classes=10, stem="cifar").state_dict()
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    sd["layer3.1.conv2.weight"].view(-1)[12345] = bad
    message = refused(submit(api, save_safetensors(sd)), "nonfinite_weights", enqueued, settings)
    assert "layer3.1.conv2.weight" in message
    assert message.startswith("1 tensors")


def _zip_with_pickle(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/version", b"3\n")
    return buf.getvalue()


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_that_would_run_code_is_422(
    api: TestClient, enqueued: Any, settings: Any, tmp_path: Path, protocol: int
) -> None:
    marker = tmp_path / "ran"
    payload = pickle.dumps({"fc.weight": _RunsCode(marker)}, protocol=protocol)
    message = refused(
        submit(api, _zip_with_pickle(payload), name="w.pt"), "unsafe_weights", enqueued, settings
    )
    assert "posix.system" in message or "os.system" in message
    assert not marker.exists()  # scanned, never executed


def test_torch_save_of_a_module_is_422(api: TestClient, enqueued: Any, settings: Any) -> None:
    """A whole nn.Module pickles its class: refused, naming it."""
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buf)
    message = refused(
        submit(api, buf.getvalue(), name="w.pt"), "unsafe_weights", enqueued, settings
    )
    assert "torch.nn.modules.linear.Linear" in message


def test_stack_global_the_scan_cannot_follow_is_refused() -> None:
    # STACK_GLOBAL on names built at run time (here: a DUP of one string) is not decidable.
    data = b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94h\x00h\x01\x93."
    assert list(_pickle_globals(data)) == ["posix system"]
    tricky = b"\x80\x04\x8c\x05posix\x942\x93."  # DUP: the names come from the stack
    with pytest.raises(ValueError, match="cannot follow"):
        list(_pickle_globals(tricky))


def test_json_submission_checks_the_registered_model(
    api: TestClient, enqueued: Any, settings: Any
) -> None:
    resp = api.post(
        "/v1/models", files={"weights": ("w.safetensors", fitting_safetensors("resnet18", 10))}
    )
    assert resp.status_code == 201, resp.text
    model_id = resp.json()["id"]
    other = {**RECIPE, "model": {**RECIPE["model"], "num_classes": 5}}
    resp = api.post("/v1/jobs", json={"recipe": other, "model_id": model_id})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "weights_mismatch"
    resp = api.post("/v1/jobs", json={"recipe": RECIPE, "model_id": model_id})
    assert resp.status_code == 202, resp.text
