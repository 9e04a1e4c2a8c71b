"""The Pallas TPU ragged paged attention kernel under Pallas' TPU interpreter (DMAs, semaphores and VMEM
simulated; fresh buffers filled with NaN; the race detector on) against the jnp reference, and its lowering
for TPU on this CPU. Tolerances: float32 2e-5; bfloat16 3e-2. Shapes are small: the interpreter costs a few
ms per grid step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention import tpu
from tests.attention_cases import TOL, lowering_args, make_case, run_kernel_and_reference

TPU_V6E = jax.sharding.AbstractDevice(device_kind="TPU v6 lite", num_cores=1, platform="tpu")


def run_both(case, **kw):
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(detect_races=True)):
        out, ref = run_kernel_and_reference(tpu.ragged_paged_attention, case, **kw)
        assert not tpu_interpreter.races.races_found
    assert not out[case.num_tokens:].any()  # padding tokens
    return out[:case.num_tokens], ref


@pytest.mark.parametrize("group,head_dim,page_size,window,soft_cap,dtype", [
    (1, 128, 8, None, None, np.float32),
    (4, 128, 16, 13, 30.0, np.float32),
    (8, 64, 8, None, None, jnp.bfloat16),
    (3, 128, 8, 5, None, np.float32),
])
def test_mixed_batch(group, head_dim, page_size, window, soft_cap, dtype):
    """Decodes (length 1 and an exact page multiple), a whole prefill and a chunked prefill in one call."""
    rng = np.random.default_rng([group, head_dim, page_size])
    kv_lens = [1, 2 * page_size, int(rng.integers(12, 24)), 2 * page_size + 5]
    case = make_case(rng, q_lens=[1, 1, kv_lens[2], 6], kv_lens=kv_lens, page_size=page_size, num_kv_heads=2,
                     group=group, head_dim=head_dim, dtype=dtype)
    out, ref = run_both(case, window=window, soft_cap=soft_cap, pages_per_block=2)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_decode_batch_double_buffers_many_blocks():
    """Decode-only, one page per block, so each program walks (and double-buffers) many blocks."""
    rng = np.random.default_rng(11)
    case = make_case(rng, q_lens=[1] * 4, kv_lens=[37, 1, 8, 29], page_size=4, num_kv_heads=1, group=4,
                     head_dim=128)
    out, ref = run_both(case, pages_per_block=1)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("max_query_len,group,window,soft_cap", [
    (1, 4, None, None), (64, 4, 512, 50.0), (64, 1, None, None), (1, 3, 4096, None)])
def test_lowers_to_tpu(dtype, max_query_len, group, window, soft_cap):
    """Lower the Llama-3-8B-shaped call (8 kv heads, head_dim 128, page 16) for a TPU v6e on this CPU."""
    args = lowering_args(max_query_len, group, dtype)
    f = functools.partial(tpu.ragged_paged_attention, max_query_len=max_query_len, scale=0.088,
                          sliding_window=window, soft_cap=soft_cap)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=TPU_V6E)):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
