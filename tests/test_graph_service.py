"""The service end to end on three graph-derived families: a job for mobilenet_v3_small,
efficientnet_b0 and vgg11_bn over HTTP through the real worker (`hawada serve`: API + Celery
worker subprocesses), tiny inputs and steps; the artifacts download, `load_pruned` returns the
plain torchvision class, and the reloaded model reproduces the reported held-out accuracy on
the same seeded held-out sample."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from services import Service, base_env, tiny_recipe

pytestmark = pytest.mark.slow

#: arch -> (input side, torchvision class name); VGG's five pools need 32 pixels.
JOBS = {
    "mobilenet_v3_small": (16, "MobileNetV3"),
    "efficientnet_b0": (16, "EfficientNet"),
    "vgg11_bn": (32, "VGG"),
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    var_dir = tmp_path_factory.mktemp("graph-service")
    svc = Service(base_env(var_dir), var_dir, embedded=True)
    try:
        yield svc
    finally:
        svc.stop()


def _recipe(arch: str, side: int) -> dict[str, Any]:
    return tiny_recipe(
        model={"arch": arch, "input_size": [3, side, side]},
        data={"limit": 96, "batch_size": 16},
        train={"steps": 4, "log_every": 2},
    )


@pytest.mark.parametrize("arch", sorted(JOBS))
def test_job_on_a_new_family_succeeds_and_reloads(
    service: Service, arch: str, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import save_file

    from hawada.adapters.torchvision import build_model, load_pruned
    from hawada.core.data import load_data
    from hawada.core.evaluate import accuracy
    from hawada.core.recipe import parse_recipe

    side, cls = JOBS[arch]
    torch.manual_seed(0)
    weights = tmp_path / f"{arch}.safetensors"
    save_file(build_model(arch, num_classes=10, stem="cifar").state_dict(), str(weights))
    recipe = _recipe(arch, side)
    job = service.client.submit(recipe, weights, idempotency_key=uuid.uuid4().hex)
    try:
        job = service.client.wait(job["id"], poll_s=0.5, timeout=600)
    except TimeoutError:
        pytest.fail(f"{arch} job did not finish\n{service.tail()}")
    assert job["status"] == "succeeded", f"{job.get('error')}\n{service.tail()}"

    out = tmp_path / "out"
    out.mkdir()
    for name in ("pruned.json", "pruned.safetensors", "report.json"):
        service.client.download(job["id"], name, out)
    report = json.loads((out / "report.json").read_text())
    model = load_pruned(out / "pruned.json", out / "pruned.safetensors")
    assert type(model).__name__ == cls and type(model).__module__.startswith("torchvision")
    assert sum(p.numel() for p in model.parameters()) == report["pruned"]["params"]
    assert report["pruned"]["flops"] < report["baseline"]["flops"]
    assert report["layers"] and all(g["after"] <= g["before"] for g in report["layers"])

    data = load_data(parse_recipe(recipe))
    assert data.n_heldout == report["data"]["n_heldout"] > 0
    got = accuracy(model, data.heldout_batches(16), "cpu")
    assert got == pytest.approx(report["pruned"]["accuracy"], abs=1e-9)
