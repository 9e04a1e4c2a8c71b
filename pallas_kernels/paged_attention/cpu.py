"""Paged attention for decode steps on CPU: a C++ XLA FFI kernel (cpu.cc) that reads each visible key and value
once from the pages. xla.py's loop gathers every block of pages into a copy first, and at one query per sequence
that copy and its small dots cost several times the KV read (benchmarks/RESULTS.md). Same contract and layout as
reference.ragged_paged_attention, for steps whose sequences have at most one query each, float32 queries, float32
pages or int8 pages with their scales, and a head_dim that is a multiple of 16; xla.py serves every other step.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_ffi

SOURCE = Path(__file__).with_name("cpu.cc")
TARGET = "jaxllm_decode_attention"


def available() -> bool:
    """Whether the kernel is built and registered (False, with one logged reason, where it cannot be)."""
    return cpu_ffi.register(SOURCE, ((TARGET, "JaxllmDecodeAttention"),))


def supported(q: jax.Array, k_pages: jax.Array, max_query_len: int, quantized: bool) -> bool:
    """Whether this step can run here: a CPU, one query per sequence, float32 q, float32 pages (int8 when
    `quantized`), head_dim % 16 == 0."""
    num_heads, head_dim = q.shape[1:]
    pages = jnp.int8 if quantized else jnp.float32
    return (jax.default_backend() == "cpu" and max_query_len == 1 and head_dim % 16 == 0 and q.dtype == jnp.float32
            and k_pages.dtype == pages and num_heads // k_pages.shape[2] <= 64 and available())


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                           seq_lens: jax.Array, query_start_loc: jax.Array, *, max_query_len: int, scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                           out: jax.Array | None = None) -> jax.Array:
    """reference.ragged_paged_attention's contract for max_query_len == 1 (see `supported`; int8 pages come with
    k_scale, v_scale [num_pages, page_size, num_kv_heads]). `out` (float32 like q; tests: NaN-filled) becomes
    the result's buffer, so an element the kernel does not write keeps its value."""
    if max_query_len != 1:
        raise ValueError(f"the CPU kernel runs decode steps (max_query_len == 1), got {max_query_len}")
    if not available():
        raise RuntimeError("the CPU paged-attention kernel could not be built (see the logged reason)")
    unused = jnp.zeros((1, 1, 1), jnp.float32)
    quantized = k_scale is not None
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            input_output_aliases={8: 0} if out is not None else None)
    i32 = lambda a: a.astype(jnp.int32)  # noqa: E731
    scales = (k_scale, v_scale) if quantized else (unused, unused)
    return call(q, k_pages, v_pages, i32(block_tables), i32(seq_lens), i32(query_start_loc), *scales,
                out if out is not None else unused, scale=np.float32(scale), soft_cap=np.float32(soft_cap or 0.0),
                window=np.int64(sliding_window or 0), quantized=np.int64(quantized))
