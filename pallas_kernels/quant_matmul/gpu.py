"""Weight-only quantized matmul on NVIDIA GPUs for small batches (decode): one Pallas kernel (Triton lowering)
that reads int8 or packed int4 weights and converts them in registers, with two bodies.

At batch 1-64 a linear layer is a read of its weights: XLA's dequantize-then-dot reads int8 at about half
of the bandwidth (benchmarks/RESULTS.md). Here a program owns a [*, block_n] column strip of W and a 1/splits
share of K, and walks its K range in steps of `block_k` rows:

- "dot" (the tensor cores): each step is a dot of x's [rows, block_k] slice with the step's weights converted
  to x's dtype (integers up to 127 are exact in bf16). Grouped scales apply per group to the dot's result
  (and the zero through the group's row sums of x); one scale per channel (G = 1) applies once at the end.
  Rows are padded to a power of two >= 16.
- "gemv" (CUDA cores, 1-8 rows): the weights are dequantized to float32 and multiplied into an elementwise
  [block_k, block_n] accumulator per row of x, reduced over K once at the end; no padding, no MMA staging.
  The default for int8 at one row only: at 8 rows its accumulators spill (5-40x slower, H200 sweep).

`convert="magic"` turns integers into floats with exponent bits instead of conversion instructions (a
quarter of the ALU rate on Hopper): OR-ing a nibble q into the bits of bf16 128.0 reads as 128 + q, whose 128
the int4 zero absorbs; int8 goes through float32 2^23 + 128 + q less that constant. The splits write float32
partials [splits, rows, N] that XLA sums.

Layouts and the oracle: reference.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.quant_matmul.reference import alike

MAX_ROWS = 64  # beyond this a matmul is no longer a weight read: the caller uses XLA's dequantize + dot
# Several matrices in one call: each branch of the kernel gets its own pipelining buffers in shared memory,
# so wide tiles run out of it (q/k/v at 64 rows asked an H200 for 240 KB of its 227); 16 rows ran.
MANY_MAX_ROWS = 16
GEMV_MAX_ROWS = 8  # the CUDA-core body keeps a [block_k, block_n] float32 accumulator per row of x
BODIES = ("dot", "gemv")
CONVERTS = ("cast", "magic")


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _to_float(v: jax.Array, dtype, magic: bool) -> tuple[jax.Array, int]:
    """An integer tile (int8 q, or uint8 nibbles 0..15) -> (float tile in dtype, offset): the tile holds q + offset."""
    if not magic:
        return v.astype(dtype), 0
    if v.dtype == jnp.int8:  # 2^23 + 128 + q as float32 bits, less the constant: exact
        f = jax.lax.bitcast_convert_type(v.astype(jnp.int32) + 0x4B000080, jnp.float32) - 8388736.0
        return f.astype(dtype), 0
    if dtype == jnp.bfloat16:  # bf16 128.0 is 0x4300 and its 7 mantissa bits step by 1: 128 + q
        return jax.lax.bitcast_convert_type(v.astype(jnp.uint16) | 0x4300, jnp.bfloat16), 128
    return jax.lax.bitcast_convert_type(v.astype(jnp.uint32) | 0x4B000000, jnp.float32) - 8388608.0, 0


def _tiles(w_ref, k: int, sub: int, half: int | None, pairs: int, dtype, magic: bool) -> list[tuple[jax.Array, int]]:
    """Rows [k, k + sub) of the program's strip as float tiles, one per output column block of _columns."""
    if half is None:  # int8: the strip is one tile
        return [_to_float(w_ref[pl.ds(k, sub), :], dtype, magic)]
    out = []
    for p in range(pairs):  # int4: byte columns [p * half, (p + 1) * half) -> two blocks of `half` outputs
        w = w_ref[pl.ds(k, sub), pl.ds(p * half, half)]
        out += [_to_float(w & 15, dtype, magic), _to_float(w >> 4, dtype, magic)]
    return out


def _columns(block_n: int, half: int | None) -> list[tuple[int, int]]:
    """(first output column, width) of each tile of a strip: int4 byte columns [p * half, (p + 1) * half) hold
    output columns [2p * half, (2p + 2) * half)."""
    if half is None:
        return [(0, block_n)]
    return [(c, half) for p in range(block_n // (2 * half)) for c in (2 * p * half, (2 * p + 1) * half)]


def _dot_kernel(split, x_ref, w_ref, s_ref, *refs, block_k: int, steps: int, group: int, half: int | None,
                per_group: bool, magic: bool, precision):
    """split: this program's share of K; x_ref [rows, K] (whole); w_ref [K, block_n] (int4: [K, block_n // 2])
    this program's column strip; s_ref (and z_ref) [G, block_n]; o_ref [rows, block_n] this split's partial."""
    z_ref, o_ref = (refs[0], refs[1]) if len(refs) == 2 else (None, refs[0])
    rows, block_n = o_ref.shape
    sub = min(group, block_k)  # rows of W sharing one scale within a step
    cols = _columns(block_n, half)

    def dot(a, b):
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)

    def scaled(terms, offsets, row_sums, g):  # a group's dot products, scaled (and shifted by zero * row sums)
        out = []
        for (c0, c), off, term in zip(cols, offsets, terms):
            s = s_ref[pl.ds(g, 1), pl.ds(c0, c)]
            term = term * s
            if z_ref is not None:  # x . (q + off) * s + sum(x) * (z - off * s) = x . (q * s + z)
                term = term + row_sums * (z_ref[pl.ds(g, 1), pl.ds(c0, c)] - off * s)
            out.append(term)
        return out

    def body(i, accs):
        k0 = (split * steps + i) * block_k
        for u in range(block_k // sub):
            k = k0 + u * sub
            xs = x_ref[:, pl.ds(k, sub)]
            tiles = _tiles(w_ref, k, sub, half, len(cols) // 2, x_ref.dtype, magic)
            terms = [dot(xs, t) for t, _ in tiles]
            if per_group:
                row_sums = jnp.sum(xs.astype(jnp.float32), axis=1, keepdims=True) if z_ref is not None else None
                terms = scaled(terms, [off for _, off in tiles], row_sums, k // group)
            accs = tuple(a + t for a, t in zip(accs, terms))
        return accs

    accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((rows, c), jnp.float32) for _, c in cols))
    if not per_group:  # int8, one scale per channel: applied once, over the whole of K
        accs = scaled(accs, [0] * len(cols), None, 0)
    for (c0, c), acc in zip(cols, accs):
        o_ref[:, pl.ds(c0, c)] = acc


def _gemv_kernel(split, xt_ref, w_ref, s_ref, *refs, block_k: int, steps: int, group: int, half: int | None,
                 per_group: bool, magic: bool):
    """xt_ref [K, rows] float32 (x transposed, whole); split, w_ref, s_ref, z_ref as _dot_kernel's; o_ref
    [rows, block_n]."""
    z_ref, o_ref = (refs[0], refs[1]) if len(refs) == 2 else (None, refs[0])
    rows, block_n = o_ref.shape
    sub = min(group, block_k)
    cols = _columns(block_n, half)

    def body(i, accs):  # accs[r][t]: [sub, c] float32, x's row r times tile t, summed over K at the end
        k0 = (split * steps + i) * block_k
        accs = [list(a) for a in accs]
        for u in range(block_k // sub):
            k = k0 + u * sub
            ws = []
            for (c0, c), (t, _) in zip(cols, _tiles(w_ref, k, sub, half, len(cols) // 2, jnp.float32, magic)):
                if per_group:
                    t = t * s_ref[pl.ds(k // group, 1), pl.ds(c0, c)]
                    if z_ref is not None:
                        t = t + z_ref[pl.ds(k // group, 1), pl.ds(c0, c)]
                ws.append(t)
            for r in range(rows):
                xc = xt_ref[pl.ds(k, sub), pl.ds(r, 1)]  # [sub, 1]
                accs[r] = [a + xc * w for a, w in zip(accs[r], ws)]
        return tuple(tuple(a) for a in accs)

    zeros = tuple(tuple(jnp.zeros((sub, c), jnp.float32) for _, c in cols) for _ in range(rows))
    accs = jax.lax.fori_loop(0, steps, body, zeros)
    for r in range(rows):
        for (c0, c), acc in zip(cols, accs[r]):
            out = jnp.sum(acc, axis=0, keepdims=True)
            if not per_group:
                out = out * s_ref[pl.ds(0, 1), pl.ds(c0, c)]
            o_ref[pl.ds(r, 1), pl.ds(c0, c)] = out


def supported(rows: int, k: int, n: int, group: int, half: int | None) -> bool:
    """Whether the kernel takes these shapes: few rows, and tiles the tensor cores accept (>= 16 along every
    dot dimension)."""
    block_n = 2 * half if half else math.gcd(n, 128)
    return rows <= MAX_ROWS and k % 16 == 0 and min(group, 128) % 16 == 0 and block_n >= 16 and n % block_n == 0


def split_k(steps: int, strips: int, num_cores: int = 132) -> int:
    """How many programs share K: the largest divisor of the `steps` along K that keeps the grid of `strips`
    column strips times it near 2 programs per SM."""
    want = max(1, -(-2 * num_cores // strips))
    return max(d for d in range(1, steps + 1) if steps % d == 0 and d <= want)


def choose_params(rows: int, k: int, n: int, half: int | None, block_k: int | None = None, block_n: int | None = None,
                  body: str | None = None, num_cores: int = 132, widest: int | None = None) -> dict:
    """Tiling from the shapes (the H100/H200 sweeps in benchmarks/RESULTS.md): int8 at one row runs the gemv
    body on [64, 256] steps with 8 warps; otherwise the dot body on column strips of 128 (int4 at <= 16 rows:
    two packed pairs, 256) and steps of 128 rows of W (several groups per step when groups are smaller); K
    splits for ~2 programs per SM (several matrices in one call: n is their common divisor and K splits as for
    the `widest` alone; gate/up fused with K in 2 ran 3 us slower than apart with K in 4 each). Exponent-bit
    conversion for int4 and the gemv body; int8's dot body converts faster with the instructions (H200, 8 rows:
    140 vs 147 us per layer)."""
    gemv = rows == 1 and not half and body in (None, "gemv")
    body = body or ("gemv" if gemv else "dot")
    if body not in BODIES:
        raise ValueError(f"body must be one of {BODIES}, got {body!r}")
    if not block_n:
        if gemv and n % 256 == 0:
            block_n = 256
        elif half:
            block_n = 4 * half if rows <= 16 and n % (4 * half) == 0 else 2 * half
        else:
            block_n = math.gcd(n, 128)
    block_k = block_k or math.gcd(k, 64 if gemv else 128)
    if n % block_n or (half and block_n % (2 * half)):
        raise ValueError(f"block_n {block_n} must divide N = {n}" + (f" in pairs of {half}" if half else ""))
    splits = split_k(k // block_k, (widest or n) // block_n, num_cores)
    return {"block_n": block_n, "block_k": block_k, "num_splits": splits, "num_warps": 8 if gemv else 4,
            "num_stages": 3, "body": body, "convert": "magic" if half or body == "gemv" else "cast"}


def quant_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None = None, *,
                 half: int | None = None, interpret: bool = False, **knobs) -> jax.Array:
    """Same contract as reference.quant_matmul (float32 [M, N]) for M <= MAX_ROWS; knobs (block_k, block_n,
    num_splits, num_warps, num_stages, body, convert) default from choose_params."""
    return quant_matmul_many(x, ((w, scale, zero),), half=half, interpret=interpret, **knobs)[0]


def supported_many(rows: int, k: int, mats: list[tuple], half: int | None) -> bool:
    """Whether one call takes these matrices together: the same K, groups, dtype and zeros, and a column strip
    width that divides every N."""
    ns = [s.shape[1] for _, s, _ in mats]
    return alike(mats) and rows <= MANY_MAX_ROWS and supported(rows, k, math.gcd(*ns), k // mats[0][1].shape[0],
                                                               half)


@functools.partial(jax.jit, static_argnames=("half", "block_k", "block_n", "num_splits", "num_warps", "num_stages",
                                             "body", "convert", "interpret"))
def quant_matmul_many(x: jax.Array, mats: tuple, *, half: int | None = None, block_k: int | None = None,
                      block_n: int | None = None, num_splits: int | None = None, num_warps: int | None = None,
                      num_stages: int | None = None, body: str | None = None, convert: str | None = None,
                      interpret: bool = False) -> list[jax.Array]:
    """x [M, K] times each (w, scale, zero) of `mats` (as reference.py lays them out; the same K, groups and
    dtype) in one kernel: its grid covers every matrix's column strips and a program reads only its own
    matrix (q/k/v or gate/up: one launch, and k/v's small N no longer leaves SMs idle). -> float32 [M, N_i]."""
    m, k = x.shape
    w0, scale0, zero0 = mats[0]
    groups = scale0.shape[0]
    ns = [s.shape[1] for _, s, _ in mats]
    bits = 4 if w0.dtype == jnp.uint8 else 8
    if m > (MAX_ROWS if len(mats) == 1 else MANY_MAX_ROWS):
        raise ValueError(f"quant_matmul kernel takes at most {MAX_ROWS} rows ({MANY_MAX_ROWS} for several matrices),"
                         f" got {m}")
    for w, s, z in mats:
        if w.dtype != w0.dtype or s.shape[0] != groups or (z is None) != (zero0 is None) or w.shape[0] != k:
            raise ValueError("matrices in one quant_matmul_many call need the same K, groups, dtype and zeros")
        if bits == 4 and (half is None or w.shape != (k, s.shape[1] // 2)):
            raise ValueError(f"int4 weights must be packed [K, N // 2] = {(k, s.shape[1] // 2)} with their half, "
                             f"got {w.shape}")
    group = k // groups
    p = choose_params(m, k, math.gcd(*ns), half if bits == 4 else None, block_k, block_n, body, widest=max(ns))
    p.update({name: value for name, value in [("num_splits", num_splits), ("num_warps", num_warps),
                                              ("num_stages", num_stages), ("convert", convert)] if value})
    block_k, block_n, body, convert, splits = p["block_k"], p["block_n"], p["body"], p["convert"], p["num_splits"]
    if convert not in CONVERTS:
        raise ValueError(f"convert must be one of {CONVERTS}, got {convert!r}")
    if body == "gemv" and m > GEMV_MAX_ROWS:
        raise ValueError(f"the gemv body takes at most {GEMV_MAX_ROWS} rows, got {m}")
    steps = k // (block_k * splits)
    if steps * block_k * splits != k or (groups > 1 and block_k % group and group % block_k):
        raise ValueError(f"block_k {block_k} x num_splits {splits} must tile K = {k} in whole groups of {group}")
    per_group = groups > 1 or zero0 is not None  # int4's zero enters through each group's row sums of x
    common = dict(block_k=block_k, steps=steps, group=group if per_group else k, half=half if bits == 4 else None,
                  per_group=per_group, magic=convert == "magic")
    if body == "gemv":
        rows = _pow2(m)
        xp = jnp.pad(x.astype(jnp.float32), ((0, rows - m), (0, 0))).T
        x_spec = pl.BlockSpec((k, rows), lambda j, s: (0, 0))
        kernel = functools.partial(_gemv_kernel, **common)
    else:
        rows = max(16, _pow2(m))
        xp = jnp.pad(x, ((0, rows - m), (0, 0)))
        x_spec = pl.BlockSpec((rows, k), lambda j, s: (0, 0))
        kernel = functools.partial(_dot_kernel, **common,
                                   precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None)
    strip = block_n // 2 if bits == 4 else block_n
    firsts = [sum(n // block_n for n in ns[:i]) for i in range(len(ns))]  # each matrix's first strip in the grid
    in_specs, args = [x_spec], [xp]
    for (w, sc, z), first, n in zip(mats, firsts, ns):
        def col(j, first=first, last=n // block_n - 1):  # the strip of this matrix (clamped: other programs skip it)
            return jnp.clip(j - first, 0, last)
        in_specs += [pl.BlockSpec((k, strip), lambda j, s, col=col: (0, col(j))),
                     pl.BlockSpec((groups, block_n), lambda j, s, col=col: (0, col(j)))]
        args += [w, sc.astype(jnp.float32)]
        if z is not None:
            in_specs.append(pl.BlockSpec((groups, block_n), lambda j, s, col=col: (0, col(j))))
            args.append(z.astype(jnp.float32))
    per_mat = 3 if zero0 is not None else 2

    def many(x_ref, *refs):  # (program ids read here: interpret mode has none inside a switch's branches)
        o_ref, j, split = refs[-1], pl.program_id(0), pl.program_id(1)
        branches = [functools.partial(kernel, split, x_ref, *refs[i * per_mat:(i + 1) * per_mat], o_ref)
                    for i in range(len(mats))]
        if len(branches) == 1:
            return branches[0]()
        jax.lax.switch(sum((j >= f).astype(jnp.int32) for f in firsts[1:]), branches)

    n_total = sum(ns)
    partial = pl.pallas_call(
        many,
        grid=(n_total // block_n, splits),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, rows, n_total), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=p["num_warps"], num_stages=p["num_stages"]),
        interpret=interpret,
        name=f"quant_matmul_int{bits}_{body}_{convert}_bk{block_k}_s{splits}" + (f"_x{len(mats)}" * (len(mats) > 1)),
    )(*args)
    out = partial.sum(axis=0)[:m]
    return [out[:, first * block_n:first * block_n + n] for first, n in zip(firsts, ns)]
