"""Finding and driving the C compiler for the CPU backend.

The first use probes, once per machine and compiler (the answer is cached on
disk), what this toolchain offers: OpenMP, and which vector math functions
of glibc's libmvec link. Kernels are then built with the richest flags that
work; a machine without OpenMP or libmvec still gets correct, slower kernels.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kitsune.cache import cache_dir, write_atomic
from kitsune.codegen.cpu.emit import VECTOR_MATH, math_declarations
from kitsune.codegen.kernel import KernelError

log = logging.getLogger("kitsune")

# -ffp-contract=off: no fused multiply-adds the source did not write, as in
# eager's own kernels: contracted, `x * x - mean(x * x)` over one element was an
# FMA's rounding error instead of 0, and a variance with correction 1 over it
# gave inf instead of eager's 0 / 0 = NaN (found by the random-graph test).
BASE_FLAGS = ["-O3", "-fwrapv", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-shared", "-fPIC",
              "-std=gnu11"]
# Bumped when the probe or the flags change, so that records of an older probe are redone.
PROBE_VERSION = 3


@dataclass(frozen=True)
class Toolchain:
    cc: str
    version: str
    flags: tuple[str, ...]
    libs: tuple[str, ...]
    vector_math: tuple[str, ...]  # libmvec functions declared `omp declare simd`

    def key(self) -> str:
        text = json.dumps([self.cc, self.version, self.flags, self.libs, self.vector_math, _cpu_model()])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def build(self, source: str, output: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="kitsune-cc-") as tmp:
            c_file = Path(tmp, output.stem + ".c")
            c_file.write_text(source)
            so_tmp = Path(tmp, output.name)
            cmd = [self.cc, *self.flags, str(c_file), "-o", str(so_tmp), *self.libs]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelError(f"C compiler failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
            write_atomic(output, so_tmp.read_bytes())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return hashlib.sha256(line.encode()).hexdigest()[:8] + line[:60]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_has(flag: str) -> bool:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return flag in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def _find_compiler() -> str:
    explicit = os.environ.get("KITSUNE_CC")
    candidates = [explicit] if explicit else ["gcc", "cc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise KernelError("no C compiler found (tried %s); set KITSUNE_CC" % ", ".join(candidates))


def _try_build(cc: str, flags: list[str], libs: list[str], source: str) -> bool:
    with tempfile.TemporaryDirectory(prefix="kitsune-probe-") as tmp:
        c_file, so_file = Path(tmp, "probe.c"), Path(tmp, "probe.so")
        c_file.write_text(source)
        proc = subprocess.run([cc, *flags, str(c_file), "-o", str(so_file), *libs], capture_output=True)
        if proc.returncode != 0:
            return False
        try:  # a missing vector symbol shows only at load time
            import ctypes
            ctypes.CDLL(str(so_file))
        except OSError:
            return False
        return True


def _probe_source(vector_math: dict[str, int]) -> str:
    calls = []
    for name, arity in vector_math.items():
        for ctype, suffix in (("float", "f"), ("double", "")):
            args = ", ".join(["p[i]"] * arity)
            calls.append(f"void probe_{name}{suffix}({ctype} *restrict p, long n) {{\n"
                         f"  #pragma omp simd\n  for (long i = 0; i < n; ++i) p[i] = {name}{suffix}({args});\n}}")
    return "#include <math.h>\n" + math_declarations(vector_math) + "\n" + "\n".join(calls) + "\n"


@functools.lru_cache(maxsize=None)
def toolchain() -> Toolchain:
    cc = _find_compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    probe = f"{cc}{version}{_cpu_model()}{PROBE_VERSION}"
    record = cache_dir("cpu") / ("toolchain-" + hashlib.sha256(probe.encode()).hexdigest()[:16] + ".json")
    if record.exists():
        try:
            data = json.loads(record.read_text())
            return Toolchain(cc, version, tuple(data["flags"]), tuple(data["libs"]), tuple(data["vector_math"]))
        except (ValueError, KeyError):
            pass
    flags = list(BASE_FLAGS)
    if _try_build(cc, flags + ["-march=native"], [], "int f(void) { return 0; }\n"):
        flags.append("-march=native")
        # GCC's tuning for AVX-512 machines vectorises 256 bits wide; the whole
        # width runs the math-heavy loops (libmvec's 16-lane expf, erff) a third
        # faster on a Sapphire Rapids (softmax 4096x1024 fp32, one thread: 3.0
        # -> 2.2 ms). Without AVX-512 the option changes nothing.
        if _cpu_has("avx512f") and _try_build(cc, flags + ["-mprefer-vector-width=512"], [],
                                              "int f(void) { return 0; }\n"):
            flags.append("-mprefer-vector-width=512")
    libs: list[str] = ["-lm"]
    if _try_build(cc, flags + ["-fopenmp"], libs, "#include <omp.h>\nint f(void) { return omp_get_max_threads(); }\n"):
        flags.append("-fopenmp")
    else:
        log.warning("%s has no OpenMP; CPU kernels run on one thread", cc)
    vector_math: dict[str, int] = {}
    if "-fopenmp" in flags:
        # All of libmvec, or the oldest set (exp, log, sin, cos, pow), or none.
        for candidate in (VECTOR_MATH, {k: VECTOR_MATH[k] for k in ("exp", "log", "sin", "cos", "pow")}):
            if _try_build(cc, flags, ["-lmvec", "-lm"], _probe_source(candidate)):
                vector_math, libs = candidate, ["-lmvec", "-lm"]
                break
        else:
            log.info("libmvec is not available; transcendental CPU kernels will not vectorise")
    tc = Toolchain(cc, version, tuple(flags), tuple(libs), tuple(sorted(vector_math)))
    write_atomic(record, json.dumps({"flags": tc.flags, "libs": tc.libs, "vector_math": tc.vector_math}))
    log.debug("C toolchain %s %s, libmvec: %s", cc, " ".join(tc.flags), ", ".join(tc.vector_math))
    return tc
