"""Weight-only quantized matmul (int8, int4): the storage layouts and oracle (reference.py), the GPU kernels
for decode-sized batches (gpu.py through Triton, hopper.py and hopper_nk.py through Mosaic GPU), the TPU
kernel (tpu.py), XLA's one-row form of the transposed layout (xla.py), the CPU kernel (cpu.py), and
`quant_linear`, which picks between them and XLA's dot per call shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import cpu, gpu, hopper, hopper_nk, reference, tpu
from pallas_kernels.quant_matmul.reference import dequantize, pack_half, pack_int4, quantize, to_nk, unpack_int4
from pallas_kernels.quant_matmul.xla import row_matmul, row_matmul_many

# The attention backends (jaxllm.attention.BACKENDS) whose platform runs the Pallas GPU kernel here, and
# those that run the C++ kernel when the platform is a CPU ("sharded": tensor parallel, XLA only).
KERNEL_BACKENDS = {"pallas-gpu": False, "pallas-interpret": True}  # -> interpret mode
TPU_KERNEL_BACKENDS = {"pallas-tpu": False, "pallas-tpu-interpret": True}  # tpu.py's kernel (-> interpret mode)
CPU_KERNEL_BACKENDS = ("reference", "xla")
HOPPER_MIN_ROWS = 17  # int4 from here to 64 rows runs hopper.py's kernel on an H100/H200 (gemv_forms, 64 rows)
ROW_MAX_ROWS = 1  # the nk layout's XLA row reduction (xla.py) reads W once per row of x
# One row through hopper_nk.py's kernel rather than the row reduction, on an H100/H200 (gemv_forms, H200):
ROW_KERNEL_INT4 = 1 << 25  # int4 W of this many weights or more (gate/up/down: 19-23 us against 26-27)
ROW_MAX_N = 32768  # int8 W wider than this (LM heads: 160 us against 222), or deeper than wide (down_proj: 23
#                   against 27; k/v_proj: 3.6 us in the model, 5 through the row reduction)
# One row of int8 q/k/v through one fused row reduction (xla.row_matmul_many): 10.3 us on an H200 against 14.7
# for q's reduction and k/v's kernel calls. Not int4: XLA copies each int4 piece out before reducing it.
ROW_MANY = True
ROW_MANY_INT4_KERNEL = True  # one row of int4 q/k/v through one hopper_nk call (its fixed cost paid once)
# One row of a lone int8 matrix that takes the row reduction (o_proj) cut into pieces of this many outputs, one
# multi-output reduction as q/k/v's (which read 25 MB in the time o_proj reads 16.8 on an H200). 0: off, until
# measured (decode_profile's "-pieces").
ROW_PIECES = 0


def quant_linear(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None, half: int | None,
                 dtype, backend: str, nk: bool = False) -> jax.Array:
    """x [M, K] @ W [K, N] -> [M, N] in `dtype`, W stored as reference.py lays it out. Small M runs a kernel
    that reads W as stored: a Pallas kernel on a GPU backend (gpu.py; hopper.py for bf16 int4 at
    HOPPER_MIN_ROWS-64 rows on an H100/H200), the Pallas TPU kernel (tpu.py) on a TPU backend, the C++
    one (cpu.py) on a CPU; otherwise int8 with one scale per channel scales the product instead (on CPU
    through int8_dot_two_level), and the rest XLA dequantizes to `dtype` inside the matmul's fusion. The nk
    layout: one row through XLA's row reduction (xla.py) or, on an H100/H200, the larger layers through
    hopper_nk.py's kernel (`_row_kernel`), 2-64 rows through that kernel, the rest as above."""
    m, k = x.shape
    groups, n = scale.shape
    if nk:
        return _quant_linear_nk(x, w, scale, zero, dtype, backend)
    bf16_int4 = w.dtype == jnp.uint8 and jnp.dtype(dtype) == jnp.bfloat16  # (the Hopper kernel computes in bf16)
    if (backend in KERNEL_BACKENDS and bf16_int4 and m >= HOPPER_MIN_ROWS and _is_hopper(backend)
            and hopper.supported(m, k, n, k // groups, half)):
        return hopper.quant_matmul(x, w, scale, zero, half=half, stages=2, piped_scales=True,
                                   interpret=KERNEL_BACKENDS[backend]).astype(dtype)
    if backend in KERNEL_BACKENDS and gpu.supported(m, k, n, k // groups, half):
        return gpu.quant_matmul(x.astype(dtype), w, scale, zero, half=half,
                                interpret=KERNEL_BACKENDS[backend]).astype(dtype)
    if backend in TPU_KERNEL_BACKENDS and tpu.supported(m, k, n, k // groups, half):
        return tpu.quant_matmul(x.astype(dtype), w, scale, zero, half=half,
                                interpret=TPU_KERNEL_BACKENDS[backend]).astype(dtype)
    if backend in CPU_KERNEL_BACKENDS and jax.default_backend() == "cpu" and m <= cpu.MAX_ROWS and cpu.available():
        return cpu.quant_matmul(x, w, scale, zero, half).astype(dtype)
    return _xla_matmul(x, w, scale, zero, half, dtype)


def _quant_linear_nk(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None, dtype,
                     backend: str) -> jax.Array:
    m, k = x.shape
    route = _nk_route(m, k, w, scale, dtype, backend)
    if route == "row":
        return row_matmul(x, w, scale, zero).astype(dtype)
    if route == "kernel":
        return hopper_nk.quant_matmul(x, w, scale, zero).astype(dtype)
    return _xla_matmul(x, w, scale, zero, None, dtype, nk=True)


def _nk_route(m: int, k: int, w: jax.Array, scale: jax.Array, dtype, backend: str) -> str:
    """Where x [M, K] @ W (nk layout) runs: "row" (XLA's row reduction), "kernel" (hopper_nk.py on an
    H100/H200: 2-64 rows, and one row of the layers it reads faster, `_row_kernel`) or "xla" (XLA's dot)."""
    kernel = _nk_kernel_takes(m, k, scale, dtype, backend)
    if m <= ROW_MAX_ROWS and not (kernel and _row_kernel(k, scale.shape[1], w.dtype == jnp.int4)):
        return "row"
    return "kernel" if kernel else "xla"


def _nk_kernel_takes(m: int, k: int, scale: jax.Array, dtype, backend: str) -> bool:
    """Whether hopper_nk.py's kernel runs x [M, K] @ W (nk layout, `scale` [G, N]) here: bf16 on an H100/H200."""
    groups, n = scale.shape
    return (backend in KERNEL_BACKENDS and jnp.dtype(dtype) == jnp.bfloat16 and _is_hopper(backend)
            and hopper_nk.supported(m, k, n, k // groups))


def _row_kernel(k: int, n: int, int4: bool) -> bool:
    """Whether one row of x @ W [K, N] reads W faster through hopper_nk.py's kernel than the row reduction."""
    return k * n >= ROW_KERNEL_INT4 if int4 else n > ROW_MAX_N or k > n


def _xla_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None, half: int | None, dtype,
                nk: bool = False) -> jax.Array:
    """XLA's own paths: int8 with one scale per channel scales the product (on a CPU, [K, N], through
    int8_dot_two_level); the rest dequantizes W to `dtype` inside the matmul's fusion."""
    if scale.shape[0] == 1 and zero is None:
        if jax.default_backend() == "cpu" and not nk:
            return int8_dot_two_level(x, w, scale).astype(dtype)
        dims = (((1,), (1 if nk else 0,)), ((), ()))
        return jax.lax.dot_general(x.astype(dtype), w.astype(dtype), dims) * scale.astype(dtype)
    return jnp.dot(x.astype(dtype), dequantize(w, scale, zero, half, dtype, nk))


def _is_hopper(backend: str) -> bool:
    """Whether the backend's device is an H100/H200 (interpret mode keeps to gpu.py: the Mosaic GPU
    interpreter is far slower; tests call hopper.py directly)."""
    return not KERNEL_BACKENDS[backend] and getattr(jax.devices()[0], "compute_capability", "") == "9.0"


def quant_linear_many(x: jax.Array, mats: list[tuple], half: int | None, dtype, backend: str,
                      nk: bool = False) -> list[jax.Array]:
    """quant_linear of one x by several (w, scale, zero) (a layer's q/k/v, or gate/up): on a GPU backend one
    kernel call for all of them when they tile alike (gpu.quant_matmul_many; in the nk layout on an
    H100/H200 hopper_nk.quant_matmul_many, when each would run that kernel alone, and for one row of int4).
    One row of int8 in the nk layout otherwise takes one pass over all of them (xla.row_matmul_many; not under
    tensor parallelism, where its pieces would cut across shards), and with ROW_PIECES so does a lone int8 matrix
    that takes the row reduction. Otherwise one call each."""
    m, k = x.shape
    one_row_int8 = m <= ROW_MAX_ROWS and backend != "sharded" and mats[0][0].dtype == jnp.int8
    if backend in KERNEL_BACKENDS and len(mats) > 1 and not nk and gpu.supported_many(m, k, mats, half):
        outs = gpu.quant_matmul_many(x.astype(dtype), tuple(mats), half=half, interpret=KERNEL_BACKENDS[backend])
        return [y.astype(dtype) for y in outs]
    if nk and len(mats) > 1 and reference.alike(mats):
        routes = {_nk_route(m, k, w, s, dtype, backend) for w, s, _ in mats}
        one_call = (ROW_MANY_INT4_KERNEL and m <= ROW_MAX_ROWS and mats[0][0].dtype == jnp.int4
                    and all(_nk_kernel_takes(m, k, s, dtype, backend) for _, s, _ in mats))
        if routes == {"kernel"} or one_call:
            return [y.astype(dtype) for y in hopper_nk.quant_matmul_many(x, tuple(mats))]
        if ROW_MANY and one_row_int8 and (ys := row_matmul_many(x, mats)) is not None:
            return [y.astype(dtype) for y in ys]
    if (ROW_PIECES and nk and len(mats) == 1 and one_row_int8
            and _nk_route(m, k, mats[0][0], mats[0][1], dtype, backend) == "row"
            and (ys := row_matmul_many(x, mats, ROW_PIECES)) is not None):
        return [ys[0].astype(dtype)]
    return [quant_linear(x, w, scale, zero, half, dtype, backend, nk) for w, scale, zero in mats]


def int8_dot_two_level(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """x [M, K] @ (int8 W [K, N] * scale [1, N]) -> float32 [M, N] through an int8 x int8 -> int32 dot, which
    XLA's CPU backend runs 1.4-1.8x faster than a float32 dot at decode sizes (it materializes a converted W
    instead: 8x slower; benchmarks/RESULTS.md). Each row of x is split in two int8 rows, x ~ d1 a1 + d2 a2:
    a1 at 1/127 of the row's max, a2 the remainder at 1/127 of its own max, so the split is off by at most
    1/64516 of the row's max (activations quantized once lose 4% perplexity on SmolLM2)."""
    m = x.shape[0]
    x = x.astype(jnp.float32)
    d1 = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    d1 = jnp.where(d1 > 0, d1, 1.0)
    a1 = jnp.round(x / d1)
    rest = x - a1 * d1
    d2 = jnp.max(jnp.abs(rest), axis=1, keepdims=True) / 127.0
    d2 = jnp.where(d2 > 0, d2, 1.0)
    a = jnp.concatenate([a1, jnp.round(rest / d2)]).astype(jnp.int8)  # [2M, K]
    acc = jax.lax.dot_general(a, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)  # [2M, N]
    return (acc[:m].astype(jnp.float32) * d1 + acc[m:].astype(jnp.float32) * d2) * scale.astype(jnp.float32)


__all__ = ["dequantize", "int8_dot_two_level", "pack_half", "pack_int4", "quant_linear", "quant_linear_many",
           "quantize", "row_matmul", "row_matmul_many", "to_nk", "unpack_int4"]
