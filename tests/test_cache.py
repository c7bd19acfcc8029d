"""The on-disk cache shared between processes: atomic writes, the per-entry
file lock, and two processes building the same C library at once."""
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from kitsune import cache

# One process of the concurrent-build test: probes the toolchain, waits until
# its sibling is ready too, builds a small kernel library (each build slowed
# down so that the two overlap) and runs it.
_BUILDER = textwrap.dedent("""
    import importlib, os, sys, time
    from pathlib import Path
    import torch
    from kitsune.codegen.cpu import compile_kernels
    toolchain_module = importlib.import_module("kitsune.codegen.cpu.toolchain")
    from kitsune.codegen.kernel import KernelInput, KernelOutput, KernelSpec
    from kitsune.ir.index import Index
    from kitsune.ir.scalar import load

    shared = Path(sys.argv[1])
    real_build = toolchain_module.Toolchain.build

    def slow_build(self, source, output):
        with open(shared / "builds.log", "a") as log:
            log.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # the sibling arrives while this build runs
        real_build(self, source, output)

    toolchain_module.Toolchain.build = slow_build
    toolchain_module.toolchain()
    (shared / f"ready-{os.getpid()}").touch()
    deadline = time.time() + 120
    while len(list(shared.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.01)
    a = load(0, Index.var(), torch.float32)
    spec = KernelSpec("k", 1000, (KernelInput("in0", torch.float32),),
                      (KernelOutput("out0", torch.float32, Index.var(), a * 2.0 + 1.0),))
    (kernel,) = compile_kernels([spec])
    if isinstance(kernel, BaseException):
        raise kernel
    x, out = torch.randn(1000), torch.empty(1000)
    kernel([x], [out])
    torch.testing.assert_close(out, x * 2.0 + 1.0)
    print("built and ran")
""")


def test_two_processes_build_one_library(tmp_path):
    """Both processes load and run the library; the lock makes one build it
    while the other waits and reuses it."""
    from kitsune.codegen.cpu.toolchain import toolchain
    toolchain()  # probed once here (and its record shared) rather than twice below
    (tmp_path / "cache" / "cpu").mkdir(parents=True)
    for record in cache.cache_dir("cpu").glob("toolchain-*.json"):
        shutil.copy(record, tmp_path / "cache" / "cpu")
    env = dict(os.environ, KITSUNE_CACHE_DIR=str(tmp_path / "cache"), KITSUNE_BACKEND="cpu",
               PYTHONPATH=os.pathsep.join([str(Path(cache.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and "built and ran" in out, err[-3000:]
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # the second process reused the first's
    libraries = list((tmp_path / "cache" / "cpu").glob("kitsune_*.so"))
    assert len(libraries) == 1 and libraries[0].with_suffix(".c").exists()
    assert not list((tmp_path / "cache" / "cpu").glob("*.tmp"))


def test_write_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "entry.json"
    cache.write_atomic(path, "first")
    cache.write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert stat.S_IMODE(path.stat().st_mode) == cache._FILE_MODE  # not mkstemp's owner-only mode
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "entry.json"
    cache.write_atomic(path, "kept")
    with pytest.raises(TypeError):
        cache.write_atomic(path, 12345)  # not str or bytes: fails while writing
    assert path.read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == ["entry.json"]


def test_file_lock_excludes_and_times_out(tmp_path):
    """A second holder waits for the first; one that cannot get the lock in
    time runs unlocked (callers write atomically) rather than failing."""
    target = tmp_path / "lib.so"
    order = []
    with cache.file_lock(target):
        waiter = threading.Thread(target=lambda: _hold(target, order))
        waiter.start()
        waiter.join(0.3)
        order.append("first released")
    waiter.join(10)
    assert order == ["first released", "second held"]
    with cache.file_lock(target):
        with cache.file_lock(target, timeout=0.05):  # another lock object: times out, runs anyway
            order.append("unlocked")
    assert order[-1] == "unlocked"


def _hold(target, order):
    with cache.file_lock(target):
        order.append("second held")


def test_file_lock_without_filelock(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "filelock", None)
    with cache.file_lock(tmp_path / "lib.so"):
        pass
