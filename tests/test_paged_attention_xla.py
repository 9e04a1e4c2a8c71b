"""The jnp ragged version (the CPU serving path) against the per-token numpy oracle, on wide static shapes.

The engine calls attention with the block table at its full width and `max_query_len` at the token bucket,
so the cases here pad both well past the real lengths: the result must not depend on them. The output is
poisoned (NaN in padding queries) to show padding rows are neither read into real rows nor left unwritten.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import xla
from tests.attention_cases import TOL, make_case, naive_attention


@pytest.mark.parametrize("group,head_dim,page_size,window,soft_cap,dtype", [
    (1, 64, 8, None, None, np.float32), (4, 128, 16, None, 30.0, np.float32), (8, 64, 16, 13, None, np.float32),
    (4, 64, 8, 5, 20.0, jnp.bfloat16), (3, 64, 16, None, None, np.float32)])
@pytest.mark.parametrize("decode_only", [False, True])
def test_matches_naive(group, head_dim, page_size, window, soft_cap, dtype, decode_only):
    rng = np.random.default_rng([group, head_dim, page_size, int(decode_only)])
    if decode_only:  # length 1, an exact page multiple, a long one
        q_lens, kv_lens = [1, 1, 1], [1, 2 * page_size, 150]
    else:  # + a whole prefill longer than a tile and a chunked prefill over cached pages
        q_lens = [1, 1, 3 * page_size + 5, 7]
        kv_lens = [1, 2 * page_size, 3 * page_size + 5, int(rng.integers(130, 170))]
    case = make_case(rng, q_lens=q_lens, kv_lens=kv_lens, page_size=page_size, num_kv_heads=2, group=group,
                     head_dim=head_dim, dtype=dtype, spare_pages=9)
    q = case.q.copy()
    q[case.num_tokens:] = np.nan  # padding queries
    tables = np.pad(case.block_tables, ((0, 0), (0, 7)))  # wider than any sequence needs
    max_q = 1 if decode_only else 256
    scale = head_dim ** -0.5
    out = np.asarray(xla.ragged_paged_attention(jnp.asarray(q), jnp.asarray(case.k_pages), jnp.asarray(case.v_pages),
                                                tables, case.seq_lens, case.query_start_loc, max_query_len=max_q,
                                                scale=scale, sliding_window=window, soft_cap=soft_cap,
                                                block_k=32), np.float32)
    ref = naive_attention(case, scale, window, soft_cap)
    np.testing.assert_allclose(out[:case.num_tokens], ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert not out[case.num_tokens:].any()
