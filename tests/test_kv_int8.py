"""int8 KV cache (kv_cache_dtype="int8"): one float32 scale per token and KV head. Each attention
implementation on int8 pages with their scales against the reference on the dequantized pages (the same
numbers, so float32 tolerance), with fresh random problems and poisoned padding queries; the engine with an
int8 cache against the same model with a float one.

Tolerances: attention 2e-5 (float32, exact dots on the same values); the engine, on tiny random float32
models: prompt logprobs within 0.01 nats on average of the float cache's; greedy continuations equal up to a
near-tie of the float model (its top two tokens within 0.05 nats).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import ConfigError
from pallas_kernels.paged_attention import cpu, gpu, reference, tpu, xla
from pallas_kernels.paged_attention.reference import quantize_kv
from tests.attention_cases import make_case
from tests.test_engine import mixed_prompts


def test_quantize_kv_within_half_a_step():
    x = jax.random.normal(jax.random.key(0), (7, 3, 64)) * jnp.arange(1, 4)[None, :, None]
    q, scale = quantize_kv(x)
    assert q.dtype == jnp.int8 and scale.shape == (7, 3, 1) and int(jnp.max(jnp.abs(q))) == 127
    np.testing.assert_allclose(scale[..., 0], jnp.max(jnp.abs(x), axis=-1) / 127, rtol=1e-6)
    assert bool(jnp.all(jnp.abs(q * scale - x) <= scale / 2 * (1 + 1e-6)))
    q0, s0 = quantize_kv(jnp.zeros((2, 1, 8)))  # an all-zero head: scale 1, values 0 (no division by zero)
    assert not bool(jnp.any(q0)) and bool(jnp.all(s0 == 1))


def int8_case(seed: int, page_size: int, group: int, decode_only: bool):
    """A ragged problem whose pages are int8 with per-token-head scales, and the same pages dequantized."""
    rng = np.random.default_rng(seed)
    q_lens, kv_lens = ([1, 1, 1], [1, 2 * page_size, 70]) if decode_only else \
        ([1, 3 * page_size + 5, 7], [2 * page_size, 3 * page_size + 5, 60])
    case = make_case(rng, q_lens=q_lens, kv_lens=kv_lens, page_size=page_size, num_kv_heads=2, group=group,
                     head_dim=64, spare_pages=4)
    shape = case.k_pages.shape  # [num_pages, page_size, kv_heads, head_dim]
    quant = [quantize_kv(jnp.asarray(p).reshape(-1, *shape[2:])) for p in (case.k_pages, case.v_pages)]
    pages = [q.reshape(shape) for q, _ in quant]
    scales = [s.reshape(shape[:3]) for _, s in quant]
    dequant = [np.asarray(p, np.float32) * np.asarray(s)[..., None] for p, s in zip(pages, scales)]
    q = case.q.copy()
    q[case.num_tokens:] = np.nan  # padding queries: must not reach real rows
    return case, q, pages, scales, dequant


@pytest.mark.parametrize("impl,decode_only", [(impl, d) for impl in ("reference", "xla", "gpu", "tpu")
                                              for d in (True, False)] + [("cpu", True)])
def test_attention_on_int8_pages(impl, decode_only):
    """Every implementation on int8 pages against the oracle on the dequantized ones (the C++ CPU kernel: decode
    steps only, writing into a NaN-filled output)."""
    page_size, group = (8, 4) if decode_only else (16, 3)
    case, q, pages, scales, dequant = int8_case(11 + decode_only, page_size, group, decode_only)
    kw = dict(max_query_len=1 if decode_only else case.max_query_len, scale=64 ** -0.5)
    args = (case.block_tables, case.seq_lens, case.query_start_loc)
    want = reference.ragged_paged_attention(jnp.asarray(case.q), *map(jnp.asarray, dequant), *args, **kw)
    if impl in ("gpu", "tpu"):  # the kernels' kv-heads-first layout, in interpret mode
        run = functools.partial((gpu if impl == "gpu" else tpu).ragged_paged_attention, interpret=True)
        pages = [gpu.to_layout(p) for p in pages]
        scales = [s.transpose(2, 0, 1) for s in scales]
    elif impl == "cpu":
        assert cpu.supported(jnp.asarray(q), pages[0], 1, quantized=True)
        run = functools.partial(cpu.ragged_paged_attention, out=jnp.full(q.shape, jnp.nan, jnp.float32))
    else:
        run = reference.ragged_paged_attention if impl == "reference" else xla.ragged_paged_attention
    got = run(jnp.asarray(q), *pages, *args, k_scale=scales[0], v_scale=scales[1], **kw)
    n = case.num_tokens
    assert not np.isnan(np.asarray(got[:n])).any()
    np.testing.assert_allclose(np.asarray(got[:n]), np.asarray(want[:n]), atol=2e-5, rtol=2e-5)


KNOBS = dict(dtype="float32", num_kv_pages=96, page_size=8, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)


def test_engine_with_an_int8_cache(tiny_model):
    path, _ = tiny_model("llama3.1")
    f = LLM(str(path), **KNOBS)
    q = LLM(str(path), kv_cache_dtype="int8", **KNOBS)
    kv = q.llm_engine.runner.kv_caches[0]
    assert kv.k.dtype == jnp.int8 and kv.k_scale.shape == kv.k.shape[:-1] and kv.k_scale.dtype == jnp.float32
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(6, seed=5) if len(p) > 1]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0, logprobs=2)
    a, b = f.generate(prompts, params, use_tqdm=False), q.generate(prompts, params, use_tqdm=False)
    diffs = [abs(lx[t].logprob - ly[t].logprob) for p, x, y in zip(prompts, a, b)
             for t, lx, ly in zip(p["prompt_token_ids"][1:], x.prompt_logprobs[1:], y.prompt_logprobs[1:])]
    assert 0 < np.mean(diffs) < 0.01, (np.mean(diffs), max(diffs))  # > 0: the cache really is int8
    for x, y in zip(a, b):  # greedy continuations agree until a near-tie of the float model's, if any
        fx, fy = x.outputs[0], y.outputs[0]
        i = next((i for i, (u, v) in enumerate(zip(fx.token_ids, fy.token_ids)) if u != v), None)
        if i is not None:
            top = fx.logprobs[i]
            assert fy.token_ids[i] in top and top[fx.token_ids[i]].logprob - top[fy.token_ids[i]].logprob < 0.05


def test_bad_kv_cache_dtype_is_a_clear_error(tiny_model):
    path, _ = tiny_model("llama3.1")
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, int8"):
        LLM(str(path), kv_cache_dtype="fp8", **KNOBS)


@pytest.mark.parametrize("platform,max_query_len,gather", [("cuda", 1, False), ("cuda", 1, True),
                                                         ("cuda", 64, True), ("tpu", 1, None), ("tpu", 64, None)])
def test_kernels_on_int8_pages_lower(platform, max_query_len, gather):
    """The Llama-3-8B-shaped call (8 kv heads, head_dim 128, page 16) on int8 pages lowers to Triton for an
    H100 and to Mosaic for a TPU v6e."""
    from tests.attention_cases import lowering_args
    from tests.test_paged_attention_gpu import H100
    from tests.test_paged_attention_tpu import TPU_V6E

    q, k, v, *rest = lowering_args(max_query_len, 4, jnp.bfloat16)
    k = v = jax.ShapeDtypeStruct(k.shape, jnp.int8)
    scales = jax.ShapeDtypeStruct(k.shape[:-1], jnp.float32)
    kernel, device, knobs = ((gpu, H100, {"gather_pages": gather}) if platform == "cuda" else (tpu, TPU_V6E, {}))
    f = functools.partial(kernel.ragged_paged_attention, max_query_len=max_query_len, scale=0.088, **knobs)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        text = jax.jit(lambda *a: f(*a[:6], k_scale=a[6], v_scale=a[7])).trace(
            q, k, v, *rest, scales, scales).lower(lowering_platforms=(platform,)).as_text()
    assert ("triton" in text) if platform == "cuda" else ("tpu_custom_call" in text)
