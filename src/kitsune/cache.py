"""Where Kitsune keeps generated sources, built kernels and tuning decisions.

`KITSUNE_CACHE_DIR` overrides the default `~/.cache/kitsune`. Every entry is
keyed by a hash of what it depends on (including the Kitsune version), so an
old entry is never reused for a new meaning.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = os.environ.get("KITSUNE_CACHE_DIR") or os.path.join(Path.home(), ".cache", "kitsune")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a cache file so that a concurrent reader never sees half of it."""
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, mode) as f:
        f.write(data)
    os.replace(tmp, path)
