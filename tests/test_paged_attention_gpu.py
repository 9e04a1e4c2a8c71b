"""The Pallas GPU ragged paged attention kernel, in interpret mode on CPU, against the jnp reference; and its
lowering to CUDA (Triton), which catches the backend's constraints that interpret mode lets through.

Interpret mode fills every kernel output with NaN before the run, so an element the kernel fails to write
fails the comparison (the poisoning the tests rely on). Tolerances: float32 (exact dots) 2e-5; bfloat16
inputs (f32 accumulation, bf16 probabilities into the PV dot, bf16 output) 3e-2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import gpu, reference
from tests.attention_cases import TOL, lowering_args, make_case, run_kernel_and_reference

H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)


def run_both(case, **kw):
    out, ref = run_kernel_and_reference(functools.partial(gpu.ragged_paged_attention, interpret=True), case, **kw)
    return out[:case.num_tokens], ref


@pytest.mark.parametrize("group,head_dim,page_size,window,soft_cap,dtype", [
    (1, 64, 8, None, None, np.float32),
    (4, 128, 16, None, 30.0, np.float32),
    (8, 64, 16, 13, None, np.float32),
    (4, 64, 8, 5, 20.0, jnp.bfloat16),
    (8, 128, 8, None, None, jnp.bfloat16),
    (3, 64, 16, None, None, np.float32),  # a group that is not a power of two (SmolLM2: 9 heads / 3)
])
@pytest.mark.parametrize("splits", [1, 3])
def test_mixed_batch(group, head_dim, page_size, window, soft_cap, dtype, splits):
    """Decodes (at length 1 and at an exact page multiple), a whole prefill and a chunked prefill, one call."""
    rng = np.random.default_rng([group, head_dim, page_size, splits])
    kv_lens = [1, 2 * page_size, int(rng.integers(20, 40)), int(rng.integers(2 * page_size, 3 * page_size)) + 7]
    q_lens = [1, 1, kv_lens[2], 7]
    case = make_case(rng, q_lens=q_lens, kv_lens=kv_lens, page_size=page_size, num_kv_heads=2, group=group,
                     head_dim=head_dim, dtype=dtype)
    out, ref = run_both(case, window=window, soft_cap=soft_cap, num_splits=splits)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("gather_pages", [True, False])
@pytest.mark.parametrize("block_q,pages_per_block", [(1, 1), (4, 2), (16, 4)])
def test_tiling_knobs(block_q, pages_per_block, gather_pages):
    """Tiles that split a prefill across programs, page blocks that overrun a sequence's pages, both ways of
    loading a block of pages."""
    rng = np.random.default_rng(block_q * 10 + pages_per_block)
    case = make_case(rng, q_lens=[9, 1, 23], kv_lens=[30, 17, 23], page_size=8, num_kv_heads=2, group=4,
                     head_dim=64)
    out, ref = run_both(case, window=11, block_q=block_q, pages_per_block=pages_per_block, num_splits=2,
                        gather_pages=gather_pages)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("splits", [None, 3])
def test_decode_batch_random_lengths(splits):
    """A decode-only batch (max_query_len 1): one token per tile; default knobs, and 3 KV splits."""
    rng = np.random.default_rng(7)
    kv_lens = [int(n) for n in rng.integers(1, 70, size=6)] + [16, 64]
    case = make_case(rng, q_lens=[1] * 8, kv_lens=kv_lens, page_size=16, num_kv_heads=2, group=4, head_dim=64)
    out, ref = run_both(case, num_splits=splits)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_default_knobs_follow_the_sweep():
    """Decode: per-page loads, one split when the batch fills the GPU, more for small batches, never fewer
    than 4 blocks a split; prefill: gathered blocks, one split."""
    big = gpu.choose_params(64, 64, 128, 8, 4, 1, 16)
    assert (big["num_splits"], big["gather_pages"], big["block_q"]) == (1, False, 1)
    assert gpu.choose_params(1, 1, 256, 8, 4, 1, 16)["num_splits"] == 16
    assert gpu.choose_params(8, 8, 512, 8, 4, 1, 16)["num_splits"] == 5
    assert gpu.choose_params(2048, 1, 128, 8, 4, 2048, 16) == {
        "block_q": 16, "pages_per_block": 4, "num_splits": 1, "num_warps": 4, "gather_pages": True}


@pytest.mark.parametrize("slots", [[31, 0, 17, 32], [13], [32]])
def test_write_kv_matches_reference_layout(slots):
    """Several tokens (a scatter) and one (a dynamic update slice), padding (slot 32) in the spare page 4."""
    rng = np.random.default_rng(3)
    k_pages = jnp.asarray(rng.standard_normal((5, 8, 2, 16)), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal((5, 8, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((len(slots), 2, 16)), jnp.float32) for _ in range(2))
    slots = jnp.asarray(slots, jnp.int32)
    ref_k, ref_v = reference.write_kv(k_pages, v_pages, k, v, slots)
    new_k, new_v = gpu.write_kv(gpu.to_layout(k_pages), gpu.to_layout(v_pages), k, v, slots)
    np.testing.assert_array_equal(np.asarray(new_k), np.asarray(gpu.to_layout(ref_k)))
    np.testing.assert_array_equal(np.asarray(new_v), np.asarray(gpu.to_layout(ref_v)))
    assert not np.array_equal(np.asarray(new_k), np.asarray(gpu.to_layout(k_pages)))  # something was written


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("max_query_len,splits,group,window,soft_cap,gather", [
    (1, None, 4, None, None, None), (1, 1, 8, 4096, None, False), (64, None, 4, None, 50.0, True),
    (64, None, 1, 512, None, False), (1, 3, 3, None, None, False)])
def test_lowers_to_cuda(dtype, max_query_len, splits, group, window, soft_cap, gather):
    """Cross-lower the Llama-3-8B-shaped call (8 kv heads, head_dim 128, page 16) to CUDA on this CPU."""
    args = lowering_args(max_query_len, group, dtype)
    f = functools.partial(gpu.ragged_paged_attention, max_query_len=max_query_len, scale=0.088,
                          sliding_window=window, soft_cap=soft_cap, num_splits=splits,
                          gather_pages=gather)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text
