"""Gate-training checkpoints: a job interrupted mid-training resumes where it stopped.

A checkpoint is a pair of files in the job's checkpoint folder: tensors (gate logits, Adam
moments) in `train_state.safetensors` and scalars in `train_state.json`, keyed by a fingerprint
of the recipe and the weights so that a checkpoint never resumes a different job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hawada.core.recipe import Recipe, recipe_hash
from hawada.core.train import TrainState
from hawada.worker.files import write_json, write_safetensors

TENSORS = "train_state.safetensors"
SCALARS = "train_state.json"


def fingerprint(recipe: Recipe, weights: Path) -> str:
    """What a checkpoint must match to be resumed: the recipe and the weights file's size."""
    return f"{recipe_hash(recipe)}:{weights.stat().st_size}"


def save_checkpoint(directory: Path, snapshot: TrainState, fingerprint: str) -> None:
    """Write the gate-training state; tensors first, then the JSON naming their step.

    The JSON is written last and names the step the tensors hold, so a crash between the two
    writes leaves a pair that `load_checkpoint` recognises as inconsistent and ignores.
    """
    directory.mkdir(parents=True, exist_ok=True)
    step = int(snapshot["step"])
    tensors = {f"gates/{k}": v for k, v in snapshot["gates"].items()}
    tensors.update({f"norm/{k}": v for k, v in snapshot.get("norm_stats", {}).items()})
    opt = snapshot["optimizer"]
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{pid}/{k}"] = v
            else:
                opt_scalars.setdefault(str(pid), {})[k] = v
    write_safetensors(directory / TENSORS, tensors, metadata={"step": str(step)})
    write_json(
        directory / SCALARS,
        {
            "fingerprint": fingerprint,
            "step": step,
            "multiplier": float(snapshot["multiplier"]),
            "start_ratio": snapshot["start_ratio"],
            "history": snapshot["history"],
            "param_groups": opt["param_groups"],
            "opt_scalars": opt_scalars,
        },
    )


def load_checkpoint(directory: Path, fingerprint: str) -> TrainState | None:
    """The state `save_checkpoint` wrote, or None when absent, stale or from another job."""
    meta_path, tensor_path = directory / SCALARS, directory / TENSORS
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
    gates_sd = {k[len("gates/") :]: v for k, v in tensors.items() if k.startswith("gates/")}
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, pid, name = k.split("/", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for pid, scalars in meta.get("opt_scalars", {}).items():
        opt_state.setdefault(int(pid), {}).update(scalars)
    norm_stats = {k[len("norm/") :]: v for k, v in tensors.items() if k.startswith("norm/")}
    return {
        "step": int(meta["step"]),
        "gates": gates_sd,
        "norm_stats": norm_stats,
        "multiplier": float(meta["multiplier"]),
        "start_ratio": meta.get("start_ratio"),
        "history": meta.get("history", []),
        "optimizer": {"state": opt_state, "param_groups": meta["param_groups"]},
    }


def clear_checkpoint(directory: Path) -> None:
    """The job finished: its checkpoint must not resume a later run."""
    for name in (SCALARS, TENSORS):
        (directory / name).unlink(missing_ok=True)
