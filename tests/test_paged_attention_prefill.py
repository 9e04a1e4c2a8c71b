"""The fresh-prefill route (pallas_kernels/paged_attention/prefill.py): on GPU a mixed step sends whole prompts
to cuDNN and the rest to the paged kernel, then merges per token. cuDNN does not run on CPU, so here its jnp
oracle stands in for it while the paged kernel runs in interpret mode (which poisons unwritten outputs with
NaN); the merged result must equal the reference on every real token. benchmarks/attention_h100.py checks the
cuDNN call itself against the same reference on the H100.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import gpu, prefill
from tests.attention_cases import TOL, make_case, run_kernel_and_reference


def step_kv(case) -> tuple[np.ndarray, np.ndarray]:
    """This step's k, v [num_tokens, num_kv_heads, head_dim]: what the step wrote to its query positions."""
    page_size = case.k_pages.shape[1]
    ks, vs = [], []
    for s, (n, kv_len) in enumerate(zip(case.q_lens, case.kv_lens)):
        for pos in range(kv_len - n, kv_len):
            page, off = case.tables[s][pos // page_size], pos % page_size
            ks.append(case.k_pages[page, off])
            vs.append(case.v_pages[page, off])
    pad = case.q.shape[0] - len(ks)
    return (np.concatenate([np.stack(x), np.zeros((pad, *x[0].shape), x[0].dtype)]) for x in (ks, vs))


def test_fresh_sequences():
    qsl = jnp.asarray([0, 5, 6, 9, 9], jnp.int32)  # a prompt, a decode, a later chunk, a padding sequence
    seq_lens = jnp.asarray([5, 12, 20, 0], jnp.int32)
    assert prefill.fresh_sequences(qsl, seq_lens).tolist() == [True, False, False, False]
    assert prefill.token_sequences(qsl, 11).tolist() == [0] * 5 + [1] + [2] * 3 + [3, 3]


@pytest.mark.parametrize("window,dtype,max_fresh", [(None, np.float32, None), (6, np.float32, 4),
                                                     (None, jnp.bfloat16, 4), (None, np.float32, 1)])
def test_route_equals_reference(window, dtype, max_fresh):
    """Two whole prompts (one an exact page multiple), a one-token prompt, decodes and a chunked prefill; with
    max_fresh 1 only the first prompt takes the dense path and the others stay with the kernel."""
    rng = np.random.default_rng(11)
    q_lens = [13, 1, 16, 1, 9, 1]
    kv_lens = [13, 30, 16, 1, 40, 17]
    case = make_case(rng, q_lens=q_lens, kv_lens=kv_lens, page_size=8, num_kv_heads=2, group=4, head_dim=64,
                     dtype=dtype)
    k, v = step_kv(case)
    scale = case.q.shape[-1] ** -0.5

    def routed(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, **kw):
        paged = lambda lens: gpu.ragged_paged_attention(q, k_pages, v_pages, block_tables, lens, query_start_loc,
                                                        interpret=True, **kw)
        return prefill.route_fresh_prefills(paged, prefill.packed_causal_attention, q, jnp.asarray(k),
                                            jnp.asarray(v), query_start_loc, seq_lens, scale=scale,
                                            sliding_window=window, max_fresh=max_fresh)

    out, ref = run_kernel_and_reference(routed, case, window=window)
    out = out[:case.num_tokens]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_packed_oracle_ignores_other_sequences():
    """The oracle attends within a fresh sequence only: changing another sequence's k, v changes nothing."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((10, 4, 16)), jnp.float32)
    k, v = (rng.standard_normal((10, 2, 16)).astype(np.float32) for _ in range(2))
    qsl = jnp.asarray([0, 4, 10], jnp.int32)
    fresh = jnp.asarray([True, True])
    f = functools.partial(prefill.packed_causal_attention, scale=0.25)
    a = f(q, jnp.asarray(k), jnp.asarray(v), qsl, fresh)
    k[4:] += 5.0
    b = f(q, jnp.asarray(k), jnp.asarray(v), qsl, fresh)
    np.testing.assert_array_equal(np.asarray(a[:4]), np.asarray(b[:4]))
    assert not np.allclose(np.asarray(a[4:]), np.asarray(b[4:]))


def test_route_is_gpu_only():
    """CPU backends, float32 models and soft-capped models keep the paged kernel for every sequence."""
    assert prefill.fresh_prefill_impl("pallas-interpret", jnp.bfloat16, 128, None) is None
    assert prefill.fresh_prefill_impl("xla", jnp.bfloat16, 128, None) is None
    assert prefill.fresh_prefill_impl("pallas-gpu", jnp.float32, 128, None) is None
    assert prefill.fresh_prefill_impl("pallas-gpu", jnp.bfloat16, 128, 50.0) is None

