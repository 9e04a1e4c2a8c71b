"""The C++ decode-attention kernel (CPU decode steps) against the per-token numpy oracle, writing into a NaN-filled
output (an element it skips stays NaN): lengths of one key, page multiples, long contexts split across threads,
GQA groups, sliding windows and soft caps, a padding sequence and padding tokens (zeros), wide block tables.
int8 pages: tests/test_kv_int8.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import cpu
from tests.attention_cases import TOL, make_case, naive_attention


@pytest.mark.parametrize("group,head_dim,page_size,window,soft_cap,kv_lens", [
    (1, 64, 8, None, None, [1, 16, 150]),
    (3, 64, 16, None, None, [500]),          # SmolLM2's shape: one long sequence, its keys split across threads
    (4, 128, 16, None, 30.0, [1, 32, 150]),
    (8, 64, 16, 13, None, [1, 40, 333]),
    (2, 32, 8, 5, 20.0, [3, 9, 64]),
])
def test_matches_naive(group, head_dim, page_size, window, soft_cap, kv_lens):
    if not cpu.available():
        pytest.fail("the CPU attention kernel did not build: see the logged compiler error")
    rng = np.random.default_rng([group, head_dim, page_size, len(kv_lens)])
    case = make_case(rng, q_lens=[1] * len(kv_lens), kv_lens=kv_lens, page_size=page_size, num_kv_heads=2,
                     group=group, head_dim=head_dim, spare_pages=5)
    tables = np.pad(case.block_tables, ((0, 0), (0, 7)))  # wider than any sequence needs
    scale = head_dim ** -0.5
    out = cpu.ragged_paged_attention(jnp.asarray(case.q), jnp.asarray(case.k_pages), jnp.asarray(case.v_pages), tables,
                                     case.seq_lens, case.query_start_loc, max_query_len=1, scale=scale,
                                     sliding_window=window, soft_cap=soft_cap,
                                     out=jnp.full(case.q.shape, jnp.nan, jnp.float32))
    out = np.asarray(out)
    ref = naive_attention(case, scale, window, soft_cap)
    np.testing.assert_allclose(out[:case.num_tokens], ref, rtol=TOL[np.float32], atol=TOL[np.float32])
    assert not out[case.num_tokens:].any()  # padding tokens: zeros, not NaN


def test_takes_decode_steps_of_float32_only():
    q, pages = jnp.zeros((4, 8, 64), jnp.float32), jnp.zeros((6, 16, 2, 64), jnp.float32)
    assert cpu.supported(q, pages, 1, quantized=False)
    assert cpu.supported(q, pages.astype(jnp.int8), 1, quantized=True)  # int8 pages: tests/test_kv_int8.py
    assert not cpu.supported(q, pages, 2, quantized=False)
    assert not cpu.supported(q, pages, 1, quantized=True)
    assert not cpu.supported(q.astype(jnp.bfloat16), pages.astype(jnp.bfloat16), 1, quantized=False)
    assert not cpu.supported(jnp.zeros((4, 8, 72), jnp.float32), jnp.zeros((6, 16, 2, 72), jnp.float32), 1, False)
    with pytest.raises(ValueError, match="max_query_len == 1"):
        cpu.ragged_paged_attention(q, pages, pages, jnp.zeros((2, 3), jnp.int32), jnp.ones(2, jnp.int32),
                                   jnp.arange(3, dtype=jnp.int32), max_query_len=4, scale=1.0)
