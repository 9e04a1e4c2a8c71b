"""Weight-only quantized matmul on Hopper GPUs over the nk layout (reference.py: W stored [N, K], int4 as
jnp.int4 q - 8), through Mosaic GPU: hopper.py's TMA pipeline with the transposed tile.

A step's tile is [tile_n, tile_k] of W, already the warpgroup MMA's [M, K] side, against x's [rows, K] slice
(M rounded up to 8 rows: the TMA copy fills the rows past M with zeros). On a GPU the tile goes from shared memory into registers in the MMA's operand layout
(`registers=True`: int8 through WGMMA_UPCAST_2X, int4 through _4X) and Mosaic GPU's own conversions make it
bf16 there (int8: four instructions per two values, signed int4: three), with no bf16 copy in shared memory.
Mosaic GPU's interpreter lacks the register-operand MMA, so tests interpret the shared-memory path and lower
the other. Group scales (and zeros) arrive by TMA with the tile and scale it in bf16 pairs per output row;
int8's one scale per channel applies to the result. The K splits write float32 partials that XLA sums.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.quant_matmul.gpu import split_k
from pallas_kernels.quant_matmul.hopper import MAX_ROWS, group_step
from pallas_kernels.quant_matmul.reference import alike


def supported(rows: int, k: int, n: int, group: int) -> bool:
    """Whether quant_matmul takes these shapes (groups of a multiple of 64 rows, or one per channel)."""
    return rows <= MAX_ROWS and k % 128 == 0 and n % 64 == 0 and (group == k or group % 64 == 0)


def choose_tile_n(k: int, n: int, int4: bool) -> int:
    """Outputs per program: 128 for large int4 layers (Llama-3.1-8B's gate/up/down at 1-64 rows: up to 12%
    faster on an H200), else 64, the MMA's height (int8's LM head at one row: 160 us against 200 with 128)."""
    return 128 if int4 and k * n >= 1 << 25 and n % 128 == 0 else 64


def _operand(w_smem, scale_zero: list, buffer, int4: bool, upcast: plgpu.Layout):
    """The MMA's weight operand from a tile [tile_n, tile_k] in shared memory: converted, and scaled per row
    when `scale_zero` names its rows' scale (and zero) refs, each [tile_n] (int4's q - 8 adds 8 scales). With
    no `buffer`: in registers, through `upcast`, scaled in bf16 pairs (half the instructions). With one (the
    shared-memory path, the interpreter's): scaled in float32, stored there as bf16, and the buffer returned."""
    registers = buffer is None
    if registers:
        q = plgpu.layout_cast(plgpu.load(w_smem, layout=upcast), plgpu.Layout.WGMMA)
    else:
        q = plgpu.load(w_smem, layout=plgpu.Layout.WGMMA, optimized=False)
    if scale_zero:
        s, *z = [plgpu.load(r, layout=plgpu.Layout.WGMMA.reduce(1), optimized=False) for r in scale_zero]
        z = z[0] if z else None
        if int4:
            z = 8.0 * s if z is None else z + 8.0 * s
        dt = jnp.bfloat16 if registers else jnp.float32
        q = q.astype(dt) * jax.lax.broadcast_in_dim(s.astype(dt), q.shape, (0,))
        q = q if z is None else q + jax.lax.broadcast_in_dim(z.astype(dt), q.shape, (0,))
    if registers:
        return q.astype(jnp.bfloat16)
    buffer[...] = q.astype(jnp.bfloat16)
    plgpu.commit_smem()
    return buffer


class _Plan(NamedTuple):
    """What quant_matmul derives from the shapes: steps along K, x's rows, shared-memory tiles."""
    tile_k: int  # K per tile: one group's step (hopper.group_step)
    splits: int  # programs along K
    steps: int  # pipeline steps per program
    registers: bool  # the tile goes to the MMA from registers (a GPU), else through shared memory as bf16
    rows: int  # x's rows as the MMA's N side: M rounded up to 8, 16, 32 or 64 (TMA fills the rest with zeros)
    w_transforms: tuple  # the weight tile's shared-memory tiling and swizzle (registers only)
    upcast: plgpu.Layout  # the layout the weight tile loads in (registers only)
    bf16_tiles: tuple  # bf16 [*, tile_k] operands' tiling and swizzle


def _plan(x: jax.Array, mats: tuple, tile_n: int, splits: int | None, registers: bool | None,
          interpret: bool) -> _Plan:
    """_Plan for x [M, K] @ each W [N_i, K] of `mats` in programs of tile_n outputs, or a ValueError saying
    what does not fit."""
    m, k = x.shape
    w0, s0, _ = mats[0]
    groups, ns = s0.shape[0], [s.shape[1] for _, s, _ in mats]
    group = k // groups
    if not alike(mats) or any(w.shape != (s.shape[1], k) for w, s, _ in mats):
        raise ValueError("hopper_nk.quant_matmul_many's matrices need the same K, groups, dtype and zeros")
    for _, s, _ in mats:
        if not supported(m, k, s.shape[1], group) or s.shape[1] % tile_n:
            raise ValueError(f"hopper_nk.quant_matmul does not take M={m}, K={k}, N={s.shape[1]}, group {group}, "
                             f"{tile_n} outputs per program")
    tile_k = group_step(group)
    splits = splits or split_k(k // tile_k, sum(ns) // tile_n)
    steps = k // (tile_k * splits)
    if steps * tile_k * splits != k:
        raise ValueError(f"splits {splits} must divide the {k // tile_k} tiles of {tile_k} along K")
    registers = not interpret if registers is None else registers
    if registers and interpret:
        raise ValueError("registers=True needs a GPU (the interpreter has no register-operand MMA)")
    row_bytes = tile_k // 2 if w0.dtype == jnp.int4 else tile_k
    return _Plan(
        tile_k, splits, steps, registers, max(8, 1 << (m - 1).bit_length()),
        (plgpu.TilingTransform((8, tile_k)), plgpu.SwizzleTransform(min(128, row_bytes))) if registers else (),
        plgpu.Layout.WGMMA_UPCAST_4X if w0.dtype == jnp.int4 else plgpu.Layout.WGMMA_UPCAST_2X,
        (plgpu.TilingTransform((8, min(64, tile_k))), plgpu.SwizzleTransform(2 * min(64, tile_k))))


def quant_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None = None, **knobs
                 ) -> jax.Array:
    """reference.quant_matmul(..., nk=True) (float32 [M, N]) for M <= MAX_ROWS and supported shapes: x
    [M, K] @ W with W stored [N, K] (int8, or jnp.int4 q - 8), scale (zero) [G, N]; knobs as
    quant_matmul_many's."""
    return quant_matmul_many(x, ((w, scale, zero),), **knobs)[0]


@functools.partial(jax.jit, static_argnames=("tile_n", "stages", "splits", "registers", "piped_scales",
                                             "interpret"))
def quant_matmul_many(x: jax.Array, mats: tuple, *, tile_n: int | None = None, stages: int = 4,
                      splits: int | None = None, registers: bool | None = None, piped_scales: bool = True,
                      interpret: bool = False) -> list[jax.Array]:
    """x [M, K] times each (w, scale, zero) of `mats` (nk layout; the same K, groups and dtype) in one kernel:
    its grid covers every matrix's strips of tile_n outputs, and a program reads only its own matrix (q/k/v
    or gate/up: one launch and one sum of the K splits) -> float32 [M, N_i]. `registers` (default on a GPU):
    the converted tile goes to the MMA from registers. `piped_scales`: a step's group scales (and zeros)
    arrive by TMA with its tile (the [K, N] kernel's int4 at 8-64 rows: 12-24% faster that way). x is read
    as it is: the TMA copies fill its rows past M with zeros (no padded copy of x)."""
    m, k = x.shape
    w0, scale0, zero0 = mats[0]
    groups, ns = scale0.shape[0], [s.shape[1] for _, s, _ in mats]
    group = k // groups
    int4 = w0.dtype == jnp.int4
    tile_n = tile_n or min(choose_tile_n(k, n, int4) for n in ns)
    tile_k, splits, steps, registers, rows, w_transforms, upcast, bf16_tiles = _plan(
        x, mats, tile_n, splits, registers, interpret)
    per_group = int4 or groups > 1
    piped = piped_scales and per_group
    vector = plgpu.Layout.WGMMA.reduce(1)  # one value per output row of the tile
    zeros = zero0 is not None
    firsts = [sum(ns[:i]) // tile_n for i in range(len(ns))]  # each matrix's first strip in the grid
    total = sum(ns)

    def kernel(x_gmem, *refs):
        o_gmem, *wb_smem = refs[len(mats) * (2 + zeros):]
        j, split = jax.lax.axis_index("strip"), jax.lax.axis_index("split")

        def matrix(i: int, w_gmem, s_gmem, z_gmem=None):
            strip = j - firsts[i]  # this program's strip of matrix i
            cols = pl.ds(strip * tile_n, tile_n)
            gmem_groups = [r for r in (s_gmem, z_gmem) if r is not None]
            group_refs = gmem_groups if piped else []

            def group_of(ki):
                return (split * steps + ki) * tile_k // group

            def accumulate(acc):
                def step(idx, w_smem, x_smem, *group_smems):
                    at = []
                    if per_group:  # the tile's group: its scale (and zero) per output row
                        at = [r.at[0] for r in group_smems] if piped else [r.at[group_of(idx[0]), cols]
                                                                            for r in gmem_groups]
                    a = _operand(w_smem, at, wb_smem[0] if wb_smem else None, int4, upcast)
                    plgpu.wgmma(acc, a, x_smem.T)  # [tile_n, tile_k] @ [tile_k, rows]
                    plgpu.wgmma_wait(0)

                plgpu.emit_pipeline(
                    step, grid=(steps,), max_concurrent_steps=stages, in_specs=[
                        plgpu.BlockSpec((tile_n, tile_k), lambda ki: (strip, split * steps + ki),
                                        transforms=w_transforms),
                        plgpu.BlockSpec((rows, tile_k), lambda ki: (0, split * steps + ki), transforms=bf16_tiles),
                        *[plgpu.BlockSpec((1, tile_n), lambda ki: (group_of(ki), strip))] * len(group_refs)],
                )(w_gmem, x_gmem, *group_refs)
                return acc[...]

            res = pl.run_scoped(accumulate, plgpu.ACC((tile_n, rows), jnp.float32))  # outputs down, x's rows across
            if not per_group:
                res = res * jax.lax.broadcast_in_dim(plgpu.load(s_gmem.at[0, cols], layout=vector, optimized=False),
                                                     res.shape, (0,))
            o_gmem[pl.ds(split * total + j * tile_n, tile_n), :] = res

        per = 2 + zeros  # refs per matrix: w, scale (, zero)
        if len(mats) == 1:
            return matrix(0, *refs[:per])
        for i in range(len(mats)):  # the program's strip falls in one matrix's range
            pl.when((j >= firsts[i]) & (j < firsts[i] + ns[i] // tile_n))(
                functools.partial(matrix, i, *refs[i * per:(i + 1) * per]))

    args = [x.astype(jnp.bfloat16)]
    for w, s, z in mats:
        args += [w, s.astype(jnp.float32)] + ([z.astype(jnp.float32)] if zeros else [])
    scratch = [] if registers else [plgpu.SMEM((tile_n, tile_k), jnp.bfloat16, transforms=bf16_tiles)]
    partial = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((splits * total, rows), jnp.float32), scratch_types=scratch,
        grid=(total // tile_n, splits), grid_names=("strip", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        kernel_name=f"quant_matmul_hopper_nk_int{4 if int4 else 8}_k{tile_k}_s{splits}" + "_reg" * registers
        + f"_x{len(mats)}" * (len(mats) > 1),
        interpret=plgpu.InterpretGPUParams() if interpret else None)(*args)
    out = sum_splits(partial.reshape(splits, total, rows), m)  # [M, sum N_i]
    return [out[:, first * tile_n:first * tile_n + n] for first, n in zip(firsts, ns)]


def sum_splits(partial: jax.Array, m: int) -> jax.Array:
    """The kernel's K-split partial sums [splits, N, rows] -> [M, N]. One row: strided slices and adds, which
    XLA fuses into the consumer (a reduce and a transpose would be a kernel of their own)."""
    if m == 1:
        return functools.reduce(jnp.add, [partial[s, :, 0] for s in range(partial.shape[0])])[None]
    return partial.sum(axis=0).T[:m]


__all__ = ["choose_tile_n", "quant_matmul", "quant_matmul_many", "supported"]
