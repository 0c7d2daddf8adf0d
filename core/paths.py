"""Confining user-named paths to configured folders. No torch: the API uses it too."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def resolve_within(path_text: str, roots: Sequence[Path] | None) -> Path | None:
    """`path_text` resolved (symlinks and `..` followed), or None when it lies outside every root.

    `roots=None` means unrestricted (a local user's own `hawada run`).
    """
    path = Path(path_text).expanduser().resolve()
    if roots is None or any(path.is_relative_to(Path(r).resolve()) for r in roots):
        return path
    return None
