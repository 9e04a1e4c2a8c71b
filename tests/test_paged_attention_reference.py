"""The jnp paged attention (the oracle for the Pallas kernels) against a plain per-token numpy loop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention.reference import ragged_paged_attention, write_kv


def naive(q, k_seqs, v_seqs, q_lens, kv_lens, scale, window, soft_cap):
    """q: [T, H, D]; k_seqs[s]: [kv_len, KVH, D] contiguous. One token, one head at a time."""
    out = np.zeros_like(q)
    group = q.shape[1] // k_seqs[0].shape[1]
    t = 0
    for s, (n, kv_len) in enumerate(zip(q_lens, kv_lens)):
        for r in range(n):
            pos = kv_len - n + r
            lo = 0 if window is None else max(0, pos - window + 1)
            for h in range(q.shape[1]):
                k, v = k_seqs[s][lo:pos + 1, h // group], v_seqs[s][lo:pos + 1, h // group]
                scores = k @ q[t + r, h] * scale
                if soft_cap is not None:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                p = np.exp(scores - scores.max())
                out[t + r, h] = (p / p.sum()) @ v
        t += n
    return out


@pytest.mark.parametrize("group,head_dim,page_size,window,soft_cap", [
    (1, 64, 8, None, None), (4, 128, 16, None, 30.0), (8, 64, 16, 13, None), (4, 64, 8, 5, 20.0)])
def test_ragged_batch_matches_naive(group, head_dim, page_size, window, soft_cap):
    rng = np.random.default_rng(group * 100 + head_dim + page_size)
    num_kv_heads, num_pages = 2, 64
    # decode at length 1, decode at an exact page multiple, a whole prefill, a chunked prefill over cached pages
    kv_lens = [1, 2 * page_size, 3 * page_size + 5, 2 * page_size + 3]
    q_lens = [1, 1, 3 * page_size + 5, 7]
    pages = rng.permutation(num_pages)
    tables, used = [], 0
    for n in kv_lens:
        k = -(-n // page_size)
        tables.append(pages[used:used + k])
        used += k
    width = max(len(t) for t in tables) + 2
    block_tables = np.zeros((len(kv_lens) + 1, width), np.int32)  # + one padding sequence
    for s, t in enumerate(tables):
        block_tables[s, :len(t)] = t
    k_pages = rng.standard_normal((num_pages, page_size, num_kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, num_kv_heads, head_dim)).astype(np.float32)
    num_tokens = sum(q_lens)
    q = rng.standard_normal((num_tokens + 5, num_kv_heads * group, head_dim)).astype(np.float32)  # + 5 padding
    cu = np.concatenate([[0], np.cumsum(q_lens), [num_tokens]]).astype(np.int32)
    seq_lens = np.asarray(kv_lens + [0], np.int32)
    scale = head_dim ** -0.5

    out = np.asarray(ragged_paged_attention(q, k_pages, v_pages, block_tables, seq_lens, cu,
                                            max_query_len=64, scale=scale, sliding_window=window, soft_cap=soft_cap))
    k_seqs = [k_pages[t].reshape(-1, num_kv_heads, head_dim) for t in tables]
    v_seqs = [v_pages[t].reshape(-1, num_kv_heads, head_dim) for t in tables]
    ref = naive(q[:num_tokens], k_seqs, v_seqs, q_lens, kv_lens, scale, window, soft_cap)
    np.testing.assert_allclose(out[:num_tokens], ref, rtol=2e-5, atol=2e-5)
    assert not out[num_tokens:].any()  # padding tokens


def test_write_kv_scatters_and_drops_padding():
    rng = np.random.default_rng(0)
    k_pages = rng.standard_normal((4, 8, 2, 16)).astype(np.float32)
    v_pages = rng.standard_normal((4, 8, 2, 16)).astype(np.float32)
    k = rng.standard_normal((5, 2, 16)).astype(np.float32)
    v = rng.standard_normal((5, 2, 16)).astype(np.float32)
    slots = np.array([3 * 8 + 7, 0, 1 * 8 + 2, 32, 32], np.int32)  # the last two are padding (>= 4 * 8)
    new_k, new_v = (np.asarray(a) for a in write_kv(jnp.asarray(k_pages), jnp.asarray(v_pages), k, v, slots))
    expect_k, expect_v = k_pages.copy(), v_pages.copy()
    for i, s in enumerate(slots[:3]):
        expect_k[s // 8, s % 8], expect_v[s // 8, s % 8] = k[i], v[i]
    np.testing.assert_array_equal(new_k, expect_k)
    np.testing.assert_array_equal(new_v, expect_v)
