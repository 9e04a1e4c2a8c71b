"""Our Flax models against transformers (torch, float32) on the same random weights, for every architecture."""

from __future__ import annotations

import random

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.runner import SeqInput, prepare_batch
from jaxllm.weights import load_model
from tests.tiny_models import VARIANTS, VOCAB, hf_greedy, hf_logits

PAGE = 8
PROMPT_LENS = (5, 17, 40)  # 40 > the sliding window (8) and spans several pages


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in PROMPT_LENS]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def ragged_logits(loaded, chunks: list[tuple[list[int], int, list[int]]], num_pages: int) -> list[np.ndarray]:
    """Run one ragged step over (token_ids, num_computed_tokens, block_table) chunks; logits of every token."""
    c = loaded.config
    kv = [(jnp.zeros((num_pages, PAGE, c.num_kv_heads, c.head_dim), loaded.dtype),) * 2 for _ in range(c.num_layers)]
    return _step(loaded, chunks, kv, num_pages)[0]


def _step(loaded, chunks, kv, num_pages):
    from jaxllm.attention import KVPages

    seqs = [SeqInput(ids, start, table) for ids, start, table in chunks]
    input_ids, positions, md, _ = prepare_batch(seqs, PAGE, num_pages, max_pages_per_seq=64)
    logits, kv = loaded.module.apply({"params": loaded.params}, input_ids, positions, [KVPages(*p) for p in kv], md)
    logits, out, t = np.asarray(logits), [], 0
    for ids, _, _ in chunks:
        out.append(logits[t:t + len(ids)])
        t += len(ids)
    return out, kv


def shuffled_tables(rng: random.Random, num_pages: int, lens: list[int]) -> list[list[int]]:
    """Non-contiguous, disjoint block tables for sequences of the given lengths."""
    pages = list(range(num_pages))
    rng.shuffle(pages)
    tables = []
    for n in lens:
        k = -(-n // PAGE)
        tables.append(pages[:k])
        pages = pages[k:]
    return tables


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, tiny_model):
    """A ragged batch of three prompts (paged, shuffled pages) gives transformers' logits to 1e-4."""
    path, hf = tiny_model(variant)
    loaded = load_model(path, dtype="float32")
    batch = prompts()
    tables = shuffled_tables(random.Random(1), 32, [len(p) for p in batch])
    ours = ragged_logits(loaded, [(p, 0, t) for p, t in zip(batch, tables)], num_pages=32)
    for p, logits in zip(batch, ours):
        ref = hf_logits(hf, p).numpy()
        assert logits.shape == ref.shape
        assert rel_err(logits, ref) < 1e-4, variant


@pytest.mark.parametrize("variant", ["llama3.1", "mistral", "gemma2", "gemma3"])
def test_chunked_prefill_over_cached_pages(variant, tiny_model):
    """Prefill 20 tokens, then the next 20 as a chunk that attends to the cached pages: same logits."""
    path, hf = tiny_model(variant)
    loaded = load_model(path, dtype="float32")
    prompt = prompts(seed=3)[2]
    table = shuffled_tables(random.Random(2), 16, [len(prompt)])[0]
    c = loaded.config
    kv = [(jnp.zeros((16, PAGE, c.num_kv_heads, c.head_dim), jnp.float32),) * 2 for _ in range(c.num_layers)]
    first, kv = _step(loaded, [(prompt[:20], 0, table)], kv, 16)
    second, _ = _step(loaded, [(prompt[20:], 20, table)], [tuple(p) for p in kv], 16)
    ref = hf_logits(hf, prompt).numpy()
    assert rel_err(np.concatenate([first[0], second[0]]), ref) < 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_continuation_matches_transformers(variant, tiny_model):
    """32 greedy tokens through LLM.generate (paged prefill + decode) equal transformers' generate."""
    path, hf = tiny_model(variant)
    llm = LLM(str(path), dtype="float32", num_kv_pages=64, page_size=PAGE)
    batch = prompts(seed=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for p, out in zip(batch, outs):
        assert out.prompt_token_ids == p
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 32), variant
        assert out.outputs[0].finish_reason == "length"
