"""Ragged paged attention on NVIDIA GPUs: one Pallas kernel (Triton lowering) for decodes, prefills and
chunked prefills, with flash-decoding split-K for long contexts and small batches.

Layout (chosen for this backend at allocation): k_pages, v_pages: [num_kv_heads, num_pages, page_size, head_dim],
so one (head, page) is one contiguous page_size * head_dim run and a block of pages is one gather.

Work decomposition. The ragged query tokens are cut into tiles of at most `block_q` tokens of one sequence.
A program takes (tile, kv head, split): its rows are the tile's tokens times the kv head's `group` query
heads (GQA: the group shares every K/V read), padded to >= 16 rows for the tensor cores; it walks the
tile's visible KV range (causal, and sliding window) in blocks of `pages_per_block` pages, one split's
share of them, with an online softmax. With one split the program normalises and writes the output; with
several it writes (acc, max, sum) partials that `_combine` merges (flash-decoding).

The kernel body uses only what the Triton lowering accepts (power-of-two loads, >= 16-row dots, no
scalar prefetch) and nothing Triton-specific beyond `plgpu.load/store` masks and CompilerParams, so a
Mosaic GPU (`plgpu.kernel`) body can replace `_kernel` behind the same wrapper.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention.reference import MASK_VALUE

LAYOUT = "kv_heads_first"  # [num_kv_heads, num_pages, page_size, head_dim]


def to_layout(pages: jax.Array) -> jax.Array:
    """[num_pages, page_size, num_kv_heads, head_dim] (reference layout) -> this backend's layout."""
    return pages.transpose(2, 0, 1, 3)


def allocate(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((num_kv_heads, num_pages, page_size, head_dim), dtype)


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """Scatter k, v [num_tokens, num_kv_heads, head_dim] to their slots (page * page_size + offset);
    slots past the pool (padding) are dropped. In place when the pages are donated."""
    kvh, num_pages, page_size, d = k_pages.shape
    flat = (kvh, num_pages * page_size, d)

    def put(pages, x):
        return pages.reshape(flat).at[:, slot_mapping].set(x.astype(pages.dtype).transpose(1, 0, 2),
                                                           mode="drop").reshape(pages.shape)

    return put(k_pages, k), put(v_pages, v)


def _kernel(tile_seq_ref, tile_q0_ref, tile_nq_ref, tile_pos0_ref, seq_lens_ref, block_tables_ref,  # scalars
            q_ref, k_ref, v_ref,  # q: [rows_total, head_dim]; k, v: [num_pages, page_size, head_dim] (one kv head)
            *out_refs, group: int, rows: int, pages_per_block: int, num_splits: int, scale: float,
            sliding_window: int | None, soft_cap: float | None, precision, gather_pages: bool):
    tile, split = pl.program_id(0), pl.program_id(2)
    page_size, head_dim = k_ref.shape[1], k_ref.shape[2]
    block_k = pages_per_block * page_size

    seq = tile_seq_ref[tile]
    q0, nq, pos0 = tile_q0_ref[tile], tile_nq_ref[tile], tile_pos0_ref[tile]
    kv_len = seq_lens_ref[seq]

    row = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    row_valid = row < nq * group
    q_pos = pos0 + row // group  # [rows, 1] position of each row's token
    q = plgpu.load(q_ref.at[pl.ds(q0 * group, rows), :], mask=jnp.broadcast_to(row_valid, (rows, head_dim)),
                   other=0.0)

    # The KV range any row of this tile can see, in blocks, and this split's share of it.
    hi = jnp.minimum(kv_len, pos0 + nq)
    lo = jnp.int32(0) if sliding_window is None else jnp.maximum(pos0 - sliding_window + 1, 0)
    first, last = lo // block_k, (hi + block_k - 1) // block_k
    per_split = (last - first + num_splits - 1) // num_splits
    start = first + split * per_split
    stop = jnp.minimum(last, start + per_split)

    def dot(a, b, contract_b: int):
        return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)

    def scores(s, first_pos: int | jax.Array, width: int):
        """Scale, soft-cap and mask raw q.k scores [rows, width] of keys first_pos, first_pos + 1, ..."""
        s = s * scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = first_pos + jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
        mask = (kv_pos <= q_pos) & (kv_pos < kv_len)
        if sliding_window is not None:
            mask &= kv_pos > q_pos - sliding_window
        return jnp.where(mask, s, MASK_VALUE)

    def body(b, carry):
        acc, m, l = carry
        if gather_pages:  # one gather of the block's pages: k, v [block_k, head_dim]
            pages = block_tables_ref[seq, pl.ds(b * pages_per_block, pages_per_block)]
            k = k_ref[pages].reshape(block_k, head_dim)
            v = v_ref[pages].reshape(block_k, head_dim)
            s = [scores(dot(q, k, 1), b * block_k, block_k)]
            vs = [v]
        else:  # one contiguous [page_size, head_dim] load per page, all issued before any use
            pages = [block_tables_ref[seq, b * pages_per_block + i] for i in range(pages_per_block)]
            ks = [k_ref[p] for p in pages]
            vs = [v_ref[p] for p in pages]
            s = [scores(dot(q, k, 1), b * block_k + i * page_size, page_size) for i, k in enumerate(ks)]
        m_new = m
        for s_i in s:
            m_new = jnp.maximum(m_new, s_i.max(axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        acc, l = alpha * acc, alpha * l
        for s_i, v_i in zip(s, vs):
            p = jnp.exp(s_i - m_new)
            l = l + p.sum(axis=1, keepdims=True)
            acc = acc + dot(p.astype(v_i.dtype), v_i, 0)
        return acc, m_new, l

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))
    acc, m, l = jax.lax.fori_loop(start, stop, body, init)

    if num_splits == 1:
        (o_ref,) = out_refs
        out = acc / jnp.where(l == 0.0, 1.0, l)
        plgpu.store(o_ref.at[pl.ds(q0 * group, rows), :], out.astype(o_ref.dtype),
                    mask=jnp.broadcast_to(row_valid, (rows, head_dim)))
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l


def _tiles(query_start_loc: jax.Array, seq_lens: jax.Array, num_tokens: int, block_q: int):
    """Per tile: (sequence, first token, token count, position of the first token); static tile count."""
    num_seqs = seq_lens.shape[0]
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    tiles_per_seq = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(tiles_per_seq)
    num_tiles = num_tokens if block_q == 1 else -(-num_tokens // block_q) + num_seqs - 1
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, t, side="right"), num_seqs - 1).astype(jnp.int32)
    j = t - (ends[seq] - tiles_per_seq[seq])
    nq = jnp.clip(q_lens[seq] - j * block_q, 0, block_q)
    q0 = query_start_loc[seq] + j * block_q
    pos0 = seq_lens[seq] - q_lens[seq] + j * block_q
    return seq, jnp.where(nq > 0, q0, 0), nq, pos0, num_tiles


@functools.partial(jax.jit, static_argnames=("max_query_len", "scale", "sliding_window", "soft_cap", "block_q",
                                             "pages_per_block", "num_splits", "num_warps", "num_stages",
                                             "gather_pages", "interpret"))
def ragged_paged_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array, seq_lens: jax.Array,
    query_start_loc: jax.Array, *, max_query_len: int, scale: float, sliding_window: int | None = None,
    soft_cap: float | None = None, block_q: int | None = None, pages_per_block: int | None = None,
    num_splits: int | None = None, num_warps: int | None = None, num_stages: int = 2, gather_pages: bool = True,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as reference.ragged_paged_attention, pages in this backend's layout.

    q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]; rows of padding tokens
    (past query_start_loc[-1]) are left unspecified. Tuning knobs default from the shapes (`choose_params`).
    """
    num_tokens, num_heads, head_dim = q.shape
    kvh, _, page_size, _ = k_pages.shape
    group = num_heads // kvh
    p = choose_params(num_tokens, *block_tables.shape, kvh, group, max_query_len, page_size,
                      block_q=block_q, pages_per_block=pages_per_block, num_splits=num_splits)
    bq, ppb, splits = p["block_q"], p["pages_per_block"], p["num_splits"]
    rows = max(16, 1 << math.ceil(math.log2(bq * group)))

    seq, q0, nq, pos0, num_tiles = _tiles(query_start_loc, seq_lens, num_tokens, bq)
    width = -(-block_tables.shape[1] // ppb) * ppb
    tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))
    # [kv_heads, tokens * group (+ rows of slack so that no tile's load or store leaves the array), head_dim]
    q_rows = q.reshape(num_tokens, kvh, group, head_dim).transpose(1, 0, 2, 3).reshape(kvh, num_tokens * group,
                                                                                        head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, rows), (0, 0)))

    kernel = functools.partial(
        _kernel, group=group, rows=rows, pages_per_block=ppb, num_splits=splits, scale=scale,
        sliding_window=sliding_window, soft_cap=soft_cap, gather_pages=gather_pages,
        precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
    scalar_specs = [pl.BlockSpec()] * 6  # whole arrays, indexed by the program
    head_spec = pl.BlockSpec((None, *q_rows.shape[1:]), lambda t, h, s: (h, 0, 0))
    page_spec = pl.BlockSpec((None, *k_pages.shape[1:]), lambda t, h, s: (h, 0, 0, 0))
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q_rows.shape, q.dtype)]
        out_specs = [head_spec]
    else:
        out_shape = [jax.ShapeDtypeStruct((splits, kvh, num_tiles, rows, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((splits, kvh, num_tiles, rows, 1), jnp.float32),
                     jax.ShapeDtypeStruct((splits, kvh, num_tiles, rows, 1), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, rows, head_dim), lambda t, h, s: (s, h, t, 0, 0)),
                     pl.BlockSpec((None, None, None, rows, 1), lambda t, h, s: (s, h, t, 0, 0)),
                     pl.BlockSpec((None, None, None, rows, 1), lambda t, h, s: (s, h, t, 0, 0))]
    outs = pl.pallas_call(
        kernel,
        grid=(num_tiles, kvh, splits),
        in_specs=[*scalar_specs, head_spec, page_spec, page_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or (4 if rows <= 32 else 8),
                                             num_stages=num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_bq{bq}_ppb{ppb}_s{splits}",
    )(seq, q0, nq, pos0, seq_lens, tables, q_rows, k_pages, v_pages)

    if splits == 1:
        out_rows = outs[0][:, :num_tokens * group]
    else:
        out_rows = _combine(*outs, q0, nq, group, num_tokens)
    return out_rows.reshape(kvh, num_tokens, group, head_dim).transpose(1, 0, 2, 3).reshape(
        num_tokens, num_heads, head_dim).astype(q.dtype)


def _combine(o, m, l, q0, nq, group: int, num_tokens: int) -> jax.Array:
    """Merge split partials [splits, kvh, tiles, rows, *] into rows [kvh, num_tokens * group, head_dim]."""
    m_max = m.max(axis=0)
    w = jnp.exp(m - m_max)  # [splits, kvh, tiles, rows, 1]
    out = (w * o).sum(axis=0) / jnp.maximum((w * l).sum(axis=0), 1e-30)  # [kvh, tiles, rows, d]
    kvh, num_tiles, rows, d = out.shape
    r = jnp.arange(rows)
    dest = q0[:, None] * group + r[None, :]  # [tiles, rows]
    dest = jnp.where(r[None, :] < nq[:, None] * group, dest, num_tokens * group)  # invalid rows dropped
    flat = jnp.zeros((kvh, num_tokens * group, d), out.dtype)
    return flat.at[:, dest.reshape(-1)].set(out.reshape(kvh, num_tiles * rows, d), mode="drop")


def choose_params(num_tokens: int, num_seqs: int, pages_per_seq: int, num_kv_heads: int, group: int,
                  max_query_len: int, page_size: int, *, block_q: int | None = None,
                  pages_per_block: int | None = None, num_splits: int | None = None,
                  num_cores: int = 132) -> dict[str, int]:
    """Tile sizes from the static shapes: decode-only batches (max_query_len 1) take one token per tile and
    enough KV splits for ~2 programs per SM; prefills take ~128 rows (tokens x group) per tile, one split."""
    if block_q is None:
        block_q = 1 if max_query_len == 1 else max(1, min(128 // group, 1 << math.ceil(math.log2(max_query_len))))
    if pages_per_block is None:
        pages_per_block = max(1, min(64 // page_size, 1 << math.ceil(math.log2(max(pages_per_seq, 1)))))
    if num_splits is None:
        blocks = -(-pages_per_seq // pages_per_block)
        programs = num_seqs * num_kv_heads
        num_splits = max(1, min(blocks, -(-2 * num_cores // programs))) if block_q == 1 else 1
    return {"block_q": block_q, "pages_per_block": pages_per_block, "num_splits": num_splits}
