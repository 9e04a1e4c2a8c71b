"""Issue 7 on one GPU: the quantized matmul kernel on Llama-3.1-8B's layer shapes, then batch-1 and batch-64
decode of the 8B shape in bf16, int8 and int4 (random weights quantized at load), all in one process.

    PYTHONPATH=. python benchmarks/quant_h100.py [--out DIR] [--skip-engine]

1. bandwidth: jaxllm.bench.device_bandwidth (2 GiB in-place elementwise).
2. kernel: for each layer shape [K, N] and batch M, a jitted chain of matmuls over enough distinct weight
   copies (> 1 GiB, 20x L2) that nothing stays in L2; wall time per matmul (4 calls queued, median of 5)
   for: bf16 dense, XLA's dequantize-in-fusion path, the Pallas kernel at its default knobs and at the other
   KNOBS (bodies, conversions, tiles); each checked against the float32 oracle first. GB/s counts the stored
   weight + scale bytes; then per (bits, M) the fastest setting over one decoder layer's matmuls.
3. engine: bench.time_decode at batch 1 (128 in / 256 out) and batch 64 (128 / 128) per quantization, batch
   1 also as N rows (ENGINE_CONFIGS), and batch 64 at 1024 in with a bf16 and an int8 KV cache; with
   --scheduler-steps, each case at each number of decode steps per launch.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jaxllm import LLM, bench
from pallas_kernels.quant_matmul import gpu, int8_dot_two_level, pack_half, quant_linear, quantize, reference

SHAPES = {"q/o_proj": (4096, 4096), "k/v_proj": (4096, 1024), "gate/up_proj": (4096, 14336), "down_proj": (14336, 4096)}
FUSED_SHAPES = {"qkv_fused": (4096, 6144), "gate_up_fused": (4096, 28672)}  # what one call over q|k|v, gate|up reads
LAYER_COUNT = {"q/o_proj": 2, "k/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}  # per decoder layer
KNOBS = [{}, {"body": "dot", "convert": "cast"}, {"body": "dot"}, {"body": "dot", "block_n": 256},
         {"body": "gemv", "block_k": 64, "num_warps": 8},
         {"body": "gemv", "block_k": 32, "block_n": 256, "num_warps": 8},
         {"body": "gemv", "block_k": 64, "block_n": 256, "num_warps": 8}]


def run_header() -> tuple[dict, float]:
    """The run's date, device and jax version, and the device's elementwise bandwidth (printed, bytes/s)."""
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    bw = bench.device_bandwidth()
    res["bandwidth_TBps"] = bw / 1e12
    print(f"{res['device']}, jax {res['jax']}, {res['date']}: bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    return res, bw


def chain_time(fn, xs, weights: list, reps: int = 5, calls: int = 4) -> float:
    """Seconds per matmul: one jitted call applies fn(x, *w) for every weight copy in turn; `calls` calls are
    queued back to back (so the host's dispatch overlaps the device's work), median over `reps`."""
    @jax.jit
    def many(x, ws):  # every output kept whole, so XLA cannot shrink a matmul to the part that is used
        return jnp.stack([fn(x, *w).astype(jnp.bfloat16) for w in ws])

    jax.block_until_ready(many(xs, weights))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        outs = [many(xs, weights) for _ in range(calls)]
        jax.block_until_ready(outs)
        samples.append((time.perf_counter() - t) / (calls * len(weights)))
    return statistics.median(samples)


def kernel_table(bw: float, batches: list[int], smoke: bool, shapes: list[str], knobs_list: list[dict],
                 bits_list: list[int], budget_mib: int) -> list[dict]:
    rows = []
    key = jax.random.key(0)
    budget = (budget_mib << 20) if not smoke else (1 << 20)
    for name in shapes:
        k, n = {**SHAPES, **FUSED_SHAPES}[name]
        if smoke:  # CPU: the script's own check, small shapes through the interpreter
            k, n = k // 16, n // 16
        w = 0.02 * jax.random.normal(key, (k, n), jnp.float32)
        for bits, group in [(b, k if b == 8 else 128) for b in bits_list]:
            groups = k // group
            half = pack_half(n) if bits == 4 else None
            stored = quantize(w, bits, groups, half)
            zero = stored[2]
            wbytes = sum(a.nbytes for a in stored if a is not None)
            copies = max(2, int(budget // wbytes))
            qcopies = [tuple(a + 0 if a is not None else None for a in stored) for _ in range(copies)]
            dense_copies = [(w.astype(jnp.bfloat16) + 0,) for _ in range(max(2, int(budget // (2 * k * n))))]
            for m in batches:
                x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32).astype(jnp.bfloat16)
                want = reference.quant_matmul(x, *stored[:2], zero, half)
                got = gpu.quant_matmul(x, *stored[:2], zero, half=half, interpret=smoke)
                err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                row = {"shape": name, "K": k, "N": n, "bits": bits, "group": group, "M": m, "rel_err": err,
                       "weight_MB": wbytes / 1e6}
                row["bf16_us"] = chain_time(lambda x, d: jnp.dot(x, d), x, dense_copies) * 1e6
                row["xla_us"] = chain_time(lambda x, q, s, z: quant_linear(x, q, s, z, half, jnp.bfloat16, "xla"),
                                           x, qcopies) * 1e6
                if bits == 8:  # x split in two int8 rows, an s8 x s8 -> s32 dot (cuBLAS / XLA's own GEMM)
                    got = int8_dot_two_level(x, *stored[:2])
                    row["s8_err"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                    row["s8_us"] = chain_time(lambda x, q, s, z: int8_dot_two_level(x, q, s), x, qcopies) * 1e6
                for knobs in knobs_list:
                    label = "kernel" + "".join(f" {a}={b}" for a, b in knobs.items())
                    try:
                        got = gpu.quant_matmul(x, *stored[:2], zero, half=half, interpret=smoke, **knobs)
                        row[label + "_err"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                        if not row[label + "_err"] < 1e-2:
                            raise ValueError(f"relative error {row[label + '_err']:.1e} against the oracle")
                        t = chain_time(lambda x, q, s, z, kn=knobs: gpu.quant_matmul(
                            x, q, s, z, half=half, interpret=smoke, **kn), x, qcopies)
                        row[label + "_us"] = t * 1e6
                    except Exception as e:  # a knob the shape cannot take: recorded, not fatal
                        row[label + "_us"] = None
                        print(f"    {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                best = min((v, k_) for k_, v in row.items() if k_.startswith("kernel") and k_.endswith("_us") and v)
                row["best"] = best[1]
                row["kernel_TBps"] = wbytes / (row["kernel_us"] * 1e-6) / 1e12
                row["kernel_of_bw"] = row["kernel_TBps"] * 1e12 / bw
                row["bf16_of_bw"] = 2 * k * n / (row["bf16_us"] * 1e-6) / bw
                rows.append(row)
                s8 = f" | s8 {row['s8_us']:7.1f} (err {row['s8_err']:.1e})" if "s8_us" in row else ""
                print(f"{name:13s} int{bits} g{group:5d} M={m:3d} err {err:.1e} | bf16 {row['bf16_us']:7.1f} us "
                      f"({row['bf16_of_bw']:.0%}) | xla {row['xla_us']:7.1f}{s8} | kernel {row['kernel_us']:7.1f} "
                      f"({row['kernel_of_bw']:.0%} of bw) | best {best[1]} {best[0]:.1f}", flush=True)
            del qcopies, dense_copies
            gc.collect()
    return rows


def layer_totals(kernel_rows: list[dict], knobs_list: list[dict]) -> dict:
    """Per (bits, M): the knob setting with the least time over one decoder layer's matmuls (a setting that
    failed on any shape is out), beside the default's."""
    best_knobs = {}
    for bits, m in sorted({(r["bits"], r["M"]) for r in kernel_rows}):
        rows = [r for r in kernel_rows if r["bits"] == bits and r["M"] == m and r["shape"] in LAYER_COUNT]
        labels = [k_ for k_ in rows[0] if k_.startswith("kernel") and k_.endswith("_us")]
        totals = {lab: sum(LAYER_COUNT[r["shape"]] * r[lab] for r in rows) for lab in labels
                  if all(r.get(lab) for r in rows)}
        best = min(totals, key=totals.get)
        knobs = next(kn for kn in knobs_list if "kernel" + "".join(f" {a}={b}" for a, b in kn.items()) + "_us" == best)
        best_knobs[f"int{bits} M={m}"] = {"knobs": knobs, "layer_us": totals[best], "default_layer_us":
                                          totals.get("kernel_us"), "totals_us": totals}
        print(f"int{bits} M={m}: {best[:-3]} ({totals[best]:.1f} us per layer; default "
              f"{totals.get('kernel_us', float('nan')):.1f} us)", flush=True)
    return best_knobs


# label -> (quantization, kv_cache_dtype, smallest decode bucket or None for the runner's, [(batch, in, out)])
# label: (quantization, kv_cache_dtype, smallest decode bucket or None, quantize_lm_head, [(batch, in, out)])
ENGINE_CONFIGS = {
    "bf16": (None, "auto", None, False, [(1, 128, 256), (64, 128, 128)]),
    "bf16-1024": (None, "auto", None, False, [(64, 1024, 128)]),  # beside bf16+kv-int8's
    "int8": ("int8", "auto", None, True, [(1, 128, 256), (64, 128, 128)]),
    "int8-bf16-head": ("int8", "auto", None, False, [(1, 128, 256), (64, 128, 128)]),
    "int8-rows8": ("int8", "auto", 8, True, [(1, 128, 256)]),
    "int4": ("int4", "auto", None, True, [(1, 128, 256), (64, 128, 128)]),
    "int4-bf16-head": ("int4", "auto", None, False, [(1, 128, 256), (64, 128, 128)]),
    "int4-rows1": ("int4", "auto", 1, True, [(1, 128, 256)]),
    "bf16+kv-int8": (None, "int8", None, False, [(1, 128, 256), (64, 128, 128), (64, 1024, 128)]),
}
ENGINE_CONFIGS.update({f"{q}-kn": ENGINE_CONFIGS[q] for q in ("int8", "int4")})  # the [in, out] layout on Hopper


def engine_table(args: argparse.Namespace, bw: float) -> list[dict]:
    """bench.time_decode per ENGINE_CONFIGS entry; "-rowsN" runs batch 1 as N rows (the runner's choice: one
    row for int8 weights on a GPU, otherwise 8: runner.decode_buckets); "-kn" keeps the quantized kernels in the
    checkpoints' [in, out] layout (load_model's quant_layout; "auto" picks nk on a Hopper GPU)."""
    from jaxllm import runner

    rows = []
    for label in args.engine_configs:
        quant, kv, min_rows, head, cases = ENGINE_CONFIGS[label]
        buckets = runner.decode_buckets
        if min_rows:  # the runner asks decode_buckets once, while LLM builds it
            runner.decode_buckets = lambda platform, quantization, n, *layout: runner.pow2_ladder(
                min_rows, max(n, min_rows))
        t = time.perf_counter()
        try:
            llm = LLM(args.model, load_format="dummy", dtype="bfloat16", quantization=quant, kv_cache_dtype=kv,
                      quantize_lm_head=head, quant_layout="kn" if label.endswith("-kn") else "auto",
                      max_num_seqs=64, num_kv_pages=4096, max_model_len=2048, max_num_batched_tokens=2048,
                      enable_prefix_caching=False, warmup=False)
        finally:
            runner.decode_buckets = buckets
        load = time.perf_counter() - t
        for (batch, in_len, out_len), steps in itertools.product(cases, args.scheduler_steps or [None]):
            if steps:  # the runner reads num_steps at each launch: the same engine at another setting
                llm.llm_engine.runner.num_steps = steps
            r = bench.time_decode(llm, batch, in_len, out_len, num_iters=3, bandwidth=bw)
            r.update(quantization=label, load_s=load, scheduler_steps=llm.llm_engine.runner.num_steps)
            rows.append(r)
            print(f"{label:13s} batch {batch:3d} in {in_len:4d} steps/launch {r['scheduler_steps']}: decode "
                  f"{r['decode_ms_per_token']:.2f} ms/step = {r['decode_tok_per_s']:.0f} tok/s, weights "
                  f"{r['weight_GB']:.2f} GB, floor {r['decode_floor_ms']:.2f} ms -> {r['roofline_fraction']:.0%} of "
                  f"its roofline (load {load:.0f} s)", flush=True)
        del llm
        gc.collect()
        with open(os.path.join(args.out, "quant_engine_partial.json"), "w") as f:  # a run cut short keeps these
            json.dump(rows, f, indent=1)
    def case(r: dict) -> tuple:
        return r["batch_size"], r["input_len"], r["scheduler_steps"]

    base = {case(r): r["decode_tok_per_s"] for r in rows if r["quantization"] == "bf16"}
    for r in rows:
        if case(r) in base:
            r["speedup_vs_bf16"] = r["decode_tok_per_s"] / base[case(r)]
            print(f"{r['quantization']:13s} batch {r['batch_size']:3d} in {r['input_len']:4d} steps/launch "
                  f"{r['scheduler_steps']}: {r['speedup_vs_bf16']:.2f}x bf16", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/llama-3.1-8b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=[*SHAPES, *FUSED_SHAPES])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 4])
    ap.add_argument("--budget-mib", type=int, default=1024, help="distinct weight copies per chain (> L2)")
    ap.add_argument("--knobs", default=None, help="JSON list of kernel knob settings to time (default: KNOBS)")
    ap.add_argument("--engine-first", action="store_true", help="the model runs before the kernel table")
    ap.add_argument("--engine-configs", nargs="+", default=list(ENGINE_CONFIGS), choices=list(ENGINE_CONFIGS))
    ap.add_argument("--scheduler-steps", type=int, nargs="+", default=None,
                    help="decode steps per launch to time each engine case at (default: the engine's)")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="a CPU check of the script: small shapes, interpreted, no engine")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    res, bw = run_header()
    knobs = json.loads(args.knobs) if args.knobs else KNOBS

    def save():  # after each part: a run cut short keeps what it measured
        with open(os.path.join(args.out, "quant_h100.json"), "w") as f:
            json.dump(res, f, indent=1)

    parts = [("kernel", not args.skip_kernel, lambda: kernel_table(bw, args.batches, args.smoke, args.shapes, knobs,
                                                                             args.bits, args.budget_mib)),
             ("engine", not args.skip_engine and not args.smoke, lambda: engine_table(args, bw))]
    for name, wanted, run in (parts[::-1] if args.engine_first else parts):
        if wanted:
            res[name] = run()
            if name == "kernel" and set(SHAPES) <= set(args.shapes):
                res["layer_totals"] = layer_totals(res["kernel"], knobs)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
