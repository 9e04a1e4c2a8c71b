"""`jaxllm bench latency | throughput | serve | perplexity`: vLLM's benchmark commands, with their flags and
definitions, and a quality measure.

    latency     one batch of `--batch-size` prompts, `--input-len` in / `--output-len` out, timed whole and as
                prefill only; per-token decode time, tokens/s, and the decode step's bytes (weights + KV) over
                the device bandwidth measured in the same run (the roofline).
    throughput  `--num-prompts` requests through LLM.generate at once (ignore_eos); requests/s, total and
                output tokens/s. Datasets: "random" (fixed lengths) and "sharegpt-like" (seeded lengths with
                ShareGPT's shape: ~200 prompt / ~180 output tokens, heavy tail, prompt <= 1024, total <= 2048).
    serve       streams completions from a running OpenAI-compatible server at `--base-url`, Poisson arrivals
                at `--request-rate` (inf: all at once) under `--max-concurrency`; TTFT, TPOT, ITL and end-to-end
                latency (mean, median, p99) as vLLM defines them, and throughput.
    perplexity  exp(mean negative log-likelihood per token) of a fixed English text (`--text`; default the
                ~3,000-word essay shipped as jaxllm/data/perplexity.txt) under the model, from the engine's prompt
                logprobs, in windows of `--context-len` tokens: to compare dtypes and `--quantization`.

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
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("random", "sharegpt-like")
DEFAULT_TEXT = Path(__file__).parent / "data" / "perplexity.txt"
DEFAULT_CONTEXT_LEN = 1024


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
              quantization=args.quantization, quantize_lm_head=args.quantize_lm_head,
              kv_cache_dtype=args.kv_cache_dtype, max_num_batched_tokens=args.max_num_batched_tokens,
              num_scheduler_steps=args.num_scheduler_steps, enable_prefix_caching=False, **knobs)
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


def time_decode(llm: Any, batch_size: int, input_len: int, output_len: int, num_iters: int = 5,
                num_iters_warmup: int = 1, bandwidth: float | None = None) -> dict:
    """One batch of `batch_size` random prompts, `input_len` in / `output_len` out (greedy, ignore_eos), timed
    whole and as prefill only (medians of `num_iters` after warm-up): per-token decode time, and with the
    device `bandwidth` (bytes/s) the decode step's floor (weights + KV bytes) and its share of the time."""
    from jaxllm import SamplingParams

    from jaxllm.kv_cache import bytes_per_page

    cfg = llm.model.config
    reqs = make_requests("random", batch_size, input_len, output_len, cfg.vocab_size)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]

    def run(max_tokens: int) -> float:
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    for _ in range(num_iters_warmup):
        run(output_len)
    whole = [run(output_len) for _ in range(num_iters)]
    prefill = [run(1) for _ in range(num_iters)]
    lat, pre = statistics.median(whole), statistics.median(prefill)
    per_token = (lat - pre) / max(output_len - 1, 1)
    weight_bytes = llm.model.num_bytes
    kv_per_token = bytes_per_page(cfg, 1, llm.model.dtype, llm.llm_engine.config.kv_cache_dtype)
    step_bytes = weight_bytes + batch_size * kv_per_token * (input_len + output_len / 2)
    result = {"batch_size": batch_size, "input_len": input_len, "output_len": output_len, "latency_s": lat,
              "latencies_s": whole, "latency_p90_s": float(np.percentile(whole, 90)), "prefill_s": pre,
              "decode_ms_per_token": per_token * 1e3,
              "output_tok_per_s": batch_size * output_len / lat, "decode_tok_per_s": batch_size / per_token,
              "weight_GB": weight_bytes / 1e9}
    if bandwidth:
        floor = step_bytes / bandwidth
        result.update(bandwidth_TBps=bandwidth / 1e12, decode_floor_ms=floor * 1e3, roofline_fraction=floor / per_token)
    return result


def latency(args: argparse.Namespace) -> dict:
    bw = device_bandwidth()  # before the KV pool takes the memory
    llm = _llm(args, max_num_seqs=max(args.batch_size, 1))
    r = time_decode(llm, args.batch_size, args.input_len, args.output_len, args.num_iters, args.num_iters_warmup, bw)
    print(f"batch {args.batch_size}, {args.input_len} in / {args.output_len} out: latency {r['latency_s']:.3f} s "
          f"(median of {args.num_iters}; p90 {r['latency_p90_s']:.3f} s), prefill {r['prefill_s'] * 1e3:.1f} ms; "
          f"decode {r['decode_ms_per_token']:.2f} ms/token = {r['decode_tok_per_s']:.1f} tok/s; floor "
          f"{r['decode_floor_ms']:.2f} ms ({r['weight_GB']:.2f} GB weights + KV at {bw / 1e12:.2f} TB/s) -> "
          f"{r['roofline_fraction']:.0%} of roofline")
    _save(args, r)
    return r


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


def _check_lengths(context_len: int, max_tokens: int | None) -> None:
    """The window and token-count lower bounds, checked before any model loads."""
    if context_len < 2:
        raise ValueError(f"--context-len must be at least 2 (one token of context, one to score), got {context_len}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2 (the first token has no context to score it), "
                         f"got {max_tokens}")


def score_text(llm: Any, text: str, context_len: int, max_tokens: int | None = None) -> dict:
    """Mean negative log-likelihood (nats/token) and perplexity of `text` under `llm`, from its prompt logprobs.

    The text is tokenized as the tokenizer does by default (BOS if it adds one; no chat template) and cut to
    `max_tokens`. Every token but the first is scored exactly once: the first window is tokens [0, context_len),
    then each window slides by stride = context_len // 2 and scores only its last `stride` (new) tokens, so a
    token past the first window sees between context_len - stride and context_len - 1 tokens of left context.
    All windows go to the engine as one batch."""
    from jaxllm import SamplingParams

    _check_lengths(context_len, max_tokens)
    limit = llm.max_model_len - 1  # a prompt leaves room for the one token the request generates
    if context_len > limit:
        raise ValueError(f"--context-len {context_len} does not fit this engine, whose prompts hold at most {limit} "
                         "tokens; lower --context-len or raise --max-model-len")
    ids = list(llm.get_tokenizer().encode(text))[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); perplexity needs at least 2: give a longer --text")
    stride = context_len // 2
    windows = [(0, min(context_len, len(ids)), 1)]  # (begin, end, first scored position): scores [first, end)
    while windows[-1][1] < len(ids):
        end = min(windows[-1][1] + stride, len(ids))
        windows.append((end - context_len, end, windows[-1][1]))
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": ids[b:e]} for b, e, _ in windows],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    elapsed = time.perf_counter() - t
    # prompt_logprobs[j]: {token id: Logprob} for window position j (None at j = 0); the prompt's own token first.
    nll = -sum(out.prompt_logprobs[p - b][ids[p]].logprob for (b, e, first), out in zip(windows, outs)
               for p in range(first, e))
    n = len(ids) - 1
    return {"num_tokens": n, "num_windows": len(windows), "context_len": context_len, "stride": stride,
            "nll": nll / n, "perplexity": math.exp(nll / n), "elapsed_s": elapsed, "tok_per_s": n / elapsed}


def perplexity(args: argparse.Namespace) -> dict:
    """`jaxllm bench perplexity`: score_text on `--text` (default: the shipped essay) with the model flags' engine."""
    path = Path(args.text) if args.text else DEFAULT_TEXT
    if not path.is_file():
        raise ValueError(f"--text {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--text {path} is empty; give a file with the text to score")
    _check_lengths(DEFAULT_CONTEXT_LEN if args.context_len is None else args.context_len, args.max_tokens)
    llm = _llm(args, max_num_seqs=args.max_num_seqs)
    context_len = min(DEFAULT_CONTEXT_LEN, llm.max_model_len - 1) if args.context_len is None else args.context_len
    result = {"text": str(path), **score_text(llm, text, context_len, args.max_tokens)}
    windows = result["num_windows"]
    print(f"{path.name}: {result['num_tokens']} tokens scored in {windows} window{'s' * (windows != 1)} of "
          f"{context_len} (stride {result['stride']}): NLL {result['nll']:.4f} nats/token, "
          f"perplexity {result['perplexity']:.3f} "
          f"in {result['elapsed_s']:.2f} s ({result['tok_per_s']:.0f} tok/s)")
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
    """One run of `--num-prompts` requests per `--request-rate`, in order; `--plot` draws latency against load."""
    runs = []
    for rate in args.request_rate:
        if len(args.request_rate) > 1:
            print(f"--- request rate {rate} req/s")
        runs.append({"request_rate": rate, **asyncio.run(_serve_async(argparse.Namespace(**{**vars(args),
                                                                                            "request_rate": rate})))})
    result = runs[0] if len(runs) == 1 else {"runs": runs}
    if args.plot:
        plot_latency(runs, args.plot)
        print(f"saved {args.plot}")
    _save(args, result, engine=False)
    return result


def plot_latency(runs: list[dict], path: str, title: str = "") -> None:
    """PNG of TTFT, TPOT and end-to-end latency (median and p99) against the offered request rate (all at once,
    inf, is drawn at 1.5x the largest finite rate)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or jaxllm[bench])") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["request_rate"] for r in runs if math.isfinite(r["request_rate"])]
    xs = [r["request_rate"] if math.isfinite(r["request_rate"]) else 1.5 * max(finite, default=1) for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, [("ttft_ms", "time to first token"), ("tpot_ms", "time per output token"),
                                       ("e2el_ms", "end-to-end latency")]):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ax.plot(xs, [r[key][stat] for r in runs], style, label=stat)
        ax.set(title=label, xlabel="request rate (req/s)", ylabel="ms")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_parser(sub: Any, add_model_args: Any) -> None:
    """`jaxllm bench {latency,throughput,serve}` with vLLM's flag names, and `jaxllm bench perplexity`."""
    b = sub.add_parser("bench", help="benchmark latency, offline throughput or a running server (vLLM's flags), "
                                     "or measure perplexity on a fixed text")
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
    srv.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                     help="requests/s, Poisson (default: inf, all at once); several values run in turn")
    srv.add_argument("--max-concurrency", type=int, default=None)
    srv.add_argument("--plot", default=None, metavar="FILE.png",
                     help="draw TTFT, TPOT and end-to-end latency against the request rate (needs matplotlib)")
    srv.set_defaults(func=serve)

    ppl = bsub.add_parser("perplexity", help="perplexity of a fixed English text (to compare dtypes, quantization)")
    add_model_args(ppl)
    ppl.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ppl.add_argument("--max-num-seqs", type=int, default=4, help="windows scored in one step")
    ppl.add_argument("--text", default=None, metavar="FILE",
                     help="UTF-8 text to score (default: jaxllm/data/perplexity.txt, ~3,000 words of English)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (default: all)")
    ppl.add_argument("--context-len", type=int, default=None,
                     help=f"window length in tokens; windows slide by half of it (default: {DEFAULT_CONTEXT_LEN}, "
                          "or the model's maximum if smaller)")
    ppl.add_argument("--save-result", default=None, metavar="FILE.json")
    ppl.set_defaults(func=perplexity)
