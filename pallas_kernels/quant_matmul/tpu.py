"""Weight-only quantized matmul on TPUs: a Pallas (Mosaic TPU) kernel over the stored [K, N] layout
(reference.py). Not yet measured on a TPU (none has been available): tested in TPU interpret mode and by
lowering for a TPU v6e on CPU.

The grid walks column blocks of W ("parallel") and, inside each, blocks of K ("arbitrary", accumulated in
VMEM). Each step converts its int8 (int4: both nibbles of its bytes) block to x's dtype exactly and runs one
MXU dot per nibble; a group's scale (and its zero times the block's sum of x) applies to the dot's float32
result, so the integers go to the MXU unscaled. int4's two nibbles of a byte block [tile_k, 128] hold two
sets of output columns (reference.py's half-blocks of 64), accumulated apart and put back in column order by
XLA after the call, as are the scales before it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quant_matmul.reference import checked_shapes

MAX_ROWS = 64  # decode-sized batches; longer x goes to XLA's dot


def supported(rows: int, k: int, n: int, group: int, half: int | None) -> bool:
    """Whether the kernel takes these shapes: K and N in lanes of 128 (int4: half-blocks of 64, N in 256s),
    groups of a multiple of 128 rows or one per channel."""
    if rows > MAX_ROWS or k % 128 or not (group == k or group % 128 == 0):
        return False
    return n % 128 == 0 if half is None else half == 64 and n % 256 == 0


def _tile(size: int, options: tuple[int, ...]) -> int:
    return next(t for t in options if size % t == 0)


@functools.partial(jax.jit, static_argnames=("half", "interpret"))
def quant_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None = None, *,
                 half: int | None = None, interpret: bool = False) -> jax.Array:
    """reference.quant_matmul (float32 [M, N]) for supported shapes: x [M, K] @ W stored [K, N] (int8) or
    [K, N // 2] (int4 in half-blocks of `half` = 64), scale (zero) [G, N]. `interpret=True` runs Pallas' TPU
    interpreter on any backend."""
    m, k, n, group, int4 = checked_shapes("quant_matmul.tpu", x, w, scale, half, supported)
    groups = scale.shape[0]
    parts = 2 if int4 else 1
    per_group = int4 or groups > 1
    tile_k = _tile(group if per_group else k, (512, 256, 128))
    tile_n = 128 * parts if int4 else _tile(n, (512, 256, 128))  # output columns per block
    cols = tile_n // parts  # stored columns per block (int4: bytes)
    rows = -(-m // 8) * 8
    xp = jnp.pad(x, ((0, rows - m), (0, 0)))

    def by_part(a: jax.Array) -> jax.Array:
        """[G, N] in column order -> [G, parts, N // parts]: part 0 the low nibbles' columns, 1 the high's."""
        if not int4:
            return a.astype(jnp.float32)[:, None]
        return a.astype(jnp.float32).reshape(groups, n // (2 * half), 2, half).transpose(0, 2, 1, 3).reshape(
            groups, 2, n // 2)

    def kernel(x_ref, w_ref, s_ref, *refs):
        z_ref, o_ref, acc_ref = refs if zero is not None else (None, *refs)
        kk = pl.program_id(1)

        @pl.when(kk == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        xb = x_ref[...]  # [rows, tile_k]
        q = w_ref[...].astype(jnp.int32)  # [tile_k, cols]
        xsum = jnp.sum(xb.astype(jnp.float32), axis=1, keepdims=True) if zero is not None else None
        for i in range(parts):
            part = ((q & 15) if i == 0 else (q >> 4)) if int4 else q
            y = jnp.dot(xb, part.astype(jnp.float32).astype(xb.dtype), preferred_element_type=jnp.float32)
            if per_group:  # this block's group
                y = y * s_ref[0, i][None]
                if zero is not None:
                    y = y + xsum * z_ref[0, i][None]
            acc_ref[i] += y

        @pl.when(kk == pl.num_programs(1) - 1)
        def _():
            for i in range(parts):
                res = acc_ref[i]
                o_ref[i] = res if per_group else res * s_ref[0, i][None]

    group_block = pl.BlockSpec((1, parts, cols), lambda j, kk: (kk * tile_k // group if per_group else 0, 0, j))
    args = [xp, w, by_part(scale)] + ([] if zero is None else [by_part(zero)])
    out = pl.pallas_call(
        kernel,
        grid=(n // tile_n, k // tile_k),
        in_specs=[pl.BlockSpec((rows, tile_k), lambda j, kk: (0, kk)),
                  pl.BlockSpec((tile_k, cols), lambda j, kk: (kk, j)),
                  *[group_block] * (len(args) - 2)],
        out_specs=pl.BlockSpec((parts, rows, cols), lambda j, kk: (0, 0, j)),
        out_shape=jax.ShapeDtypeStruct((parts, rows, n // parts), jnp.float32),
        scratch_shapes=[pltpu.VMEM((parts, rows, cols), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(*args)
    if int4:  # [2, rows, N / 2] in byte order -> [rows, N] in column order
        out = out.reshape(2, rows, n // (2 * half), half).transpose(1, 2, 0, 3).reshape(rows, n)
    else:
        out = out[0]
    return out[:m]


__all__ = ["MAX_ROWS", "quant_matmul", "supported"]
