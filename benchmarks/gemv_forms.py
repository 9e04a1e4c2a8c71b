"""Decode-sized quantized matmuls on one GPU, written every way we have: which form reads the weights fastest?

    PYTHONPATH=. python benchmarks/gemv_forms.py [--shapes ...] [--extra-shapes KxN ...] [--bits 8 4]
        [--rows 1 8 64] [--forms ...] [--out DIR] [--smoke]

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
- nk_row (1-8 rows): the nk layout's row reduction in XLA (xla.row_matmul), what quant_linear runs at one row
  in that layout.
- hopper_nk[...]: the Mosaic GPU kernel on the nk layout (hopper_nk.quant_matmul: the tile converted in
  registers, int4 from jnp.int4 q - 8, into the MMA's register operand).

GB/s counts the stored weight + scale (+ zero) bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks.quant_h100 import SHAPES, chain_time, run_header
from pallas_kernels.quant_matmul import (gpu, hopper, hopper_nk, pack_half, quant_linear, quantize, reference,
                                        row_matmul, to_nk, unpack_int4)
from pallas_kernels.quant_matmul.gpu import split_k

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
HOPPER_NK_KNOBS = [{"stages": 2}, {"stages": 8}, {"tile_n": 64}, {"tile_n": 128}, {"piped_scales": False},
                   {"splits": "x2"}, {"splits": "x4"}]


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


def forms(bits: int, half: int | None, rows: int, k: int, n: int, smoke: bool) -> dict:
    """label -> (fn(x, *weights), which copies it reads: "q" stored, "n" the nk layout, "d" bf16)."""
    out = {"bf16": (lambda x, d: jnp.dot(x, d), "d"),
           "xla_dot": (lambda x, q, s, z: quant_linear(x, q, s, z, half, jnp.bfloat16, "xla"), "q")}
    if rows == 1:
        out.update({"col": (lambda x, q, s, z: matvec_reduce(x, q, s, z, half), "q"),
                    "col_direct": (lambda x, q, s, z: matvec_reduce(x, q, s, z, half, factored=False), "q")})
    if rows <= 8:
        out["nk_row"] = (lambda x, q, s, z: row_matmul(x, q, s, z), "n")
    for knobs in [{}, *KNOBS]:
        label = "kernel" + "".join(f" {a}={b}" for a, b in knobs.items())
        out[label] = (lambda x, q, s, z, kn=knobs: gpu.quant_matmul(x, q, s, z, half=half, interpret=smoke, **kn), "q")
    group = k if bits == 8 else 128
    if hopper_nk.supported(rows, k, n, group):
        for knobs in [{}, *HOPPER_NK_KNOBS]:
            knobs = _splits(knobs, k, n, group)
            label = "hopper_nk" + "".join(f" {a}={b}" for a, b in knobs.items())
            out[label] = (lambda x, q, s, z, kn=knobs: hopper_nk.quant_matmul(x, q, s, z, interpret=smoke, **kn), "n")
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


def _splits(knobs: dict, k: int, n: int, group: int) -> dict:
    """knobs with splits "xF" resolved for hopper_nk: F times its default K split (a divisor of its steps)."""
    if not str(knobs.get("splits", "")).startswith("x"):
        return knobs
    steps = k // hopper.group_step(group)
    tile_n = knobs.get("tile_n", hopper_nk.choose_tile_n(k, n, group < k))
    want = int(knobs["splits"][1:]) * split_k(steps, n // tile_n)
    return {**knobs, "splits": max(d for d in range(1, steps + 1) if steps % d == 0 and d <= want)}


def _fresh(a: jax.Array | None) -> jax.Array | None:
    """A distinct copy on the device (so that a chain's calls read different bytes)."""
    return None if a is None else jnp.array(a, copy=True)


def run(args: argparse.Namespace, bw: float) -> list[dict]:
    results = []
    key = jax.random.key(0)
    budget = (args.budget_mib << 20) if not args.smoke else (1 << 20)
    extra = {f"{k}x{n}": (int(k), int(n)) for k, n in (kn.split("x") for kn in args.extra_shapes)}
    for name in [*args.shapes, *extra]:
        k, n = {**ALL_SHAPES, **extra}[name]
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
            nstored = (to_nk(stored[0], half), *stored[1:])
            want = reference.quant_matmul(x, *stored, half)
            wbytes = sum(a.nbytes for a in stored if a is not None)  # (the nk layout's int4 holds as many)
            copies = max(2, int(budget // wbytes))
            sets = {"q": [tuple(_fresh(a) for a in stored) for _ in range(copies)],
                    "n": [tuple(_fresh(a) for a in nstored) for _ in range(copies)],
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
    ap.add_argument("--extra-shapes", nargs="*", default=[], metavar="KxN",
                    help="more [K, N] shapes (e.g. a sweep of K: a kernel's fixed cost against its cost per step)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x (decode batch)")
    ap.add_argument("--forms", nargs="+", default=None, help="only these forms ('hopper*': every hopper setting)")
    ap.add_argument("--budget-mib", type=int, default=1024, help="distinct weight copies per chain (> L2)")
    ap.add_argument("--smoke", action="store_true", help="a CPU check of the script: small shapes, interpreted")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    args.header, bw = run_header()
    run(args, bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
