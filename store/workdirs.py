"""Per-job scratch on the worker's disk: gate-training checkpoints and attempt work folders.

`var/checkpoints/<job id>/` lets a re-queued attempt resume; `var/work/<job id>-*` is one
attempt's scratch. Both exist only while the job can still run: they are removed when the job
ends or is deleted, and the reaper sweeps what a killed attempt left behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hawada.store.artifacts import check_job_id


def checkpoint_dir(var_dir: Path | str, job_id: str) -> Path:
    """Where the job's checkpoints live."""
    return Path(var_dir) / "checkpoints" / check_job_id(job_id)


def work_root(var_dir: Path | str) -> Path:
    """The folder holding every attempt's work folder."""
    return Path(var_dir) / "work"


def work_dirs(var_dir: Path | str, job_id: str) -> list[Path]:
    """Work folders of the job's attempts (`<job id>-*`)."""
    root = work_root(var_dir)
    return sorted(root.glob(f"{check_job_id(job_id)}-*")) if root.is_dir() else []


def remove_job_leftovers(var_dir: Path | str, job_id: str) -> None:
    """Remove the job's checkpoints and every attempt's work folder (no error when absent)."""
    shutil.rmtree(checkpoint_dir(var_dir, job_id), ignore_errors=True)
    for folder in work_dirs(var_dir, job_id):
        shutil.rmtree(folder, ignore_errors=True)
