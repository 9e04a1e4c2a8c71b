"""ModelRunner: owns the device state (parameters, KV pages) and runs one jitted step on a padded batch.

A step takes sequences, each feeding some new tokens (a whole prompt, a chunk of one, or one decode
token) after `num_computed_tokens` already in its pages. The batch is padded up to a small set of
static shapes (powers of two) so that the jitted step compiles once per bucket, never per request.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import AttentionMetadata, KVPages, allocate_kv_pages
from jaxllm.config import EngineConfig
from jaxllm.kv_cache import num_pages_for
from jaxllm.weights import LoadedModel

MIN_TOKEN_BUCKET = 8
MIN_PAGES_BUCKET = 8


@dataclasses.dataclass
class SeqInput:
    """One sequence's share of a step: feed `token_ids` at positions num_computed_tokens, ...;
    its pages are `block_table` (enough for num_computed_tokens + len(token_ids))."""

    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]


def bucket(n: int, minimum: int) -> int:
    """The static size a dimension of n is padded to: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def prepare_batch(seqs: list[SeqInput], page_size: int, num_pages: int, max_pages_per_seq: int
                  ) -> tuple[jax.Array, jax.Array, AttentionMetadata, jax.Array]:
    """Padded (input_ids [T], positions [T], metadata, logits_indices [S]) for a ragged batch.

    Padding tokens write to slot num_pages * page_size (dropped) and padding sequences have no tokens.
    """
    num_tokens = sum(len(s.token_ids) for s in seqs)
    t_pad = bucket(num_tokens, MIN_TOKEN_BUCKET)
    s_pad = bucket(len(seqs), 1)
    max_q = max(len(s.token_ids) for s in seqs)
    longest = max(s.num_computed_tokens + len(s.token_ids) for s in seqs)
    p_pad = min(bucket(math.ceil(longest / page_size), MIN_PAGES_BUCKET), max_pages_per_seq)

    input_ids = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slot_mapping = np.full(t_pad, num_pages * page_size, np.int32)
    block_tables = np.zeros((s_pad, p_pad), np.int32)
    seq_lens = np.zeros(s_pad, np.int32)
    query_start_loc = np.zeros(s_pad + 1, np.int32)
    logits_indices = np.zeros(s_pad, np.int32)
    t = 0
    for i, s in enumerate(seqs):
        n, start = len(s.token_ids), s.num_computed_tokens
        pos = np.arange(start, start + n)
        table = np.asarray(s.block_table, np.int32)
        input_ids[t:t + n] = s.token_ids
        positions[t:t + n] = pos
        slot_mapping[t:t + n] = table[pos // page_size] * page_size + pos % page_size
        block_tables[i, :len(table)] = table[:p_pad]
        seq_lens[i] = start + n
        t += n
        query_start_loc[i + 1] = t
        logits_indices[i] = t - 1
    query_start_loc[len(seqs) + 1:] = t
    md = AttentionMetadata(slot_mapping=jnp.asarray(slot_mapping), block_tables=jnp.asarray(block_tables),
                           seq_lens=jnp.asarray(seq_lens), query_start_loc=jnp.asarray(query_start_loc),
                           max_query_len=bucket(max_q, 1))
    return jnp.asarray(input_ids), jnp.asarray(positions), md, jnp.asarray(logits_indices)


class ModelRunner:
    """Device state and the jitted step: tokens in, one greedy token per sequence out."""

    def __init__(self, loaded: LoadedModel, engine: EngineConfig) -> None:
        self.loaded, self.engine = loaded, engine
        c = loaded.config
        device = loaded.mesh.devices.flat[0]
        self.page_size = engine.page_size
        self.num_pages = num_pages_for(c, engine, loaded.dtype, device)
        capacity = self.num_pages * self.page_size
        self.max_model_len = engine.max_model_len or min(c.max_position_embeddings or capacity, capacity)
        if self.max_model_len > capacity:
            raise ValueError(f"max_model_len={self.max_model_len} needs {math.ceil(self.max_model_len / self.page_size)}"
                             f" KV pages but the pool has {self.num_pages}; lower max_model_len or raise num_kv_pages")
        self.max_pages_per_seq = math.ceil(self.max_model_len / self.page_size)
        self.kv_caches: list[KVPages] = allocate_kv_pages(
            loaded.module.backend, c.num_layers, self.num_pages, self.page_size, c.num_kv_heads, c.head_dim,
            loaded.dtype, loaded.mesh)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))

    def _step_fn(self, params: Any, kv_caches: list[KVPages], input_ids: jax.Array, positions: jax.Array,
                 md: AttentionMetadata, logits_indices: jax.Array) -> tuple[jax.Array, list[KVPages]]:
        logits, kv_caches = self.loaded.module.apply({"params": params}, input_ids, positions, kv_caches, md,
                                                     logits_indices)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), kv_caches

    def execute(self, seqs: list[SeqInput]) -> list[int]:
        """Run one step; returns the greedy next token of each sequence."""
        input_ids, positions, md, logits_indices = prepare_batch(seqs, self.page_size, self.num_pages,
                                                                 self.max_pages_per_seq)
        tokens, self.kv_caches = self._step(self.loaded.params, self.kv_caches, input_ids, positions, md,
                                            logits_indices)
        return np.asarray(tokens)[:len(seqs)].tolist()
