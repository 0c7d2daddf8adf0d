"""Files on disk: job artifacts addressed by (job id, name) and uploaded inputs.

Layout under `root`: `jobs/<job id>/<name>` and `uploads/<kind>/<id><suffix>`. Every write goes
to a temporary file in the destination folder, is fsynced and then renamed over the target
(`hawada.atomic.atomic_write`), so a reader never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from hawada.atomic import atomic_write

# The artifacts of a succeeded job (docs/contract.md): nothing else can be stored or served.
ARTIFACT_NAMES = frozenset(
    {
        "pruned.safetensors",
        "pruned.json",
        "keepall.safetensors",
        "gates.safetensors",
        "report.json",
        "report.html",
        "pruned.onnx",
        "pruned.pt2",
    }
)
UPLOAD_KINDS = frozenset({"weights", "dataset", "heldout", "models"})
CHUNK = 1024 * 1024
_HEX_ID = re.compile(r"^[0-9a-f]{32}$")
_SUFFIX = re.compile(r"^(\.[a-z0-9]{1,12}){0,2}$")


class UploadTooLarge(ValueError):
    """An upload exceeded its byte cap; nothing of it was kept."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"upload exceeds the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


def check_job_id(job_id: str) -> str:
    """Return `job_id` if it is a 32-char lowercase hex id, else raise ValueError."""
    if not _HEX_ID.match(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return job_id


def check_artifact_name(name: str) -> str:
    """Return `name` if it is an allowed artifact name, else raise ValueError."""
    if "/" in name or "\\" in name or name not in ARTIFACT_NAMES:
        raise ValueError(f"unknown artifact name {name!r}")
    return name


def _copy_hashing(src: BinaryIO, dst: BinaryIO, max_bytes: int | None) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise UploadTooLarge(max_bytes)
        digest.update(chunk)
        dst.write(chunk)
    return size, digest.hexdigest()


def _atomic_write(target: Path, src: BinaryIO, max_bytes: int | None = None) -> tuple[int, str]:
    """Copy `src` to `target` atomically and durably; returns (size, sha256 hex)."""

    def copy(tmp: Path) -> tuple[int, str]:
        with tmp.open("wb") as out:
            return _copy_hashing(src, out, max_bytes)

    # 0600 as before: uploads are user data; API and worker run as the same user.
    return atomic_write(target, copy, mode=0o600, durable=True)


def file_sha256(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


class ArtifactStore:
    """Job artifacts and uploads under one root folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        """Folder holding the artifacts of one job."""
        return self.root / "jobs" / check_job_id(job_id)

    def path(self, job_id: str, name: str) -> Path:
        """Where artifact `name` of `job_id` lives (it may not exist yet)."""
        return self.job_dir(job_id) / check_artifact_name(name)

    def write(self, job_id: str, name: str, src: bytes | BinaryIO | Path) -> tuple[int, str]:
        """Store an artifact atomically from bytes, an open binary file or a path.

        Returns (size, sha256 hex) of what was written.
        """
        target = self.path(job_id, name)
        if isinstance(src, bytes):
            return _atomic_write(target, io.BytesIO(src))
        if isinstance(src, Path):
            with src.open("rb") as fh:
                return _atomic_write(target, fh)
        return _atomic_write(target, src)

    @contextmanager
    def open(self, job_id: str, name: str) -> Iterator[BinaryIO]:
        """Open an artifact for reading (FileNotFoundError when absent)."""
        with self.path(job_id, name).open("rb") as fh:
            yield fh

    def exists(self, job_id: str, name: str) -> bool:
        """True when the artifact file is on disk."""
        return self.path(job_id, name).is_file()

    def delete_job(self, job_id: str) -> None:
        """Remove every artifact of a job (no error when there are none)."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def save_upload(
        self, kind: str, stream: BinaryIO, max_bytes: int, suffix: str = ""
    ) -> tuple[Path, int, str]:
        """Stream an upload to `uploads/<kind>/<new id><suffix>` with a byte cap.

        Returns (path, size, sha256 hex). Raises `UploadTooLarge` past `max_bytes`, leaving
        nothing on disk.
        """
        if kind not in UPLOAD_KINDS:
            raise ValueError(f"unknown upload kind {kind!r}")
        suffix = suffix.lower()
        if not _SUFFIX.match(suffix):
            raise ValueError(f"invalid file suffix {suffix!r}")
        target = self.root / "uploads" / kind / f"{uuid.uuid4().hex}{suffix}"
        size, sha = _atomic_write(target, stream, max_bytes)
        return target, size, sha

    def is_upload(self, path: Path | str) -> bool:
        """True when `path` lies inside this store's upload area (safe to delete)."""
        try:
            Path(path).resolve().relative_to((self.root / "uploads").resolve())
        except ValueError:
            return False
        return True

    def delete_upload(self, path: Path | str) -> None:
        """Remove an upload file; paths outside the upload area are left alone."""
        if self.is_upload(path):
            Path(path).unlink(missing_ok=True)
