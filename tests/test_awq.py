"""AWQ checkpoints (issue 7): loaded into the int4 layout as stored, found from config.json.

The checkpoint is made here from a tiny random Llama: each linear layer gets known int4 values q, zero points z
and fp16 scales s, packed as AutoAWQ's GEMM format does (by this file's own packer), beside a float checkpoint
of w = (q - z) * s. Loaded, our layout must dequantize to exactly that w, and the model must give the float
model's logprobs (float32 activations, within 1e-4).
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxllm import LLM, SamplingParams
from jaxllm.config import ConfigError, ModelLoadError
from jaxllm.weights import convert_checkpoint, load_model
from pallas_kernels.quant_matmul import dequantize, pack_half
from tests.test_engine import mixed_prompts

GROUP = 32
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True,
              "modules_to_not_convert": None}
KNOBS = dict(dtype="float32", num_kv_pages=64, page_size=8, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)
PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def pack_awq(values: np.ndarray) -> np.ndarray:
    """[rows, cols] values 0..15 -> int32 [rows, cols // 8]: of each eight columns, column (0, 2, 4, 6, 1, 3, 5, 7)[i]
    goes to bits 4i..4i+3, as AutoAWQ's WQLinear_GEMM packs."""
    packed = np.zeros((values.shape[0], values.shape[1] // 8), np.uint32)
    for i, column in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
        packed |= values[:, column::8].astype(np.uint32) << np.uint32(4 * i)
    return packed.view(np.int32)


def write_model(src, dst, tensors: dict, quantization_config: dict | None = None) -> None:
    """A copy of the Hugging Face model directory `src` (config, tokenizer) with these weights (and this
    quantization_config in config.json)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file(tensors, str(dst / "model.safetensors"))
    if quantization_config is not None:
        config = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    """(AWQ dir, float dir of the dequantized weights, {layer name: (q [in, out], z, s [in // G, out])})."""
    src, _ = tiny_model("llama3.1")
    floats = load_file(str(src / "model.safetensors"))
    rng = np.random.default_rng(0)
    awq, deq, known = {}, {}, {}
    for name, w in floats.items():
        layer = name.removesuffix(".weight")
        if not layer.endswith(tuple(PROJECTIONS)):
            awq[name] = deq[name] = w
            continue
        n_out, n_in = w.shape
        q = rng.integers(0, 16, (n_in, n_out))
        z = rng.integers(0, 16, (n_in // GROUP, n_out))
        s = rng.uniform(0.005, 0.02, (n_in // GROUP, n_out)).astype(np.float16)
        known[layer] = q, z, s
        awq.update({f"{layer}.qweight": pack_awq(q), f"{layer}.qzeros": pack_awq(z), f"{layer}.scales": s})
        deq[name] = np.ascontiguousarray(expected_weight(q, z, s).T)  # Hugging Face's [out, in]
    root = tmp_path_factory.mktemp("awq")
    write_model(src, root / "awq", awq, AWQ_CONFIG)
    write_model(src, root / "float", deq)
    return root / "awq", root / "float", known


def expected_weight(q, z, s) -> np.ndarray:
    """(q - z) * s in float32, [in, out]."""
    rep = np.repeat(np.arange(q.shape[0] // GROUP), GROUP)
    return (q - z[rep]).astype(np.float32) * s[rep].astype(np.float32)


@pytest.fixture(scope="module")
def llms(checkpoints):
    awq_dir, float_dir, _ = checkpoints
    return LLM(str(awq_dir), quantize_lm_head=False, **KNOBS), LLM(str(float_dir), **KNOBS)  # the head as stored


def test_weights_are_the_stored_ones(checkpoints, llms):
    """Found from config.json (quantization=None); kernel, scale and zero in our int4 layout dequantize to
    exactly (q - z) * s."""
    _, _, known = checkpoints
    model = llms[0].model
    assert model.quantization == "awq"
    assert (model.config.quantization, model.config.quant_group_size) == ("int4", GROUP)
    for layer, (q, z, s) in known.items():
        _, _, i, _, proj = layer.split(".")
        got = model.params[f"layers_{i}"][PROJECTIONS[proj]][proj]
        kernel, scale, zero = (np.asarray(got[k]) for k in ("kernel", "scale", "zero"))
        groups, *out = scale.shape
        n = int(np.prod(out))
        assert kernel.dtype == np.uint8 and groups == q.shape[0] // GROUP
        deq = dequantize(kernel.reshape(q.shape[0], n // 2), scale.reshape(groups, n), zero.reshape(groups, n),
                         pack_half(out[-1]))
        np.testing.assert_array_equal(np.asarray(deq), expected_weight(q, z, s), err_msg=layer)


def test_logprobs_match_the_dequantized_float_model(llms):
    awq, fp = llms
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(6, seed=3) if len(p) > 1]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    a, b = awq.generate(prompts, params, use_tqdm=False), fp.generate(prompts, params, use_tqdm=False)
    for p, x, y in zip(prompts, a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for t, lx, ly in zip(p["prompt_token_ids"][1:], x.prompt_logprobs[1:], y.prompt_logprobs[1:]):
            assert abs(lx[t].logprob - ly[t].logprob) < 1e-4


def test_nk_layout_keeps_the_checkpoint_weights(checkpoints, llms):
    """quant_layout="nk" (one Hopper GPU's): the checkpoint's int4 weights re-laid exactly (transposed, as
    jnp.int4 q - 8), so generation gives the [in, out] layout's tokens and logprobs."""
    nk = LLM(str(checkpoints[0]), quantize_lm_head=False, quant_layout="nk", **KNOBS)
    assert nk.model.config.quant_layout == "nk"
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(3, seed=5) if len(p) > 1]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)
    a, b = nk.generate(prompts, params, use_tqdm=False), llms[0].generate(prompts, params, use_tqdm=False)
    for p, x, y in zip(prompts, a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for t, lx, ly in zip(p["prompt_token_ids"][1:], x.prompt_logprobs[1:], y.prompt_logprobs[1:]):
            assert abs(lx[t].logprob - ly[t].logprob) < 1e-4


def test_explicit_awq_dummy_weights_and_jaxllm_checkpoint(checkpoints, llms, tmp_path):
    """quantization="awq" as None; load_format="dummy" quantizes random weights like the checkpoint; a converted
    jaxllm checkpoint keeps the int4 weights (its config.json keeps the quantization_config)."""
    awq_dir, _, _ = checkpoints
    assert load_model(awq_dir, quantization="awq", dtype="float32").quantization == "awq"
    dummy = load_model(awq_dir, load_format="dummy", dtype="float32")
    assert (dummy.config.quantization, dummy.config.quant_group_size) == ("int4", GROUP)
    convert_checkpoint(awq_dir, tmp_path / "ckpt", dtype="float32")
    restored = load_model(tmp_path / "ckpt", quantize_lm_head=False)
    assert restored.quantization == "awq"
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(llms[0].model.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("value", ["int8", "int4", "gguf"])
def test_requantizing_awq_is_a_clear_error(checkpoints, value):
    with pytest.raises(ConfigError, match="is an AWQ checkpoint .* pass quantization='awq' or None"):
        load_model(checkpoints[0], quantization=value)


def test_awq_on_a_float_checkpoint_is_a_clear_error(checkpoints):
    with pytest.raises(ConfigError, match="quantization='awq' reads an AWQ checkpoint.*pass None, 'int8' or 'int4'"):
        load_model(checkpoints[1], quantization="awq")


@pytest.mark.parametrize("change,message", [
    ({"bits": 8}, "bits=8"), ({"version": "gemv"}, "version='gemv'"), ({"zero_point": False}, "zero_point=False"),
    ({"quant_method": "gptq"}, "quant_method='gptq'")])
def test_unsupported_variants_are_clear_errors(checkpoints, tmp_path, change, message):
    config = json.loads((checkpoints[0] / "config.json").read_text())
    config["quantization_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_model(tmp_path)


def test_missing_or_float_awq_layer_is_a_clear_error(checkpoints, tmp_path):
    awq_dir, float_dir, _ = checkpoints
    tensors = load_file(str(awq_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.scales"]
    write_model(awq_dir, tmp_path / "missing", tensors, AWQ_CONFIG)
    with pytest.raises(ModelLoadError, match="'model.layers.1.mlp.up_proj' has only qweight, qzeros"):
        load_model(tmp_path / "missing", dtype="float32")
    # One linear layer left in float (AWQ's modules_to_not_convert): the model has one kind for all of them.
    layer = "model.layers.0.self_attn.v_proj"
    tensors = {k: v for k, v in load_file(str(awq_dir / "model.safetensors")).items() if not k.startswith(layer)}
    tensors[f"{layer}.weight"] = load_file(str(float_dir / "model.safetensors"))[f"{layer}.weight"]
    write_model(awq_dir, tmp_path / "float_layer", tensors, AWQ_CONFIG)
    with pytest.raises(ModelLoadError, match="'model.layers.0.self_attn.v_proj.weight' is stored as float"):
        load_model(tmp_path / "float_layer", dtype="float32")
