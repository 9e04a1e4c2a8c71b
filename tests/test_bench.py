"""`jaxllm bench`: every command once on a tiny model (a smoke test: timings are measured, never asserted),
the datasets' lengths, and `--load-format dummy` from a directory holding only config.json."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams, bench
from jaxllm.cli import main
from tests import tiny_models


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """A tiny Llama as config.json alone: no weights, no tokenizer."""
    path = tmp_path_factory.mktemp("config_only")
    tiny_models.make_config("llama3.1", max_position_embeddings=2048).save_pretrained(str(path))
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
    return path


def test_sharegpt_like_lengths():
    reqs = bench.make_requests("sharegpt-like", 2000, 0, 0, vocab_size=1000, seed=3)
    prompt = np.array([len(p) for p, _ in reqs])
    out = np.array([o for _, o in reqs])
    assert 150 < prompt.mean() < 250 and 140 < out.mean() < 220  # ShareGPT: ~200 / ~180
    assert prompt.max() <= 1024 and (prompt + out).max() <= 2048 and prompt.min() >= 4 and out.min() >= 1
    assert np.percentile(prompt, 99) > 4 * np.median(prompt)  # a heavy tail
    assert all(16 <= t < 1000 - 16 for p, _ in reqs[:50] for t in p)
    assert bench.make_requests("sharegpt-like", 2000, 0, 0, vocab_size=1000, seed=3) == reqs  # seeded
    with pytest.raises(ValueError, match="dataset-name"):
        bench.make_requests("sharegpt", 5, 0, 0, 1000)


def test_dummy_load_from_config_alone(config_only):
    """Random weights of the config's shapes, a synthetic tokenizer of its vocabulary; generation runs."""
    llm = LLM(str(config_only), load_format="dummy", dtype="float32", max_num_seqs=2, max_num_batched_tokens=32,
              warmup=False)
    cfg = llm.model.config
    emb = llm.model.params["embed_tokens"]["embedding"]
    assert emb.shape == (cfg.vocab_size, cfg.hidden_size) and float(jax.numpy.std(emb)) > 0
    assert len(llm.get_tokenizer()) == cfg.vocab_size
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text.count("<") == 4
    with pytest.raises(ValueError, match="load_format"):
        LLM(str(config_only), load_format="random")


@pytest.mark.parametrize("command", [
    ["latency", "--batch-size", "2", "--input-len", "12", "--output-len", "5", "--num-iters", "2"],
    ["throughput", "--num-prompts", "6", "--dataset-name", "sharegpt-like", "--max-num-seqs", "4"],
])
def test_bench_offline_commands(config_only, tmp_path, capsys, command):
    out = tmp_path / "result.json"
    rc = main(["bench", *command, "--model", str(config_only), "--load-format", "dummy", "--dtype", "float32",
               "--max-num-batched-tokens", "64", "--save-result", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["device"] and result["jax"] == jax.__version__
    if command[0] == "latency":
        assert 0 < result["prefill_s"] < result["latency_s"] and result["decode_ms_per_token"] > 0
        assert 0 < result["roofline_fraction"] and result["weight_GB"] > 0
    else:
        reqs = bench.make_requests("sharegpt-like", 6, 128, 128, tiny_models.VOCAB, 0)
        assert result["output_tokens"] == sum(o for _, o in reqs)  # ignore_eos: every token asked for
        assert result["output_tok_per_s"] > 0
    assert "start-up" in capsys.readouterr().out
