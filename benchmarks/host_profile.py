"""Where the host's time goes in a decode step: cProfile of the engine stepping `--seqs` sequences of a
config-only model (random weights), after warm-up. The device work runs concurrently (async scheduling):
time spent waiting for it shows up under `fetch` (block on the step's output).

    PYTHONPATH=. python benchmarks/host_profile.py [--model DIR] [--seqs 256] [--steps 30]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import numpy as np

from jaxllm import LLM, SamplingParams


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/llama-3.1-8b")
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--num-kv-pages", type=int, default=24000)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype=args.dtype, max_model_len=2048, max_num_seqs=args.seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, num_kv_pages=args.num_kv_pages,
              enable_prefix_caching=False)
    e = llm.llm_engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=args.steps + 40, ignore_eos=True, output_kind="final_only")
    vocab = llm.model.config.vocab_size
    for i in range(args.seqs):
        e.add_request(str(i), {"prompt_token_ids": rng.integers(16, vocab - 16, 128).tolist()}, params)
    while e.scheduler.waiting or any(s.num_computed_tokens <= s.num_prompt_tokens for s in e.scheduler.running):
        e.step()
    for _ in range(5):
        e.step()
    t = time.perf_counter()
    for _ in range(10):
        e.step()
    print(f"{(time.perf_counter() - t) / 10 * 1e3:.2f} ms/step at {args.seqs} sequences (no profiler)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        e.step()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumtime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
