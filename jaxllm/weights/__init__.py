"""Load a model onto a device mesh from any source: Hugging Face directory, GGUF file, hub id, jaxllm checkpoint.

    loaded = load_model("path/or/hub-id", dtype="auto")
    loaded.config     # ModelConfig
    loaded.params     # parameter tree, placed on the mesh
    loaded.tokenizer  # transformers tokenizer (with chat template)
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.attention import resolve_backend
from jaxllm.config import (QUANT_LAYOUTS, ConfigError, ModelConfig, ModelLoadError, check_dtype, check_quantization,
                           resolve_dtype)
from jaxllm.models import CausalLM, abstract_params, build_model, dummy_params, quantize_params
from jaxllm.sharding import check_tensor_parallel, make_mesh, param_shardings
from jaxllm.tokenizer import generation_eos_ids, has_hf_tokenizer, load_hf_tokenizer, synthetic_tokenizer
from jaxllm.weights.awq import awq_group_size, awq_tensors
from jaxllm.weights.checkpoint import read_marker, restore_params, save_checkpoint
from jaxllm.weights.gguf import BLOCK_SIZE, GGUFModel
from jaxllm.weights.hub import ModelSource, resolve_model
from jaxllm.weights.mapping import ParamTreeBuilder
from jaxllm.weights.safetensors import iter_safetensors
from pallas_kernels.quant_matmul import cpu as quant_matmul_cpu

logger = logging.getLogger("jaxllm")


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    module: CausalLM
    params: Any
    tokenizer: Any
    source: ModelSource
    mesh: Mesh
    quantization: str | None = None  # as asked for, or "awq" when found; config.quantization: how layers hold it

    @property
    def dtype(self) -> Any:
        return self.module.dtype

    @property
    def num_bytes(self) -> int:
        """Bytes of all parameters on the devices (what a decode step reads; int4 packs two per byte)."""
        return sum(x.size // 2 if x.dtype == jnp.int4 else x.nbytes for x in jax.tree.leaves(self.params))


LOAD_FORMATS = ("auto", "dummy")


def load_model(model: str | Path | None = None, *, dtype: Any = "auto", tokenizer: str | Path | None = None,
               mesh: Mesh | None = None, revision: str | None = None, attention_backend: str = "auto",
               load_format: str = "auto", quantization: str | None = None,
               quantize_lm_head: bool = True, quant_layout: str = "auto") -> LoadedModel:
    """Resolve `model` (None = the embedded SmolLM2), build its Flax module and stream its weights onto `mesh`.

    quantization "int8" / "int4" stores the linear layers' weights quantized (models.quantize_params);
    "awq" (an AWQ checkpoint, also taken when None) and "gguf" (a GGUF file of Q4_0/Q4_1 or Q8_0 linear layers)
    keep the checkpoint's own quantized weights, as int4 / int8 in groups of its own size. With any of them the
    LM head goes to int8 too (a tied embedding gets an int8 copy), unless quantize_lm_head is False.
    quant_layout "kn" / "nk" lays the quantized kernels out as stored or transposed (config.QUANT_LAYOUTS);
    "auto" picks "nk" on one Hopper GPU with the Pallas kernels, where its matmuls are faster.
    load_format "dummy" reads only the config (a directory with just config.json will do) and makes random
    weights on the devices, for benchmarks; without a tokenizer there it gets a synthetic one of the
    model's vocabulary size.
    """
    check_dtype(dtype)
    check_quantization(quantization)
    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    source = resolve_model(model, revision)
    mesh = mesh or make_mesh()
    platform = mesh.devices.flat[0].platform
    gguf = GGUFModel(source.path) if source.kind == "gguf" else None
    freq_factors = None
    if gguf is not None:
        hf_config, eos = gguf.hf_config(), gguf.eos_token_ids()
        freq_factors = gguf.rope_freq_factors()
    else:
        hf_config, eos = _read_hf_config(source.path), generation_eos_ids(source.path)
        if source.kind == "jaxllm":
            freq_factors = read_marker(source.path).get("rope_freq_factors")
    config = ModelConfig.from_hf(hf_config, eos_token_ids=eos)
    if freq_factors:
        ropes = tuple(dataclasses.replace(r, freq_factors=tuple(freq_factors)) for r in config.ropes)
        config = dataclasses.replace(config, ropes=ropes)

    check_tensor_parallel(config, mesh.shape["model"])
    awq_group = awq_group_size(hf_config)  # None unless config.json describes an AWQ checkpoint
    quantization = _check_source_quantization(quantization, source, awq_group)
    backend = resolve_backend(attention_backend, platform)
    quantized = None
    if quantization:
        quantized = _quantized_config(config, quantization, gguf, awq_group, quantize_lm_head)
        layout = _quant_layout(quant_layout, mesh, backend, quantized.quant_group_size)
        quantized = dataclasses.replace(quantized, quant_layout=layout)
    keep = quantization in ("awq", "gguf") and load_format != "dummy"  # built quantized, reads them as stored
    as_stored = dataclasses.replace(quantized, lm_head_int8=False, quant_layout="kn") if keep else config
    module = build_model(as_stored, resolve_dtype(dtype, config, platform), backend)
    abstract = abstract_params(module)
    shardings = param_shardings(abstract, mesh)
    if load_format == "dummy":
        params = dummy_params(module, shardings)
    elif source.kind == "jaxllm":
        params = restore_params(source.path, nn.unbox(abstract), shardings)
    else:
        builder = ParamTreeBuilder(module.config, abstract, shardings, module.dtype, str(source.path))
        if gguf is not None:
            tensors = gguf.tensors(config.num_heads, config.num_kv_heads, keep_blocks=keep)
        else:
            tensors = iter_safetensors(source.path)
            if quantization == "awq":
                tensors = awq_tensors(tensors, str(source.path))
        for name, tensor in tensors:
            builder.add(name, tensor)
        params = builder.build()

    if quantized is not None and quantized != as_stored:  # float weights (and the LM head) quantized on the devices
        module = build_model(quantized, module.dtype, module.backend)
        abstract = abstract_params(module)
        params = quantize_params(params, nn.unbox(abstract), param_shardings(abstract, mesh),
                                 nk=quantized.quant_layout == "nk")
    config = module.config
    if platform == "cpu" and config.quantization == "int4" and not quant_matmul_cpu.available():
        logger.warning("int4 weights on CPU without the C++ kernel decode slower than float32 (XLA dequantizes "
                       "them every step; SmolLM2: 6 vs 28 tok/s): quantization='int8' is the fast one there")

    if tokenizer is not None:
        tok = load_hf_tokenizer(tokenizer)
    elif gguf is not None:
        tok = gguf.tokenizer()
    elif load_format == "dummy" and not has_hf_tokenizer(source.path):
        logger.warning("%s has no tokenizer: using a synthetic one of %d tokens (load_format='dummy')",
                       source.path, config.vocab_size)
        tok = synthetic_tokenizer(config.vocab_size, config.eos_token_ids)
    else:
        tok = load_hf_tokenizer(source.path)
    return LoadedModel(config, module, params, tok, source, mesh, quantization)


def convert_checkpoint(src: str | Path | None, dst: str | Path, *, dtype: Any = "bfloat16") -> LoadedModel:
    """Load `src` in `dtype` and write it as a jaxllm (Orbax) checkpoint at `dst`."""
    loaded = load_model(src, dtype=dtype, mesh=make_mesh(devices=jax.devices("cpu")), quantize_lm_head=False)
    c = loaded.config
    freq_factors = c.ropes[0].freq_factors
    save_checkpoint(Path(dst), loaded.params, c.hf_config, loaded.tokenizer, dtype=loaded.dtype,
                    eos_token_ids=c.eos_token_ids, rope_freq_factors=list(freq_factors) if freq_factors else None)
    return loaded


def _quantized_config(config: ModelConfig, quantization: str, gguf: GGUFModel | None, awq_group: int | None,
                      lm_head: bool) -> ModelConfig:
    """`config` with how its linear layers hold their weights, in groups of how many inputs, and (`lm_head`) the LM
    head in int8: one scale per vocab entry; a decode step's largest matmul, which llama.cpp's Q4 files hold in
    6-8 bits (SmolLM2: +0.08% perplexity, benchmarks/RESULTS.md)."""
    if quantization == "awq":
        layers, group = "int4", awq_group
    elif quantization == "gguf":
        layers, group = gguf.block_quantization(), BLOCK_SIZE
    else:  # int4 from GGUF: its blocks, requantized exactly; int8: one scale per channel (the fast CPU path)
        layers = quantization
        group = BLOCK_SIZE if gguf is not None and quantization == "int4" else config.quant_group_size
    return dataclasses.replace(config, quantization=layers, quant_group_size=group, lm_head_int8=lm_head)


def _quant_layout(asked: str, mesh: Mesh, backend: str, group_size: int | None) -> str:
    """load_model's quant_layout: "auto" -> "nk" on one Hopper GPU (compute capability 9.0) with the Pallas
    kernels (a one-row matmul reads W [N, K] faster there: benchmarks/RESULTS.md) for groups the nk kernel
    takes (per channel or multiples of 64 inputs; GGUF's blocks of 32 keep gpu.py's kernel), "kn" elsewhere."""
    if asked not in ("auto", *QUANT_LAYOUTS):
        raise ConfigError(f"quant_layout must be 'auto' or one of {', '.join(QUANT_LAYOUTS)}, got {asked!r}")
    if asked == "nk" and mesh.devices.size > 1:
        raise ConfigError("quant_layout='nk' runs on one device (the tensor-parallel path reads [in, out]): "
                          "pass quant_layout='auto' or 'kn'")
    if asked != "auto":
        return asked
    device = mesh.devices.flat[0]
    hopper = getattr(device, "compute_capability", "") == "9.0"
    grouped_alike = group_size is None or group_size % 64 == 0
    return "nk" if mesh.devices.size == 1 and backend == "pallas-gpu" and hopper and grouped_alike else "kn"


def _check_source_quantization(quantization: str | None, source: ModelSource, awq_group: int | None) -> str | None:
    """The quantization to load `source` with: "awq" for an AWQ checkpoint (None asks for it too); a clear
    ConfigError where the asked one does not fit the checkpoint."""
    if awq_group is not None:
        if quantization not in (None, "awq"):
            raise ConfigError(f"{source.path} is an AWQ checkpoint (4-bit, groups of {awq_group} inputs), which "
                              f"cannot be requantized to {quantization!r}: pass quantization='awq' or None")
        return "awq"
    if quantization == "awq":
        raise ConfigError(f"quantization='awq' reads an AWQ checkpoint (config.json's quantization_config with "
                          f"quant_method 'awq'); {source.path} is not one: pass None, 'int8' or 'int4'")
    if quantization == "gguf" and source.kind != "gguf":
        raise ConfigError(f"quantization='gguf' keeps a GGUF file's quantized blocks; {source.path} is not a GGUF "
                          "file: pass None, 'int8' or 'int4'")
    return quantization


def _read_hf_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except ValueError as e:  # unknown model_type, malformed values
        raise ConfigError(f"{model_dir / 'config.json'}: {e}") from e
    except OSError as e:  # unreadable or invalid JSON
        raise ModelLoadError(f"{model_dir / 'config.json'} could not be read ({e})") from e


__all__ = ["LoadedModel", "load_model", "convert_checkpoint"]
