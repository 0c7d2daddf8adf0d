"""Writing a file so that readers see the old content or the new, never a part of it.

The one atomic write of the project: engine artifacts, reports, latency-table caches,
baseline weights and the artifact store all go through `atomic_write`. Imports nothing of ours.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path | str, write: Callable[[Path], T], *, mode: int = 0o644, durable: bool = False
) -> T:
    """Call `write(tmp)` on a fresh temporary file beside `path`, then rename it over `path`.

    The temporary file (`.<name>.<random>.tmp` in the same folder, so the rename is atomic) is
    removed when `write` raises. `mode` is applied before the rename: some writers
    (safetensors, mkstemp) create 0600 files while artifacts are meant to be shared.
    `durable=True` also fsyncs the file and the folder, so the new content survives a power
    loss (the artifact store wants this; caches and scratch files do not). Missing parent
    folders are created. Returns what `write` returned.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        result = write(tmp)
        os.chmod(tmp, mode)
        if durable:
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(target.parent)
    return result
