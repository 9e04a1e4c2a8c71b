"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from jaxllm import LLM, SamplingParams
from jaxllm.async_engine import AsyncLLM
from serve.app import create_app

KEY = "sk-test"
MODEL = "tiny"
KNOBS = dict(dtype="float32", num_kv_pages=128, page_size=8, max_num_seqs=8, max_num_batched_tokens=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", srv, thread


def headless_chromium(width: int, height: int):
    """A selenium driver for Debian's chromium and chromium-driver, headless."""
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"), options=opts)


def stop(srv: uvicorn.Server, thread: threading.Thread) -> None:
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_model):
    path, _ = tiny_model("llama2")
    llm = AsyncLLM(str(path), **KNOBS)
    base, srv, thread = start(create_app(llm, MODEL, KEY))
    offline = LLM(str(path), **KNOBS)
    yield base, llm, offline
    stop(srv, thread)
    llm.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY)


def greedy_text(offline: LLM, prompt, max_tokens: int) -> str:
    return offline.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text


def test_completions_stream_equals_non_stream_equals_offline(server, client):
    _, _, offline = server
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.choices[0].text == greedy_text(offline, "The quick brown fox", 12)
    assert full.choices[0].finish_reason == "length" and full.id.startswith("cmpl-")
    assert full.usage.completion_tokens == 12 and full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    echo = client.completions.create(**kw, echo=True, logprobs=1)
    assert echo.choices[0].text == "The quick brown fox" + full.choices[0].text
    lp = echo.choices[0].logprobs
    assert len(lp.tokens) == full.usage.prompt_tokens + 12 and lp.token_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and "".join(lp.tokens) == echo.choices[0].text
    stopped = client.completions.create(**{**kw, "stop": [full.choices[0].text[3:5]]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full.choices[0].text[:full.choices[0].text.index(full.choices[0].text[3:5])]


def test_completions_batch_n_seed_logprobs(server, client):
    out = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=5, n=2, temperature=1.0,
                                    seed=3, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    again = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=5, n=2, temperature=1.0,
                                      seed=3, logprobs=2, extra_body={"ignore_eos": True})
    assert [c.text for c in out.choices] == [c.text for c in again.choices]
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)


def test_chat_stream_and_logprobs(server, client):
    _, _, offline = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    assert full.choices[0].message.content == expected and full.choices[0].message.role == "assistant"
    assert len(full.choices[0].logprobs.content) == 8
    assert all(len(t.top_logprobs) == 2 for t in full.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_errors_are_openai_json(server, client):
    base = server[0]
    with pytest.raises(openai.BadRequestError, match="temperature must be non-negative"):
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens"):
        client.completions.create(model=MODEL, prompt=[5] * 500, max_tokens=100)
    with pytest.raises(openai.BadRequestError, match="n=1000000 exceeds max_num_seqs=8"):  # not a hang
        client.completions.create(model=MODEL, prompt="hi", n=1_000_000)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong").models.list()
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(base + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400
    assert httpx.get(base + "/health").status_code == 200  # open without the key
    with pytest.raises(openai.BadRequestError, match="chat template could not be applied"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"chat_template": "{% for m in messages %}{{ m.content "})
    tokenizer = server[1].get_tokenizer()
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    finally:
        tokenizer.chat_template = template
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_64_concurrent_streams_complete_and_match(server):
    """64 streaming requests of mixed prompt and output lengths at once: every one completes exactly once with
    its greedy reference text; afterwards /metrics shows nothing running."""
    base, llm, offline = server
    prompts = [f"request {i} " + "word " * (i % 13) for i in range(64)]
    lengths = [4 + (i * 7) % 21 for i in range(64)]

    async def one(c: openai.AsyncOpenAI, prompt: str, n: int) -> tuple[str, int]:
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, tokens = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, tokens

    async def main() -> list[tuple[str, int]]:
        c = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(c, p, n) for p, n in zip(prompts, lengths)))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    tokens = sum(t for _, t in results)
    print(f"load: 64 concurrent streaming requests, {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.0f} "
          f"generated tok/s (CPU, tiny model, max_num_seqs={KNOBS['max_num_seqs']})")
    outs = offline.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths],
                            use_tqdm=False)
    assert [t for t, _ in results] == [o.outputs[0].text for o in outs]
    assert [n for _, n in results] == lengths
    text = httpx.get(base + "/metrics").text
    assert f'jaxllm:num_requests_running{{model_name="{MODEL}"}} 0.0' in text
    assert 'jaxllm:request_success_total{finished_reason="length",model_name="tiny"}' in text
    assert 'jaxllm:time_to_first_token_seconds_count{model_name="tiny"}' in text
    assert float(text.split('jaxllm:generation_tokens_total{model_name="tiny"} ')[1].split()[0]) >= tokens


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_pages(server, stream):
    """A client that goes away mid-stream (or while waiting for a whole reply) has its request aborted:
    /metrics shows nothing running and every KV page is free again."""
    base, llm, _ = server
    engine = llm.engine
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 500, "stream": stream, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    generated, aborted = engine.stats["generated_tokens"], engine.finished_reasons.get("abort", 0)
    step = engine.step

    def slow_step():  # ~5 ms a token, so the request outlives the server's noticing the disconnect
        time.sleep(0.005)
        return step()

    engine.step = slow_step
    try:
        if stream:
            with httpx.stream("POST", base + "/v1/completions", headers=headers, json=body, timeout=30) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i > 6:
                        break
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(base + "/v1/completions", headers=headers, json=body, timeout=0.1)
        for _ in range(100):
            if not engine.has_unfinished_requests() and engine.kv.num_free == engine.kv.num_pages:
                break
            time.sleep(0.05)
        assert f'jaxllm:num_requests_running{{model_name="{MODEL}"}} 0.0' in httpx.get(base + "/metrics").text
    finally:
        engine.step = step
    assert engine.stats["generated_tokens"] - generated < 500  # stopped early, not run to max_tokens
    assert engine.finished_reasons.get("abort", 0) == aborted + 1
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free == engine.kv.num_pages


def test_503_while_loading_then_429_when_the_queue_is_full(tiny_model):
    path, _ = tiny_model("llama2")
    release = threading.Event()

    def load() -> AsyncLLM:
        release.wait(60)
        return AsyncLLM(str(path), **KNOBS)

    base, srv, thread = start(create_app(load, MODEL, None, max_queued_requests=0))
    try:
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "the model is still loading"
        assert httpx.post(base + "/v1/completions", json={"prompt": "hi"}).status_code == 503
        release.set()
        for _ in range(600):
            if httpx.get(base + "/health").status_code == 200:
                break
            time.sleep(0.1)
        with pytest.raises(openai.RateLimitError, match="requests waiting already"):
            openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0).completions.create(
                model=MODEL, prompt="hi", max_tokens=2)
    finally:
        stop(srv, thread)


def test_jaxllm_serve_command_starts_answers_and_stops_on_sigterm(tiny_model):
    """The console command: serves after warm-up, answers a request, exits cleanly soon after SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    path, _ = tiny_model("llama2")
    port = free_port()
    exe = Path(sys.executable).with_name("jaxllm")
    proc = subprocess.Popen([str(exe), "serve", str(path), "--port", str(port), "--dtype", "float32",
                             "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--served-model-name", "t"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAXLLM_WARMUP": "1"})
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert c.completions.create(model="t", prompt="hi", max_tokens=3).usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
    log = proc.stdout.read()
    assert "compiled" in log and "Finished server process" in log, log[-2000:]


def test_chat_page_in_headless_chromium(server, tmp_path):
    """The page at / in a real headless Chromium: set the key and greedy sampling, send a message, and the
    streamed reply in the DOM is the engine's reply; a second turn keeps the conversation."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _, offline = server
    driver = headless_chromium(1100, 760)
    try:
        driver.get(base + "/")
        wait = WebDriverWait(driver, 60)

        def fill(element_id: str, value: str) -> None:
            el = driver.find_element(By.ID, element_id)
            el.clear()
            el.send_keys(value)

        fill("apikey", KEY)
        driver.find_element(By.ID, "temperature").click()  # blur the key field: the page fetches /v1/models
        wait.until(lambda d: d.find_element(By.ID, "model").text == MODEL)
        fill("temperature", "0")
        fill("max_tokens", "8")
        replies = []
        for turn, text in enumerate(["Hello there", "And again"]):
            fill("input", text)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".meta")) == turn + 1
                       and d.find_elements(By.CSS_SELECTOR, ".meta")[-1].text)
            replies.append(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text)
        driver.save_screenshot(str(tmp_path / "chat.png"))
        print(f"screenshot: {tmp_path / 'chat.png'}")
        params = SamplingParams(temperature=0, top_p=0.95, max_tokens=8)
        first = offline.chat([{"role": "user", "content": "Hello there"}], params, use_tqdm=False)[0].outputs[0].text
        second = offline.chat([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                               {"role": "user", "content": "And again"}], params, use_tqdm=False)[0].outputs[0].text
        # the DOM shows text as rendered: compare without the whitespace the browser may fold at the ends
        assert [r.strip() for r in replies] == [first.strip(), second.strip()]
        assert "tokens" in driver.find_elements(By.CSS_SELECTOR, ".meta")[-1].text
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
    finally:
        driver.quit()


def test_tokenize_detokenize_version(server, tiny_tokenizer):
    base = server[0]
    r = httpx.post(base + "/tokenize", json={"model": MODEL, "prompt": "The quick brown fox"}).json()
    assert r["tokens"] == tiny_tokenizer.encode("The quick brown fox") and r["count"] == len(r["tokens"])
    assert httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "The quick brown fox"
    chat = httpx.post(base + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                                                add_generation_prompt=True, return_dict=False)
    bad = httpx.post(base + "/detokenize", json={"tokens": [10 ** 6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.get(base + "/version").json()["version"]


def test_bench_serve_against_the_server(server, tmp_path):
    """`jaxllm bench serve` (its client and metrics) over loopback: every request completes with every token
    asked for; the latency figures are consistent with each other (smoke test, nothing timed is asserted)."""
    import argparse

    from jaxllm import bench
    from tests.tiny_models import VOCAB

    args = argparse.Namespace(base_url=server[0], model=None, api_key=KEY, vocab_size=VOCAB, num_prompts=10,
                              dataset_name="random", input_len=8, output_len=6, seed=0, request_rate=50.0,
                              max_concurrency=4, save_result=None)
    result = asyncio.run(bench._serve_async(args))
    assert (result["completed"], result["failed"]) == (10, 0), result["errors"]
    assert result["output_throughput"] * result["elapsed_s"] == pytest.approx(60)
    assert 0 < result["ttft_ms"]["median"] <= result["e2el_ms"]["median"] and result["tpot_ms"]["mean"] > 0
    # The command: two request rates in turn, their results saved and drawn against the rate.
    from jaxllm.cli import main

    out, png = tmp_path / "serve.json", tmp_path / "latency.png"
    assert main(["bench", "serve", "--base-url", server[0], "--api-key", KEY, "--vocab-size", str(VOCAB),
                 "--num-prompts", "4", "--dataset-name", "random", "--input-len", "8", "--output-len", "3",
                 "--request-rate", "40", "inf", "--save-result", str(out), "--plot", str(png)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [40, math.inf] and all(r["completed"] == 4 for r in runs)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    args.api_key = None
    with pytest.raises(ValueError, match="HTTP 401.*--api-key"):
        asyncio.run(bench._serve_async(args))
    args.base_url = "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="cannot reach a server"):
        asyncio.run(bench._serve_async(args))
