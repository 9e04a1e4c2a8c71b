"""AsyncLLM: concurrent streams over one engine, each equal to the offline result; a stream abandoned midway
aborts its request and frees its pages; bad input raises before anything is queued."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.async_engine import AsyncLLM
from tests.test_model_parity import prompts


@pytest.fixture(scope="module")
def async_llm(tiny_model):
    path, _ = tiny_model("llama2")
    llm = AsyncLLM(str(path), dtype="float32", num_kv_pages=64, page_size=8, max_num_seqs=4,
                   max_num_batched_tokens=32)
    yield path, llm
    llm.shutdown()


def test_concurrent_streams_equal_offline(async_llm):
    path, llm = async_llm
    batch = [{"prompt_token_ids": p} for p in prompts(seed=21)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def consume(prompt):
        texts, last = [], None
        async for out in llm.generate(prompt, params):
            texts.append(out.outputs[0].text)
            last = out
        return texts, last

    async def main():
        return await asyncio.gather(*(consume(p) for p in batch))

    results = asyncio.run(main())
    offline = LLM(str(path), dtype="float32", num_kv_pages=64, page_size=8).generate(batch, params, use_tqdm=False)
    for (texts, last), ref in zip(results, offline):
        assert last.finished and last.outputs[0].token_ids == ref.outputs[0].token_ids
        assert texts[-1] == ref.outputs[0].text
        assert len(texts) >= 10  # one update per generated token at least
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # text only grows


def test_multi_step_streams_equal_offline(tiny_model):
    """With 4 decode steps per launch, streams arrive several tokens at a time, still equal to the offline result
    and only growing; a stream abandoned midway is aborted and its pages come back."""
    path, _ = tiny_model("llama2")
    llm = AsyncLLM(str(path), dtype="float32", num_kv_pages=64, page_size=8, max_num_seqs=4,
                   max_num_batched_tokens=32, num_scheduler_steps=4, warmup=False)
    batch = [{"prompt_token_ids": p} for p in prompts(seed=22)]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=4, max_tokens=11, ignore_eos=True)

    async def consume(prompt):
        updates = []
        async for out in llm.generate(prompt, params):
            updates.append((len(out.outputs[0].token_ids), out.outputs[0].text))
        return updates

    async def main():
        results = await asyncio.gather(*(consume(p) for p in batch))
        gen = llm.generate(batch[0], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 5:
                break
        await gen.aclose()
        return results

    try:
        results = asyncio.run(main())
        engine = llm.engine
        for _ in range(100):  # the engine thread finishes the launch already made for the abandoned stream
            if not engine.has_unfinished_requests() and engine.kv.num_free == engine.kv.num_pages:
                break
            time.sleep(0.05)
        assert not engine.has_unfinished_requests() and engine.kv.num_free == engine.kv.num_pages
        assert engine.runner.num_multi_step_launches > 0
    finally:
        llm.shutdown()
    offline = LLM(str(path), dtype="float32", num_kv_pages=64, page_size=8).generate(batch, params, use_tqdm=False)
    for updates, ref in zip(results, offline):
        assert updates[-1] == (11, ref.outputs[0].text)
        assert all(b[1].startswith(a[1]) for a, b in zip(updates, updates[1:]))  # text only grows
        assert max(b[0] - a[0] for a, b in zip(updates, updates[1:])) > 1  # several tokens per update


def test_abandoned_stream_is_aborted(async_llm):
    _, llm = async_llm
    engine = llm.engine

    async def main():
        gen = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=400,
                                                                            ignore_eos=True))
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await gen.aclose()
        with pytest.raises(ValueError, match="empty"):
            async for _ in llm.generate({"prompt_token_ids": []}):
                pass

    asyncio.run(main())
    for _ in range(100):  # the engine thread finishes the step already launched for it
        if not engine.has_unfinished_requests() and engine.kv.num_free == engine.kv.num_pages:
            break
        time.sleep(0.05)
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free == engine.kv.num_pages


def test_event_loop_never_waits_for_a_step(async_llm, monkeypatch):
    """While the engine thread is inside a step (held there on purpose), the event loop can still queue a new
    request and run other coroutines. The first AsyncLLM took the engine's lock from the event loop, which
    froze the loop (every client) until the step ended: here the loop itself must be the one to release the
    held step; a watchdog thread releases it after 10 s otherwise, and the test fails."""
    _, llm = async_llm
    step, entered, gate = llm.engine.step, threading.Event(), threading.Event()
    opened_by = []

    def held_step():
        entered.set()
        gate.wait()
        return step()

    def watchdog():
        if not gate.wait(10):
            opened_by.append("watchdog")
            gate.set()

    monkeypatch.setattr(llm.engine, "step", held_step)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        first = asyncio.create_task(_final(llm.generate({"prompt_token_ids": [5, 6, 7]}, params)))
        await asyncio.to_thread(entered.wait, 10)  # the engine thread is now held inside a step
        threading.Thread(target=watchdog, daemon=True).start()
        second = asyncio.create_task(_final(llm.generate({"prompt_token_ids": [8, 9]}, params)))
        await asyncio.sleep(0.05)  # the second request's first iteration has run on the loop by now
        opened_by.append("event loop")
        gate.set()
        return await asyncio.gather(first, second)

    finals = asyncio.run(main())
    assert opened_by[0] == "event loop", opened_by
    assert all(len(f.outputs[0].token_ids) == 4 for f in finals)


async def _final(gen):
    last = None
    async for out in gen:
        last = out
    return last


def test_engine_thread_survives_a_closed_caller_loop(async_llm):
    """A caller whose asyncio.run ends with its stream unfinished: the loop closes while the request may still
    have a step in flight. The engine thread must drop it and go on serving (it once died there)."""
    _, llm = async_llm
    long = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)

    async def abandon(i):
        gen = llm.generate({"prompt_token_ids": [9 + i, 8, 7]}, long)
        await gen.__anext__()  # then return: asyncio.run finalises the generator and closes the loop

    for i in range(4):
        asyncio.run(abandon(i))

    async def fresh():
        outs = [o async for o in llm.generate({"prompt_token_ids": [1, 2, 3]},
                                              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))]
        return outs[-1]

    assert asyncio.run(asyncio.wait_for(fresh(), 120)).finished
    assert llm._thread.is_alive()
