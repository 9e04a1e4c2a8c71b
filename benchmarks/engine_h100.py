"""Issue 6 on one GPU in one process: a Llama-3.1-8B-shaped model (random bf16 weights, load_format "dummy"),
one engine for every measurement so the step shapes compile once.

    PYTHONPATH=. python benchmarks/engine_h100.py [--num-prompts 1000] [--random-prompts 1000] [--out DIR]

1. bandwidth: jaxllm.bench.device_bandwidth (2 GiB in-place elementwise, back-to-back calls)
2. start-up: load (random weights made on the device) + compiling every step shape
3. batch-1 latency, 128 in / 256 out (median of 3), decode ms/token against the weights + KV floor
4. profile: device busy time (union of GPU events in a jax.profiler trace) against wall time, per step, for
   steady decode steps at 64 sequences and for prefill steps of 2048 tokens
5. offline throughput: ShareGPT-like requests, then random 1024 in / 128 out, all submitted at once
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

logging.getLogger("jaxllm").setLevel(logging.INFO)

from benchmarks.attention_profile import device_events
from jaxllm import LLM, SamplingParams, bench


def busy_us(events: list[dict]) -> float:
    """Length of the union of the events' [ts, ts + dur) intervals, in us."""
    total, end = 0.0, -1.0
    for e in sorted(events, key=lambda e: e["ts"]):
        s, t = e["ts"], e["ts"] + e["dur"]
        if t > end:
            total += t - max(s, end)
            end = t
    return total


def profile_steps(llm: LLM, prompts: list, params: SamplingParams, want: callable, steps: int, out: str) -> dict:
    """Submit `prompts`, step until `want(engine)` holds, then trace `steps` steps: wall and device time each."""
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"prof-{time.monotonic()}-{i}", p, params)
    while not want(engine):
        engine.step()
    trace_dir = tempfile.mkdtemp(dir=out, prefix="trace_")
    walls, buckets = [], []
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t_all = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t)
            buckets.append(engine.runner.last_bucket)
        jax.effects_barrier()
        span = time.perf_counter() - t_all
    events = device_events(trace_dir)
    while engine.has_unfinished_requests():
        engine.step()
    busy = busy_us(events) / steps
    return {"steps": steps, "buckets": sorted(set(map(str, buckets))), "wall_ms_median": statistics.median(walls) * 1e3,
            "wall_ms_mean": span / steps * 1e3, "device_busy_ms": busy / 1e3,
            "device_idle_fraction": max(0.0, 1 - busy / 1e3 / (span / steps * 1e3))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/llama-3.1-8b")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--random-prompts", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-kv-pages", type=int, default=16384)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    res: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M")}
    print(res, flush=True)
    bw = bench.device_bandwidth()
    res["bandwidth_TBps"] = bw / 1e12
    print(f"bandwidth (2 GiB in-place elementwise): {bw / 1e12:.2f} TB/s", flush=True)

    t0 = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=2048, num_kv_pages=args.num_kv_pages,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False)
    res["startup_s"] = time.perf_counter() - t0
    runner, cfg = llm.llm_engine.runner, llm.model.config
    compiled = runner.num_compilations
    weight_bytes = llm.model.num_bytes
    print(f"start-up {res['startup_s']:.1f} s ({len(runner.all_buckets())} step shapes, "
          f"{runner.num_compilations} functions), weights {weight_bytes / 1e9:.2f} GB", flush=True)

    # Batch-1 latency.
    r = res["latency_b1"] = bench.time_decode(llm, 1, 128, 256, num_iters=3, bandwidth=bw)
    print(f"batch 1, 128 in / 256 out: {r['latency_s']:.3f} s, prefill {r['prefill_s'] * 1e3:.1f} ms, decode "
          f"{r['decode_ms_per_token']:.2f} ms/token = {r['decode_tok_per_s']:.1f} tok/s; floor "
          f"{r['decode_floor_ms']:.2f} ms -> {r['roofline_fraction']:.0%} of roofline", flush=True)
    rng = np.random.default_rng(0)

    # Profiles: steady decode at 64 sequences; prefill steps of 2048 tokens.
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for n in sorted({64, args.max_num_seqs}):
        dec = [{"prompt_token_ids": rng.integers(16, cfg.vocab_size - 16, 128).tolist()} for _ in range(n)]
        res[f"profile_decode_{n}"] = profile_steps(
            llm, dec, greedy, lambda e, n=n: len(e.scheduler.running) == n and not e.scheduler.waiting
            and all(s.num_computed_tokens > s.num_prompt_tokens for s in e.scheduler.running), 20, args.out)
    pre_reqs = [{"prompt_token_ids": rng.integers(16, cfg.vocab_size - 16, 512).tolist()} for _ in range(32)]
    res["profile_prefill_2048"] = profile_steps(llm, pre_reqs, SamplingParams(max_tokens=1, ignore_eos=True),
                                                lambda e: True, 6, args.out)
    for k in [k for k in res if k.startswith("profile_")]:
        print(k, res[k], flush=True)

    # Offline throughput.
    for name, n, in_len, out_len in (("sharegpt-like", args.num_prompts, 0, 0),
                                     ("random", args.random_prompts, 1024, 128)):
        if n <= 0:
            continue
        reqs = bench.make_requests(name, n, in_len, out_len, cfg.vocab_size, seed=1)
        prompts = [{"prompt_token_ids": p} for p, _ in reqs]
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        el = time.perf_counter() - t
        n_in, n_out = sum(len(p) for p, _ in reqs), sum(len(o.outputs[0].token_ids) for o in outs)
        res[f"throughput_{name}"] = {"requests": n, "elapsed_s": el, "prompt_tokens": n_in, "output_tokens": n_out,
                                     "requests_per_s": n / el, "output_tok_per_s": n_out / el,
                                     "total_tok_per_s": (n_in + n_out) / el}
        print(f"throughput {name}: {n} requests ({n_in} + {n_out} tokens) in {el:.1f} s: {n / el:.2f} req/s, "
              f"{n_out / el:.0f} output tok/s, {(n_in + n_out) / el:.0f} total tok/s", flush=True)
    res["compilations_after_warmup"] = runner.num_compilations - compiled
    print(f"compilations after warm-up: {res['compilations_after_warmup']}")
    with open(os.path.join(args.out, "engine_h100.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
