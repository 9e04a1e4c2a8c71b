"""Pure-jnp paged attention: the oracle for the Pallas kernels and the fallback where they do not run.

The KV cache of one layer is a pool of pages, `k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim]`.
Sequence s owns pages `block_tables[s, :]` in order, so its token j lives in page `block_tables[s, j // page_size]`
at offset `j % page_size`. A batch is ragged: the query tokens of all sequences are concatenated,
sequence s owning tokens `query_start_loc[s]:query_start_loc[s + 1]`, which are the last tokens of its
`seq_lens[s]` tokens (so one call serves decodes, prefills and chunked prefills alike).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so that a fully masked row (a padding query) gives a uniform softmax instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def write_kv(
    k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scatter new keys/values `[num_tokens, num_kv_heads, head_dim]` into their slots.

    `slot_mapping[t] = page * page_size + offset`; padding tokens' slots lie in a spare page that no block
    table names (jaxllm.attention.allocate_kv_pages), and a slot past the pages is dropped.
    With the pages donated to the enclosing jit, XLA updates them in place.
    """
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
    flat = (num_pages * page_size, num_kv_heads, head_dim)
    k_pages = k_pages.reshape(flat).at[slot_mapping].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.reshape(flat).at[slot_mapping].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages.reshape(num_pages, page_size, num_kv_heads, head_dim), v_pages.reshape(
        num_pages, page_size, num_kv_heads, head_dim)


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 KV cache: x [num_tokens, num_kv_heads, head_dim] -> (int8 values, float32 scales
    [num_tokens, num_kv_heads, 1]), symmetric per token and head (max |x| -> 127)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(x32 / scale), -127, 127).astype(jnp.int8), scale


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
) -> jax.Array:
    """Causal attention of ragged queries over paged keys/values.

    q: [num_tokens, num_heads, head_dim]; block_tables: [num_seqs, pages_per_seq]; seq_lens: [num_seqs];
    query_start_loc: [num_seqs + 1]; `max_query_len` (static) bounds any sequence's query count.
    A query at position p attends to keys j <= p, and with a sliding window only to j > p - sliding_window
    (Hugging Face's convention). Returns [num_tokens, num_heads, head_dim] in q's dtype; tokens past
    `query_start_loc[-1]` (padding) get zeros. int8 pages come with k_scale, v_scale [num_pages, page_size,
    num_kv_heads]: a key is its int8 values times its scale.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs, pages_per_seq = block_tables.shape
    group = num_heads // num_kv_heads
    max_kv_len = pages_per_seq * page_size

    # Gather each sequence's queries into a padded block: [num_seqs, max_query_len, num_heads, head_dim].
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    rows = jnp.arange(max_query_len)
    token_idx = jnp.clip(query_start_loc[:-1, None] + rows[None, :], 0, num_tokens - 1)
    qs = q[token_idx].astype(jnp.float32).reshape(num_seqs, max_query_len, num_kv_heads, group, head_dim)

    # Each sequence's keys/values in order: [num_seqs, max_kv_len, num_kv_heads, head_dim].
    ks = k_pages[block_tables].reshape(num_seqs, max_kv_len, num_kv_heads, head_dim).astype(jnp.float32)
    vs = v_pages[block_tables].reshape(num_seqs, max_kv_len, num_kv_heads, head_dim).astype(jnp.float32)
    if k_scale is not None:
        ks = ks * k_scale[block_tables].reshape(num_seqs, max_kv_len, num_kv_heads, 1)
        vs = vs * v_scale[block_tables].reshape(num_seqs, max_kv_len, num_kv_heads, 1)

    scores = jnp.einsum("sqkgd,sjkd->skgqj", qs, ks) * scale  # [num_seqs, kv_heads, group, max_q, max_kv]
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    q_pos = (seq_lens - q_lens)[:, None] + rows[None, :]  # [num_seqs, max_q]
    kv_pos = jnp.arange(max_kv_len)
    mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < seq_lens[:, None, None])
    if sliding_window is not None:
        mask &= kv_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("skgqj,sjkd->sqkgd", probs, vs).reshape(num_seqs, max_query_len, num_heads, head_dim)

    # Back to the ragged token order.
    tokens = jnp.arange(num_tokens)
    seq_of_token = jnp.clip(jnp.searchsorted(query_start_loc, tokens, side="right") - 1, 0, num_seqs - 1)
    row_of_token = jnp.clip(tokens - query_start_loc[seq_of_token], 0, max_query_len - 1)
    result = out[seq_of_token, row_of_token]
    valid = (tokens < query_start_loc[-1])[:, None, None]
    return jnp.where(valid, result, 0.0).astype(q.dtype)
