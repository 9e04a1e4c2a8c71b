"""Decode of the 8B shape on one GPU: is a step bound by the device or by the host launching it?

    PYTHONPATH=. python benchmarks/decode_profile.py [--configs bf16 int8 int4] [--batch 1] [--pointers]
        [--fresh-buffers] [--hlo] [--tokens 64] [--max-num-seqs N --kv-pages N --max-model-len N
        --max-num-batched-tokens N] [--out DIR]

Per weight configuration (random weights, quantized at load, the LM head as its label says): the wall time per
decode step of a 64-token greedy generate of `--batch` sequences (median of 3, less a 1-token generate), then
the same generate under jax.profiler: device busy time per step (the sum of kernel durations over the whole
generate, prefill included, per decode step), kernels per step and the longest kernels. Busy well below wall
is a device waiting for the host (quantized steps launch several hundred small kernels); where the host's
time goes is listed by event name (a `command_buffer::update` per step means XLA re-records the CUDA graph:
some buffer moved, which --pointers shows). Suffixes switch a path (VARIANTS): "-apart" runs q/k/v and gate/up
as separate kernel calls, "-triton" keeps int4 at 17-64 rows off the Hopper kernel, "-kn" keeps the quantized
kernels [in, out] (load_model picks the transposed nk layout on a Hopper GPU), "-rowapart" runs one row of q/k/v
as before xla.row_matmul_many, "-pieces" cuts one row of int8 o_proj into [1024, K] pieces
(quant_matmul.ROW_PIECES), "-downpieces" int8 down_proj too (off hopper_nk's kernel), "-unfused" runs as before
the small-kernel fusions (rope by concatenation, a one-token KV write as a scatter, one row's K splits summed by
a reduce). "one layer" lists a middle layer's kernels in launch order.
"""

from __future__ import annotations

import argparse
import collections
import gc
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

import jax

from benchmarks.attention_profile import trace_events
import jax.numpy as jnp

from jaxllm import LLM, SamplingParams, runner, weights
from jaxllm.models import layers
from pallas_kernels import quant_matmul
from pallas_kernels.paged_attention import gpu as attention_gpu
from pallas_kernels.quant_matmul import gpu, hopper_nk


def _rope_by_concat(x, cos, sin):  # layers.apply_rope before its reverse form
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _write_by_scatter(k_pages, v_pages, k, v, slot_mapping):  # gpu.write_kv before its one-token update slice
    kvh, num_pages, page_size, d = k_pages.shape

    def put(pages, x):
        return pages.reshape(kvh, num_pages * page_size, d).at[:, slot_mapping].set(
            x.astype(pages.dtype).transpose(1, 0, 2), mode="drop").reshape(pages.shape)

    return put(k_pages, k), put(v_pages, v)

CONFIGS = {"bf16": (None, False), "int8": ("int8", True), "int8-bf16-head": ("int8", False), "int4": ("int4", True)}
# suffix -> the switches it sets while the config loads and runs
VARIANTS = {
    "-apart": [(gpu, "supported_many", lambda *a: False),  # q/k/v, gate/up as separate kernel calls
               (quant_matmul.reference, "alike", lambda mats: False)],  # (the nk layout's too)
    "-triton": [(quant_matmul, "HOPPER_MIN_ROWS", 10 ** 9)],  # int4 at 17-64 rows in gpu.py's kernel too
    "-kn": [(weights, "_quant_layout", lambda *a: "kn")],  # the [in, out] layout on a Hopper GPU too
    "-rowapart": [(quant_matmul, "ROW_MANY", False),  # one row of q/k/v: a reduction or kernel call each
                  (quant_matmul, "ROW_MANY_INT4_KERNEL", False)],
    "-pieces": [(quant_matmul, "ROW_PIECES", 1024)],  # one row of int8 o_proj as four [1024, K] pieces
    "-downpieces": [(quant_matmul, "ROW_PIECES", 1024),  # and int8 down_proj too, off hopper_nk's kernel
                    (quant_matmul, "_row_kernel", lambda k, n, int4: k * n >= quant_matmul.ROW_KERNEL_INT4 if int4
                     else n > quant_matmul.ROW_MAX_N)],
    "-unfused": [(layers, "apply_rope", _rope_by_concat),
                 (attention_gpu, "write_kv", _write_by_scatter),
                 (hopper_nk, "sum_splits", lambda partial, m: partial.sum(axis=0).T[:m])],
}
CHOICES = [*CONFIGS, *(c + v for c in CONFIGS if c != "bf16" for v in VARIANTS), "bf16-unfused"]


def profile_config(label: str, args: argparse.Namespace, shown: str | None = None) -> dict:
    for suffix, switches in VARIANTS.items():
        if label.endswith(suffix):
            saved = [(mod, name, getattr(mod, name)) for mod, name, _ in switches]
            jax.clear_caches()  # module-level jitted functions (hopper_nk's) traced before the switch
            try:
                for mod, name, value in switches:
                    setattr(mod, name, value)
                return profile_config(label[:-len(suffix)], args, shown or label) | {"config": shown or label}
            finally:
                for mod, name, value in saved:
                    setattr(mod, name, value)
                jax.clear_caches()
    quant, head = CONFIGS[label]
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", quantization=quant, quantize_lm_head=head,
              max_num_seqs=args.max_num_seqs or args.batch, num_kv_pages=args.kv_pages or 256 * args.batch,
              max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False, num_scheduler_steps=args.scheduler_steps, warmup=False)
    vocab = llm.model.config.vocab_size
    prompt = [{"prompt_token_ids": [(i + 7 * b) % vocab for i in range(1000, 1128)]} for b in range(args.batch)]
    def run(n: int = args.tokens) -> float:
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    run()
    if args.hlo:
        dump_step_hlo(llm, run, os.path.join(args.out, f"hlo_{shown or label}.txt"))
    if args.pointers:  # do the step's buffers keep their addresses? (a moved one makes XLA re-record the graph)
        report_pointers(llm, run)
    prefill = statistics.median(run(1) for _ in range(3))  # and the first token: taken off the wall time
    wall = (statistics.median(run() for _ in range(3)) - prefill) / (args.tokens - 1)
    trace_dir = tempfile.mkdtemp(prefix=f"trace_{label}_")  # traces stay out of --out (tens of MB)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run()
    events, host = trace_events(trace_dir)
    per_kernel = collections.defaultdict(list)
    for e in events:
        per_kernel[e["name"]].append(e["dur"])
    top = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:args.top]
    row = {"config": label, "batch": args.batch, "wall_ms_per_step": wall * 1e3,
           "busy_ms_per_step": sum(e["dur"] for e in events) / 1e3 / args.tokens,
           "kernels_per_step": len(events) / args.tokens,
           "top": [(k[:80], len(v) / args.tokens, statistics.median(v)) for k, v in top]}
    print(f"{shown or label}: wall {row['wall_ms_per_step']:.2f} ms/step, "
          f"device busy {row['busy_ms_per_step']:.2f} ms/step, "
          f"{row['kernels_per_step']:.0f} kernels/step", flush=True)
    for k, n, d in row["top"]:
        print(f"    {n:6.1f}/step  median {d:8.1f} us  {k}", flush=True)
    row.update(idle_and_host(events, host, args.tokens))
    row["layer"] = one_layer(events)
    return row  # the engine goes with this frame; the caller collects it before the next config loads


def one_layer(events: list[dict]) -> list[tuple[str, float]]:
    """The kernels of one decoder layer in launch order (name, us): those from a middle step's 10th attention
    kernel up to its 11th, on the stream that ran the most kernels."""
    streams = collections.defaultdict(list)
    for e in events:
        streams[e["pid"], e["tid"]].append(e)
    if not streams:
        return []
    evs = sorted(max(streams.values(), key=len), key=lambda e: e["ts"])
    attn = [i for i, e in enumerate(evs) if "attention" in e["name"]]
    if len(attn) < 12:
        return []
    start = attn[len(attn) // 2 // 32 * 32 + 10] if len(attn) >= 64 else attn[10]
    end = next(i for i in attn if i > start)
    layer = [(e["name"][:70], e["dur"]) for e in evs[start:end]]
    print(f"    one layer: {len(layer)} kernels, {sum(d for _, d in layer):.1f} us:", flush=True)
    for name, dur in layer:
        print(f"        {dur:7.1f}  {name}", flush=True)
    return layer


def dump_step_hlo(llm: LLM, run, path: str) -> None:
    """The optimized HLO of the last decode step's forward, written gzipped to `path`.gz (fusion names as the
    trace shows them, with '.' for '_')."""
    step_runner = llm.llm_engine.runner
    orig, seen = step_runner._forward, []

    def spy(*args):  # noqa: ANN002
        seen.append(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") else a,
                                 args))
        return orig(*args)

    step_runner._forward = spy
    try:
        run(3)
    finally:
        step_runner._forward = orig
    with gzip.open(path + ".gz", "wt") as f:
        f.write(orig.trace(*seen[-1]).lower().compile().as_text())


def report_pointers(llm: LLM, run) -> None:
    """Device addresses of the step's buffers over a few decode steps (printed)."""
    step_runner = llm.llm_engine.runner
    orig, seen = step_runner._run_step, []

    def spy(key, inputs, mode, plp):  # noqa: ANN001
        out = orig(key, inputs, mode, plp)
        bufs = step_runner._last_out[1] if step_runner._last_out else (None, None)
        arrays = [*bufs, *step_runner._staged.values(), step_runner.prev_tokens,
                  jax.tree.leaves(step_runner.kv_caches)[0], out[0]]
        seen.append((key, *(a.unsafe_buffer_pointer() if a is not None else 0 for a in arrays)))
        return out

    step_runner._run_step = spy
    try:
        run(6)
    finally:
        step_runner._run_step = orig
    print("    pointers (bucket, logits, hidden, staged inputs..., prev_tokens, kv[0], step output):", flush=True)
    for row in seen:
        print("        " + " ".join(f"{v:x}" if isinstance(v, int) else str(v) for v in row), flush=True)


def idle_and_host(events: list[dict], host: list[dict], steps: int) -> dict:
    """Where the device idles: gaps between consecutive kernels of a stream (under 200 us: inside a step),
    summed per step and by the kernel that waited; and the host's events by name (count and time per step)."""
    streams = collections.defaultdict(list)
    for e in events:
        streams[e["pid"], e["tid"]].append(e)
    waited = collections.defaultdict(float)
    for evs in streams.values():
        evs.sort(key=lambda e: e["ts"])
        for a, b in zip(evs, evs[1:]):
            gap = b["ts"] - (a["ts"] + a["dur"])
            if 0 < gap < 200:
                waited[b["name"][:70]] += gap
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in host:
        by_name[e["name"][:70]][0] += 1
        by_name[e["name"][:70]][1] += e["dur"]
    out = {"gap_ms_per_step": sum(waited.values()) / 1e3 / steps,
           "gaps_before": [(k, v / steps) for k, v in sorted(waited.items(), key=lambda kv: -kv[1])[:8]],
           "host": [(k, n / steps, t / steps) for k, (n, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]]}
    print(f"    in-step gaps {out['gap_ms_per_step']:.2f} ms/step; the kernels that waited most (us/step):", flush=True)
    for k, v in out["gaps_before"]:
        print(f"        {v:8.1f}  {k}", flush=True)
    print("    host events (count/step, us/step):", flush=True)
    for k, n, t in out["host"]:
        print(f"        {n:8.1f} {t:9.1f}  {k}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/llama-3.1-8b")
    ap.add_argument("--configs", nargs="+", default=["bf16", "int8", "int4"], choices=CHOICES)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--top", type=int, default=8, help="kernels listed, by total time")
    # the engine's sizes (quant_h100.py's engine table: --max-num-seqs 64 --kv-pages 4096 --max-model-len 2048
    # --max-num-batched-tokens 2048)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: --batch")
    ap.add_argument("--kv-pages", type=int, default=None, help="default: 256 per sequence")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--scheduler-steps", type=int, default=1, help="decode steps per launch (the engine's default "
                    "is 8 for quantized weights on a GPU; 1 shows each step's kernels)")
    ap.add_argument("--hlo", action="store_true", help="write the decode step's optimized HLO to --out")
    ap.add_argument("--pointers", action="store_true", help="print the step buffers' device addresses")
    ap.add_argument("--fresh-buffers", action="store_true",
                    help="steps take fresh input and output buffers, as before runner.STABLE_ADDRESSES")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    runner.STABLE_ADDRESSES = not args.fresh_buffers
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows = []
    for label in args.configs:
        print(f"== {label}", flush=True)
        rows.append(profile_config(label, args))
        gc.collect()
        with open(os.path.join(args.out, "decode_profile.json"), "w") as f:  # each config's row kept as it ends
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
