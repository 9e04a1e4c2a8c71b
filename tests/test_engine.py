"""The engine end to end on a tiny random Llama: continuous batching, preemption, prefix caching, sampling,
stopping, logprobs, n > 1, warm-up without recompilation, and input validation.

References: transformers (torch, float32) on the same weights, and the same engine run one request at a time.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil

import jax
import numpy as np
import pytest

from jaxllm import LLM, LLMEngine, SamplingParams
from tests.test_model_parity import prompts
from tests.test_sampler import chi_square_pvalue, log_softmax, truncated_softmax
from tests.tiny_models import VOCAB, hf_greedy, hf_logits

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PAGE = 8


@pytest.fixture(scope="module")
def llama(tiny_model):
    path, hf = tiny_model("llama2")
    return path, hf, LLM(str(path), dtype="float32", num_kv_pages=96, page_size=PAGE, max_num_seqs=16,
                         max_num_batched_tokens=64)


def ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def mixed_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.choice([1, 2, 7, 8, 9, 16, 23, 40, 61]))] for _ in range(n)]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_continuous_batching_equals_alone_and_transformers(llama, async_scheduling):
    """32 requests of 1..61 tokens at once (chunked prefills under a 64-token budget mixed with decodes, 16
    sequences at a time) give each request's output alone, which is transformers' greedy continuation."""
    _, hf, llm = llama
    llm.llm_engine.config.async_scheduling = async_scheduling
    batch = mixed_prompts(32, seed=1)
    together = ids(llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY))
    assert together == [hf_greedy(hf, p, 12) for p in batch]
    alone = [ids(llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False))[0] for p in batch[:6]]
    assert alone == together[:6]
    llm.llm_engine.config.async_scheduling = True  # the default


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_recomputes_and_loses_nothing(llama, async_scheduling):
    """A pool of 12 pages cannot hold 8 growing sequences: the newest are preempted and recomputed."""
    path, _, big = llama
    batch = [{"prompt_token_ids": p} for p in mixed_prompts(8, seed=2)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = ids(big.generate(batch, params))
    small = LLM(str(path), dtype="float32", num_kv_pages=12, page_size=PAGE, max_model_len=96, max_num_seqs=8,
                max_num_batched_tokens=64, enable_prefix_caching=False, async_scheduling=async_scheduling)
    assert ids(small.generate(batch, params)) == expected
    preemptions = small.llm_engine.scheduler.num_preemptions
    print(f"preemptions: {preemptions}")
    assert preemptions > 0
    assert small.llm_engine.kv.num_free == 12  # every page came back


def test_multi_step_decode_equals_one_step(llama, tiny_tokenizer):
    """num_scheduler_steps=4 (four decode steps per launch, stop conditions checked after the fact) gives what one
    step per launch gives: greedy, seeded top-p, penalties (counted on the device between steps), logprobs, n=2,
    stop tokens and strings inside a launch, max_tokens not a multiple of 4, min_tokens (one step at a time until
    it is reached); with async scheduling, and without it in a pool so small that sequences are preempted."""
    path, _, one = llama
    batch = [{"prompt_token_ids": p} for p in mixed_prompts(8, seed=12)]
    free = ids(one.generate(batch[:2], SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)))
    stop_str = tiny_tokenizer.decode(free[1][6:8])
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=11, seed=5, ignore_eos=True),
              SamplingParams(temperature=1.0, frequency_penalty=0.5, repetition_penalty=1.3, max_tokens=10, seed=6,
                             logprobs=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[free[0][5]]),
              SamplingParams(temperature=0, max_tokens=14, stop=[stop_str], ignore_eos=True),
              SamplingParams(n=2, temperature=1.0, max_tokens=9, seed=7, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, min_tokens=6, stop_token_ids=[free[0][1]]),
              GREEDY, SamplingParams(temperature=0.7, max_tokens=1, seed=8)]
    batch = [batch[0], batch[1]] + batch[2:4] + [batch[0], batch[1]] + batch[4:]
    expected = one.generate(batch, params, use_tqdm=False)
    for pool in (96, 14):
        multi = LLM(str(path), dtype="float32", num_kv_pages=pool, page_size=PAGE, max_model_len=96, max_num_seqs=16,
                    max_num_batched_tokens=64, num_scheduler_steps=4, async_scheduling=pool > 20,
                    enable_prefix_caching=pool > 20, warmup=False)
        got = multi.generate(batch, params, use_tqdm=False)
        for e, g in zip(expected, got):
            for ce, cg in zip(e.outputs, g.outputs, strict=True):
                assert (cg.token_ids, cg.text, cg.finish_reason, cg.stop_reason) == (
                    ce.token_ids, ce.text, ce.finish_reason, ce.stop_reason)
                if ce.logprobs is not None:
                    assert [{t: round(v.logprob, 4) for t, v in d.items()} for d in cg.logprobs] == [
                        {t: round(v.logprob, 4) for t, v in d.items()} for d in ce.logprobs]
        engine = multi.llm_engine
        assert engine.runner.num_multi_step_launches > 0
        assert engine.kv.num_free == pool and not engine.requests
        if pool == 14:
            assert engine.scheduler.num_preemptions > 0
    assert {o.outputs[0].finish_reason for o in expected[4:6]} == {"stop"}


def test_prefix_caching_prefills_only_the_rest(llama):
    path, _, _ = llama
    llm = LLM(str(path), dtype="float32", num_kv_pages=64, page_size=PAGE)
    engine = llm.llm_engine
    prefix = mixed_prompts(1, seed=3)[0][:1] + list(range(10, 50))  # 41 tokens: 5 full pages
    first, second = prefix + [60, 61, 62], prefix + [70, 71]
    out1 = llm.generate({"prompt_token_ids": first}, GREEDY, use_tqdm=False)
    before = dict(engine.stats), engine.kv.num_cache_hits
    out2 = llm.generate({"prompt_token_ids": second}, GREEDY, use_tqdm=False)
    assert engine.kv.num_cache_hits - before[1] == 40  # 5 pages of 8
    assert engine.stats["prompt_tokens"] - before[0]["prompt_tokens"] == len(second) - 40
    no_cache = LLM(str(path), dtype="float32", num_kv_pages=64, page_size=PAGE, enable_prefix_caching=False)
    assert ids(out1 + out2) == ids(no_cache.generate([{"prompt_token_ids": p} for p in (first, second)], GREEDY))
    assert no_cache.llm_engine.kv.num_cache_hits == 0


@pytest.mark.parametrize("kw", [dict(temperature=0.8, top_k=20), dict(temperature=1.3, top_p=0.8, min_p=0.02)])
def test_first_token_distribution_matches_transformers(llama, kw):
    """4000 seeded draws of the first token follow the truncated softmax of transformers' logits
    (chi-square over the support, p > 1e-4: a correct sampler fails 1 run in 10^4)."""
    _, hf, llm = llama
    prompt = prompts(seed=4)[1]
    outs = llm.generate([{"prompt_token_ids": prompt}] * 4000,
                        [SamplingParams(max_tokens=1, seed=i, **kw) for i in range(4000)], use_tqdm=False)
    counts = np.bincount([o.outputs[0].token_ids[0] for o in outs], minlength=VOCAB)
    probs = truncated_softmax(hf_logits(hf, prompt)[-1].numpy().astype(np.float64), kw["temperature"],
                              kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("min_p", 0.0))
    assert counts[probs == 0].sum() == 0
    assert chi_square_pvalue(counts, probs) > 1e-4


def test_seeds_reproduce_alone_or_in_a_batch(llama):
    _, _, llm = llama
    p = {"prompt_token_ids": prompts(seed=5)[2]}
    seeded = SamplingParams(temperature=1.0, max_tokens=10, seed=1234, ignore_eos=True)
    alone = ids(llm.generate(p, seeded, use_tqdm=False))[0]
    others = [SamplingParams(temperature=0.9, max_tokens=8, seed=i, ignore_eos=True) for i in range(5)]
    batch = [{"prompt_token_ids": q} for q in mixed_prompts(5, seed=6)]
    mixed = ids(llm.generate(batch[:3] + [p] + batch[3:], others[:3] + [seeded] + others[3:], use_tqdm=False))
    assert mixed[3] == alone
    other_seed = ids(llm.generate(p, SamplingParams(temperature=1.0, max_tokens=10, seed=99, ignore_eos=True)))[0]
    assert other_seed != alone


def test_repetition_penalty_matches_transformers(llama):
    """Greedy with repetition_penalty (counted over prompt and output) equals transformers' generate."""
    import torch

    _, hf, llm = llama
    prompt = prompts(seed=7)[1]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                                    repetition_penalty=1.8))[0].outputs[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=1.8,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert out.token_ids == ref
    assert out.token_ids != hf_greedy(hf, prompt, 16)  # the penalty changed something


def test_logprobs_and_prompt_logprobs_equal_log_softmax(llama):
    _, hf, llm = llama
    prompt = prompts(seed=8)[1]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                                    logprobs=5, prompt_logprobs=3))[0]
    ref = log_softmax(hf_logits(hf, prompt + out.outputs[0].token_ids).numpy().astype(np.float64))
    c = out.outputs[0]
    assert len(c.logprobs) == 4
    for i, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert entry[tok].logprob == pytest.approx(row[tok], abs=1e-4) and entry[tok].rank == 1
        top = np.argsort(-row)[:5]
        assert set(top.tolist()) <= set(entry) and len(entry) == 5
        for t in top:
            assert entry[int(t)].logprob == pytest.approx(row[t], abs=1e-4)
    assert c.cumulative_logprob == pytest.approx(sum(ref[len(prompt) - 1 + i][t] for i, t in enumerate(c.token_ids)),
                                                 abs=1e-3)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry, row = out.prompt_logprobs[pos], ref[pos - 1]
        assert entry[prompt[pos]].logprob == pytest.approx(row[prompt[pos]], abs=1e-4)
        assert entry[prompt[pos]].rank == 1 + int((row > row[prompt[pos]]).sum())
        assert {int(t) for t in np.argsort(-row)[:3]} <= set(entry)


def test_stop_strings_tokens_and_finish_reasons(llama, tiny_tokenizer):
    _, _, llm = llama
    p = {"prompt_token_ids": prompts(seed=9)[1]}
    free = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert free.finish_reason == "length" and free.stop_reason is None
    # a stop string made of the end of token 3's text and the start of token 4's: it spans a token boundary
    t3, t4 = (tiny_tokenizer.decode([t]) for t in free.token_ids[3:5])
    head = tiny_tokenizer.decode(free.token_ids[:3])
    stop = t3[-1:] + t4[:1]
    if stop in head + t3[:-1]:
        pytest.skip("the chosen stop string occurs earlier in this random output")
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0].outputs[0]
    cut = free.text.index(stop)
    assert (out.text, out.finish_reason, out.stop_reason) == (free.text[:cut], "stop", stop)
    assert out.token_ids == free.token_ids[:5]
    kept = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop,
                                          include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == free.text[:cut + len(stop)]
    # stop_token_ids, and min_tokens holding them off
    tok = free.token_ids[2]
    first = free.token_ids.index(tok)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[tok]))[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (free.token_ids[:first + 1], "stop", tok)
    late = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[tok],
                                          min_tokens=first + 2))[0].outputs[0]
    assert len(late.token_ids) >= first + 2 and tok not in late.token_ids[:first + 1]
    assert late.token_ids[:first] == free.token_ids[:first]


def test_n_completions_share_the_prompt(llama):
    _, _, llm = llama
    engine = llm.llm_engine
    prompt = mixed_prompts(1, seed=10)[0] + list(range(3, 43))
    hits = engine.kv.num_cache_hits
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8,
                                                                    ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different samples
    assert engine.kv.num_cache_hits - hits >= 3 * (len(prompt) - 1) // PAGE * PAGE  # siblings reused the prompt
    again = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8,
                                                                      ignore_eos=True))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_engine_step_api_and_abort(llama):
    """Outputs come one step late with async scheduling; an abort frees everything once the launched step ends."""
    _, _, llm = llama
    engine: LLMEngine = llm.llm_engine
    assert engine.config.async_scheduling  # the default
    a = engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=50,
                                                                                ignore_eos=True))
    b = engine.add_request("b", {"prompt_token_ids": [8, 9]}, SamplingParams(temperature=0, max_tokens=3,
                                                                            ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", "x", GREEDY)
    seen, finished = [], {}
    for _ in range(5):
        for out in engine.step():
            seen.append(out.request_id)
            if out.finished:
                finished[out.request_id] = out
    assert set(seen) == {a, b} and finished[b].outputs[0].finish_reason == "length"
    engine.abort_request(a)
    while engine.has_unfinished_requests():  # the step already launched for it finishes
        assert engine.step() == []
    assert engine.kv.num_free == engine.kv.num_pages


@pytest.mark.parametrize("background", [False, True])
def test_warmup_compiles_every_shape_once(tiny_model, monkeypatch, background):
    """Warm-up compiles each model executable once (ahead of time: its run finds it compiled); the multi-step
    forms before it returns or (JAXLLM_MULTI_STEP_BACKGROUND=1) on a background thread, their decode shape
    running single steps until they are ready. After it, a varied workload (lengths, batch sizes, sampling,
    penalties, logprobs, n; one and two decode steps per launch) compiles nothing."""
    monkeypatch.setenv("JAXLLM_MULTI_STEP_BACKGROUND", str(int(background)))
    path, _ = tiny_model("llama2")
    records = io.StringIO()
    handler = logging.StreamHandler(records)
    logging.getLogger("jax").addHandler(handler)
    jax.config.update("jax_log_compiles", True)  # (a config context would not reach the compiling threads)
    try:
        llm = LLM(str(path), dtype="float32", num_kv_pages=64, page_size=PAGE, max_num_seqs=2,
                  max_num_batched_tokens=16, num_scheduler_steps=2, warmup=True)
        runner = llm.llm_engine.runner
        runner.wait_for_multi_step()
    finally:
        jax.config.update("jax_log_compiles", False)
        logging.getLogger("jax").removeHandler(handler)
    compiled = records.getvalue()
    assert compiled.count("Compiling jit(_forward_fn)") == len(runner.all_buckets())
    assert compiled.count("Compiling jit(_decode_steps_fn)") == 3 * len(runner.decode_buckets)
    warm = runner.num_compilations
    assert warm >= len(runner.all_buckets()) + 3 * len(runner.decode_buckets) * (not background)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_a, **_k: compiles.append(event) if "backend_compile" in event else None)
    if background:  # a decode shape whose forms are still compiling runs single steps
        runner._multi_step_pending.add(1)
        llm.generate({"prompt_token_ids": [5, 6]}, GREEDY, use_tqdm=False)
        assert runner.num_multi_step_launches == 0 and not runner.multi_step_ready(1)
        runner._multi_step_pending.clear()
    batch = [{"prompt_token_ids": p} for p in mixed_prompts(8, seed=11)]
    kinds = [GREEDY, SamplingParams(temperature=0.7, top_p=0.9, max_tokens=9, seed=1),
             SamplingParams(temperature=0, max_tokens=5, repetition_penalty=1.2, logit_bias={5: 2.0}, min_tokens=2),
             SamplingParams(temperature=1.0, n=2, max_tokens=4, logprobs=2, prompt_logprobs=1, seed=2)]
    llm.generate(batch, [kinds[i % 4] for i in range(8)], use_tqdm=False)
    llm.generate(batch[:1], GREEDY, use_tqdm=False)
    assert runner.num_multi_step_launches > 0 and compiles == []  # (the background's forms too: none compiled)
    if not background:  # every shape ran in warm-up (the background's forms are compiled, never run, there)
        assert runner.num_compilations == warm


def test_eos_from_generation_config(tiny_model, tmp_path):
    """EOS ids come from generation_config.json; generation stops there unless ignore_eos."""
    src, _ = tiny_model("llama2")
    path = shutil.copytree(src, tmp_path / "m")
    llm = LLM(str(path), dtype="float32", num_kv_pages=32, page_size=PAGE)
    p = {"prompt_token_ids": prompts(seed=10)[0]}
    free_run = ids(llm.generate(p, GREEDY))[0]
    eos = free_run[2]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, eos]}))
    llm = LLM(str(path), dtype="float32", num_kv_pages=32, page_size=PAGE)
    assert llm.model.config.eos_token_ids == (2, eos)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert out.token_ids == free_run[:free_run.index(eos) + 1] and out.finish_reason == "stop"
    assert out.stop_reason is None
    assert ids(llm.generate(p, GREEDY))[0] == free_run


def test_max_tokens_none_fills_the_context(tiny_model):
    path, _ = tiny_model("llama2")
    llm = LLM(str(path), dtype="float32", num_kv_pages=16, page_size=PAGE, max_model_len=48)
    out = llm.generate({"prompt_token_ids": prompts()[2]}, SamplingParams(temperature=0, max_tokens=None,
                                                                          ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 48 - 40 and out.finish_reason == "length"


def test_bad_requests_get_clear_errors(llama):
    _, _, llm = llama
    engine = llm.llm_engine
    long_prompt = {"prompt_token_ids": [5] * 505}
    with pytest.raises(ValueError, match=r"maximum context length is 512 tokens; you requested 515 \(505 in the "
                                         r"prompt \+ max_tokens=10\)"):
        llm.generate(long_prompt, SamplingParams(temperature=0, max_tokens=10))
    with pytest.raises(ValueError, match="leaves no room"):
        llm.generate({"prompt_token_ids": [5] * 512}, SamplingParams(temperature=0))
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, GREEDY)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 320\)"):
        llm.generate({"prompt_token_ids": [1, 999]}, GREEDY)
    with pytest.raises(TypeError, match="prompt_token_ids"):
        llm.generate([{"text": "hi"}], GREEDY)
    with pytest.raises(ValueError, match="2 sampling_params for 1 prompts"):
        llm.generate(["hi"], [GREEDY, GREEDY])
    with pytest.raises(ValueError, match="logprobs must be at most 20"):
        llm.generate("hi", SamplingParams(logprobs=21))
    with pytest.raises(ValueError, match="n=17 exceeds max_num_seqs=16"):  # a huge n once hung the server
        llm.generate("hi", SamplingParams(n=17))
    with pytest.raises(ValueError, match=r"logit_bias keys must be token ids in \[0, 320\)"):
        llm.generate("hi", SamplingParams(logit_bias={400: 1.0}))
    # a bad prompt in a batch queues none of it
    with pytest.raises(ValueError):
        llm.generate(["fine", {"prompt_token_ids": []}], GREEDY)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"max_tokens": 0}, "max_tokens"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 0}, "n must"), ({"stop": [""]}, "stop"), ({"logprobs": -1}, "logprobs"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"seed": "a"}, "seed")])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_engine_config_validation(llama):
    path = llama[0]
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        LLM(str(path), page_size=12)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        LLM(str(path), attention_backend="flash")
    with pytest.raises(ValueError, match="max_model_len=512 needs 64 KV pages but the pool has 4"):
        LLM(str(path), num_kv_pages=4, page_size=8, max_model_len=512)
    with pytest.raises(ValueError, match="memory_utilization must be in"):
        LLM(str(path), gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(16\)"):
        LLM(str(path), max_num_seqs=16, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(str(path), scheduling_policy="lifo")
    with pytest.raises(ValueError, match="num_scheduler_steps must be >= 1, got 0"):
        LLM(str(path), num_scheduler_steps=0)


def test_priority_scheduling_admits_lower_values_first(tiny_model):
    """With one sequence at a time, requests run in priority order (then arrival), not submission order."""
    path, _ = tiny_model("llama2")
    llm = LLM(str(path), dtype="float32", num_kv_pages=32, page_size=PAGE, max_num_seqs=1,
              max_num_batched_tokens=16, scheduling_policy="priority")
    engine = llm.llm_engine
    order = []
    for rid, priority in (("a", 5), ("b", 1), ("c", 3), ("d", 1)):
        engine.add_request(rid, {"prompt_token_ids": [7, 8, 9]}, SamplingParams(temperature=0, max_tokens=2),
                           priority=priority)
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["b", "d", "c", "a"]


def test_decode_rows_wider_than_max_num_seqs(tiny_model, monkeypatch):
    """Accelerators pad decode steps to >= 8 rows even when max_num_seqs is smaller (8 rows ran faster than 1
    on the H100): forced here on CPU with max_num_seqs=2, sampled and greedy outputs are unchanged."""
    from jaxllm import runner as runner_mod

    path, hf = tiny_model("llama2")
    knobs = dict(dtype="float32", num_kv_pages=64, page_size=PAGE, max_num_seqs=2, max_num_batched_tokens=32,
                 warmup=False)
    batch = [{"prompt_token_ids": p} for p in mixed_prompts(5, seed=4)]
    params = [GREEDY, SamplingParams(temperature=0.9, top_k=20, max_tokens=10, seed=3)] * 2 + [GREEDY]
    narrow = LLM(str(path), **knobs).generate(batch, params, use_tqdm=False)
    monkeypatch.setitem(runner_mod.MIN_DECODE_ROWS, "cpu", 8)
    llm = LLM(str(path), **knobs)
    assert llm.llm_engine.runner.decode_buckets == [8] and llm.llm_engine.runner.all_buckets()[0] == (8, 8, 1)
    wide = llm.generate(batch, params, use_tqdm=False)
    assert ids(wide) == ids(narrow)
    assert ids(wide)[0] == hf_greedy(hf, batch[0]["prompt_token_ids"], 12)


@pytest.mark.parametrize("platform,quantization,max_num_seqs,layout,want", [
    ("cpu", "int8", 4, "kn", [1, 2, 4]), ("gpu", None, 64, "kn", [8, 16, 32, 64]), ("gpu", "int4", 2, "kn", [8]),
    ("gpu", "int8", 64, "kn", [1, 8, 16, 32, 64]),  # int8 weights: a lone sequence decodes as one row (gemv body)
    ("gpu", "int4", 2, "nk", [1, 8]),  # the nk layout: one row through XLA's row reduction
    ("gpu", None, 2, "nk", [8]), ("tpu", "int8", 20, "kn", [8, 16, 20])])
def test_decode_buckets(platform, quantization, max_num_seqs, layout, want):
    from jaxllm.runner import decode_buckets

    assert decode_buckets(platform, quantization, max_num_seqs, layout) == want


def test_compile_threads(monkeypatch):
    """The platform defaults of compile threads, background multi-step compiles and decode steps per launch, and
    the environment variables and engine knob that override them."""
    from jaxllm.config import EngineConfig
    from jaxllm.runner import compile_threads, multi_step_background, scheduler_steps

    monkeypatch.delenv("JAXLLM_COMPILE_THREADS", raising=False)
    assert (compile_threads("cpu"), compile_threads("gpu")) == (1, 1)
    monkeypatch.setenv("JAXLLM_COMPILE_THREADS", "3")
    assert compile_threads("gpu") == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("JAXLLM_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match="JAXLLM_COMPILE_THREADS must be a whole number >= 1"):
            compile_threads("cpu")
    monkeypatch.delenv("JAXLLM_MULTI_STEP_BACKGROUND", raising=False)
    assert not multi_step_background("cpu") and multi_step_background("gpu")
    monkeypatch.setenv("JAXLLM_MULTI_STEP_BACKGROUND", "1")
    assert multi_step_background("cpu")
    monkeypatch.setenv("JAXLLM_MULTI_STEP_BACKGROUND", "0")
    assert not multi_step_background("gpu")
    auto = EngineConfig()
    assert [scheduler_steps(auto, p, q) for p, q in [("gpu", "int4"), ("gpu", None), ("cpu", "int8")]] == [8, 1, 1]
    assert scheduler_steps(EngineConfig(num_scheduler_steps=1), "gpu", "int8") == 1
    monkeypatch.setenv("JAXLLM_MULTI_STEP_BACKGROUND", "yes")
    with pytest.raises(ValueError, match="JAXLLM_MULTI_STEP_BACKGROUND must be 1 or 0"):
        multi_step_background("gpu")
