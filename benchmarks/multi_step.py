"""Several greedy decode steps per launch: is a batch-1 step on the GPU bound by the host, and does a device-side
loop over the step take the host's share off?

    PYTHONPATH=. python benchmarks/multi_step.py [--model DIR] [--configs bf16 int8 int4] [--steps 1 4 8 16]
        [--tokens 64] [--dynamic] [--max-num-seqs 64 --kv-pages 4096 --max-model-len 2048] [--out DIR]

Per weight configuration (random weights quantized at load, as quant_h100.py loads them): the engine's wall
time per decode token (a `--tokens` greedy generate less a 1-token one, median of 3), then the same model run by
this script: one prompt prefilled, then `--tokens` decode tokens as a chain of jitted calls that each run `steps`
decode steps in a lax.fori_loop on the device (the next step's input is the last step's argmax; positions and
slot_mapping advance on the device). Wall time per token, median of 3 chains, whether the tokens equal the
engine's, and each call's compile time and while loops left in its optimized HLO (none: XLA unrolled the loop;
--dynamic also runs each with the trip count as an argument, which XLA cannot unroll). With
XLA_FLAGS=--xla_gpu_enable_command_buffer=... the same run shows whether XLA keeps the loop in one CUDA graph (a
loop run from the host launches each iteration's kernels again).
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
import numpy as np

from jaxllm import LLM, SamplingParams
from jaxllm.attention import AttentionMetadata
from jaxllm.runner import SeqInput, prepare_batch

CONFIGS = {"bf16": (None, False), "int8": ("int8", True), "int4": ("int4", True)}


def decode_chain(llm: LLM, prompt: list[int], tokens: int, steps: int, dynamic: bool = False, reps: int = 3
                 ) -> tuple[float, list[int], dict]:
    """Seconds per token of `tokens` greedy decode tokens after `prompt`, `steps` per jitted call; the tokens; the
    call's compile time and what XLA made of its loop. dynamic: the trip count is an argument (a while loop
    XLA cannot unroll; one executable for any number of steps)."""
    r = llm.llm_engine.runner
    module, ps, rows = r.loaded.module, r.page_size, r.bucket_for(1, 1, True)[1]
    pages = -(-(len(prompt) + tokens + steps) // ps)
    table = np.zeros((rows, r.max_pages_per_seq), np.int32)
    table[0, :pages] = np.arange(pages)
    dropped = r.num_pages * ps

    @jax.jit
    def prefill(params, kv, ids, pos, md, li):
        hidden, kv = module.apply({"params": params}, ids, pos, kv, md, method="hidden_states")
        logits = module.apply({"params": params}, hidden[li], method="logits")
        return jnp.argmax(logits, -1).astype(jnp.int32), kv

    def decode(params, kv, token, start, block_tables, n):
        """n (= steps) decode steps of one sequence (row 0; the other rows pad): tokens [steps], kv."""
        valid = jnp.arange(rows) == 0
        qsl = jnp.minimum(jnp.arange(rows + 1, dtype=jnp.int32), 1)

        def body(i, carry):
            token, kv, out = carry
            p = start + i
            pos = jnp.full(rows, p, jnp.int32)
            slot = jnp.where(valid, block_tables[0, p // ps] * ps + p % ps, dropped)
            md = AttentionMetadata(slot, block_tables, jnp.where(valid, pos + 1, 0), qsl, 1)
            ids = jnp.where(valid, token, 0)
            hidden, kv = module.apply({"params": params}, ids, pos, kv, md, method="hidden_states")
            nxt = jnp.argmax(module.apply({"params": params}, hidden, method="logits"), -1).astype(jnp.int32)
            return nxt[0], kv, out.at[i].set(nxt[0])

        token, kv, out = jax.lax.fori_loop(0, n if dynamic else steps, body,
                                           (token, kv, jnp.zeros(steps, jnp.int32)))
        return out, kv

    ids, pos, md, li = prepare_batch([SeqInput(prompt, 0, list(table[0, :pages]))], ps, r.num_pages,
                                     r.max_pages_per_seq)
    params, bt = r.loaded.params, jnp.asarray(table)
    t = time.perf_counter()
    compiled = jax.jit(decode, donate_argnums=(1,)).lower(params, r.kv_caches, jnp.int32(0), jnp.int32(0), bt,
                                                          jnp.int32(steps)).compile()
    hlo = compiled.as_text()
    report = {"compile_s": time.perf_counter() - t, "while_ops": hlo.count(" while("), "hlo_chars": len(hlo)}
    samples, got = [], []
    for rep in range(reps + 1):  # the first chain compiles
        first, r.kv_caches = prefill(params, r.kv_caches, ids, pos, md, li)
        token, outs = first[0], []
        jax.block_until_ready(token)
        t = time.perf_counter()
        for s in range(0, tokens, steps):
            out, r.kv_caches = compiled(params, r.kv_caches, token, jnp.int32(len(prompt) + s), bt, jnp.int32(steps))
            token = out[-1]
            outs.append(out)
        jax.block_until_ready(outs)
        if rep:
            samples.append((time.perf_counter() - t) / tokens)
        got = [int(first[0])] + [int(v) for o in outs for v in np.asarray(o)]
    return statistics.median(samples), got[:tokens + 1], report


def measure(label: str, args: argparse.Namespace) -> dict:
    quant, head = CONFIGS[label]
    llm = LLM(args.model or None, load_format="dummy" if args.dummy else "auto", dtype=args.dtype, quantization=quant,
              quantize_lm_head=head, max_num_seqs=args.max_num_seqs, num_kv_pages=args.kv_pages,
              max_model_len=args.max_model_len, max_num_batched_tokens=2048, enable_prefix_caching=False, warmup=False)
    vocab = llm.model.config.vocab_size
    prompt = [(i * 7) % vocab for i in range(1000, 1000 + args.prompt_len)]

    def run(n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                           use_tqdm=False)
        return time.perf_counter() - t, out[0].outputs[0].token_ids

    run(args.tokens + 1)
    first = statistics.median(run(1)[0] for _ in range(3))
    engine = (statistics.median(run(args.tokens + 1)[0] for _ in range(3)) - first) / args.tokens
    reference = run(args.tokens + 1)[1]
    row = {"config": label, "engine_ms_per_token": engine * 1e3, "loop": {}}
    print(f"{label}: engine {engine * 1e3:.2f} ms/token", flush=True)
    for steps, dynamic in itertools.product(args.steps, [False, True] if args.dynamic else [False]):
        sec, got, report = decode_chain(llm, prompt, args.tokens, steps, dynamic)
        same = sum(a == b for a, b in zip(got, reference))
        kind = "dynamic" if dynamic else "static"
        row["loop"][f"{steps}-{kind}"] = {"ms_per_token": sec * 1e3, "tokens_equal": same, "of": len(reference),
                                          **report}
        print(f"    {steps:3d} steps per call ({kind} trip count): {sec * 1e3:.2f} ms/token, {same}/{len(reference)} "
              f"tokens equal the engine's; compiled in {report['compile_s']:.1f} s, {report['while_ops']} while "
              f"loops in the optimized HLO ({report['hlo_chars'] / 1e6:.1f} M chars)", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/llama-3.1-8b")
    ap.add_argument("--dummy", action=argparse.BooleanOptionalAction, default=True, help="random weights")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dynamic", action="store_true", help="each --steps also with the trip count as an argument")
    ap.add_argument("--prompt-len", type=int, default=128)
    # the engine's sizes: quant_h100.py's engine table (max_num_seqs is EngineConfig's default)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-pages", type=int, default=4096)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    assert all(args.tokens % s == 0 for s in args.steps), "--tokens must be a multiple of every --steps"
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"XLA_FLAGS={flags!r}", flush=True)
    rows = []
    for label in args.configs:
        rows.append(measure(label, args))
        gc.collect()
    with open(os.path.join(args.out, f"multi_step{args.tag}.json"), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "xla_flags": flags,
                   "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
