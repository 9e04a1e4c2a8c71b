"""Decode-sized quantized matmuls on one GPU, written every way we have: which form reads the weights fastest?

    PYTHONPATH=. python benchmarks/gemv_forms.py [--shapes ...] [--bits 8 4] [--rows 1 8 64] [--forms ...]
        [--out DIR] [--smoke]

At batch 1-64 a linear layer is a read of its weights. Per Llama-3.1-8B layer shape [K, N], weight format and
number of rows of x (`--rows`), each form checked against the float32 oracle (reference.quant_matmul), then timed
as a jitted chain over > 1 GiB of distinct weight copies (quant_h100.chain_time: 4 queued calls, median of 5):

- bf16: `jnp.dot` on bf16 weights (cuBLAS / XLA's GEMM; the peer: what the quantized forms must beat by their
  byte ratio).
- kernel[...]: the Pallas Triton kernel (gpu.quant_matmul) at its default knobs and at each of KNOBS.
- hopper[...]: the Pallas Mosaic GPU kernel (hopper.quant_matmul) at its defaults and HOPPER_KNOBS.
- xla_dot: XLA's dequantize-in-fusion dot (quant_linear's non-kernel path).
- col / col_direct (one row only): matvec_reduce on the stored layout: a column reduction XLA fuses with the conversion
  (factored per group, or every weight dequantized first).
- hopper_nk[...]: a probe of the [N, K] layout with the MMA's register operand (hopper_nk, below).
- row / row_direct (one row only): the same sum over W stored transposed ([N, K]; int4 packed along K, a
  group's first half in the low nibbles): a row reduction, XLA's most tuned kind. Only here, to see whether
  a layout change would pay.

GB/s counts the stored weight + scale (+ zero) bytes.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.quant_h100 import SHAPES, chain_time, run_header
from pallas_kernels.quant_matmul import gpu, hopper, pack_half, quant_linear, quantize, reference, unpack_int4

ALL_SHAPES = {**SHAPES, "lm_head": (4096, 128256)}
KNOBS = [{"num_splits": s} for s in (4, 8, 16, 32, 64)] + [
    {"body": "gemv", "block_k": 64, "block_n": 128, "num_warps": 4},
    {"body": "gemv", "block_k": 32, "block_n": 256, "num_warps": 4},
    {"body": "gemv", "block_k": 128, "block_n": 256, "num_warps": 8},
    {"body": "gemv", "block_k": 64, "block_n": 256, "num_warps": 8, "num_stages": 1},
    {"body": "gemv", "block_k": 64, "block_n": 256, "num_warps": 8, "num_stages": 4},
    {"body": "gemv", "block_k": 64, "block_n": 512, "num_warps": 8}]
HOPPER_KNOBS = [{"stages": 2}, {"stages": 6}, {"splits": "half"}, {"splits": "double"}, {"piped_scales": True},
                {"piped_scales": True, "stages": 2}]


def matvec_reduce(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None = None,
                  half: int | None = None, factored: bool = True) -> jax.Array:
    """x [1, K] @ W [K, N] -> float32 [1, N] written as a sum over K that XLA emits as one column-reduction
    fusion, the integers converted inside it: a one-row matmul is a read of W, and a reduction is what XLA
    tunes for bandwidth. `factored`: each group's sum over its rows first, scaled (and shifted by zero times
    the group's sum of x) once per group; otherwise every weight is dequantized before the multiply."""
    k = x.shape[1]
    groups, n = scale.shape
    q = (unpack_int4(w, half) if w.dtype == jnp.uint8 else w).reshape(groups, k // groups, n)
    xs = x.astype(jnp.float32).reshape(groups, k // groups, 1)
    scale, zero = scale.astype(jnp.float32), None if zero is None else zero.astype(jnp.float32)
    if not factored:
        deq = q.astype(jnp.float32) * scale[:, None]
        deq = deq if zero is None else deq + zero[:, None]
        return jnp.sum(xs * deq, axis=(0, 1))[None]
    inner = jnp.sum(xs * q.astype(jnp.float32), axis=1)  # [G, N]
    out = inner * scale if zero is None else inner * scale + zero * jnp.sum(xs, axis=1)
    return jnp.sum(out, axis=0, keepdims=True)


_X_TILES = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

@functools.partial(jax.jit, static_argnames=("tile_n", "tile_k", "stages", "splits", "interpret"))
def hopper_nk(x: jax.Array, wt: jax.Array, st: jax.Array, zt: jax.Array | None = None, *, tile_n: int = 64,
              tile_k: int = 128, stages: int = 4, splits: int | None = None, interpret: bool = False) -> jax.Array:
    """A layout probe, not yet in the package: x [M, K] @ W with W stored [N, K] (int8, st [N, 1]; or jnp.int4
    values -8..7, st and zt [N, G]), as Hopper kernels elsewhere take it. The weight tile goes from shared
    memory into registers in the MMA's operand layout (WGMMA_UPCAST_2X / _4X), converted there, and into the
    warpgroup MMA as its register operand: no bf16 copy through shared memory. Mosaic GPU's interpreter has
    no register-operand MMA, so this runs on a GPU only (checked against the oracle before it is timed)."""
    m, k = x.shape
    n = wt.shape[0]
    groups = st.shape[1]
    group = k // groups
    int4 = wt.dtype == jnp.int4
    rows = max(8, 1 << (m - 1).bit_length())
    xp = jnp.pad(x.astype(jnp.bfloat16), ((0, rows - m), (0, 0)))
    splits = splits or gpu.split_k(k // tile_k, n // tile_n)
    steps = k // (tile_k * splits)
    row_bytes = tile_k // 2 if int4 else tile_k
    w_tiles = (plgpu.TilingTransform((8, tile_k)), plgpu.SwizzleTransform(min(128, row_bytes)))
    upcast = plgpu.Layout.WGMMA_UPCAST_4X if int4 else plgpu.Layout.WGMMA_UPCAST_2X
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def kernel(x_gmem, w_gmem, s_gmem, *refs):
        z_gmem = refs[0] if zt is not None else None
        o_gmem = refs[-1]
        j, split = jax.lax.axis_index("strip"), jax.lax.axis_index("split")
        rows_n = pl.ds(j * tile_n, tile_n)

        def accumulate(acc):
            def step(idx, x_smem, w_smem):
                q = plgpu.load(w_smem, layout=upcast)
                q = plgpu.layout_cast(q, plgpu.Layout.WGMMA)
                if groups > 1:
                    g = (split * steps + idx[0]) * tile_k // group
                    s = plgpu.load(s_gmem.at[rows_n, g], layout=row_layout, optimized=False)
                    t = q.astype(jnp.float32) * jax.lax.broadcast_in_dim(s, q.shape, (0,))
                    if z_gmem is not None:
                        z = plgpu.load(z_gmem.at[rows_n, g], layout=row_layout, optimized=False)
                        t = t + jax.lax.broadcast_in_dim(z, q.shape, (0,))
                    a = t.astype(jnp.bfloat16)
                else:
                    a = q.astype(jnp.bfloat16)
                plgpu.wgmma(acc, a, x_smem.T)
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(
                step, grid=(steps,),
                in_specs=[plgpu.BlockSpec((rows, tile_k), lambda ki: (0, split * steps + ki), transforms=_X_TILES),
                          plgpu.BlockSpec((tile_n, tile_k), lambda ki: (j, split * steps + ki), transforms=w_tiles)],
                max_concurrent_steps=stages)(x_gmem, w_gmem)
            return acc[...]

        res = pl.run_scoped(accumulate, plgpu.ACC((tile_n, rows), jnp.float32))
        if groups == 1:
            s = plgpu.load(s_gmem.at[rows_n, 0], layout=row_layout, optimized=False)
            res = res * jax.lax.broadcast_in_dim(s, res.shape, (0,))
        o_gmem[pl.ds(split * n + j * tile_n, tile_n), :] = res

    args = [xp, wt, st.astype(jnp.float32)] + ([] if zt is None else [zt.astype(jnp.float32)])
    run = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((splits * n, rows), jnp.float32),
                       grid=(n // tile_n, splits), grid_names=("strip", "split"),
                       compiler_params=plgpu.CompilerParams(approx_math=False), kernel_name="quant_matmul_hopper_nk",
                       interpret=plgpu.InterpretGPUParams() if interpret else None)
    return run(*args).reshape(splits, n, rows).sum(axis=0).T[:m]


def to_nk(w: jax.Array, bits: int, groups: int) -> tuple:
    """float w [K, N] -> (wt [N, K] int8 / int4, st [N, G], zt [N, G] or None) and the float weights they hold."""
    k, n = w.shape
    wg = w.T.reshape(n, groups, k // groups)
    if bits == 8:
        s = jnp.max(jnp.abs(wg), axis=2) / 127.0
        q = jnp.clip(jnp.round(wg / s[:, :, None]), -127, 127)
        return q.reshape(n, k).astype(jnp.int8), s, None, (q * s[:, :, None]).reshape(n, k).T
    lo, hi = jnp.min(wg, axis=2), jnp.max(wg, axis=2)
    s = (hi - lo) / 15.0
    q = jnp.clip(jnp.round((wg - lo[:, :, None]) / s[:, :, None]), 0, 15) - 8  # signed int4: -8..7
    z = lo + 8 * s
    return q.reshape(n, k).astype(jnp.int4), s, z, (q * s[:, :, None] + z[:, :, None]).reshape(n, k).T


def transposed(w: jax.Array, bits: int, groups: int) -> tuple:
    """The row forms' layout: int8 q [N, K]; int4 q [N, K // 2] with a group's rows [0, g/2) in the low
    nibbles and [g/2, g) in the high ones; scale (zero) [N, G]."""
    q, s, z = quantize(w, bits, groups, pack_half(w.shape[1]) if bits == 4 else None)
    if bits == 4:  # requantize from the oracle's values 0..15 so the transposed bytes hold the same numbers
        vals = unpack_int4(q, pack_half(w.shape[1]))  # [K, N]
        k, n = vals.shape
        v = vals.T.reshape(n, groups, 2, k // groups // 2)
        q = (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2)
    else:
        q = q.T
    return q, s.T, None if z is None else z.T


def row_form(x: jax.Array, q: jax.Array, s: jax.Array, z: jax.Array | None, direct: bool) -> jax.Array:
    """x [1, K] @ W from the transposed layout -> float32 [1, N]: a row reduction."""
    n, groups = s.shape
    k = x.shape[1]
    xs = x.astype(jnp.float32).reshape(groups, -1)  # [G, g]
    if q.dtype == jnp.uint8:  # nibbles: q[n, G, j] low = row j of the group, high = row g/2 + j
        q3 = q.reshape(n, groups, -1)
        halves = [(q3 & 15).astype(jnp.float32), (q3 >> 4).astype(jnp.float32)]
        xh = xs.reshape(groups, 2, -1)
        if direct:
            return jnp.sum(sum((h * s[:, :, None] + z[:, :, None]) * xh[:, i] for i, h in enumerate(halves)),
                           axis=(1, 2))[None]
        inner = jnp.sum(halves[0] * xh[:, 0] + halves[1] * xh[:, 1], axis=2)  # [N, G]
    else:
        q3 = q.reshape(n, groups, k // groups).astype(jnp.float32)
        if direct or groups == 1:
            deq = q3 * s[:, :, None]
            return jnp.sum((deq if z is None else deq + z[:, :, None]) * xs, axis=(1, 2))[None]
        inner = jnp.sum(q3 * xs, axis=2)
    out = inner * s if z is None else inner * s + z * jnp.sum(xs, axis=1)
    return jnp.sum(out, axis=1)[None]


def forms(bits: int, half: int | None, rows: int, k: int, n: int, smoke: bool) -> dict:
    """label -> (fn(x, *weights), which copies it reads: "q" stored, "t" transposed, "d" bf16)."""
    out = {"bf16": (lambda x, d: jnp.dot(x, d), "d"),
           "xla_dot": (lambda x, q, s, z: quant_linear(x, q, s, z, half, jnp.bfloat16, "xla"), "q")}
    if rows == 1:
        out.update({"col": (lambda x, q, s, z: matvec_reduce(x, q, s, z, half), "q"),
                    "col_direct": (lambda x, q, s, z: matvec_reduce(x, q, s, z, half, factored=False), "q"),
                    "row": (lambda x, q, s, z: row_form(x, q, s, z, False), "t"),
                    "row_direct": (lambda x, q, s, z: row_form(x, q, s, z, True), "t")})
    for knobs in [{}, *KNOBS]:
        label = "kernel" + "".join(f" {a}={b}" for a, b in knobs.items())
        out[label] = (lambda x, q, s, z, kn=knobs: gpu.quant_matmul(x, q, s, z, half=half, interpret=smoke, **kn), "q")
    if not smoke:
        out["hopper_nk"] = (lambda x, q, s, z: hopper_nk(x, q, s, z), "n")
        out["hopper_nk stages=2"] = (lambda x, q, s, z: hopper_nk(x, q, s, z, stages=2), "n")
        out["hopper_nk tile_n=128"] = (lambda x, q, s, z: hopper_nk(x, q, s, z, tile_n=128), "n")
    group = k if bits == 8 else 128
    if hopper.supported(rows, k, n, group, half):
        base = hopper.choose_params(rows, k, n, group, half)
        for knobs in [{}, *HOPPER_KNOBS]:
            label = "hopper" + "".join(f" {a}={b}" for a, b in knobs.items())
            kn = dict(knobs)
            if "splits" in kn:
                kn["splits"] = max(1, base["splits"] // 2) if kn["splits"] == "half" else 2 * base["splits"]
            out[label] = (lambda x, q, s, z, kn=kn: hopper.quant_matmul(x, q, s, z, half=half, interpret=smoke,
                                                                        **kn), "q")
    return out


def run(args: argparse.Namespace, bw: float) -> list[dict]:
    results = []
    key = jax.random.key(0)
    budget = (args.budget_mib << 20) if not args.smoke else (1 << 20)
    for name in args.shapes:
        k, n = ALL_SHAPES[name]
        if args.smoke:
            k, n = k // 16, n // 16 if name != "lm_head" else 512
        w = 0.02 * jax.random.normal(key, (k, n), jnp.float32)
        for bits, rows in [(b, r) for b in args.bits for r in args.rows]:
            x = jax.random.normal(jax.random.fold_in(key, rows), (rows, k), jnp.float32).astype(jnp.bfloat16)
            if bits == 4 and name == "lm_head":  # the LM head is quantized to int8 only (quantize_lm_head)
                continue
            group = k if bits == 8 else 128
            half = pack_half(n) if bits == 4 else None
            stored = quantize(w, bits, k // group, half)
            tstored = transposed(w, bits, k // group)
            nstored = to_nk(w, bits, k // group)[:3]
            want = reference.quant_matmul(x, *stored, half)
            wbytes = sum(a.nbytes for a in stored if a is not None)
            copies = max(2, int(budget // wbytes))
            sets = {"q": [tuple(a + 0 if a is not None else None for a in stored) for _ in range(copies)],
                    "t": [tuple(a + 0 if a is not None else None for a in tstored) for _ in range(copies)],
                    "n": [tuple(None if a is None else jnp.array(a, copy=True) for a in nstored)
                          for _ in range(copies)],
                    "d": [(w.astype(jnp.bfloat16) + 0,) for _ in range(max(2, int(budget // (2 * k * n))))]}
            row = {"shape": name, "K": k, "N": n, "bits": bits, "group": group, "M": rows, "weight_MB": wbytes / 1e6}
            for label, (fn, which) in forms(bits, half, rows, k, n, args.smoke).items():
                if args.forms and not any(label == f or f.endswith("*") and label.startswith(f[:-1])
                                          for f in args.forms):
                    continue
                try:
                    got = jax.jit(fn)(x, *sets[which][0])
                    ref = want if which != "d" else jnp.dot(x.astype(jnp.float32), w.astype(jnp.bfloat16).astype(
                        jnp.float32))
                    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
                    if not err < 2e-2:
                        raise ValueError(f"relative error {err:.1e} against the oracle")
                    us = chain_time(fn, x, sets[which]) * 1e6
                    nbytes = 2 * k * n if which == "d" else wbytes
                    row[label] = {"us": us, "err": err, "TBps": nbytes / us / 1e6, "of_bw": nbytes / us / 1e-6 / bw}
                    print(f"{name:13s} int{bits} M={rows:2d} {label:58s} {us:8.1f} us  {nbytes / us / 1e6:5.2f} TB/s "
                          f"(err {err:.1e})", flush=True)
                except Exception as e:  # a knob the shape cannot take: recorded, not fatal
                    row[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    print(f"{name:13s} int{bits} M={rows:2d} {label:58s} failed: {row[label]['error']}", flush=True)
            results.append(row)
            if args.out:  # after each row: a run cut short keeps what it measured
                with open(os.path.join(args.out, "gemv_forms.json"), "w") as f:
                    json.dump({**args.header, "rows": results}, f, indent=1)
            del sets
            gc.collect()
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(ALL_SHAPES), choices=list(ALL_SHAPES))
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 4])
    ap.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x (decode batch)")
    ap.add_argument("--forms", nargs="+", default=None, help="only these forms ('hopper*': every hopper setting)")
    ap.add_argument("--budget-mib", type=int, default=1024, help="distinct weight copies per chain (> L2)")
    ap.add_argument("--smoke", action="store_true", help="a CPU check of the script: small shapes, interpreted")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    args.header, bw = run_header()
    run(args, bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
