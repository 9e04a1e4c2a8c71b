"""Engine start-up on the 8B shape (load + warm-up), by decode steps per launch and compile threads.

    PYTHONPATH=. python benchmarks/startup.py [--model DIR] [--quantization int4] [--runs 1:1:cold 8:8:cold 8:8:warm
        8:1:cold:bg] [--out DIR]

Each run STEPS:THREADS:CACHE[:bg] is a fresh process (this script again, with --child) that builds the engine at the
sizes of quant_h100.py's engine table with warm-up on, num_scheduler_steps=STEPS and JAXLLM_COMPILE_THREADS=THREADS,
on a compilation cache that is empty (cold) or the one the previous run filled (warm); ":bg" compiles the
multi-step forms on a background thread (JAXLLM_MULTI_STEP_BACKGROUND=1). It prints the start-up seconds and the
executables compiled, a first batch-1 decode time (bench.time_decode, 128 in / 64 out; with ":bg" the multi-step
forms may still be compiling), the seconds until they are ready, then the batch-1 decode time (median of 3), so
that a compile setting which changes the kernels XLA picks (overlapping compilations autotune at once) shows up.
Random weights (--load-format dummy), quantized at load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(args: argparse.Namespace) -> None:
    t = time.perf_counter()
    from jaxllm import LLM, bench

    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", quantization=args.quantization or None,
              num_scheduler_steps=args.steps, max_num_seqs=64, num_kv_pages=4096, max_model_len=2048,
              max_num_batched_tokens=2048, enable_prefix_caching=False, warmup=True)
    startup = time.perf_counter() - t
    runner = llm.llm_engine.runner
    first = bench.time_decode(llm, 1, 128, 64, num_iters=1)  # (multi-step forms perhaps still compiling)
    runner.wait_for_multi_step()
    ready = time.perf_counter() - t
    r = bench.time_decode(llm, 1, 128, 64, num_iters=3)
    print("RESULT " + json.dumps({"startup_s": startup, "multi_step_ready_s": ready,
                                  "executables": runner.num_compilations,
                                  "first_decode_ms_per_token": first["decode_ms_per_token"],
                                  "decode_ms_per_token": r["decode_ms_per_token"]}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/llama-3.1-8b")
    ap.add_argument("--quantization", default="int4", help="int8 | int4 | '' (bf16)")
    ap.add_argument("--runs", nargs="+", default=["1:1:cold", "8:8:cold", "8:8:warm"])
    ap.add_argument("--timeout", type=int, default=400, help="seconds per run")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    import jax

    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows, cache = [], None
    for run in args.runs:
        steps, threads, state, *bg = run.split(":")
        if state == "cold" or cache is None:
            cache = tempfile.mkdtemp(prefix="xla_cache_")
        env = {**os.environ, "JAXLLM_COMPILATION_CACHE": cache, "JAXLLM_COMPILE_THREADS": threads,
               "JAXLLM_MULTI_STEP_BACKGROUND": "1" if bg == ["bg"] else "0"}
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--quantization", args.quantization,
               "--steps", steps]
        log = os.path.join(args.out, f"startup_{run.replace(':', '_')}.log")  # kept if the run times out
        try:
            with open(log, "w") as err:
                proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                      timeout=args.timeout)
            out = proc.stdout.split("RESULT ", 1)
            row = json.loads(out[1]) if len(out) == 2 else {"error": open(log).read()[-2000:]}
        except subprocess.TimeoutExpired:
            row = {"error": f"not done within {args.timeout} s; see {log}"}
        row.update(run=run, quantization=args.quantization)
        rows.append(row)
        print(json.dumps(row)[:400], flush=True)
    with open(os.path.join(args.out, "startup.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
