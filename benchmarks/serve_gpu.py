"""`jaxllm serve` on one GPU under load (issue 6): start the server on a config-only model (random weights),
time start-up to the first token, run `jaxllm bench serve` (ShareGPT-like requests, Poisson arrivals) at each
request rate, then restart with the compile cache now warm and time start-up again.

    PYTHONPATH=. python benchmarks/serve_gpu.py [--model benchmarks/models/llama-3.1-8b] [--rates 4 16 32]
    PYTHONPATH=. python benchmarks/serve_gpu.py --plot-from serve_gpu.json   # the PNG, where matplotlib is
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time

import httpx

from jaxllm import bench


def start(args: argparse.Namespace, log_path: str) -> tuple[subprocess.Popen, float]:
    """Launch the server; seconds from launch until a one-token completion has come back."""
    cmd = [sys.executable, "-m", "jaxllm.cli", "serve", args.model, "--load-format", "dummy", "--dtype", "bfloat16",
           "--port", str(args.port), "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens",
           str(args.max_num_batched_tokens), "--num-kv-pages", str(args.num_kv_pages), "--max-model-len", "2048"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{args.port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    r = httpx.post(f"{base}/v1/completions", json={"model": args.model, "prompt": [100, 200, 300], "max_tokens": 1},
                   timeout=60)
    r.raise_for_status()
    return proc, time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/llama-3.1-8b")
    ap.add_argument("--rates", type=float, nargs="+", default=[4, 16, 32])
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-kv-pages", type=int, default=16384)
    ap.add_argument("--vocab-size", type=int, default=128256)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--plot-from", default=None, metavar="SERVE_GPU.json", help="only draw a saved run's plot")
    args = ap.parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            plot(json.load(f), args.plot_from.removesuffix(".json") + ".png")
        return 0
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "rates": {}}
    proc, cold = start(args, os.path.join(args.out, "server_cold.log"))
    result["startup_cold_s"] = cold
    print(f"start-up to the first token, cold compile cache: {cold:.1f} s", flush=True)
    try:
        for rate in args.rates:
            ns = argparse.Namespace(base_url=f"http://127.0.0.1:{args.port}", model=None, api_key=None,
                                    vocab_size=args.vocab_size, num_prompts=args.num_prompts,
                                    dataset_name="sharegpt-like", input_len=0, output_len=0, seed=int(rate),
                                    request_rate=rate if rate > 0 else math.inf, max_concurrency=None,
                                    save_result=None)
            print(f"--- request rate {rate} req/s, {args.num_prompts} ShareGPT-like requests", flush=True)
            result["rates"][str(rate)] = asyncio.run(bench._serve_async(ns))
    finally:
        stop(proc)
    proc, warm = start(args, os.path.join(args.out, "server_warm.log"))
    stop(proc)
    result["startup_warm_s"] = warm
    print(f"start-up to the first token, warm compile cache: {warm:.1f} s", flush=True)
    with open(os.path.join(args.out, "serve_gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "serve_gpu.png"))
    return 0


def plot(result: dict, path: str) -> None:
    """Latency against the request rate (bench.plot_latency), where matplotlib is installed; elsewhere (the GPU
    machine) `python benchmarks/serve_gpu.py --plot-from serve_gpu.json` draws it afterwards."""
    runs = [{"request_rate": float(rate), **r} for rate, r in result["rates"].items()]
    try:
        bench.plot_latency(runs, path, f"jaxllm serve, 8B shape bf16, ShareGPT-like requests ({result['date']})")
        print(f"saved {path}")
    except ValueError as e:
        print(f"no plot: {e}")


if __name__ == "__main__":
    sys.exit(main())
