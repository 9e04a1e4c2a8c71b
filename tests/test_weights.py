"""Loading: GGUF (every family, quant types), sharded and bf16 safetensors, the Orbax round trip, hub ids, bad input."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch

from jaxllm import ConfigError, ModelLoadError
from jaxllm.weights import convert_checkpoint, load_model
from jaxllm.weights.gguf import GGUFModel
from tests.gguf_writer import write_gguf
from tests.test_model_parity import prompts, ragged_logits, rel_err, shuffled_tables
from tests.tiny_models import TEXT, build_model, hf_logits

Q = gguf.GGMLQuantizationType
REPO = Path(__file__).resolve().parents[1]

# Variants as llama.cpp can represent them: its GGUF keeps no query_pre_attn_scalar (it uses head_dim) and
# gives Gemma 3 its fixed pattern of five sliding layers then one global.
GGUF_VARIANTS = {
    "llama2": {}, "llama3.2": {}, "qwen2": {}, "qwen3": {},
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3": {"num_hidden_layers": 6, "layer_types": None},
}


def batch_logits(loaded) -> list[np.ndarray]:
    batch = prompts()
    tables = shuffled_tables(random.Random(1), 32, [len(p) for p in batch])
    return ragged_logits(loaded, [(p, 0, t) for p, t in zip(batch, tables)], num_pages=32)


def assert_matches(loaded, hf, tol=1e-4):
    for p, ours in zip(prompts(), batch_logits(loaded)):
        assert rel_err(ours, hf_logits(hf, p).numpy()) < tol


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory, tiny_tokenizer):
    """variant -> (torch model, tokenizer dir, GGUF factory by quant type)."""
    root = tmp_path_factory.mktemp("gguf")
    tiny_tokenizer.save_pretrained(str(root))
    built = {v: build_model(v, root / v, tiny_tokenizer, **kw) for v, kw in GGUF_VARIANTS.items()}

    def get(variant: str, qtype=Q.F32) -> tuple[torch.nn.Module, Path]:
        path = root / f"{variant}-{qtype.name}.gguf"
        if not path.exists():
            write_gguf(built[variant], root, path, qtype)
        return built[variant], path

    return get


@pytest.mark.parametrize("variant", list(GGUF_VARIANTS))
def test_gguf_f32_matches_transformers(variant, gguf_models, tiny_tokenizer):
    """A GGUF written as llama.cpp's converter writes it loads back to the original model's logits."""
    hf, path = gguf_models(variant)
    loaded = load_model(path, dtype="float32")
    assert_matches(loaded, hf)
    assert loaded.tokenizer.encode(TEXT) == tiny_tokenizer.encode(TEXT)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_quant_types_match_transformers_import(qtype, gguf_models, tmp_path):
    """Quantized GGUFs dequantize to what transformers' own GGUF import computes from the same file."""
    from transformers import AutoModelForCausalLM

    _, path = gguf_models("llama2", qtype)
    shutil.copy(path, tmp_path / path.name)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path.parent / f, tmp_path / f)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    assert_matches(load_model(path, dtype="float32"), ref)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_gguf_k_quants_dequantize(qtype, tmp_path):
    """K-quant blocks (which gguf-py cannot produce) load to exactly gguf.dequantize of the raw blocks."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 8, 2 * block
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    # Keep the float16 super-block scales finite and small: d (and dmin) sit at the start (Q4_K) or end (Q6_K).
    scales = rng.uniform(0.001, 0.01, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        raw[..., :4] = scales.reshape(rows, cols // block, 4)
    else:
        raw[..., -2:] = scales[..., :2]
    raw = raw.reshape(rows, -1)
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    (name, tensor), = GGUFModel(path).tensors(num_heads=1, num_kv_heads=1)
    assert name == "model.embed_tokens.weight"
    expected = gguf.dequantize(raw, qtype)
    assert tensor.shape == (rows, cols) and np.isfinite(expected).all()
    np.testing.assert_array_equal(tensor, expected)


def test_sharded_safetensors(tiny_model):
    path, hf = tiny_model("qwen2", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    assert_matches(load_model(path, dtype="float32"), hf)


def test_tied_and_untied_embeddings(tiny_model):
    from safetensors import safe_open

    for variant, tied in (("llama3.2", True), ("llama3.1", False)):
        path, hf = tiny_model(variant)
        with safe_open(str(path / "model.safetensors"), "np") as f:
            assert ("lm_head.weight" in f.keys()) is not tied
        loaded = load_model(path, dtype="float32")
        assert loaded.config.tie_word_embeddings is tied
        assert ("lm_head" in loaded.params) is not tied


def test_bf16_safetensors(tiny_model):
    """bf16 files load in float32 (exactly the bf16 values) and in bfloat16 (within bf16 rounding)."""
    path, hf = tiny_model("gemma2", dtype=torch.bfloat16)
    hf_rounded = copy.deepcopy(hf)  # the same bf16-rounded weights (not buffers such as inv_freq), in float32
    with torch.no_grad():
        for p in hf_rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    f32 = load_model(path, dtype="float32")
    assert f32.config.checkpoint_dtype == "bfloat16"
    assert_matches(f32, hf_rounded)
    bf16 = load_model(path, dtype="bfloat16")
    assert bf16.params["embed_tokens"]["embedding"].dtype == jax.numpy.bfloat16
    assert_matches(bf16, hf_rounded, tol=5e-2)


def test_orbax_round_trip(tiny_model, tmp_path):
    """jaxllm convert writes a checkpoint whose logits are identical to the source's."""
    path, _ = tiny_model("gemma3")
    src = load_model(path, dtype="float32")
    convert_checkpoint(path, tmp_path / "ckpt", dtype="float32")
    restored = load_model(tmp_path / "ckpt", dtype="float32")
    assert restored.source.kind == "jaxllm"
    for a, b in zip(batch_logits(src), batch_logits(restored)):
        np.testing.assert_array_equal(a, b)
    assert restored.tokenizer.encode(TEXT) == src.tokenizer.encode(TEXT)
    assert restored.config.eos_token_ids == src.config.eos_token_ids


def test_orbax_round_trip_of_gguf_keeps_rope_factors(gguf_models, tmp_path):
    """A Llama 3.1-style GGUF (rope_freqs tensor) converts and restores to the same logits, bf16 on disk."""
    _, path = gguf_models("llama3.2")
    src = load_model(path, dtype="bfloat16")
    assert src.config.ropes[0].freq_factors is not None
    convert_checkpoint(path, tmp_path / "ckpt", dtype="bfloat16")
    restored = load_model(tmp_path / "ckpt", dtype="bfloat16")
    assert restored.config.ropes == src.config.ropes
    for a, b in zip(batch_logits(src), batch_logits(restored)):
        np.testing.assert_array_equal(a, b)


def test_convert_refuses_non_empty_destination(tiny_model, tmp_path):
    path, _ = tiny_model("llama2")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="not empty"):
        convert_checkpoint(path, tmp_path / "x")


# ------------------------------------------------------------------------------------------------ bad input


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/no/such/model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./missing.gguf")


def test_directory_without_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_corrupt_safetensors_header(tiny_model, tmp_path):
    path = copy_model(tiny_model("llama2")[0], tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ModelLoadError, match="model.safetensors is not a readable safetensors file"):
        load_model(path)


def test_truncated_gguf(gguf_models, tmp_path):
    _, path = gguf_models("llama2")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(bad)


def test_unknown_architecture(tiny_model, tmp_path):
    path = copy_model(tiny_model("llama2")[0], tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'FalconForCausalLM' is not supported; supported: LlamaForCausalLM"):
        load_model(path)
    cfg["model_type"] = "no_such_model_type"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json"):
        load_model(path)


def test_config_and_weights_disagree(tiny_model, tmp_path):
    path = copy_model(tiny_model("llama2")[0], tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"_proj.weight' has shape \((128, 64|64, 128)\), but the config implies \((96, 64|64, 96)\)"):
        load_model(path)


def test_missing_shard(tiny_model, tmp_path):
    path = copy_model(tiny_model("qwen2", max_shard_size="40KB")[0], tmp_path / "m")
    victim = sorted(path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=f"missing from .*{victim.name}"):
        load_model(path)


def test_missing_tensor(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = copy_model(tiny_model("llama2")[0], tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="1 parameter.*missing.*layers_1/mlp/up_proj/kernel"):
        load_model(path)


def _run_offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_hub_id_offline(tiny_model, tmp_path):
    """A hub id resolves from the local Hugging Face cache when offline; an uncached one says what to do."""
    src, _ = tiny_model("llama2")
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(src, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    code = ("from jaxllm.weights import load_model\n"
            "m = load_model('tiny-org/tiny-llama', dtype='float32')\n"
            "print('OK', m.source.path, m.config.architecture)\n"
            "from jaxllm import ModelLoadError\n"
            "try:\n    load_model('tiny-org/not-cached')\nexcept ModelLoadError as e:\n    print('ERR', e)\n")
    out = _run_offline(code, tmp_path / "hub")
    assert out.returncode == 0, out.stderr
    assert f"OK {snapshot} LlamaForCausalLM" in out.stdout
    assert "ERR 'tiny-org/not-cached' is not in the local Hugging Face cache" in out.stdout


def test_modelscope_switch_without_package(monkeypatch):
    monkeypatch.setenv("JAXLLM_USE_MODELSCOPE", "1")
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed
    with pytest.raises(ModelLoadError, match="needs the modelscope package"):
        load_model("org/some-model")


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_loading_streams_one_tensor_at_a_time(fmt, tiny_model, tmp_path):
    """Host allocations while loading (tensor copies, plus a few MB of Python objects) stay far below the model."""
    import tracemalloc

    path, hf = tiny_model("llama2", num_hidden_layers=8, hidden_size=256, intermediate_size=1024)
    if fmt == "gguf":
        path = write_gguf(hf, path, tmp_path / "m.gguf")
    total = sum(p.numel() * 4 for p in hf.parameters())
    largest = max(p.numel() * 4 for p in hf.parameters())
    load_model(path, dtype="float32")  # warm the imports and caches out of the measurement
    tracemalloc.start()
    try:
        loaded = load_model(path, dtype="float32")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(x.nbytes for x in jax.tree.leaves(loaded.params)) == total
    assert largest < total / 24 and peak < total / 3, (peak, largest, total)
