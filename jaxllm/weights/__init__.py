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
from jax.sharding import Mesh

from jaxllm.attention import resolve_backend
from jaxllm.config import ConfigError, ModelConfig, ModelLoadError, check_dtype, check_quantization, resolve_dtype
from jaxllm.models import CausalLM, abstract_params, build_model, dummy_params, quantize_params
from jaxllm.sharding import check_tensor_parallel, make_mesh, param_shardings
from jaxllm.tokenizer import generation_eos_ids, has_hf_tokenizer, load_hf_tokenizer, synthetic_tokenizer
from jaxllm.weights.checkpoint import read_marker, restore_params, save_checkpoint
from jaxllm.weights.gguf import GGUFModel
from jaxllm.weights.hub import ModelSource, resolve_model
from jaxllm.weights.mapping import ParamTreeBuilder
from jaxllm.weights.safetensors import iter_safetensors

logger = logging.getLogger("jaxllm")


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    module: CausalLM
    params: Any
    tokenizer: Any
    source: ModelSource
    mesh: Mesh

    @property
    def dtype(self) -> Any:
        return self.module.dtype

    @property
    def num_bytes(self) -> int:
        """Bytes of all parameters on the devices (what a decode step reads)."""
        return sum(x.nbytes for x in jax.tree.leaves(self.params))


LOAD_FORMATS = ("auto", "dummy")


def load_model(model: str | Path | None = None, *, dtype: Any = "auto", tokenizer: str | Path | None = None,
               mesh: Mesh | None = None, revision: str | None = None, attention_backend: str = "auto",
               load_format: str = "auto", quantization: str | None = None) -> LoadedModel:
    """Resolve `model` (None = the embedded SmolLM2), build its Flax module and stream its weights onto `mesh`.

    quantization "int8" / "int4" stores the linear layers' weights quantized (models.quantize_params).
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
    module = build_model(config, resolve_dtype(dtype, config, platform), resolve_backend(attention_backend, platform))
    abstract = abstract_params(module)
    shardings = param_shardings(abstract, mesh)
    if load_format == "dummy":
        params = dummy_params(module, shardings)
    elif source.kind == "jaxllm":
        params = restore_params(source.path, nn.unbox(abstract), shardings)
    else:
        builder = ParamTreeBuilder(config, abstract, shardings, module.dtype, str(source.path))
        tensors = (gguf.tensors(config.num_heads, config.num_kv_heads) if gguf is not None
                   else iter_safetensors(source.path))
        for name, tensor in tensors:
            builder.add(name, tensor)
        params = builder.build()

    if quantization is not None:  # weights loaded as they are, then quantized on the devices
        group = 32 if gguf is not None else config.quant_group_size  # GGUF's Q4/Q8 blocks are 32 inputs
        module = build_model(dataclasses.replace(config, quantization=quantization, quant_group_size=group),
                             module.dtype, module.backend)
        abstract = abstract_params(module)
        params = quantize_params(params, nn.unbox(abstract), param_shardings(abstract, mesh))
        config = module.config

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
    return LoadedModel(config, module, params, tok, source, mesh)


def convert_checkpoint(src: str | Path | None, dst: str | Path, *, dtype: Any = "bfloat16") -> LoadedModel:
    """Load `src` in `dtype` and write it as a jaxllm (Orbax) checkpoint at `dst`."""
    loaded = load_model(src, dtype=dtype, mesh=make_mesh(devices=jax.devices("cpu")))
    c = loaded.config
    freq_factors = c.ropes[0].freq_factors
    save_checkpoint(Path(dst), loaded.params, c.hf_config, loaded.tokenizer, dtype=loaded.dtype,
                    eos_token_ids=c.eos_token_ids, rope_freq_factors=list(freq_factors) if freq_factors else None)
    return loaded


def _read_hf_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except ValueError as e:  # unknown model_type, malformed values
        raise ConfigError(f"{model_dir / 'config.json'}: {e}") from e
    except OSError as e:  # unreadable or invalid JSON
        raise ModelLoadError(f"{model_dir / 'config.json'} could not be read ({e})") from e


__all__ = ["LoadedModel", "load_model", "convert_checkpoint"]
