"""The attention interface between the model and the kernels: metadata, KV pages, backend choice.

One step's batch is ragged (vLLM's vocabulary): `num_tokens` query tokens from `num_seqs` sequences,
each sequence reading and writing the pages of its block table. The model calls `paged_attention`; which
implementation runs is chosen here, from `attention_backend`, and nowhere else.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels.paged_attention import reference


@struct.dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache.

    slot_mapping:    [num_tokens] page * page_size + offset to write each new K/V; padding >= pool size.
    block_tables:    [num_seqs, pages_per_seq] page indices of each sequence, in order.
    seq_lens:        [num_seqs] tokens in each sequence after this step (0 for a padding sequence).
    query_start_loc: [num_seqs + 1] sequence s owns query tokens query_start_loc[s]:query_start_loc[s+1].
    max_query_len:   static bound on any sequence's query tokens in this step (1 for pure decode).
    """

    slot_mapping: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array
    max_query_len: int = struct.field(pytree_node=False)


class KVPages(NamedTuple):
    """One layer's KV cache: k, v: [num_pages, page_size, num_kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array


def allocate_kv_pages(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                      dtype, sharding: jax.sharding.Sharding | None = None) -> list[KVPages]:
    """Zero-filled page pools, one per layer, created directly on the device (or its shards)."""
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return [KVPages(zeros(), zeros()) for _ in range(num_layers)]


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv: KVPages,
    md: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    backend: str,
) -> tuple[jax.Array, KVPages]:
    """Write this step's k, v [num_tokens, num_kv_heads, head_dim] into the pages, then attend.

    q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim].
    """
    if backend not in ("auto", "reference"):
        raise ValueError(f"unknown attention backend {backend!r}")
    k_pages, v_pages = reference.write_kv(kv.k, kv.v, k, v, md.slot_mapping)
    out = reference.ragged_paged_attention(
        q, k_pages, v_pages, md.block_tables, md.seq_lens, md.query_start_loc,
        max_query_len=md.max_query_len, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    return out, KVPages(k_pages, v_pages)
