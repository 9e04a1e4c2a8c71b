"""`jaxllm bench latency | throughput | serve`: vLLM's benchmark commands, with their flags and definitions.

    latency     one batch of `--batch-size` prompts, `--input-len` in / `--output-len` out, timed whole and as
                prefill only; per-token decode time, tokens/s, and the decode step's bytes (weights + KV) over
                the device bandwidth measured in the same run (the roofline).
    throughput  `--num-prompts` requests through LLM.generate at once (ignore_eos); requests/s, total and
                output tokens/s. Datasets: "random" (fixed lengths) and "sharegpt-like" (seeded lengths with
                ShareGPT's shape: ~200 prompt / ~180 output tokens, heavy tail, prompt <= 1024, total <= 2048).
    serve       streams completions from a running OpenAI-compatible server at `--base-url`, Poisson arrivals
                at `--request-rate` (inf: all at once) under `--max-concurrency`; TTFT, TPOT, ITL and end-to-end
                latency (mean, median, p99) as vLLM defines them, and throughput.

`--load-format dummy` times a model from its config.json alone (random weights made on the device).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import time
from typing import Any

import numpy as np

DATASETS = ("random", "sharegpt-like")


def make_requests(name: str, num: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0
                  ) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request; token ids drawn uniformly from [16, vocab_size - 16)."""
    rng = np.random.default_rng(seed)
    if name == "random":
        lens = [(input_len, output_len)] * num
    elif name == "sharegpt-like":
        # Log-normal lengths fitted to ShareGPT's conversations as vLLM's benchmark filters them.
        prompt = np.clip(rng.lognormal(np.log(120), 1.0, num), 4, 1024).astype(int)
        out = np.clip(rng.lognormal(np.log(110), 1.0, num), 4, None).astype(int)
        lens = [(int(p), int(min(o, 2048 - p))) for p, o in zip(prompt, out)]
    else:
        raise ValueError(f"--dataset-name must be one of {', '.join(DATASETS)}, got {name!r}")
    return [(rng.integers(16, vocab_size - 16, p).tolist(), o) for p, o in lens]


def device_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB elementwise op on the default device: median over 5 samples
    of 10 back-to-back calls (so launch and sync costs are not counted as memory time)."""
    import jax
    import jax.numpy as jnp

    n = (1 << 30) if jax.devices()[0].platform != "cpu" else (1 << 24)
    x = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1, donate_argnums=0)  # in place: one 2 GiB buffer, read and written
    x = f(x).block_until_ready()
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            x = f(x)
        x.block_until_ready()
        samples.append((time.perf_counter() - t) / 10)
    nbytes = x.nbytes
    del x
    return 2 * nbytes / statistics.median(samples)


def _llm(args: argparse.Namespace, **knobs: Any) -> Any:
    from jaxllm import LLM

    t0 = time.perf_counter()
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, load_format=args.load_format,
              max_model_len=args.max_model_len, num_kv_pages=args.num_kv_pages,
              tensor_parallel_size=args.tensor_parallel_size, attention_backend=args.attention_backend,
              quantization=args.quantization,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False, **knobs)
    runner = llm.llm_engine.runner
    print(f"start-up (load + compile {len(runner.all_buckets())} step shapes): {time.perf_counter() - t0:.1f} s")
    return llm


def _save(args: argparse.Namespace, result: dict, engine: bool = True) -> None:
    """Stamp the result (and the local device, for the commands that run the engine here); write --save-result."""
    result.update(date=time.strftime("%Y-%m-%d %H:%M"), args={k: v for k, v in vars(args).items() if k != "func"})
    if engine:
        import jax

        result.update(device=jax.devices()[0].device_kind, jax=jax.__version__)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(result, f, indent=1)
        print(f"saved {args.save_result}")


def latency(args: argparse.Namespace) -> dict:
    from jaxllm import SamplingParams

    bw = device_bandwidth()  # before the KV pool takes the memory
    llm = _llm(args, max_num_seqs=max(args.batch_size, 1))
    cfg, dtype_bytes = llm.model.config, np.dtype(llm.model.dtype).itemsize
    reqs = make_requests("random", args.batch_size, args.input_len, args.output_len, cfg.vocab_size)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]

    def run(max_tokens: int) -> float:
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    for _ in range(args.num_iters_warmup):
        run(args.output_len)
    whole = [run(args.output_len) for _ in range(args.num_iters)]
    prefill = [run(1) for _ in range(args.num_iters)]
    lat, pre = statistics.median(whole), statistics.median(prefill)
    per_token = (lat - pre) / max(args.output_len - 1, 1)
    weight_bytes = llm.model.num_bytes
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    step_bytes = weight_bytes + args.batch_size * kv_per_token * (args.input_len + args.output_len / 2)
    floor = step_bytes / bw
    result = {"latency_s": lat, "latencies_s": whole, "prefill_s": pre, "decode_ms_per_token": per_token * 1e3,
              "output_tok_per_s": args.batch_size * args.output_len / lat,
              "decode_tok_per_s": args.batch_size / per_token, "bandwidth_TBps": bw / 1e12,
              "weight_GB": weight_bytes / 1e9, "decode_floor_ms": floor * 1e3, "roofline_fraction": floor / per_token}
    print(f"batch {args.batch_size}, {args.input_len} in / {args.output_len} out: latency {lat:.3f} s (median of "
          f"{args.num_iters}; p90 {np.percentile(whole, 90):.3f} s), prefill {pre * 1e3:.1f} ms; decode "
          f"{per_token * 1e3:.2f} ms/token = {args.batch_size / per_token:.1f} tok/s; floor {floor * 1e3:.2f} ms "
          f"({weight_bytes / 1e9:.2f} GB weights + KV at {bw / 1e12:.2f} TB/s) -> {floor / per_token:.0%} of roofline")
    _save(args, result)
    return result


def throughput(args: argparse.Namespace) -> dict:
    from jaxllm import SamplingParams

    llm = _llm(args, max_num_seqs=args.max_num_seqs)
    reqs = make_requests(args.dataset_name, args.num_prompts, args.input_len, args.output_len,
                         llm.model.config.vocab_size, args.seed)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    llm.generate(prompts[:min(8, len(prompts))], params[:8], use_tqdm=False)  # first-use costs outside the timing
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    n_in = sum(len(p) for p, _ in reqs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"elapsed_s": elapsed, "num_requests": len(reqs), "prompt_tokens": n_in, "output_tokens": n_out,
              "requests_per_s": len(reqs) / elapsed, "total_tok_per_s": (n_in + n_out) / elapsed,
              "output_tok_per_s": n_out / elapsed}
    print(f"{args.dataset_name}: {len(reqs)} requests, {n_in} prompt + {n_out} output tokens in {elapsed:.2f} s: "
          f"{len(reqs) / elapsed:.2f} requests/s, {(n_in + n_out) / elapsed:.0f} total tok/s, "
          f"{n_out / elapsed:.0f} output tok/s")
    _save(args, result)
    return result


async def _one_request(client: Any, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """Stream one completion; times of its first token and of every later chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunks, tokens, error = [], 0, None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
        else:
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if data.get("choices"):  # as vLLM counts: a chunk with a choice, even one whose text is held back
                    chunks.append(time.perf_counter())
    end = time.perf_counter()
    return {"start": start, "chunks": chunks, "end": end, "output_tokens": tokens, "error": error}


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"mean": math.nan, "median": math.nan, "p99": math.nan}
    return {"mean": float(np.mean(xs)), "median": float(np.median(xs)), "p99": float(np.percentile(xs, 99))}


async def _serve_async(args: argparse.Namespace) -> dict:
    import httpx

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), headers=headers) as client:
        try:
            resp = await client.get(f"{base}/v1/models")
        except httpx.HTTPError as e:
            raise ValueError(f"cannot reach a server at {base} ({e!r}); start one with `jaxllm serve`") from e
        if resp.status_code != 200:
            hint = "; pass --api-key or set OPENAI_API_KEY" if resp.status_code == 401 else ""
            raise ValueError(f"{base}/v1/models answered HTTP {resp.status_code}: {resp.text[:200]}{hint}")
        models = resp.json()["data"]
        model = args.model or models[0]["id"]
        reqs = make_requests(args.dataset_name, args.num_prompts, args.input_len, args.output_len, args.vocab_size,
                             args.seed)
        rng = np.random.default_rng(args.seed)
        sem = asyncio.Semaphore(args.max_concurrency or len(reqs))

        async def limited(prompt, n):
            async with sem:
                return await _one_request(client, f"{base}/v1/completions", model, prompt, n)

        tasks, t0 = [], time.perf_counter()
        for prompt, n in reqs:
            tasks.append(asyncio.create_task(limited(prompt, n)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None and r["chunks"]]
    ttft = [(r["chunks"][0] - r["start"]) * 1e3 for r in ok]
    e2el = [(r["end"] - r["start"]) * 1e3 for r in ok]
    tpot = [(r["end"] - r["chunks"][0]) * 1e3 / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    n_out = sum(r["output_tokens"] for r in ok)
    result = {"completed": len(ok), "failed": len(results) - len(ok), "elapsed_s": elapsed,
              "request_throughput": len(ok) / elapsed, "output_throughput": n_out / elapsed,
              "ttft_ms": _stats(ttft), "tpot_ms": _stats(tpot), "itl_ms": _stats(itl), "e2el_ms": _stats(e2el),
              "errors": sorted({r["error"] for r in results if r["error"]})[:5]}
    print(f"{len(ok)} of {len(results)} requests in {elapsed:.2f} s: {len(ok) / elapsed:.2f} req/s, "
          f"{n_out / elapsed:.0f} output tok/s")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = result[name]
        print(f"  {name[:-3].upper():5s} mean {s['mean']:8.1f} ms  median {s['median']:8.1f} ms  "
              f"p99 {s['p99']:8.1f} ms")
    return result


def serve(args: argparse.Namespace) -> dict:
    result = asyncio.run(_serve_async(args))
    _save(args, result, engine=False)
    return result


def add_parser(sub: Any, add_model_args: Any) -> None:
    """`jaxllm bench {latency,throughput,serve}` with vLLM's flag names."""
    b = sub.add_parser("bench", help="benchmark latency, offline throughput or a running server (vLLM's flags)")
    bsub = b.add_subparsers(dest="bench_command", required=True)

    def common(p: argparse.ArgumentParser, engine: bool) -> None:
        p.add_argument("--input-len", type=int, default=128)
        p.add_argument("--output-len", type=int, default=128)
        p.add_argument("--save-result", default=None, metavar="FILE.json")
        p.add_argument("--seed", type=int, default=0)
        if engine:
            add_model_args(p)
            p.add_argument("--max-num-batched-tokens", type=int, default=2048)

    lat = bsub.add_parser("latency", help="one batch, whole and prefill-only; decode ms/token and roofline")
    common(lat, engine=True)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--num-iters-warmup", type=int, default=1)
    lat.add_argument("--num-iters", type=int, default=5)
    lat.set_defaults(func=latency)

    thr = bsub.add_parser("throughput", help="N requests offline through LLM.generate")
    common(thr, engine=True)
    thr.add_argument("--num-prompts", type=int, default=1000)
    thr.add_argument("--dataset-name", default="random", choices=DATASETS)
    thr.add_argument("--max-num-seqs", type=int, default=256)
    thr.set_defaults(func=throughput)

    srv = bsub.add_parser("serve", help="stream requests to a running OpenAI-compatible server")
    common(srv, engine=False)
    srv.add_argument("--base-url", default="http://127.0.0.1:8000")
    srv.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    srv.add_argument("--vocab-size", type=int, default=32000, help="random prompt token ids are below this")
    srv.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    srv.add_argument("--num-prompts", type=int, default=200)
    srv.add_argument("--dataset-name", default="sharegpt-like", choices=DATASETS)
    srv.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default: inf)")
    srv.add_argument("--max-concurrency", type=int, default=None)
    srv.set_defaults(func=serve)
