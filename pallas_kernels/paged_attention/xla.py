"""Ragged paged attention in plain jnp (XLA), for CPUs: the kernels' algorithm without Pallas.

The reference (reference.py) pads every sequence to `max_query_len` queries and the whole block table of
keys, so its cost is num_seqs x max_query_len x pages_per_seq: right for an oracle, too slow for serving
on a CPU, where the engine keeps those dimensions at their static maximum. This version does what the GPU
kernel does: the ragged tokens are cut into tiles of `block_q` tokens of one sequence, and a loop walks
the keys in blocks with an online softmax, only as far as the longest visible range in the batch
(a dynamic trip count). Its cost follows the real tokens and context lengths, not the static shapes.

Layout: the reference's, k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim] (written by
reference.write_kv).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention.common import ragged_tiles, visible_blocks
from pallas_kernels.paged_attention.reference import MASK_VALUE


@functools.partial(jax.jit, static_argnames=("max_query_len", "scale", "sliding_window", "soft_cap", "block_k"))
def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    query_start_loc: jax.Array,
    *,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    block_k: int = 128,
) -> jax.Array:
    """Same contract as reference.ragged_paged_attention: q [num_tokens, num_heads, head_dim] -> same shape
    (int8 pages with their scales [num_pages, page_size, kv_heads] too)."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, kvh, _ = k_pages.shape
    pages_per_seq = block_tables.shape[1]
    group = num_heads // kvh
    block_q = 1 if max_query_len == 1 else min(16, max_query_len)
    pages_per_block = max(1, min(block_k // page_size, pages_per_seq))
    block_k = pages_per_block * page_size
    # Pad the table so the last block's slice stays in bounds.
    num_blocks = -(-pages_per_seq // pages_per_block)
    tables = jnp.pad(block_tables, ((0, 0), (0, num_blocks * pages_per_block - pages_per_seq)))

    tile_seq, tile_q0, tile_nq, tile_pos0, num_tiles = ragged_tiles(query_start_loc, seq_lens, num_tokens, block_q,
                                                                    max_query_len == 1)
    rows = jnp.arange(block_q)
    token = tile_q0[:, None] + rows[None, :]  # [tiles, block_q]
    valid = rows[None, :] < tile_nq[:, None]
    qs = q[jnp.clip(token, 0, num_tokens - 1)].astype(jnp.float32) * scale
    qs = qs.reshape(num_tiles, block_q, kvh, group, head_dim)
    q_pos = tile_pos0[:, None] + rows[None, :]  # [tiles, block_q]
    kv_len = seq_lens[tile_seq]
    first, last = visible_blocks(kv_len, tile_pos0, tile_nq, block_k, sliding_window)
    first = jnp.where(tile_nq > 0, first, 0)
    last = jnp.where(tile_nq > 0, last, 0)

    def body(i, carry):
        acc, m, l = carry  # [tiles, kvh, group, block_q, head_dim], [..., 1], [..., 1]
        b = first + i  # [tiles]: each tile walks its own range; past its end it is masked out
        pages = jax.vmap(lambda t, bb: jax.lax.dynamic_slice(t, (bb * pages_per_block,), (pages_per_block,)))(
            tables[tile_seq], jnp.minimum(b, num_blocks - 1))
        k = k_pages[pages].reshape(num_tiles, block_k, kvh, head_dim).astype(jnp.float32)
        v = v_pages[pages].reshape(num_tiles, block_k, kvh, head_dim).astype(jnp.float32)
        if k_scale is not None:
            k = k * k_scale[pages].reshape(num_tiles, block_k, kvh, 1)
            v = v * v_scale[pages].reshape(num_tiles, block_k, kvh, 1)
        s = jnp.einsum("tqkgd,tjkd->tkgqj", qs, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = b[:, None] * block_k + jnp.arange(block_k)[None, :]  # [tiles, block_k]
        mask = (kv_pos[:, None, :] <= q_pos[:, :, None]) & (kv_pos[:, None, :] < kv_len[:, None, None])
        mask &= (b < last)[:, None, None]
        if sliding_window is not None:
            mask &= kv_pos[:, None, :] > q_pos[:, :, None] - sliding_window
        s = jnp.where(mask[:, None, None], s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m - m_new)
        acc = alpha * acc + jnp.einsum("tkgqj,tjkd->tkgqd", p, v)
        return acc, m_new, alpha * l + p.sum(axis=-1, keepdims=True)

    init = (jnp.zeros((num_tiles, kvh, group, block_q, head_dim), jnp.float32),
            jnp.full((num_tiles, kvh, group, block_q, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((num_tiles, kvh, group, block_q, 1), jnp.float32))
    trips = jnp.max(last - first, initial=0)
    acc, _, l = jax.lax.fori_loop(0, trips, body, init)
    out = acc / jnp.where(l == 0.0, 1.0, l)  # rows that saw no key (padding) stay zero
    out = out.transpose(0, 3, 1, 2, 4).reshape(num_tiles * block_q, num_heads, head_dim)
    dest = jnp.where(valid, token, num_tokens).reshape(-1)
    result = jnp.zeros((num_tokens, num_heads, head_dim), jnp.float32).at[dest].set(out, mode="drop")
    return result.astype(q.dtype)
