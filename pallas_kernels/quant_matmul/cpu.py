"""Weight-only quantized matmul on CPU for decode-sized batches: a C++ XLA FFI kernel (cpu.cc) that reads the
stored int8 / int4 weights once and converts them in registers.

XLA's CPU backend has no fast path for this: an int8 x int8 dot at one row, or a converted weight, runs 8-10x
slower than a float32 dot, and even its two-row int8 dot (`int8_dot_two_level`) reads int8 at about a third
of the float32 dot's bytes per second (benchmarks/RESULTS.md). Built and registered by pallas_kernels.cpu_ffi
on first use; where it cannot be, `available()` is False and callers keep the XLA path.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_ffi

SOURCE = Path(__file__).with_name("cpu.cc")
TARGET = "jaxllm_quant_matmul"
MAX_ROWS = 8  # beyond this XLA's dot (or the two-level int8 dot) is faster: benchmarks/RESULTS.md


def available() -> bool:
    """Whether the kernel is built and registered (False, with one logged reason, where it cannot be)."""
    return cpu_ffi.register(SOURCE, ((TARGET, "JaxllmQuantMatmul"),))


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
