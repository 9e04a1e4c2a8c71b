"""Weight-only quantized matmul on Hopper GPUs over the nk layout (reference.py: W stored [N, K], int4 packed
along K), through Mosaic GPU: hopper.py's TMA pipeline with the transposed tile.

At one row of x XLA's row reduction (xla.py) reads this layout; here are the kernels for the rest:

- `quant_matmul` (2-64 rows, and one row of an int8 LM head): a step's tile is [tile_n, tile_k] (int4:
  [tile_n, tile_k / 2] bytes, whose low and high nibbles are the step's two halves of K), already the MMA's
  [M, K] side, against x's [rows, K] slice (rows padded to 8). int8 can skip shared memory: the tile loads
  straight into the MMA's register-operand layout (`registers=True`, WGMMA_UPCAST_2X), which Mosaic GPU's
  interpreter lacks, so tests interpret the shared-memory path and lower the other. Group scales (and zeros)
  arrive by TMA with the tile.
- `quant_gemv` (one row): the same pipeline with CUDA-core FMAs and a sum along K per step; a candidate,
  measured next.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.quant_matmul.gpu import split_k
from pallas_kernels.quant_matmul.hopper import MAX_ROWS, group_step


def supported(rows: int, k: int, n: int, group: int, half: int | None) -> bool:
    """Whether quant_matmul takes these shapes (int4: K packed in half-blocks of half a step)."""
    if rows > MAX_ROWS or k % 128 or n % 64:
        return False
    if half is None:
        return group == k or group % 64 == 0
    return group % 64 == 0 and half == group_step(group) // 2


def _steps(name: str, m: int, k: int, n: int, group: int, half: int | None, tile_n: int,
           splits: int | None) -> tuple[int, int, int]:
    """(tile_k, splits, steps per split along K) for these shapes, or a ValueError saying what does not fit."""
    if not supported(m, k, n, group, half) or n % tile_n:
        raise ValueError(f"hopper_nk.{name} does not take M={m}, K={k}, N={n}, group {group}, half {half}, "
                         f"tile_n {tile_n}")
    tile_k = group_step(group)
    splits = splits or split_k(k // tile_k, n // tile_n)
    steps = k // (tile_k * splits)
    if steps * tile_k * splits != k:
        raise ValueError(f"splits {splits} must divide the {k // tile_k} steps of {tile_k} along K")
    return tile_k, splits, steps


@functools.partial(jax.jit, static_argnames=("half", "tile_n", "stages", "splits", "registers", "piped_scales",
                                             "interpret"))
def quant_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None = None, *,
                 half: int | None = None, tile_n: int = 64, stages: int = 4, splits: int | None = None,
                 registers: bool | None = None, piped_scales: bool = True, interpret: bool = False) -> jax.Array:
    """reference.quant_matmul(..., nk=True) (float32 [M, N]) for M <= MAX_ROWS and supported shapes: x
    [M, K] @ W with W stored [N, K] (int4 [N, K // 2]), scale (zero) [G, N]. `registers` (int8 only; default
    on a GPU): the converted tile goes to the MMA from registers, with no bf16 copy in shared memory.
    `piped_scales`: a step's group scales (and zeros) arrive by TMA with its tile (the [K, N] kernel's int4 at
    8-64 rows: 12-24% faster that way on an H200)."""
    m, k = x.shape
    groups, n = scale.shape
    group = k // groups
    int4 = w.dtype == jnp.uint8
    tile_k, splits, steps = _steps("quant_matmul", m, k, n, group, half if int4 else None, tile_n, splits)
    registers = (not int4 and not interpret) if registers is None else registers
    if registers and (int4 or interpret):
        raise ValueError("registers=True takes int8 weights on a GPU (the interpreter has no register-operand MMA)")
    per_group = int4 or groups > 1
    piped = piped_scales and per_group
    rows = max(8, 1 << (m - 1).bit_length())
    xp = jnp.pad(x.astype(jnp.bfloat16), ((0, rows - m), (0, 0)))
    parts = 2 if int4 else 1  # int4: the low nibbles are K [0, tile_k / 2) of the step, the high ones the rest
    width = tile_k // parts  # K per MMA
    w_cols = tile_k // 2 if int4 else tile_k
    w_transforms = (plgpu.TilingTransform((8, w_cols)), plgpu.SwizzleTransform(min(128, w_cols))) if registers else ()
    vector = plgpu.Layout.WGMMA.reduce(1)  # one value per output row of the tile
    bf16_tiles = (plgpu.TilingTransform((8, min(64, width))), plgpu.SwizzleTransform(2 * min(64, width)))

    def kernel(x_gmem, w_gmem, s_gmem, *refs):
        z_gmem = refs[0] if zero is not None else None
        o_gmem, *wb_smems = refs[len(refs) - 1 - (0 if registers else parts):]
        j, split = jax.lax.axis_index("strip"), jax.lax.axis_index("split")
        cols = pl.ds(j * tile_n, tile_n)
        gmem_groups = [r for r in (s_gmem, z_gmem) if r is not None]
        group_refs = gmem_groups if piped else []

        def group_of(ki):
            return (split * steps + ki) * tile_k // group

        def accumulate(acc):
            def step(idx, w_smem, *smems):
                x_smems, group_smems = smems[:parts], smems[parts:]
                g = group_of(idx[0])
                if registers:
                    q = plgpu.layout_cast(plgpu.load(w_smem, layout=plgpu.Layout.WGMMA_UPCAST_2X),
                                          plgpu.Layout.WGMMA)
                else:
                    q = plgpu.load(w_smem, layout=plgpu.Layout.WGMMA, optimized=False)
                q = q.astype(jnp.int32) if int4 else q  # (shifts need 16 or 32 bits)
                if per_group:  # the step's group: its scale (and zero) per output row, broadcast along K
                    at = [r.at[0] for r in group_smems] if piped else [r.at[g, cols] for r in gmem_groups]
                    s, *z = [jax.lax.broadcast_in_dim(plgpu.load(a, layout=vector, optimized=False), q.shape, (0,))
                             for a in at]
                    z = z[0] if z else None
                operands = []
                for i in range(parts):
                    part = (q & 15 if i == 0 else q >> 4) if int4 else q
                    if per_group:
                        part = part.astype(jnp.float32) * s if z is None else part.astype(jnp.float32) * s + z
                    operands.append(part.astype(jnp.bfloat16))
                if not registers:
                    for wb, a in zip(wb_smems, operands):
                        wb[...] = a
                    plgpu.commit_smem()
                    operands = wb_smems
                for a, x_smem in zip(operands, x_smems):
                    plgpu.wgmma(acc, a, x_smem.T)  # [tile_n, width] @ [width, rows]
                plgpu.wgmma_wait(0)

            x_specs = [plgpu.BlockSpec((rows, width), lambda ki, i=i: (0, (split * steps + ki) * parts + i),
                                       transforms=bf16_tiles) for i in range(parts)]
            group_specs = [plgpu.BlockSpec((1, tile_n), lambda ki: (group_of(ki), j))] * len(group_refs)
            plgpu.emit_pipeline(
                step, grid=(steps,),
                in_specs=[plgpu.BlockSpec((tile_n, w_cols), lambda ki: (j, split * steps + ki),
                                          transforms=w_transforms), *x_specs, *group_specs],
                max_concurrent_steps=stages)(w_gmem, *[x_gmem] * parts, *group_refs)
            return acc[...]

        res = pl.run_scoped(accumulate, plgpu.ACC((tile_n, rows), jnp.float32))  # outputs down, x's rows across
        if not per_group:
            res = res * jax.lax.broadcast_in_dim(plgpu.load(s_gmem.at[0, cols], layout=vector, optimized=False),
                                                 res.shape, (0,))
        o_gmem[pl.ds(split * n + j * tile_n, tile_n), :] = res

    args = [xp, w, scale.astype(jnp.float32)] + ([] if zero is None else [zero.astype(jnp.float32)])
    scratch = [] if registers else [plgpu.SMEM((tile_n, width), jnp.bfloat16, transforms=bf16_tiles)
                                    for _ in range(parts)]
    partial = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((splits * n, rows), jnp.float32), scratch_types=scratch,
        grid=(n // tile_n, splits), grid_names=("strip", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        kernel_name=f"quant_matmul_hopper_nk_int{4 if int4 else 8}_k{tile_k}_s{splits}" + "_reg" * registers,
        interpret=plgpu.InterpretGPUParams() if interpret else None)(*args)
    return partial.reshape(splits, n, rows).sum(axis=0).T[:m]


@functools.partial(jax.jit, static_argnames=("half", "tile_n", "stages", "splits", "interpret"))
def quant_gemv(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None = None, *,
               half: int | None = None, tile_n: int = 64, stages: int = 4, splits: int | None = None,
               interpret: bool = False) -> jax.Array:
    """quant_matmul for one row on the CUDA cores (a candidate against XLA's row reduction, not yet measured
    on a GPU): TMA streams [tile_n, tile_k] weight tiles; each step multiplies the converted tile by the step's
    slice of x broadcast down its rows and sums along K into a [tile_n] partial, scaled once per group (and
    shifted by the zero times the slice's sum of x). No MMA, no padding of x."""
    m, k = x.shape
    groups, n = scale.shape
    group = k // groups
    int4 = w.dtype == jnp.uint8
    if m != 1:
        raise ValueError(f"hopper_nk.quant_gemv takes one row, got {m}")
    tile_k, splits, steps = _steps("quant_gemv", m, k, n, group, half if int4 else None, tile_n, splits)
    per_group = int4 or groups > 1
    parts = 2 if int4 else 1
    width = tile_k // parts
    xp = jnp.pad(x.astype(jnp.float32), ((0, 7), (0, 0)))  # [8, K]: TMA moves rows of 8
    rows_vector, cols_vector = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def kernel(x_gmem, w_gmem, s_gmem, *refs):
        z_gmem, o_gmem = (refs[0], refs[1]) if zero is not None else (None, refs[0])
        j, split = jax.lax.axis_index("strip"), jax.lax.axis_index("split")
        cols = pl.ds(j * tile_n, tile_n)

        def step(idx, w_smem, *rest):
            *x_smems, carry = rest
            q = plgpu.load(w_smem, layout=plgpu.Layout.WGMMA, optimized=False).astype(jnp.int32)
            partial = None
            xsum = 0.0
            for i, x_smem in enumerate(x_smems):
                part = ((q & 15) if i == 0 else (q >> 4)) if int4 else q
                xs = plgpu.load(x_smem.at[0], layout=cols_vector, optimized=False)  # [width]
                term = jnp.sum(part.astype(jnp.float32) * jax.lax.broadcast_in_dim(xs, part.shape, (1,)), axis=1)
                partial = term if partial is None else partial + term
                xsum = xsum + jnp.sum(xs)
            if not per_group:
                return carry + partial
            g = (split * steps + idx[0]) * tile_k // group
            out = partial * plgpu.load(s_gmem.at[g, cols], layout=rows_vector, optimized=False)
            if z_gmem is not None:
                out = out + xsum * plgpu.load(z_gmem.at[g, cols], layout=rows_vector, optimized=False)
            return carry + out

        x_specs = [plgpu.BlockSpec((8, width), lambda ki, i=i: (0, (split * steps + ki) * parts + i))
                   for i in range(parts)]
        acc = plgpu.emit_pipeline(
            step, grid=(steps,),
            in_specs=[plgpu.BlockSpec((tile_n, tile_k // parts), lambda ki: (j, split * steps + ki)), *x_specs],
            max_concurrent_steps=stages,
            init_carry=plgpu.layout_cast(jnp.zeros((tile_n,), jnp.float32), rows_vector),
        )(w_gmem, *[x_gmem] * parts)
        if not per_group:
            acc = acc * plgpu.load(s_gmem.at[0, cols], layout=rows_vector, optimized=False)
        o_gmem[split, cols] = acc

    args = [xp, w, scale.astype(jnp.float32)] + ([] if zero is None else [zero.astype(jnp.float32)])
    partial = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((splits, n), jnp.float32),
        grid=(n // tile_n, splits), grid_names=("strip", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        kernel_name=f"quant_gemv_hopper_nk_int{4 if int4 else 8}_k{tile_k}_s{splits}",
        interpret=plgpu.InterpretGPUParams() if interpret else None)(*args)
    return partial.sum(axis=0, keepdims=True)


__all__ = ["quant_gemv", "quant_matmul", "supported"]
