"""Load test of the OpenAI server: N concurrent streaming chat requests through the official client.

    PYTHONPATH=. python benchmarks/serve_load.py [--model M] [--requests 64] [--max-tokens 64] [--screenshot F]

Starts the server in this process (uvicorn on 127.0.0.1, the default SmolLM2 unless --model), waits for /health,
sends every request at once with mixed prompts, and prints: requests, concurrency, wall time, generated tokens,
tokens/s, median and p90 time to first token and end-to-end latency, and whether /metrics reads 0 running
afterwards. With --screenshot (needs chromium + chromedriver), also sends one message through the chat page at /
in headless Chromium and saves a screenshot.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
import openai

from jaxllm.async_engine import AsyncLLM
from serve.app import create_app
from tests.test_server import headless_chromium, start, stop

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
             "Explain what a KV cache is in one sentence.", "What is 12 times 12?", "Say hello in Spanish.",
             "Give me a synonym for happy.", "Why is the sky blue?"]


async def one(c: openai.AsyncOpenAI, model: str, i: int, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = await c.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"}])
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first or 0.0, time.perf_counter() - t0, tokens


def screenshot(base: str, path: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium(1100, 700)
    try:
        driver.get(base + "/")
        WebDriverWait(driver, 30).until(lambda d: "SmolLM" in d.find_element(By.ID, "model").text or
                                        d.find_element(By.ID, "model").text not in ("", "connecting..."))
        for text in ("What is the capital of France?", "And of Italy?"):
            n = len(driver.find_elements(By.CSS_SELECTOR, ".meta"))
            driver.find_element(By.ID, "input").send_keys(text)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".meta")) == n + 1
                                             and d.find_elements(By.CSS_SELECTOR, ".meta")[-1].text)
        driver.save_screenshot(path)
        return " | ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg, .meta"))
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--screenshot", default=None)
    args = ap.parse_args()
    name = args.model or "SmolLM2-135M-Instruct"
    t0 = time.perf_counter()
    llm = AsyncLLM(args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=2048)
    print(f"model loaded and compiled in {time.perf_counter() - t0:.1f} s")
    base, srv, thread = start(create_app(llm, name))
    try:
        async def run() -> list[tuple[float, float, int]]:
            c = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
            return await asyncio.gather(*(one(c, name, i, args.max_tokens) for i in range(args.requests)))

        asyncio.run(run())  # first use of each shape outside the timing
        t0 = time.perf_counter()
        results = asyncio.run(run())
        wall = time.perf_counter() - t0
        tokens = sum(r[2] for r in results)
        ttft = sorted(r[0] for r in results)
        e2e = sorted(r[1] for r in results)
        running = 'num_requests_running{model_name="%s"} 0.0' % name in httpx.get(base + "/metrics").text
        print(f"{args.requests} concurrent streaming chat requests (max_tokens {args.max_tokens}, greedy), "
              f"max_num_seqs {args.max_num_seqs}: {wall:.2f} s, {tokens} tokens, {tokens / wall:.1f} tok/s; "
              f"TTFT median {statistics.median(ttft):.2f} s p90 {ttft[int(0.9 * len(ttft))]:.2f} s; "
              f"latency median {statistics.median(e2e):.2f} s p90 {e2e[int(0.9 * len(e2e))]:.2f} s; "
              f"all {len(results)} completed; /metrics 0 running afterwards: {running}")
        if args.screenshot:
            print("page:", screenshot(base, args.screenshot))
    finally:
        stop(srv, thread)
        llm.shutdown()


if __name__ == "__main__":
    main()
