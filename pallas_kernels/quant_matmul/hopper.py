"""Weight-only quantized matmul on Hopper GPUs (H100/H200) for decode-sized batches: a Pallas kernel through
the Mosaic GPU backend, where weight tiles stream in by TMA several steps ahead of the math.

The Triton kernel (gpu.py) loads a tile and then waits on it, and keeps too few bytes in flight per SM to
read at the bandwidth (benchmarks/RESULTS.md). Here each program owns a strip of `tile_n` output columns and
a 1/splits share of K, and `plgpu.emit_pipeline` keeps `stages` [tile_k, tile_n] weight tiles in flight.
Each step converts its tile in registers (int4: unpacks both nibbles and applies the group's scale and
zero), stores it as bf16 to shared memory, and one warpgroup MMA adds W_tile^T @ x_tile^T into an
accumulator [tile_n, rows]: the weights are the MMA's 64-row side, so x's few rows are padded only to 8.
int8's per-channel scale applies once, to the result. The splits write float32 partials that XLA sums.
Measured on an H200 (benchmarks/RESULTS.md): faster than gpu.py only for int4 at 17-64 rows (with 2 stages),
which is where quant_linear uses it; at 1-8 rows the per-step conversion, store and MMA wait bound it.

Layouts as in reference.py; int4 only in half-blocks of 64 (a strip of 128 outputs is one [K, 64] byte
column block), groups of a multiple of 64 rows.

hopper_nk.py has the same pipeline over the transposed (nk) layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.quant_matmul.gpu import split_k
from pallas_kernels.quant_matmul.reference import checked_shapes

MAX_ROWS = 64  # x's rows are the MMA's N side: 8..64 here
_SMEM_TILES = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # bf16 MMA operands, 128-byte rows


def supported(rows: int, k: int, n: int, group: int, half: int | None) -> bool:
    """Whether the kernel takes these shapes."""
    if rows > MAX_ROWS or k % 128:
        return False
    if half is None:
        return n % 64 == 0 and (group == k or group % 64 == 0)
    return half == 64 and n % 128 == 0 and group % 64 == 0


def choose_params(rows: int, k: int, n: int, group: int, half: int | None, num_cores: int = 132) -> dict:
    """Tiles from the shapes: strips of 64 outputs (int4: 128, one packed column block), steps of 128 rows
    (groups of 64: 64), four tiles in flight, K split until the grid has ~2 programs per SM."""
    tile_n = 64 if half is None else 128
    tile_k = group_step(group)
    return {"tile_n": tile_n, "tile_k": tile_k, "stages": 4, "splits": split_k(k // tile_k, n // tile_n, num_cores)}


def group_step(group: int) -> int:
    """Rows of W per pipeline step: 128, or 64 for groups of 64 (a step holds at most one group's scales)."""
    return 128 if group % 128 == 0 else 64


@functools.partial(jax.jit, static_argnames=("half", "tile_n", "tile_k", "stages", "splits", "piped_scales",
                                             "interpret"))
def quant_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None = None, *,
                 half: int | None = None, tile_n: int | None = None, tile_k: int | None = None,
                 stages: int | None = None, splits: int | None = None, piped_scales: bool = False,
                 interpret: bool = False) -> jax.Array:
    """Same contract as reference.quant_matmul (float32 [M, N]) for M <= MAX_ROWS and supported shapes. x
    enters the MMA as bf16; int4 weights are dequantized to bf16 before it (int8's are exact in bf16).
    `piped_scales`: a step's group scales (and zeros) arrive by TMA with its weight tile instead of a load
    from global memory in the step (H200, int4 at 64 rows with 2 stages: gate/up 47 against 55 us; quant_linear
    runs it so)."""
    m, k, n, group, int4 = checked_shapes("hopper.quant_matmul", x, w, scale, half, supported)
    groups = scale.shape[0]
    p = choose_params(m, k, n, group, half if int4 else None)
    tile_n, tile_k = tile_n or p["tile_n"], tile_k or p["tile_k"]
    stages, splits = stages or p["stages"], splits or p["splits"]
    per_group = int4 or groups > 1
    piped = piped_scales and per_group
    steps = k // (tile_k * splits)
    if steps * tile_k * splits != k or n % tile_n or (per_group and group % tile_k):
        raise ValueError(f"tile_k {tile_k} x splits {splits} must tile K = {k} (at most one group of {group} "
                         f"per step), tile_n {tile_n} N = {n}")
    rows = max(8, 1 << (m - 1).bit_length())
    xp = jnp.pad(x.astype(jnp.bfloat16), ((0, rows - m), (0, 0)))
    parts = 2 if int4 else 1  # int4: the low and the high nibbles are two [tile_k, tile_n / 2] column blocks
    width = tile_n // parts
    w_cols = tile_n // 2 if int4 else tile_n

    def kernel(x_gmem, w_gmem, s_gmem, *refs):
        z_gmem = refs[0] if zero is not None else None
        o_gmem, *wb_smems = refs[-1 - parts:]
        j, split = jax.lax.axis_index("strip"), jax.lax.axis_index("split")
        group_refs = [r for r in (s_gmem, z_gmem) if r is not None] if piped else []

        def group_row(ref, ki, c):  # the group's scale (or zero) for output columns [c, c + width) of the strip
            at = ref.at[0, pl.ds(c, width)] if piped else ref.at[group_of(ki), pl.ds(j * tile_n + c, width)]
            return plgpu.load(at, layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)

        def group_of(ki):  # the group of K step ki of this split
            return (split * steps + ki) * tile_k // group

        def accumulate(*accs):
            def step(idx, x_smem, w_smem, *group_smems):
                ki = idx[0]
                s_ref, z_ref = (group_smems + (None,))[:2] if piped else (s_gmem, z_gmem)
                q = plgpu.load(w_smem, layout=plgpu.Layout.WGMMA, optimized=False)  # [tile_k, w_cols]
                if int4:  # (shifts need 16 or 32 bits)
                    q = q.astype(jnp.int32)
                for i, (acc, wb) in enumerate(zip(accs, wb_smems)):
                    part = (q & 15 if i == 0 else q >> 4) if int4 else q
                    if per_group:
                        t = part.astype(jnp.float32) * jax.lax.broadcast_in_dim(
                            group_row(s_ref, ki, i * width), part.shape, (1,))
                        if z_ref is not None:
                            t = t + jax.lax.broadcast_in_dim(group_row(z_ref, ki, i * width), part.shape, (1,))
                        wb[...] = t.astype(jnp.bfloat16)
                    else:
                        wb[...] = part.astype(jnp.bfloat16)
                plgpu.commit_smem()
                for acc, wb in zip(accs, wb_smems):
                    plgpu.wgmma(acc, wb.T, x_smem.T)  # [width, tile_k] @ [tile_k, rows]
                plgpu.wgmma_wait(0)

            group_specs = [plgpu.BlockSpec((1, tile_n), lambda ki: (group_of(ki), j))] * len(group_refs)
            plgpu.emit_pipeline(
                step, grid=(steps,),
                in_specs=[plgpu.BlockSpec((rows, tile_k), lambda ki: (0, split * steps + ki), transforms=_SMEM_TILES),
                          plgpu.BlockSpec((tile_k, w_cols), lambda ki: (split * steps + ki, j)), *group_specs],
                max_concurrent_steps=stages)(x_gmem, w_gmem, *group_refs)
            return tuple(acc[...] for acc in accs)

        results = pl.run_scoped(accumulate, *[plgpu.ACC((width, rows), jnp.float32) for _ in range(parts)])
        for i, res in enumerate(results):  # res [width, rows]: output columns down, x's rows across
            if not per_group:
                s = plgpu.load(s_gmem.at[0, pl.ds(j * tile_n, tile_n)], layout=plgpu.Layout.WGMMA.reduce(1),
                               optimized=False)
                res = res * jax.lax.broadcast_in_dim(s, res.shape, (0,))
            o_gmem[pl.ds(split * n + j * tile_n + i * width, width), :] = res

    args = [xp, w, scale.astype(jnp.float32)] + ([] if zero is None else [zero.astype(jnp.float32)])
    partial = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((splits * n, rows), jnp.float32),
        scratch_types=[plgpu.SMEM((tile_k, width), jnp.bfloat16, transforms=_SMEM_TILES) for _ in range(parts)],
        grid=(n // tile_n, splits), grid_names=("strip", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        kernel_name=f"quant_matmul_hopper_int{4 if int4 else 8}_k{tile_k}_s{splits}",
        interpret=plgpu.InterpretGPUParams() if interpret else None)(*args)
    return partial.reshape(splits, n, rows).sum(axis=0).T[:m]


__all__ = ["MAX_ROWS", "choose_params", "group_step", "quant_matmul", "supported"]
