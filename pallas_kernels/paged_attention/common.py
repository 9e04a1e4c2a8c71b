"""Pieces shared by the GPU and TPU kernels: ragged query tiles and the online-softmax arithmetic.

All of it is plain jnp on values, which both the Triton and the Mosaic TPU lowerings accept.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention.reference import MASK_VALUE


def ragged_tiles(query_start_loc: jax.Array, seq_lens: jax.Array, num_tokens: int, block_q: int, decode_only: bool):
    """Per tile: (sequence, first token, token count, position of the first token); a static tile count."""
    num_seqs = seq_lens.shape[0]
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    if decode_only:  # every sequence has at most one query token: one tile per sequence
        return (jnp.arange(num_seqs, dtype=jnp.int32), query_start_loc[:-1], q_lens, seq_lens - q_lens, num_seqs)
    tiles_per_seq = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(tiles_per_seq)
    num_tiles = -(-num_tokens // block_q) + num_seqs - 1
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, t, side="right"), num_seqs - 1).astype(jnp.int32)
    j = t - (ends[seq] - tiles_per_seq[seq])
    nq = jnp.clip(q_lens[seq] - j * block_q, 0, block_q)
    return seq, query_start_loc[seq] + j * block_q, nq, seq_lens[seq] - q_lens[seq] + j * block_q, num_tiles


def visible_blocks(kv_len, pos0, nq, block_k: int, sliding_window: int | None):
    """[first, last) blocks of block_k keys that any query of a tile (positions pos0 .. pos0 + nq - 1) can see."""
    hi = jnp.minimum(kv_len, pos0 + nq)
    lo = jnp.int32(0) if sliding_window is None else jnp.maximum(pos0 - sliding_window + 1, 0)
    return lo // block_k, (hi + block_k - 1) // block_k


def masked_scores(s, first_pos, q_pos, kv_len, *, scale: float, soft_cap: float | None,
                  sliding_window: int | None):
    """Scale, soft-cap and causally mask raw q.k scores [rows, width] of keys first_pos, first_pos + 1, ...;
    q_pos: [rows, 1] position of each row's query."""
    s = s * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    kv_pos = first_pos + jax.lax.broadcasted_iota(jnp.int32, (1, s.shape[1]), 1)
    mask = (kv_pos <= q_pos) & (kv_pos < kv_len)
    if sliding_window is not None:
        mask &= kv_pos > q_pos - sliding_window
    return jnp.where(mask, s, MASK_VALUE)


def softmax_init(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online-softmax state: accumulator [rows, head_dim], running max and sum [rows, 1]."""
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))


def online_softmax_update(acc, m, l, scores: list, values: list, dot_pv: Callable):
    """Fold blocks of masked scores [rows, width_i] and their values into the state: dot_pv(p [rows, width_i]
    float32, values[i]) -> [rows, head_dim] (values[i] is whatever the caller's dot_pv reads)."""
    m_new = m
    for s in scores:
        m_new = jnp.maximum(m_new, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    acc, l = alpha * acc, alpha * l
    for s, v in zip(scores, values):
        p = jnp.exp(s - m_new)
        l = l + p.sum(axis=1, keepdims=True)
        acc = acc + dot_pv(p, v)
    return acc, m_new, l


def normalize(acc, l):
    """acc / l, with rows that saw no key (padding) left at zero."""
    return acc / jnp.where(l == 0.0, 1.0, l)
