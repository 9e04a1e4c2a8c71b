"""Decode of the 8B shape on one GPU: is a step bound by the device or by the host launching it?

    PYTHONPATH=. python benchmarks/decode_profile.py [--configs bf16 int8 int4] [--batch 1] [--out DIR]

Per weight configuration (random weights, quantized at load, the LM head as its label says): the wall time per
decode step of a 64-token greedy generate of `--batch` sequences (median of 3, less a 1-token generate), then
the same generate under jax.profiler: device busy time per step (the sum of kernel durations over the whole
generate, prefill included, per decode step), kernels per step and the longest kernels. Busy well below wall
is a device waiting for the host (quantized steps launch several hundred small kernels).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import jax

from benchmarks.attention_profile import device_events
from jaxllm import LLM, SamplingParams

CONFIGS = {"bf16": (None, False), "int8": ("int8", True), "int8-bf16-head": ("int8", False), "int4": ("int4", True)}


def profile_config(label: str, args: argparse.Namespace) -> dict:
    quant, head = CONFIGS[label]
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", quantization=quant, quantize_lm_head=head,
              max_num_seqs=args.batch, num_kv_pages=256 * args.batch, max_model_len=1024, enable_prefix_caching=False,
              warmup=False)
    vocab = llm.model.config.vocab_size
    prompt = [{"prompt_token_ids": [(i + 7 * b) % vocab for i in range(1000, 1128)]} for b in range(args.batch)]
    def run(n: int = args.tokens) -> float:
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    run()
    prefill = statistics.median(run(1) for _ in range(3))  # and the first token: taken off the wall time
    wall = (statistics.median(run() for _ in range(3)) - prefill) / (args.tokens - 1)
    trace_dir = tempfile.mkdtemp(prefix=f"trace_{label}_")  # traces stay out of --out (tens of MB)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run()
    events = device_events(trace_dir)
    per_kernel = collections.defaultdict(list)
    for e in events:
        per_kernel[e["name"]].append(e["dur"])
    top = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:8]
    row = {"config": label, "batch": args.batch, "wall_ms_per_step": wall * 1e3,
           "busy_ms_per_step": sum(e["dur"] for e in events) / 1e3 / args.tokens,
           "kernels_per_step": len(events) / args.tokens,
           "top": [(k[:80], len(v) / args.tokens, statistics.median(v)) for k, v in top]}
    print(f"{label}: wall {row['wall_ms_per_step']:.2f} ms/step, "
          f"device busy {row['busy_ms_per_step']:.2f} ms/step, "
          f"{row['kernels_per_step']:.0f} kernels/step", flush=True)
    for k, n, d in row["top"]:
        print(f"    {n:6.1f}/step  median {d:8.1f} us  {k}", flush=True)
    return row  # the engine goes with this frame; the caller collects it before the next config loads


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/llama-3.1-8b")
    ap.add_argument("--configs", nargs="+", default=["bf16", "int8", "int4"], choices=list(CONFIGS))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows = []
    for label in args.configs:
        rows.append(profile_config(label, args))
        gc.collect()
    with open(os.path.join(args.out, "decode_profile.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
