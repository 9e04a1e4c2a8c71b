"""Ragged paged attention on NVIDIA GPUs: one Pallas kernel (Triton lowering) for decodes, prefills and
chunked prefills, with flash-decoding split-K for long contexts and small batches.

Layout (chosen for this backend at allocation): k_pages, v_pages: [num_kv_heads, num_pages, page_size, head_dim],
so one (head, page) is one contiguous page_size * head_dim run.

Work decomposition. The ragged query tokens are cut into tiles of at most `block_q` tokens of one sequence.
A program takes (tile, kv head, split). Its rows are the tile's tokens times the kv head's query heads
(GQA: the group shares every K/V read; the group is padded to a power of two and the rows to >= 16 for
the tensor cores), read straight from q [num_tokens, num_heads, head_dim] and written straight to the
output. It walks the tile's visible KV range (causal, sliding window) in blocks of `pages_per_block`
pages, its split's share of them, with an online softmax. With one split it normalises and stores; with
several it writes (acc, max, sum) partials that `_combine` merges (flash-decoding).

Measured choices (benchmarks/RESULTS.md): decode loads each page of a block as its own contiguous
[page_size, head_dim] load, all issued before use (`gather_pages=False`), which beat one gather of the
block by 13-15% at batch 64-256; prefill tiles keep the gather. The body uses only what the Triton
lowering accepts (power-of-two loads, >= 16-row dots, no scalar prefetch), so a Mosaic GPU
(`plgpu.kernel`) body can replace `_kernel` behind the same wrapper.

This kernel serves every step, prefills included, by measurement: cuDNN's flash attention is 1.9x faster on
a lone dense prompt (106 vs 204 us at 2048 tokens), but merged into ragged steps (fresh prompts to cuDNN's
packed layout, the rest here) it made every mixed step 1.3-2.8x slower than this kernel alone, and a step
that is one whole prompt only gained 204 -> 149 us (benchmarks/RESULTS.md; experiment at commit ac0fb0b).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention.common import (masked_scores, normalize, online_softmax_update, ragged_tiles,
                                                   softmax_init, visible_blocks)

def to_layout(pages: jax.Array) -> jax.Array:
    """[num_pages, page_size, num_kv_heads, head_dim] (reference layout) -> this backend's layout."""
    return pages.transpose(2, 0, 1, 3)


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """Scatter k, v [num_tokens, num_kv_heads, head_dim] to their slots (page * page_size + offset); padding
    tokens' slots lie in a spare page (jaxllm.attention.allocate_kv_pages). One token is a dynamic update
    slice, which clamps a slot past the pool to its last (a scatter drops it): no bounds check, so XLA fuses
    the token's computation (rope, a cast) into the write. In place when the pages are donated."""
    kvh, num_pages, page_size, d = k_pages.shape
    flat = (kvh, num_pages * page_size, d)

    def put(pages, x):
        x = x.astype(pages.dtype).transpose(1, 0, 2)  # [kvh, num_tokens, d]
        if x.shape[1] == 1:
            new = jax.lax.dynamic_update_slice_in_dim(pages.reshape(flat), x, slot_mapping[0], axis=1)
        else:
            new = pages.reshape(flat).at[:, slot_mapping].set(x, mode="drop")
        return new.reshape(pages.shape)

    return put(k_pages, k), put(v_pages, v)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _kernel(tile_seq_ref, tile_q0_ref, tile_nq_ref, tile_pos0_ref, seq_lens_ref, block_tables_ref,  # int32
            q_ref, k_ref, v_ref,  # q: [tokens, heads, head_dim]; k, v: [num_pages, page_size, head_dim] (one kv head)
            *refs, group: int, group_pad: int, tile_tokens: int, pages_per_block: int, num_splits: int,
            scale: float, sliding_window: int | None, soft_cap: float | None, precision, gather_pages: bool,
            quantized: bool):
    # int8 pages: ks_ref, vs_ref [num_pages, page_size] float32 (one kv head) come before the outputs.
    (ks_ref, vs_ref), out_refs = (refs[:2], refs[2:]) if quantized else ((None, None), refs)
    tile, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page_size, head_dim = k_ref.shape[1], k_ref.shape[2]
    block_k = pages_per_block * page_size
    rows = tile_tokens * group_pad

    seq = tile_seq_ref[tile]
    q0, nq, pos0 = tile_q0_ref[tile], tile_nq_ref[tile], tile_pos0_ref[tile]
    kv_len = seq_lens_ref[seq]

    # Row r is token q0 + r // group_pad, query head head * group + r % group_pad.
    q_block = q_ref.at[pl.ds(q0, tile_tokens), pl.ds(head * group, group_pad), :]
    q = plgpu.load(q_block, mask=_io_mask(nq, group, (tile_tokens, group_pad, head_dim)), other=0.0)
    q = q.reshape(rows, head_dim)
    q_pos = pos0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group_pad  # [rows, 1]

    # The KV range any row of this tile can see, in blocks, and this split's share of it.
    first, last = visible_blocks(kv_len, pos0, nq, block_k, sliding_window)
    per_split = (last - first + num_splits - 1) // num_splits
    start = first + split * per_split
    stop = jnp.minimum(last, start + per_split)

    def dot(a, b, contract_b: int):
        return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)

    scores = functools.partial(masked_scores, q_pos=q_pos, kv_len=kv_len, scale=scale, soft_cap=soft_cap,
                               sliding_window=sliding_window)

    last_block = block_tables_ref.shape[1] // pages_per_block - 1

    def table_block(b):
        """The page indices [pages_per_block] of block b (clamped: prefetching past the end is harmless)."""
        return block_tables_ref[seq, pl.ds(jnp.minimum(b, last_block) * pages_per_block, pages_per_block)]

    def load_pages(pages):
        """K and V of a block, one contiguous [page_size, head_dim] load per page, all issued at once (int8:
        with the page's [1, page_size] scales)."""
        lane = jax.lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
        idx = [jnp.sum(jnp.where(lane == i, pages, 0)) for i in range(pages_per_block)]
        if not quantized:
            return [k_ref[p] for p in idx], [v_ref[p] for p in idx]
        return ([(k_ref[p], ks_ref[pl.ds(p, 1), :]) for p in idx],
                [(v_ref[p], vs_ref[pl.ds(p, 1), :]) for p in idx])

    def raw_scores(k):  # q . k [rows, width]; int8 keys as exact integers, times each key's scale
        if not quantized:
            return dot(q, k, 1)
        return dot(q, k[0].astype(q.dtype), 1) * k[1]

    def dot_pv(p, v):  # p [rows, width] float32 . v; int8 values: p times each value's scale first
        if not quantized:
            return dot(p.astype(v.dtype), v, 0)
        return dot((p * v[1]).astype(q.dtype), v[0].astype(q.dtype), 0)

    def update(b, acc, m, l, ks, vs):
        """Online-softmax step over block b, given as per-page lists (or one gathered block)."""
        width = block_k if gather_pages else page_size
        s = [scores(raw_scores(k), b * block_k + i * width) for i, k in enumerate(ks)]
        return online_softmax_update(acc, m, l, s, vs, dot_pv)

    init = softmax_init(rows, head_dim)
    if gather_pages:  # one gather of the block's pages: k, v [block_k, head_dim]
        def body(b, carry):
            pages = table_block(b)
            k, v = (ref[pages].reshape(block_k, head_dim) for ref in (k_ref, v_ref))
            if quantized:
                k, v = (k, ks_ref[pages].reshape(1, block_k)), (v, vs_ref[pages].reshape(1, block_k))
            return update(b, *carry, [k], [v])
        acc, m, l = jax.lax.fori_loop(start, stop, body, init)
    else:  # the next block's page indices load while this block's K/V load and compute
        def body(b, carry):
            acc, m, l, pages = carry
            nxt = table_block(b + 1)
            return (*update(b, acc, m, l, *load_pages(pages)), nxt)
        acc, m, l, _ = jax.lax.fori_loop(start, stop, body, (*init, table_block(start)))

    if num_splits == 1:
        (o_ref,) = out_refs
        _store_rows(o_ref, normalize(acc, l), q0, nq, head, group, group_pad, tile_tokens)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("max_query_len", "scale", "sliding_window", "soft_cap", "block_q",
                                             "pages_per_block", "num_splits", "num_warps", "num_stages",
                                             "gather_pages", "interpret"))
def ragged_paged_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array, seq_lens: jax.Array,
    query_start_loc: jax.Array, *, max_query_len: int, scale: float, sliding_window: int | None = None,
    soft_cap: float | None = None, block_q: int | None = None, pages_per_block: int | None = None,
    num_splits: int | None = None, num_warps: int | None = None, num_stages: int = 2,
    gather_pages: bool | None = None, interpret: bool = False, k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> jax.Array:
    """Same contract as reference.ragged_paged_attention, pages in this backend's layout.

    q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]; rows of padding tokens
    (past query_start_loc[-1]) are left unspecified. Tuning knobs default from the shapes (`choose_params`).
    int8 pages come with k_scale, v_scale [num_kv_heads, num_pages, page_size] float32.
    """
    num_tokens, num_heads, head_dim = q.shape
    kvh, _, page_size, _ = k_pages.shape
    group = num_heads // kvh
    p = choose_params(num_tokens, *block_tables.shape, kvh, group, max_query_len, page_size)
    block_q = block_q or p["block_q"]
    ppb = pages_per_block or p["pages_per_block"]
    splits = num_splits or p["num_splits"]
    gather_pages = p["gather_pages"] if gather_pages is None else gather_pages
    group_pad = _pow2(group)
    tile_tokens = max(block_q, 16 // group_pad)  # >= 16 rows for the tensor cores

    decode_only = max_query_len == 1 and block_q == 1
    seq, q0, nq, pos0, num_tiles = ragged_tiles(query_start_loc, seq_lens, num_tokens, block_q, decode_only)
    if block_tables.shape[1] % ppb:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, ppb - block_tables.shape[1] % ppb)))
    q_in = q
    if interpret:  # the interpreter clamps out-of-range blocks instead of masking them: give it slack
        q_in = jnp.pad(q, ((0, tile_tokens), (0, group_pad - group), (0, 0)))

    kernel = functools.partial(
        _kernel, group=group, group_pad=group_pad, tile_tokens=tile_tokens, pages_per_block=ppb,
        num_splits=splits, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, gather_pages=gather_pages,
        precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None, quantized=k_scale is not None)
    whole = pl.BlockSpec()  # the whole array; the program indexes it
    page_spec = pl.BlockSpec((None, *k_pages.shape[1:]), lambda t, h, s: (h, 0, 0, 0))
    scales = [] if k_scale is None else [k_scale, v_scale]
    scale_spec = pl.BlockSpec((None, *k_pages.shape[1:3]), lambda t, h, s: (h, 0, 0))
    rows = tile_tokens * group_pad
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q_in.shape, q.dtype)]
        out_specs = [whole]
    else:
        part = (splits, kvh, num_tiles, rows)
        out_shape = [jax.ShapeDtypeStruct((*part, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((*part, 1), jnp.float32), jax.ShapeDtypeStruct((*part, 1), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, rows, n), lambda t, h, s: (s, h, t, 0, 0))
                     for n in (head_dim, 1, 1)]
    outs = pl.pallas_call(
        kernel,
        grid=(num_tiles, kvh, splits),
        in_specs=[whole] * 7 + [page_spec, page_spec] + [scale_spec] * len(scales),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or p["num_warps"], num_stages=num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_bq{block_q}_ppb{ppb}_s{splits}",
    )(seq, q0, nq, pos0, seq_lens, block_tables, q_in, k_pages, v_pages, *scales)
    if splits > 1:
        return _combine(*outs, q0, nq, group, group_pad, tile_tokens, num_tokens).astype(q.dtype)
    return outs[0][:num_tokens, :num_heads]


def _store_rows(o_ref, rows_val, q0, nq, head, group: int, group_pad: int, tile_tokens: int) -> None:
    """Store a tile's [tile_tokens * group_pad, head_dim] rows at tokens q0.. and this kv head's query heads."""
    shape = (tile_tokens, group_pad, rows_val.shape[-1])
    plgpu.store(o_ref.at[pl.ds(q0, tile_tokens), pl.ds(head * group, group_pad), :],
                rows_val.reshape(shape).astype(o_ref.dtype), mask=_io_mask(nq, group, shape))


def _io_mask(nq, group: int, shape: tuple[int, int, int]) -> jax.Array:
    """[tile_tokens, group_pad, head_dim]: the tile's real tokens and the kv head's real query heads."""
    return (jax.lax.broadcasted_iota(jnp.int32, shape, 0) < nq) & (jax.lax.broadcasted_iota(jnp.int32, shape, 1)
                                                                   < group)


def _combine(o, m, l, q0, nq, group: int, group_pad: int, tile_tokens: int, num_tokens: int) -> jax.Array:
    """Flash-decoding's second pass: merge split partials [splits, kvh, tiles, rows, *] into the output
    [num_tokens, num_heads, head_dim]. In XLA: it measured faster than a Pallas pass, whose few programs
    (one per tile and kv head) walk the splits serially."""
    def over_splits(op, a):  # unrolled (the split count is static): elementwise, so XLA fuses the whole merge
        return functools.reduce(op, [a[s] for s in range(a.shape[0])])  # into the scatter, one kernel

    w = jnp.exp(m - over_splits(jnp.maximum, m))
    out = over_splits(jnp.add, w * o) / jnp.maximum(over_splits(jnp.add, w * l), 1e-30)  # [kvh, tiles, rows, d]
    kvh, num_tiles, _, d = out.shape
    out = out.reshape(kvh, num_tiles, tile_tokens, group_pad, d)[:, :, :, :group]
    out = out.transpose(1, 2, 0, 3, 4).reshape(num_tiles * tile_tokens, kvh * group, d)
    r = jnp.arange(tile_tokens)
    dest = jnp.where(r[None, :] < nq[:, None], q0[:, None] + r[None, :], num_tokens).reshape(-1)
    return jnp.zeros((num_tokens, kvh * group, d), out.dtype).at[dest].set(out, mode="drop")


def choose_params(num_tokens: int, num_seqs: int, pages_per_seq: int, num_kv_heads: int, group: int,
                  max_query_len: int, page_size: int, num_cores: int = 132) -> dict:
    """Defaults from the static shapes, set by the H100 sweep (benchmarks/RESULTS.md): decode-only batches
    (max_query_len 1) take one token per tile, per-page loads, and KV splits for ~2 programs per SM but at
    least 4 blocks per split; prefills take 16-token tiles (64 rows at GQA 4) and a gather per block of
    pages. Blocks of 64 tokens, 4 warps."""
    decode = max_query_len == 1
    block_q = 1 if decode else max(1, min(64 // _pow2(group), _pow2(max_query_len)))
    pages_per_block = max(1, min(64 // page_size, _pow2(pages_per_seq)))
    blocks = -(-pages_per_seq // pages_per_block)
    want = -(-2 * num_cores // (num_seqs * num_kv_heads))
    splits = max(1, min(want, blocks // 4)) if decode else 1
    return {"block_q": block_q, "pages_per_block": pages_per_block, "num_splits": splits, "num_warps": 4,
            "gather_pages": not decode}
