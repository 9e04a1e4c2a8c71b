"""Quantized inference (issue 7): weight-only int8 (one scale per output channel) and int4 (a scale and zero
per group of inputs), quantized at load from the checkpoint's float weights; checked against the float model
on the same weights.

Tolerances: every weight within half a quantization step of the original (exactly what rounding allows);
prompt logprobs (float32 activations) within 0.02 nats (int8) / 0.3 nats (int4, 16 levels) of the float
model's on average on these tiny random models; a GGUF Q4_1 model requantized to int4 in its own 32-input blocks is the
float model again (logprobs within 1e-3).
"""

from __future__ import annotations

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import ConfigError
from jaxllm.models.layers import QuantDense, project_many
from pallas_kernels import quant_matmul
from pallas_kernels.quant_matmul import dequantize, pack_half, to_nk
from tests.gguf_writer import write_gguf
from tests.test_engine import mixed_prompts

KNOBS = dict(dtype="float32", num_kv_pages=96, page_size=8, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


LOGPROB_TOL = {"int8": 0.02, "int4": 0.3}  # mean |difference| of the prompt logprobs


@pytest.fixture(scope="module", params=[("llama3.1", "int8"), ("qwen2", "int8"), ("llama3.1", "int4")])
def pair(request, tiny_model):  # qwen2: biases on q/k/v
    variant, kind = request.param
    path, _ = tiny_model(variant)
    return LLM(str(path), **KNOBS), LLM(str(path), quantization=kind, **KNOBS), kind


def layer(params, i: int, name: str) -> dict:
    module = "self_attn" if name in PROJECTIONS[:4] else "mlp"
    return params[f"layers_{i}"][module][name]


def test_weights_within_half_a_step(pair):
    f, q, kind = pair
    for name in PROJECTIONS:
        w = np.asarray(layer(f.model.params, 1, name)["kernel"])
        got = layer(q.model.params, 1, name)
        kernel, scale = np.asarray(got["kernel"]), np.asarray(got["scale"])
        assert scale.dtype == np.float32
        n_in = w.ndim - scale.ndim + 1
        k, n = int(np.prod(w.shape[:n_in])), int(np.prod(w.shape[n_in:]))
        groups = scale.shape[0]
        assert scale.shape == (groups, *w.shape[n_in:])
        if kind == "int8":
            assert kernel.dtype == np.int8 and kernel.shape == w.shape and groups == 1  # one scale per channel
            np.testing.assert_allclose(scale[0], np.abs(w).max(axis=tuple(range(n_in))) / 127, rtol=1e-6)
            assert np.abs(kernel).max() == 127  # each channel's largest weight uses the whole range
            zero, half = None, None
        else:  # two values a byte along the last output dim
            assert kernel.dtype == np.uint8 and kernel.shape == (*w.shape[:-1], w.shape[-1] // 2)
            assert groups == k // min(k, 128) and got["zero"].shape == scale.shape
            zero, half = np.asarray(got["zero"]).reshape(groups, n), pack_half(w.shape[-1])
        deq = np.asarray(dequantize(kernel.reshape(k, -1), scale.reshape(groups, n), zero, half))
        step = np.repeat(scale.reshape(groups, n), k // groups, axis=0)
        assert np.all(np.abs(w.reshape(k, n) - deq) <= step / 2 * (1 + 1e-5) + 1e-7)
    # The LM head: int8, one scale per vocab entry (a tied embedding gets its own int8 copy).
    head = f.model.params["lm_head"]["kernel"] if "lm_head" in f.model.params else f.model.params["embed_tokens"][
        "embedding"].T
    w, got = np.asarray(head), q.model.params["lm_head"]
    assert got["kernel"].dtype == np.int8 and got["kernel"].shape == w.shape and got["scale"].shape == (1, w.shape[1])
    deq = np.asarray(dequantize(got["kernel"], got["scale"]))
    assert np.all(np.abs(w - deq) <= np.asarray(got["scale"]) / 2 * (1 + 1e-5) + 1e-7)
    # Not quantized: embeddings, norms, biases.
    assert q.model.params["embed_tokens"]["embedding"].dtype == f.model.params["embed_tokens"]["embedding"].dtype
    kinds = {str(x.dtype) for x in jax.tree.leaves(q.model.params)}
    assert {"int8": "int8", "int4": "uint8"}[kind] in kinds


def test_outputs_close_to_the_float_model(pair):
    f, q, kind = pair
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(6, seed=9) if len(p) > 1]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    a, b = f.generate(prompts, params, use_tqdm=False), q.generate(prompts, params, use_tqdm=False)
    diffs = [abs(lx[t].logprob - ly[t].logprob) for p, x, y in zip(prompts, a, b)
             for t, lx, ly in zip(p["prompt_token_ids"][1:], x.prompt_logprobs[1:], y.prompt_logprobs[1:])]
    assert 0 < np.mean(diffs) < LOGPROB_TOL[kind], (np.mean(diffs), max(diffs))  # > 0: not the float model
    same = sum(u == v for x, y in zip(a, b) for u, v in zip(x.outputs[0].token_ids, y.outputs[0].token_ids))
    if kind == "int8":  # int4 on these tiny, flat-logit models flips greedy choices early; its logprobs are checked
        assert same >= 0.9 * sum(len(x.outputs[0].token_ids) for x in a)


def test_lm_head_kept_float_on_request(tiny_model):
    """quantize_lm_head=False: the linear layers quantized, the LM head as the float model holds it."""
    path, _ = tiny_model("llama3.1")
    f, q = LLM(str(path), **KNOBS), LLM(str(path), quantization="int8", quantize_lm_head=False, **KNOBS)
    assert not q.model.config.lm_head_int8 and q.model.config.quantization == "int8"
    assert ("lm_head" in q.model.params) == ("lm_head" in f.model.params)
    heads = [jax.tree.leaves(m.model.params.get("lm_head", {})) for m in (f, q)]
    for a, b in zip(*heads):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("value,message", [("int3", "must be one of int8, int4, awq, gguf"),
                                           ("awq", "is not one: pass None, 'int8' or 'int4'"),
                                           ("gguf", "is not a GGUF file: pass None, 'int8' or 'int4'")])
def test_bad_quantization_is_a_clear_error(tiny_model, value, message):
    path, _ = tiny_model("llama2")
    with pytest.raises(ConfigError, match=message):
        LLM(str(path), quantization=value, **KNOBS)


@pytest.mark.parametrize("kind", ["int4"])  # its LM head is int8: both kinds
def test_nk_layout_is_the_same_model(tiny_model, kind):
    """quant_layout="nk" (what one Hopper GPU gets): each quantized kernel holds the [in, out] layout's integers
    transposed (reference.to_nk), the scales as they are, and generation gives the same tokens and logprobs
    (one row through XLA's row reduction, several through the dequantized dot)."""
    path, _ = tiny_model("llama3.1")
    kn, nk = (LLM(str(path), quantization=kind, quant_layout=layout, **KNOBS) for layout in ("kn", "nk"))
    assert (kn.model.config.quant_layout, nk.model.config.quant_layout) == ("kn", "nk")
    pairs = [(layer(kn.model.params, 1, name), layer(nk.model.params, 1, name), kind) for name in PROJECTIONS]
    for a, b, bits in pairs + [(kn.model.params["lm_head"], nk.model.params["lm_head"], "int8")]:
        np.testing.assert_array_equal(a["scale"], b["scale"])
        _, *out = a["scale"].shape
        half = pack_half(out[-1]) if bits == "int4" else None
        want = to_nk(a["kernel"].reshape(-1, int(np.prod(out)) // (2 if half else 1)), half)
        assert b["kernel"].shape == (*out, want.shape[1]) and b["kernel"].dtype == want.dtype
        np.testing.assert_array_equal(b["kernel"].reshape(want.shape), want)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0, logprobs=0)
    one = [{"prompt_token_ids": [5, 9, 12, 40, 7]}]  # decodes as one row
    for prompts in (one, [{"prompt_token_ids": p} for p in mixed_prompts(4, seed=2)]):
        for x, y in zip(kn.generate(prompts, params, use_tqdm=False), nk.generate(prompts, params, use_tqdm=False)):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids
            got = [next(iter(lp.values())).logprob for lp in y.outputs[0].logprobs]
            want = [next(iter(lp.values())).logprob for lp in x.outputs[0].logprobs]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_bad_quant_layout_is_a_clear_error(tiny_model):
    path, _ = tiny_model("llama3.1")
    with pytest.raises(ConfigError, match="quant_layout must be 'auto' or one of kn, nk"):
        LLM(str(path), quantization="int8", quant_layout="mn", **KNOBS)


@pytest.mark.parametrize("capability,devices,backend,group,want", [
    ("9.0", 1, "pallas-gpu", None, "nk"), ("9.0", 1, "pallas-gpu", 128, "nk"),
    ("9.0", 1, "pallas-gpu", 32, "kn"),  # GGUF's blocks: the nk kernel takes groups of 64 and more
    ("8.0", 1, "pallas-gpu", None, "kn"), ("9.0", 2, "pallas-gpu", None, "kn"), ("9.0", 1, "xla", None, "kn")])
def test_auto_quant_layout(capability, devices, backend, group, want):
    """quant_layout="auto": transposed on one Hopper GPU with the Pallas kernels, as stored elsewhere."""
    from types import SimpleNamespace

    from jaxllm.weights import _quant_layout

    mesh = SimpleNamespace(devices=np.array([SimpleNamespace(compute_capability=capability)] * devices))
    assert _quant_layout("auto", mesh, backend, group) == want
    assert _quant_layout("kn", mesh, backend, group) == "kn"
    if devices > 1:
        with pytest.raises(ConfigError, match="runs on one device"):
            _quant_layout("nk", mesh, backend, group)


@pytest.mark.parametrize("kind", ["int4"])  # int8 through the kernel: tests/test_quant_matmul.py's dispatch test
def test_decode_through_the_gpu_kernel(tiny_model, kind, monkeypatch):
    """On a GPU backend, decode steps' matmuls run the Pallas quantized kernel (here interpreted on CPU): the
    same tokens and logprobs as XLA's dequantize-and-dot path on the same weights."""
    traced = []  # (rows, K, matrices per call): q/k/v and gate/up go as one call each
    kernel_fn = quant_matmul.gpu.quant_matmul_many
    monkeypatch.setattr(quant_matmul.gpu, "quant_matmul_many",
                        lambda *a, **k: traced.append((*a[0].shape, len(a[1]))) or kernel_fn(*a, **k))
    path, _ = tiny_model("llama3.1")
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(2, seed=4)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=0)
    kernel = LLM(str(path), quantization=kind, attention_backend="pallas", **KNOBS).generate(prompts, params,
                                                                                            use_tqdm=False)
    assert traced and all(rows <= quant_matmul.gpu.MAX_ROWS for rows, _, _ in traced)
    assert {n for _, _, n in traced} == {1, 2, 3}  # o/down (and the head) alone, gate/up, q/k/v
    del traced[:]
    xla = LLM(str(path), quantization=kind, **KNOBS).generate(prompts, params, use_tqdm=False)
    assert not traced
    for a, b in zip(kernel, xla):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            (ta, va), = la.items()
            assert abs(va.logprob - lb[ta].logprob) < 1e-4


def test_decode_through_the_tpu_kernel(tiny_model, monkeypatch):
    """On a TPU backend (here Pallas' TPU interpreter) the int4 matmuls that tile in lanes of 128 run tpu.py's
    kernel: the same tokens and logprobs as XLA's dequantize-and-dot path on the same weights."""
    traced = []  # (rows, K, N) of each kernel call
    kernel_fn = quant_matmul.tpu.quant_matmul
    monkeypatch.setattr(quant_matmul.tpu, "quant_matmul",
                        lambda x, w, scale, *a, **k: traced.append((*x.shape, scale.shape[1])) or kernel_fn(
                            x, w, scale, *a, **k))
    path, _ = tiny_model("llama3.1", hidden_size=128, intermediate_size=256)
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(2, seed=6)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=0)
    kernel = LLM(str(path), quantization="int4", attention_backend="pallas-tpu-interpret", **KNOBS).generate(
        prompts, params, use_tqdm=False)
    assert {(k, n) for _, k, n in traced} >= {(128, 256)}  # gate/up ([128, 256], groups of 128)
    xla = LLM(str(path), quantization="int4", **KNOBS).generate(prompts, params, use_tqdm=False)
    for a, b in zip(kernel, xla):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            (ta, va), = la.items()
            assert abs(va.logprob - lb[ta].logprob) < 1e-4


@pytest.mark.parametrize("features", [(128, 128, 256), (64, 128)])  # int4 half-blocks alike / of 32 and 64
@pytest.mark.parametrize("backend", ["pallas-interpret", "xla"])
def test_project_many_is_each_layer(features, backend, monkeypatch):
    """Several quantized layers applied to one x together (one kernel call where they tile alike) give what
    each layer gives alone, bias included, whatever their int4 half-blocks."""
    calls = []  # matrices per kernel call
    kernel_fn = quant_matmul.gpu.quant_matmul_many
    monkeypatch.setattr(quant_matmul.gpu, "quant_matmul_many",
                        lambda *a, **k: calls.append(len(a[1])) or kernel_fn(*a, **k))

    class Layers(nn.Module):
        @nn.compact
        def __call__(self, x, together: bool):
            layers = [QuantDense(n, ("embed", "mlp"), -1, True, jnp.float32, 4, 32, backend, name=f"p{i}")
                      for i, n in enumerate(features)]
            return project_many(layers, x) if together else [layer(x) for layer in layers]

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
    params = Layers().init(jax.random.key(0), x, True)
    params = jax.tree.map(lambda a: jnp.asarray(rng.integers(0, 256, a.shape), a.dtype) if a.dtype == jnp.uint8
                          else jnp.asarray(rng.normal(size=a.shape) * 0.1, a.dtype), params)
    together, alone = Layers().apply(params, x, True), Layers().apply(params, x, False)
    assert [y.shape for y in together] == [(3, n) for n in features]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    fused = backend == "pallas-interpret" and len({pack_half(n) for n in features}) == 1
    assert max(calls, default=0) == (len(features) if fused else 1 if backend == "pallas-interpret" else 0)


# quantization="gguf": the linear layers' Q4_0 / Q4_1 / Q8_0 blocks loaded as stored, into int4 / int8 with
# groups of 32; checked against gguf.dequantize of the same tensors (exactly) and the float model's logprobs.

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory):
    """tiny_gguf(qtype, **part_qtypes) -> the tiny Llama 3.1 written as a GGUF file of those types."""
    src, model = tiny_model("llama3.1")
    root = tmp_path_factory.mktemp("gguf_blocks")

    def get(qtype, **part_qtypes):
        out = root / ("-".join([qtype.name, *(f"{k}_{t.name}" for k, t in part_qtypes.items())]) + ".gguf")
        return out if out.exists() else write_gguf(model, src, out, qtype, part_qtypes)

    return get


def stored_weight(params, i: int, name: str) -> np.ndarray:
    """A quantized layer's weight [K, N] dequantized from our layout (int8, or int4 with its zero)."""
    got = {k: np.asarray(v) for k, v in layer(params, i, name).items()}
    groups, *out = got["scale"].shape
    n, int4 = int(np.prod(out)), got["kernel"].dtype == np.uint8
    zero, half = (got["zero"].reshape(groups, n), pack_half(out[-1])) if int4 else (None, None)
    return np.asarray(dequantize(got["kernel"].reshape(-1, n // 2 if int4 else n), got["scale"].reshape(groups, n),
                                 zero, half))


def assert_same_logprobs(a: LLM, b: LLM, prompts: list[list[int]], tol: float) -> None:
    """The same greedy tokens, and prompt logprobs within `tol`."""
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=0)
    prompts = [{"prompt_token_ids": p} for p in prompts]
    outputs = (m.generate(prompts, params, use_tqdm=False) for m in (a, b))
    for p, x, y in zip(prompts, *outputs):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for t, lx, ly in zip(p["prompt_token_ids"][1:], x.prompt_logprobs[1:], y.prompt_logprobs[1:]):
            assert abs(lx[t].logprob - ly[t].logprob) < tol


@pytest.mark.parametrize("qtype,parts,kind", [(Q.Q4_0, {}, "int4"), (Q.Q8_0, {}, "int8"),
                                             (Q.Q4_0, {"ffn_down": Q.Q4_1}, "int4")],
                         ids=["Q4_0", "Q8_0", "Q4_0+Q4_1"])
def test_gguf_blocks_are_kept(tiny_gguf, qtype, parts, kind):
    """Q4_0 -> int4 (scale d, zero -8d), Q4_1 -> int4 (scale d, zero m), Q8_0 -> int8 (scale d): each weight
    exactly what gguf.dequantize makes of it (the float model's, Q/K rows unpermuted alike); with the LM head kept
    float, logprobs the float model's."""
    path = str(tiny_gguf(qtype, **parts))
    f, g = LLM(path, **KNOBS), LLM(path, quantization="gguf", quantize_lm_head=False, **KNOBS)
    assert f.model.config.quantization is None  # None keeps loading GGUF files as float
    assert g.model.quantization == "gguf"
    assert (g.model.config.quantization, g.model.config.quant_group_size) == (kind, 32)
    for i in range(2):
        for name in PROJECTIONS:
            deq = stored_weight(g.model.params, i, name)
            np.testing.assert_array_equal(deq, np.asarray(layer(f.model.params, i, name)["kernel"]).reshape(deq.shape),
                                          err_msg=name)
    embedding = g.model.params["embed_tokens"]["embedding"]  # not a linear layer: float, as dequantized before
    np.testing.assert_array_equal(embedding, f.model.params["embed_tokens"]["embedding"])
    assert_same_logprobs(f, g, [p for p in mixed_prompts(6, seed=9) if len(p) > 1], 1e-4)


def test_smollm2_q4_1_blocks_are_the_int4_requantization(smollm_llm, smollm_quantized):
    """The embedded SmolLM2 is a Q4_1 GGUF (blocks of 32 inputs, a scale and a minimum each; a Q8_0
    embedding). int4 at load uses the same blocks, so its weights are the float model's; with the blocks kept
    ("gguf") it is the int4 requantization again: the same kernels and zeros, its scales (recomputed in float32
    as (max - min) / 15) within an ulp of the stored fp16 d. (Q4_1 against gguf.dequantize:
    test_gguf_blocks_are_kept.)"""
    g, q = smollm_quantized("gguf"), smollm_quantized("int4")
    assert (g.model.config.quantization, g.model.config.quant_group_size) == ("int4", 32)
    assert q.model.params["layers_0"]["mlp"]["down_proj"]["scale"].shape == (1536 // 32, 576)
    for i in (0, 29):  # the float model's weights are the dequantized Q4_1 blocks: int4 gives them back
        for name in PROJECTIONS:
            got = layer(q.model.params, i, name)
            want = np.asarray(layer(smollm_llm.model.params, i, name)["kernel"])
            k = int(np.prod(want.shape[:2 if name == "o_proj" else 1]))
            deq = dequantize(got["kernel"].reshape(k, -1), got["scale"].reshape(-1, want.size // k),
                             got["zero"].reshape(-1, want.size // k), pack_half(want.shape[-1]))
            np.testing.assert_allclose(np.asarray(deq), want.reshape(k, -1), rtol=0, atol=1e-6 * np.abs(want).max(),
                                       err_msg=f"layer {i} {name}")
    requantized = dict(jax.tree_util.tree_flatten_with_path(q.model.params)[0])
    for path, x in jax.tree_util.tree_flatten_with_path(g.model.params)[0]:
        x, y = np.asarray(x), np.asarray(requantized[path])
        assert x.dtype == y.dtype and x.shape == y.shape
        if path[-1].key == "scale" and path[-2].key.endswith("_proj"):
            np.testing.assert_allclose(x, y, rtol=1.2e-7, atol=0)
        else:
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    # Scales an ulp apart move the int8 LM head's two-level activations (int8_dot_two_level) across a rounding.
    assert_same_logprobs(g, q, [list(range(300, 340))], 2e-3)


@pytest.mark.parametrize("qtype,parts,found", [(Q.Q4_0, {"ffn_down": Q.Q8_0}, "Q4_0, Q8_0"), (Q.F32, {}, "F32"),
                                               (Q.Q8_0, {"attn_v": Q.Q5_0}, "Q5_0, Q8_0")])
def test_gguf_of_mixed_or_other_types_is_a_clear_error(tiny_gguf, qtype, parts, found):
    with pytest.raises(ConfigError, match=f"linear layers are {found}: pass quantization='int4' or 'int8'"):
        LLM(str(tiny_gguf(qtype, **parts)), quantization="gguf", **KNOBS)
