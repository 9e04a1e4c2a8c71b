"""Weight-only quantized matmul on NVIDIA GPUs for small batches (decode): one Pallas kernel (Triton lowering)
that reads int8 or packed int4 weights, converts them in registers and multiplies on the tensor cores.

At batch 1-64 a linear layer is a read of its weights: XLA's dequantize-then-dot reads int8 at about half
of the bandwidth (benchmarks/RESULTS.md). Here a program owns a [*, block_n] column strip of W and a 1/splits
share of K: it walks its K range in steps of `block_k` rows, each step a dot of x's [rows, block_k] slice
with the step's weights converted to x's dtype (integers up to 127 are exact in bf16). Grouped scales apply
per group to the dot's result (and the zero through the group's row sums of x), so the conversion is only
int -> float; one scale per channel (G = 1) applies once at the end. The splits write float32 partials
[splits, rows, N] that XLA sums. Rows are padded to a power of two >= 16 for the tensor cores.

Layouts and the oracle: reference.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_ROWS = 64  # beyond this a matmul is no longer a weight read: the caller uses XLA's dequantize + dot


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _kernel(x_ref, w_ref, s_ref, *refs, block_k: int, steps: int, group: int, half: int | None, per_group: bool,
            precision):
    """x_ref [rows, K] (whole); w_ref [K, block_n] (int4: [K, block_n // 2]) this program's column strip;
    s_ref (and z_ref) [G, block_n]; o_ref [rows, block_n] this split's partial."""
    z_ref, o_ref = (refs[0], refs[1]) if len(refs) == 2 else (None, refs[0])
    split = pl.program_id(1)
    rows, block_n = o_ref.shape
    sub = min(group, block_k)  # rows of W sharing one scale within a step
    if half is None:  # int8: the strip is one tile
        cols = [(0, block_n)]
    else:  # int4: byte columns [p * half, (p + 1) * half) hold output columns [2p * half, (2p + 2) * half)
        cols = [(c, half) for p in range(block_n // (2 * half)) for c in (2 * p * half, (2 * p + 1) * half)]

    def dot(a, b):
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)

    def tiles(k):  # rows [k, k + sub) of the strip, one float tile per output column block of `cols`
        if half is None:
            return [w_ref[pl.ds(k, sub), :].astype(x_ref.dtype)]
        out = []
        for p in range(len(cols) // 2):
            w = w_ref[pl.ds(k, sub), pl.ds(p * half, half)]
            out += [(w & 15).astype(x_ref.dtype), (w >> 4).astype(x_ref.dtype)]
        return out

    def scaled(terms, row_sums, g):  # a group's dot products, scaled (and shifted by zero * its row sums of x)
        out = []
        for (c0, c), term in zip(cols, terms):
            term = term * s_ref[pl.ds(g, 1), pl.ds(c0, c)]
            if z_ref is not None:
                term = term + row_sums * z_ref[pl.ds(g, 1), pl.ds(c0, c)]
            out.append(term)
        return out

    def body(i, accs):
        k0 = (split * steps + i) * block_k
        for u in range(block_k // sub):
            k = k0 + u * sub
            xs = x_ref[:, pl.ds(k, sub)]
            terms = [dot(xs, t) for t in tiles(k)]
            if per_group:
                row_sums = jnp.sum(xs.astype(jnp.float32), axis=1, keepdims=True) if z_ref is not None else None
                terms = scaled(terms, row_sums, k // group)
            accs = tuple(a + t for a, t in zip(accs, terms))
        return accs

    accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((rows, c), jnp.float32) for _, c in cols))
    if not per_group:  # int8, one scale per channel: applied once, over the whole of K
        accs = scaled(accs, None, 0)
    for (c0, c), acc in zip(cols, accs):
        o_ref[:, pl.ds(c0, c)] = acc


def supported(rows: int, k: int, n: int, group: int, half: int | None) -> bool:
    """Whether the kernel takes these shapes: few rows, and tiles the tensor cores accept (>= 16 along every
    dot dimension)."""
    block_n = 2 * half if half else math.gcd(n, 128)
    return rows <= MAX_ROWS and k % 16 == 0 and min(group, 128) % 16 == 0 and block_n >= 16 and n % block_n == 0


def choose_params(rows: int, k: int, n: int, half: int | None, block_k: int | None = None, block_n: int | None = None,
                  num_cores: int = 132) -> dict:
    """Tiling from the shapes: column strips of 128 (int4: 2 * half), steps of 128 rows of W (several groups
    per step when groups are smaller), and K splits for ~2 programs per SM."""
    if not block_n:  # int4 at <= 16 rows: two packed pairs a strip (gate/up/down 44-46 vs 52-54 us, H100 sweep)
        block_n = (4 * half if rows <= 16 and n % (4 * half) == 0 else 2 * half) if half else math.gcd(n, 128)
    block_k = block_k or math.gcd(k, 128)
    if n % block_n or (half and block_n % (2 * half)):
        raise ValueError(f"block_n {block_n} must divide N = {n}" + (f" in pairs of {half}" if half else ""))
    total = k // block_k
    want = -(-2 * num_cores // (n // block_n))
    splits = max(d for d in range(1, total + 1) if total % d == 0 and d <= max(1, want))
    return {"block_n": block_n, "block_k": block_k, "num_splits": splits, "num_warps": 4, "num_stages": 3}


@functools.partial(jax.jit, static_argnames=("half", "block_k", "block_n", "num_splits", "num_warps", "num_stages",
                                             "interpret"))
def quant_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None = None, *,
                 half: int | None = None, block_k: int | None = None, block_n: int | None = None,
                 num_splits: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None, interpret: bool = False) -> jax.Array:
    """Same contract as reference.quant_matmul (float32 [M, N]) for M <= MAX_ROWS; knobs default from
    choose_params."""
    m, k = x.shape
    groups, n = scale.shape
    bits = 4 if w.dtype == jnp.uint8 else 8
    if m > MAX_ROWS:
        raise ValueError(f"quant_matmul kernel takes at most {MAX_ROWS} rows, got {m}")
    if bits == 4 and (half is None or w.shape != (k, n // 2)):
        raise ValueError(f"int4 weights must be packed [K, N // 2] = {(k, n // 2)} with their half, got {w.shape}")
    group = k // groups
    p = choose_params(m, k, n, half if bits == 4 else None, block_k, block_n)
    block_k, block_n = p["block_k"], p["block_n"]
    splits = num_splits or p["num_splits"]
    steps = k // (block_k * splits)
    if steps * block_k * splits != k or (groups > 1 and block_k % group and group % block_k):
        raise ValueError(f"block_k {block_k} x num_splits {splits} must tile K = {k} in whole groups of {group}")
    rows = max(16, _pow2(m))
    xp = jnp.pad(x, ((0, rows - m), (0, 0)))
    per_group = groups > 1 or zero is not None  # int4's zero enters through each group's row sums of x
    strip = block_n // 2 if bits == 4 else block_n
    in_specs = [pl.BlockSpec((rows, k), lambda j, s: (0, 0)), pl.BlockSpec((k, strip), lambda j, s: (0, j)),
                pl.BlockSpec((groups, block_n), lambda j, s: (0, j))]
    args = [xp, w, scale.astype(jnp.float32)]
    if zero is not None:
        in_specs.append(pl.BlockSpec((groups, block_n), lambda j, s: (0, j)))
        args.append(zero.astype(jnp.float32))
    kernel = functools.partial(_kernel, block_k=block_k, steps=steps, group=group if per_group else k,
                               half=half if bits == 4 else None, per_group=per_group,
                               precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None)
    partial = pl.pallas_call(
        kernel,
        grid=(n // block_n, splits),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, rows, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or p["num_warps"],
                                             num_stages=num_stages or p["num_stages"]),
        interpret=interpret,
        name=f"quant_matmul_int{bits}_bk{block_k}_s{splits}",
    )(*args)
    return partial.sum(axis=0)[:m]
