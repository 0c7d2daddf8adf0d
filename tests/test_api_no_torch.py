"""The API process must never import torch (docs/internals.md): checked in a clean interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from fastapi.testclient import TestClient
    from hawada.api.main import create_app
    from hawada.api.queue import CeleryEnqueuer
    from hawada.settings import get_settings

    settings = get_settings()
    app = create_app(settings)  # the real Celery enqueuer over the filesystem broker
    assert isinstance(app.state.enqueue, CeleryEnqueuer)
    client = TestClient(app)
    from weights_files import fitting_safetensors  # names and shapes from the catalogue

    weights = fitting_safetensors("resnet18", 10, "imagenet")  # checked: shapes, finite floats
    recipe = "model: {arch: resnet18, num_classes: 10}\\ndata: {source: synthetic}"
    statuses = [
        client.get("/healthz").status_code,
        client.get("/readyz").status_code,
        client.get("/v1/architectures").status_code,
        client.get("/v1/recipes").status_code,
        client.post("/v1/jobs", data={"recipe": recipe},
                    files={"weights": ("w.safetensors", weights)}).status_code,
        client.get("/v1/jobs").status_code,
        client.get("/metrics").status_code,
        client.get("/openapi.json").status_code,
    ]
    queued = sorted(p.name for p in settings.broker_dir.iterdir())
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
    print(json.dumps({"statuses": statuses, "heavy": heavy, "queued": len(queued)}))
    """
)


def test_api_never_imports_torch(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAWADA_")}
    env.update(
        HAWADA_VAR_DIR=str(tmp_path / "var"),
        PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        OMP_NUM_THREADS="1",
    )
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # /readyz: 503 here, honestly: no worker process beats its heartbeat in this test.
    assert result["statuses"] == [200, 503, 200, 200, 202, 200, 200, 200]
    assert result["queued"] == 1  # the job id reached the broker folder, as a worker would see it
    assert result["heavy"] == []
