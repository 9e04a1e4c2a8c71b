"""The jnp paged attention (the oracle for the Pallas kernels) against a plain per-token numpy loop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention.reference import ragged_paged_attention, write_kv
from tests.attention_cases import make_case, naive_attention


@pytest.mark.parametrize("group,head_dim,page_size,window,soft_cap", [
    (1, 64, 8, None, None), (4, 128, 16, None, 30.0), (8, 64, 16, 13, None), (4, 64, 8, 5, 20.0)])
def test_ragged_batch_matches_naive(group, head_dim, page_size, window, soft_cap):
    rng = np.random.default_rng(group * 100 + head_dim + page_size)
    # decode at length 1, decode at an exact page multiple, a whole prefill, a chunked prefill over cached pages
    case = make_case(rng, q_lens=[1, 1, 3 * page_size + 5, 7], kv_lens=[1, 2 * page_size, 3 * page_size + 5,
                                                                       2 * page_size + 3],
                     page_size=page_size, num_kv_heads=2, group=group, head_dim=head_dim)
    scale = head_dim ** -0.5
    out = np.asarray(ragged_paged_attention(case.q, case.k_pages, case.v_pages, case.block_tables, case.seq_lens,
                                            case.query_start_loc, max_query_len=case.max_query_len, scale=scale,
                                            sliding_window=window, soft_cap=soft_cap))
    ref = naive_attention(case, scale, window, soft_cap)
    np.testing.assert_allclose(out[:case.num_tokens], ref, rtol=2e-5, atol=2e-5)
    assert not out[case.num_tokens:].any()  # padding tokens


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
