"""Where Kitsune keeps generated sources, built kernels and tuning decisions.

`KITSUNE_CACHE_DIR` overrides the default `~/.cache/kitsune`. Every entry is
keyed by a hash of what it depends on (including the Kitsune version), so an
old entry is never reused for a new meaning.

Several processes may share the cache (a training job's workers, a test run in
parallel): entries are written atomically (`write_atomic`), and work that
makes an entry (a C library's build) runs under a per-entry file lock
(`file_lock`), so no process reads half a file and an entry is built once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("kitsune")

# How long to wait for another process's build before building anyway
# (atomic writes keep that safe; the lock only saves duplicated work).
LOCK_TIMEOUT_S = 600.0


def cache_dir(*parts: str) -> Path:
    root = os.environ.get("KITSUNE_CACHE_DIR") or os.path.join(Path.home(), ".cache", "kitsune")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a cache file so that a concurrent reader never sees half of it:
    into a temporary file in the same directory, then renamed over `path`
    (atomic on POSIX). The file gets the permissions a plain write would
    (mkstemp's are owner-only), so a cache shared between users still works."""
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = LOCK_TIMEOUT_S):
    """Holds an inter-process lock named by `path` (the file `path` + ".lock")
    for the duration of the block, with the `filelock` package. Where the lock
    cannot be had within `timeout` seconds, or the package is missing, the
    block runs unlocked (with a logged reason): callers write atomically, so
    that costs duplicated work, never a broken file."""
    try:
        import filelock
    except ImportError:
        log.debug("filelock is not installed; %s is built without a lock", path.name)
        yield
        return
    lock = filelock.FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=timeout)
    except (filelock.Timeout, OSError) as error:
        log.warning("no lock on %s (%s); building without it", path, error)
        yield
        return
    try:
        yield
    finally:
        lock.release()


class LRU:
    """An in-process cache of compiled things by structure key, the least recently
    used dropped first once it holds `size` entries (kitsune.lazy's graphs,
    kitsune.ops' kernels)."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict = OrderedDict()

    def get(self, key):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key, entry) -> None:
        self.entries[key] = entry
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)
