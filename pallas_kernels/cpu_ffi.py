"""The C++ CPU kernels (XLA FFI custom calls): compiled on first use with the machine's C++ compiler (`$CXX`,
else `c++`; -O3 -march=native) into a cache keyed by the source, compiler, CPU and jax version, then registered
as FFI targets. Without a compiler `register` logs once why and returns False, and callers keep their XLA path.
JAXLLM_CPU_KERNELS=0 turns them all off (A/B runs).
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

logger = logging.getLogger("jaxllm")

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
HEADER = Path(__file__).with_name("cpu_common.h")  # shared by the kernels: vector loads, the parallel loop


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


def build(source: Path, compiler: str | None = None) -> Path:
    """Compile `source` into the cache (once per source, compiler, CPU and jax) and return the library's path.
    Raises RuntimeError with the compiler's message when it cannot."""
    compiler = compiler or os.environ.get("CXX") or "c++"
    exe = shutil.which(compiler)
    if exe is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX, or install g++)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), HEADER.read_text(), version, " ".join(FLAGS), _cpu_flags(),
                                    jax.__version__, platform.machine()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{source.parent.name}_{source.stem}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        lib = Path(tmp) / out.name
        cmd = [exe, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{HEADER.parent}", str(source), "-o", str(lib)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(lib, out)  # atomic: a concurrent build finds a whole file or none
    return out


@functools.cache
def register(source: Path, targets: tuple[tuple[str, str], ...]) -> bool:
    """Build `source` and register each (FFI target name, exported handler symbol) on the CPU platform; False
    (with one logged reason) where that cannot be done or JAXLLM_CPU_KERNELS=0."""
    if os.environ.get("JAXLLM_CPU_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build(source)))
    except (RuntimeError, OSError) as e:
        logger.warning("the CPU kernel %s is unavailable, its XLA fallback runs instead (slower): %s", source.name, e)
        return False
    for target, symbol in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True
