"""LLM.generate over the paged KV cache: batching, admission under a small pool, stopping, input validation."""

from __future__ import annotations

import json
import shutil

import pytest

from jaxllm import LLM, SamplingParams
from tests.test_model_parity import prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tiny_model):
    path, _ = tiny_model("llama2")
    return path, LLM(str(path), dtype="float32", num_kv_pages=64, page_size=8)


def ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_batch_equals_one_at_a_time(llama):
    _, llm = llama
    batch = [{"prompt_token_ids": p} for p in prompts(seed=7)]
    together = ids(llm.generate(batch, GREEDY))
    alone = [ids(llm.generate([p], GREEDY))[0] for p in batch]
    assert together == alone
    assert all(len(t) == 12 for t in together)


def test_small_pool_queues_requests_and_reuses_pages(llama):
    """A pool that holds one request at a time still serves all of them, in order, with the same result."""
    path, big = llama
    batch = [{"prompt_token_ids": p} for p in prompts(seed=8)] * 2
    expected = ids(big.generate(batch, GREEDY))
    small = LLM(str(path), dtype="float32", num_kv_pages=7, page_size=8, max_model_len=56)
    assert small.allocator.num_free == 7
    assert ids(small.generate(batch, GREEDY)) == expected
    assert small.allocator.num_free == 7  # every page came back
    one_seq = LLM(str(path), dtype="float32", num_kv_pages=64, page_size=8, max_num_seqs=1, max_num_batched_tokens=8)
    assert ids(one_seq.generate(batch, GREEDY)) == expected


def test_outputs_are_vllm_shaped(llama, tiny_tokenizer):
    _, llm = llama
    text = "The quick brown fox"
    out = llm.generate([text, {"prompt": text}], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert [o.prompt for o in out] == [text, text]
    assert out[0].prompt_token_ids == tiny_tokenizer.encode(text) == out[1].prompt_token_ids
    c = out[0].outputs[0]
    assert (c.index, len(c.token_ids), c.finish_reason, c.stop_reason) == (0, 5, "length", None)
    assert c.text == tiny_tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert out[0].request_id != out[1].request_id and out[0].finished


def test_stop_token_ids(llama):
    _, llm = llama
    p = {"prompt_token_ids": prompts(seed=9)[1]}
    free_run = ids(llm.generate(p, GREEDY))[0]
    stop = free_run[3]
    first = free_run.index(stop)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]))[0].outputs[0]
    assert out.token_ids == free_run[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_eos_from_generation_config(tiny_model, tmp_path):
    """EOS ids come from generation_config.json; generation stops there unless ignore_eos."""
    src, _ = tiny_model("llama2")
    path = shutil.copytree(src, tmp_path / "m")
    llm = LLM(str(path), dtype="float32", num_kv_pages=32, page_size=8)
    p = {"prompt_token_ids": prompts(seed=10)[0]}
    free_run = ids(llm.generate(p, GREEDY))[0]
    eos = free_run[2]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, eos]}))
    llm = LLM(str(path), dtype="float32", num_kv_pages=32, page_size=8)
    assert llm.model.config.eos_token_ids == (2, eos)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert out.token_ids == free_run[:free_run.index(eos) + 1] and out.finish_reason == "stop"
    assert out.stop_reason is None
    assert ids(llm.generate(p, GREEDY))[0] == free_run


def test_max_tokens_none_fills_the_context(tiny_model):
    path, _ = tiny_model("llama2")
    llm = LLM(str(path), dtype="float32", num_kv_pages=16, page_size=8, max_model_len=48)
    out = llm.generate({"prompt_token_ids": prompts()[2]}, SamplingParams(temperature=0, max_tokens=None,
                                                                          ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 48 - 40 and out.finish_reason == "length"


def test_bad_requests_get_clear_errors(llama):
    _, llm = llama
    long_prompt = {"prompt_token_ids": [5] * 505}
    with pytest.raises(ValueError, match=r"maximum context length is 512 tokens; you requested 515 \(505 in the prompt \+ max_tokens=10\)"):
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
    with pytest.raises(NotImplementedError, match="temperature, top_p"):
        llm.generate("hi", SamplingParams(temperature=0.7, top_p=0.9))
    with pytest.raises(NotImplementedError, match="stop need the sampler"):
        llm.generate("hi", SamplingParams(temperature=0, stop=["\n"]))


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"max_tokens": 0}, "max_tokens"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 0}, "n must"), ({"stop": [""]}, "stop"), ({"logprobs": -1}, "logprobs")])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_engine_config_validation(llama):
    path, _ = llama
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        LLM(str(path), page_size=12)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        LLM(str(path), attention_backend="flash")
    with pytest.raises(ValueError, match="max_model_len=512 needs 64 KV pages but the pool has 4"):
        LLM(str(path), num_kv_pages=4, page_size=8, max_model_len=512)
    with pytest.raises(ValueError, match="memory_utilization must be in"):
        LLM(str(path), gpu_memory_utilization=1.5)
