"""Fresh prefills: sequences whose whole prompt is this step's query (nothing cached, no earlier chunk).

Their attention needs no KV pages: it is dense causal attention over the step's own k, v, one packed segment
per sequence. On the H100 cuDNN's flash attention ran a 2048-token prefill in 109 us against 196 us for our
ragged Pallas kernel (benchmarks/RESULTS.md), so on GPU a mixed step sends its fresh prefills to cuDNN
(packed "THD" layout, one call for all of them) and everything else (decodes, later chunks, prefix-cache
hits) to the paged kernel, whose programs for the fresh sequences see no keys and exit at once. The two
outputs are merged per token. No branch on the device: both calls run in every mixed step.

`packed_causal_attention` is the jnp oracle of the cuDNN call; `route_fresh_prefills` is the merge, tested
on CPU with the oracle in place of cuDNN.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention.reference import MASK_VALUE


# cuDNN's packed layout costs in proportion to its segment slots (measured: 64 slots made a step of 4 fresh
# prompts and 60 decodes slower than the kernel alone), so only the first few fresh prompts of a step take it.
MAX_CUDNN_SEGMENTS = 4


def fresh_sequences(query_start_loc: jax.Array, seq_lens: jax.Array) -> jax.Array:
    """[num_seqs] bool: the sequence's query is all of it (a whole prompt in one chunk); padding is not."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    return (q_lens == seq_lens) & (q_lens > 0)


def token_sequences(query_start_loc: jax.Array, num_tokens: int) -> jax.Array:
    """[num_tokens] the sequence each query token belongs to (padding tokens: the last sequence)."""
    num_seqs = query_start_loc.shape[0] - 1
    seq = jnp.searchsorted(query_start_loc, jnp.arange(num_tokens), side="right") - 1
    return jnp.clip(seq, 0, num_seqs - 1)


def packed_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, query_start_loc: jax.Array,
                            fresh: jax.Array, *, scale: float, sliding_window: int | None = None) -> jax.Array:
    """The oracle: each fresh sequence's tokens attend causally to its own tokens' k, v.

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]. Rows of tokens that are
    not in a fresh sequence are unspecified (the caller takes them from elsewhere).
    """
    num_tokens, num_heads, head_dim = q.shape
    kvh = k.shape[1]
    t = jnp.arange(num_tokens)
    seq = token_sequences(query_start_loc, num_tokens)
    inside = fresh[seq] & (t < query_start_loc[-1])
    mask = (seq[:, None] == seq[None, :]) & inside[:, None] & inside[None, :] & (t[None, :] <= t[:, None])
    if sliding_window is not None:
        mask &= t[None, :] > t[:, None] - sliding_window
    qg = q.astype(jnp.float32).reshape(num_tokens, kvh, num_heads // kvh, head_dim)
    s = jnp.einsum("tkgd,skd->kgts", qg, k.astype(jnp.float32)) * scale
    p = jax.nn.softmax(jnp.where(mask, s, MASK_VALUE), axis=-1)
    out = jnp.einsum("kgts,skd->tkgd", p, v.astype(jnp.float32))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def packed_causal_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, query_start_loc: jax.Array, fresh: jax.Array,
                        *, scale: float, sliding_window: int | None = None,
                        max_segments: int = MAX_CUDNN_SEGMENTS) -> jax.Array:
    """Same contract, through cuDNN's flash attention on the packed layout (Hopper or newer, fp16/bf16), for
    at most `max_segments` fresh sequences (at least 2 unless the step has one sequence: the packed layout).

    The fresh sequences become segments of one batch row: their lengths and start offsets come first, the
    rest is -1 (cuDNN's padding). A step without fresh sequences still gets one (ignored) segment.
    """
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    num_seqs = fresh.shape[0]
    segments = 1 if num_seqs == 1 else min(max(2, max_segments), num_seqs)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    order = jnp.argsort(~fresh, stable=True)[:segments]  # fresh sequences first, in batch order
    present = fresh[order]
    lens = jnp.where(present, q_lens[order], -1).astype(jnp.int32)
    starts = jnp.where(present, query_start_loc[:-1][order], -1).astype(jnp.int32)
    none = ~present[0]
    lens = lens.at[0].set(jnp.where(none, 1, lens[0]))
    starts = starts.at[0].set(jnp.where(none, 0, starts[0]))
    if segments == 1:  # one sequence: cuDNN's plain padded layout
        seg = dict(q_seqlen=lens, kv_seqlen=lens)
    else:
        offsets = jnp.concatenate([starts, jnp.full((1,), -1, jnp.int32)])[None]
        seg = dict(q_seqlen=lens[None], kv_seqlen=lens[None], q_offsets=offsets, kv_offsets=offsets)
    out = dot_product_attention(q[None], k.astype(q.dtype)[None], v.astype(q.dtype)[None], scale=scale,
                                mask_type=MaskType.PADDING_CAUSAL, sliding_window_length=sliding_window, **seg)
    return out[0]


@functools.cache
def cudnn_supported() -> bool:
    """cuDNN's packed flash attention is there: a CUDA device of compute capability >= 9.0 (Hopper)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa

        fa.check_cudnn_version()
        dev = jax.devices()[0]
        return dev.platform == "gpu" and float(getattr(dev, "compute_capability", "0")) >= 9.0
    except Exception:  # no cuDNN, a ROCm or older jax: the paged kernel serves fresh prefills too
        return False


def fresh_prefill_impl(backend: str, dtype, head_dim: int, soft_cap: float | None) -> Callable | None:
    """The implementation fresh prefills take on this backend, or None for "the paged kernel like the rest".

    cuDNN on the GPU kernel's backend when it applies (fp16/bf16, head_dim <= 256 and a multiple of 8, no
    logit soft cap, which cuDNN lacks); float32 models (the parity tests) keep the kernel.
    """
    if (backend == "pallas-gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and soft_cap is None
            and head_dim % 8 == 0 and head_dim <= 256 and cudnn_supported()):
        return packed_causal_cudnn
    return None


def route_fresh_prefills(paged: Callable[[jax.Array], jax.Array], fresh_attention: Callable, q: jax.Array,
                         k: jax.Array, v: jax.Array, query_start_loc: jax.Array, seq_lens: jax.Array, *,
                         scale: float, sliding_window: int | None, max_fresh: int | None = MAX_CUDNN_SEGMENTS
                         ) -> jax.Array:
    """Attention of a ragged step with its first `max_fresh` fresh prefills sent to `fresh_attention`.

    paged(seq_lens) runs the paged kernel; it gets seq_lens 0 for the fresh sequences, so their programs
    visit no keys. q: [num_tokens, num_heads, head_dim]; k, v: this step's [num_tokens, num_kv_heads, head_dim].
    """
    fresh = fresh_sequences(query_start_loc, seq_lens)
    if max_fresh is not None:
        fresh &= jnp.cumsum(fresh) <= max_fresh
    out_paged = paged(jnp.where(fresh, 0, seq_lens))
    out_fresh = fresh_attention(q, k, v, query_start_loc, fresh, scale=scale, sliding_window=sliding_window)
    take_fresh = fresh[token_sequences(query_start_loc, q.shape[0])]
    return jnp.where(take_fresh[:, None, None], out_fresh, out_paged)
