"""Weight-only quantized matmul on CPU for decode-sized batches: a C++ XLA FFI kernel (cpu.cc) that reads the
stored int8 / int4 weights once and converts them in registers.

XLA's CPU backend has no fast path for this: an int8 x int8 dot at one row, or a converted weight, runs 8-10x
slower than a float32 dot, and even its two-row int8 dot (`int8_dot_two_level`) reads int8 at about a third
of the float32 dot's bytes per second (benchmarks/RESULTS.md). The kernel is compiled on first use with the
machine's C++ compiler (`$CXX`, else `c++`; -O3 -march=native) into a cache keyed by the source, compiler,
CPU and jaxlib, then registered as an FFI target. Without a compiler it logs once why, and callers keep the
XLA path (`available()` is False). JAXLLM_CPU_KERNEL=0 turns it off (for A/B runs).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger("jaxllm")

SOURCE = Path(__file__).with_name("cpu.cc")
TARGET = "jaxllm_quant_matmul"
MAX_ROWS = 8  # beyond this XLA's dot (or the two-level int8 dot) is faster: benchmarks/RESULTS.md
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _cache_dir() -> Path:
    root = os.environ.get("JAXLLM_KERNEL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "jaxllm" / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiled for), so a shared cache never serves another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(compiler: str | None = None) -> Path:
    """Compile cpu.cc into the cache (once per source, compiler, CPU and jaxlib) and return the library's path.
    Raises RuntimeError with the compiler's message when it cannot."""
    compiler = compiler or os.environ.get("CXX") or "c++"
    exe = shutil.which(compiler)
    if exe is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX, or install g++)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_flags(),
                                    jax.__version__, platform.machine()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"quant_matmul_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        lib = Path(tmp) / out.name
        cmd = [exe, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(lib)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(lib, out)  # atomic: a concurrent build finds a whole file or none
    return out


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (False, with one logged reason, where it cannot be)."""
    if os.environ.get("JAXLLM_CPU_KERNEL", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as e:
        logger.warning("the CPU quantized-matmul kernel is unavailable, quantized layers use XLA's slower "
                       "path: %s", e)
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxllmQuantMatmul), platform="cpu")
    return True


def quant_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None = None,
                 half: int | None = None, out: jax.Array | None = None) -> jax.Array:
    """Same contract as reference.quant_matmul: x [M, K] @ W -> float32 [M, N], W int8 [K, N] or int4 packed
    [K, N // 2] with its `half`. `out` (float32 [M, N], tests: NaN-filled) becomes the result's buffer, so an
    element the kernel does not write keeps its value. Needs available()."""
    if not available():
        raise RuntimeError("the CPU quantized-matmul kernel could not be built (see the logged reason)")
    m, k = x.shape
    groups, n = scale.shape
    int4 = w.dtype == jnp.uint8
    if int4 and (half is None or w.shape != (k, n // 2)):
        raise ValueError(f"int4 weights must be packed [K, N // 2] = {(k, n // 2)} with their half, got {w.shape}")
    if not int4 and w.shape != (k, n):
        raise ValueError(f"int8 weights must be [K, N] = {(k, n)}, got {w.shape}")
    if k % groups:
        raise ValueError(f"{groups} groups must divide K = {k}")
    unused = jnp.zeros((1, 1), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32),
                            input_output_aliases={4: 0} if out is not None else None)
    return call(x.astype(jnp.float32), w, scale.astype(jnp.float32),
                zero.astype(jnp.float32) if zero is not None else unused, out if out is not None else unused,
                half=np.int64(half if int4 else 0), has_zero=np.int64(zero is not None))
