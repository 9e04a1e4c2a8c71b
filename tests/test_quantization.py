"""Quantized inference (issue 7), the int8 step: weight-only int8 with one scale per output channel, quantized
at load from the checkpoint's float weights. Checked against the float model on the same weights.

Tolerances: a weight is within half a quantization step of the original (exactly what rounding allows);
prompt logprobs (float32 activations) within 0.05 nats of the float model's on these tiny random models.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import ConfigError
from tests.test_engine import mixed_prompts

KNOBS = dict(dtype="float32", num_kv_pages=96, page_size=8, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=["llama3.1", "qwen2"])  # qwen2: biases on q/k/v
def pair(request, tiny_model):
    path, _ = tiny_model(request.param)
    return LLM(str(path), **KNOBS), LLM(str(path), quantization="int8", **KNOBS)


def layer(params, i: int, name: str) -> dict:
    module = "self_attn" if name in PROJECTIONS[:4] else "mlp"
    return params[f"layers_{i}"][module][name]


def test_weights_are_int8_within_half_a_step(pair):
    f, q = pair
    for name in PROJECTIONS:
        w = np.asarray(layer(f.model.params, 1, name)["kernel"])
        got = layer(q.model.params, 1, name)
        kernel, scale = np.asarray(got["kernel"]), np.asarray(got["scale"])
        assert kernel.dtype == np.int8 and kernel.shape == w.shape and scale.dtype == np.float32
        n_in = w.ndim - scale.ndim
        assert scale.shape == w.shape[n_in:]
        np.testing.assert_allclose(scale, np.abs(w).max(axis=tuple(range(n_in))) / 127, rtol=1e-6)
        assert np.all(np.abs(w - kernel * scale) <= scale / 2 * (1 + 1e-5))
        assert np.abs(kernel).max() == 127  # each channel's largest weight uses the whole range
    # Not quantized: embeddings, norms, biases.
    assert q.model.params["embed_tokens"]["embedding"].dtype == f.model.params["embed_tokens"]["embedding"].dtype
    int8_bytes = sum(x.nbytes for x in jax.tree.leaves(q.model.params) if x.dtype == np.int8)
    assert int8_bytes > 0


def test_outputs_close_to_the_float_model(pair):
    f, q = pair
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(6, seed=9) if len(p) > 1]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    a, b = f.generate(prompts, params, use_tqdm=False), q.generate(prompts, params, use_tqdm=False)
    worst = max(abs(lx[t].logprob - ly[t].logprob) for p, x, y in zip(prompts, a, b)
                for t, lx, ly in zip(p["prompt_token_ids"][1:], x.prompt_logprobs[1:], y.prompt_logprobs[1:]))
    assert 0 < worst < 0.05, worst  # > 0: the int8 model is not the float one
    same = sum(u == v for x, y in zip(a, b) for u, v in zip(x.outputs[0].token_ids, y.outputs[0].token_ids))
    assert same >= 0.9 * sum(len(x.outputs[0].token_ids) for x in a)


@pytest.mark.parametrize("value,message", [("int3", "must be one of int8"), ("awq", "not implemented yet")])
def test_bad_quantization_is_a_clear_error(tiny_model, value, message):
    path, _ = tiny_model("llama2")
    with pytest.raises(ConfigError, match=message):
        LLM(str(path), quantization=value, **KNOBS)
