"""Ragged paged attention on TPU (Pallas / Mosaic TPU): the same contract as the reference and the GPU kernel.

Layout: the GPU backend's, k_pages, v_pages: [num_kv_heads, num_pages, page_size, head_dim] (gpu.to_layout,
gpu.write_kv), so one (head, page) is one contiguous DMA.

Work decomposition. As on GPU, query tokens are cut into tiles of at most `block_q` tokens of one sequence
and a program takes (tile, kv head), with the kv head's query heads stacked as rows. The queries are first
gathered in XLA into tile-major blocks [num_tiles, num_heads, block_q, head_dim] so that BlockSpecs (which
need block-aligned offsets) can stream them; outputs come back the same way and are scattered to tokens.
Block tables, lengths and tile metadata are scalar-prefetched into SMEM; each block of `pages_per_block`
pages is copied HBM -> VMEM with async copies, double-buffered: block b + 1 is in flight while block b is
computed. No split-K (flash-decoding) here: a TensorCore runs grid steps one after another, so splitting a
sequence's KV range adds no parallelism on one-core chips (v5e, v6e); on two-core chips (v4, v5p) the cores
share the (tile, head) grid through its "parallel" dimensions. Not yet measured on a TPU (none has been available): tested in TPU interpret mode and by
lowering for TPU on a CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention.common import (masked_scores, normalize, online_softmax_update, ragged_tiles,
                                                   softmax_init, visible_blocks)


def _kernel(tile_seq_ref, tile_nq_ref, tile_pos0_ref, seq_lens_ref, block_tables_ref,  # SMEM (scalar prefetch)
            q_ref,  # VMEM [group, block_q, head_dim]
            k_hbm, v_hbm,  # HBM [num_kv_heads, num_pages, page_size, head_dim]
            *refs, pages_per_block: int, scale: float, sliding_window: int | None, soft_cap: float | None,
            quantized: bool):
    # int8 pages add, after v_hbm: ks_hbm, vs_hbm [num_kv_heads, num_pages, page_size] (HBM) and, after the
    # K/V buffers, ks_buf, vs_buf [2, 1, block_k] (a block's scales as one row of lanes).
    if quantized:
        ks_hbm, vs_hbm, o_ref, k_buf, v_buf, ks_buf, vs_buf, sems = refs
    else:
        (o_ref, k_buf, v_buf, sems), ks_hbm = refs, None  # o_ref VMEM [group, block_q, head_dim]; K/V buffers
        # [2, pages_per_block, page_size, head_dim] x 2; DMA semaphores [2, 2 or 4]
    tile, head = pl.program_id(0), pl.program_id(1)
    group, block_q, head_dim = q_ref.shape
    page_size = k_buf.shape[2]
    block_k = pages_per_block * page_size
    rows = group * block_q
    seq, nq, pos0 = tile_seq_ref[tile], tile_nq_ref[tile], tile_pos0_ref[tile]
    kv_len = seq_lens_ref[seq]
    last_block = block_tables_ref.shape[1] // pages_per_block - 1

    start, stop = visible_blocks(kv_len, pos0, nq, block_k, sliding_window)

    def copies(b, slot):
        """The async copies of block b's pages (K and V) into buffer `slot`."""
        b = jnp.minimum(b, last_block)
        out = []
        for i in range(pages_per_block):
            page = block_tables_ref[seq, b * pages_per_block + i]
            out.append(pltpu.make_async_copy(k_hbm.at[head, page], k_buf.at[slot, i], sems.at[slot, 0]))
            out.append(pltpu.make_async_copy(v_hbm.at[head, page], v_buf.at[slot, i], sems.at[slot, 1]))
            if quantized:
                lanes = pl.ds(i * page_size, page_size)
                for j, (src, dst) in enumerate(((ks_hbm, ks_buf), (vs_hbm, vs_buf))):
                    out.append(pltpu.make_async_copy(src.at[head, page], dst.at[slot, 0, lanes], sems.at[slot, 2 + j]))
        return out

    q = q_ref[...].reshape(rows, head_dim)
    q_pos = pos0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) % block_q  # row r: token r % block_q

    @pl.when(start < stop)
    def _():
        for c in copies(start, 0):
            c.start()

    def body(b, carry):
        acc, m, l = carry
        slot = (b - start) % 2

        @pl.when(b + 1 < stop)
        def _():
            for c in copies(b + 1, 1 - slot):
                c.start()

        for c in copies(b, slot):
            c.wait()
        k = k_buf[slot].reshape(block_k, head_dim)
        v = v_buf[slot].reshape(block_k, head_dim)
        if quantized:  # int8 as exact integers in q's dtype; each key's scale on its score column
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if quantized:
            s = s * ks_buf[slot]
        s = masked_scores(s, b * block_k, q_pos, kv_len, scale=scale, soft_cap=soft_cap,
                          sliding_window=sliding_window)

        def dot_pv(p, v_):  # int8 values: each value's scale on its probability column first
            if quantized:
                p = p * vs_buf[slot]
            return jax.lax.dot_general(p.astype(v_.dtype), v_, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

        return online_softmax_update(acc, m, l, [s], [v], dot_pv)

    acc, _, l = jax.lax.fori_loop(start, stop, body, softmax_init(rows, head_dim))
    o_ref[...] = normalize(acc, l).reshape(group, block_q, head_dim).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("max_query_len", "scale", "sliding_window", "soft_cap", "block_q",
                                             "pages_per_block", "interpret"))
def ragged_paged_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array, seq_lens: jax.Array,
    query_start_loc: jax.Array, *, max_query_len: int, scale: float, sliding_window: int | None = None,
    soft_cap: float | None = None, block_q: int | None = None, pages_per_block: int | None = None,
    interpret: bool = False, k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
) -> jax.Array:
    """Same contract as reference.ragged_paged_attention, pages in [num_kv_heads, num_pages, page_size, head_dim]
    (int8 pages with k_scale, v_scale [num_kv_heads, num_pages, page_size] float32).

    q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim] (padding tokens: zeros).
    `interpret=True` runs Pallas' TPU interpreter (DMAs and semaphores simulated) on any backend.
    """
    num_tokens, num_heads, head_dim = q.shape
    kvh, _, page_size, _ = k_pages.shape
    group = num_heads // kvh
    if block_q is None:  # a sublane multiple, or the whole single token of a decode
        block_q = 1 if max_query_len == 1 else max(8, min(128 // group, 1 << (max_query_len - 1).bit_length()))
    ppb = pages_per_block or max(1, min(128 // page_size, block_tables.shape[1]))
    decode_only = max_query_len == 1 and block_q == 1
    seq, q0, nq, pos0, num_tiles = ragged_tiles(query_start_loc, seq_lens, num_tokens, block_q, decode_only)
    if block_tables.shape[1] % ppb:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, ppb - block_tables.shape[1] % ppb)))

    # Tile-major queries [num_tiles, num_heads, block_q, head_dim]: row i of tile t is token q0[t] + i.
    tok = q0[:, None] + jnp.arange(block_q)[None, :]  # [num_tiles, block_q]
    valid = jnp.arange(block_q)[None, :] < nq[:, None]
    q_tiles = jnp.where(valid[..., None, None], q[jnp.clip(tok, 0, num_tokens - 1)], 0).transpose(0, 2, 1, 3)

    quantized = k_scale is not None
    kernel = functools.partial(_kernel, pages_per_block=ppb, scale=scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, quantized=quantized)
    tile_spec = pl.BlockSpec((None, group, block_q, head_dim), lambda t, h, *_: (t, h, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    scales = [k_scale, v_scale] if quantized else []
    scale_bufs = [pltpu.VMEM((2, 1, ppb * page_size), jnp.float32)] * 2 if quantized else []
    out_tiles = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(num_tiles, kvh),
            in_specs=[tile_spec, hbm, hbm] + [hbm] * len(scales),
            out_specs=tile_spec,
            scratch_shapes=[pltpu.VMEM((2, ppb, page_size, head_dim), k_pages.dtype),
                            pltpu.VMEM((2, ppb, page_size, head_dim), v_pages.dtype), *scale_bufs,
                            pltpu.SemaphoreType.DMA((2, 4 if quantized else 2))]),
        out_shape=jax.ShapeDtypeStruct(q_tiles.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=f"ragged_paged_attention_tpu_bq{block_q}_ppb{ppb}",
    )(seq, nq, pos0, seq_lens, block_tables, q_tiles, k_pages, v_pages, *scales)

    dest = jnp.where(valid, tok, num_tokens).reshape(-1)
    out = out_tiles.transpose(0, 2, 1, 3).reshape(num_tiles * block_q, num_heads, head_dim)
    return jnp.zeros_like(q).at[dest].set(out, mode="drop")
