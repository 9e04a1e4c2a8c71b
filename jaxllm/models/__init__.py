"""Model families (one file each) and the registry that picks one from `config.architectures`."""

from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.attention import AttentionMetadata, KVPages, kv_pages_shape
from jaxllm.config import ARCHITECTURES, ConfigError, ModelConfig
from jaxllm.models.gemma import GemmaForCausalLM
from jaxllm.models.layers import CausalLM
from jaxllm.models.llama import LlamaForCausalLM
from pallas_kernels.quant_matmul import pack_half, quantize, to_nk

FAMILIES: dict[str, type[CausalLM]] = {"llama": LlamaForCausalLM, "gemma": GemmaForCausalLM}


def build_model(config: ModelConfig, dtype, backend: str = "reference") -> CausalLM:
    """The Flax module for this config's architecture (the supported ones are config.ARCHITECTURES);
    `backend` is a resolved attention backend (jaxllm.attention.resolve_backend)."""
    if config.architecture not in ARCHITECTURES:
        raise ConfigError(f"architecture {config.architecture!r} is not supported; "
                          f"supported: {', '.join(ARCHITECTURES)}")
    return FAMILIES[config.family](config, dtype=dtype, backend=backend)


def abstract_params(module: CausalLM) -> dict:
    """The parameter tree of `module` as shapes/dtypes with logical axis names (boxed), computing nothing."""
    c = module.config
    one = jax.ShapeDtypeStruct((1,), jnp.int32)
    page = jax.ShapeDtypeStruct(kv_pages_shape(module.backend, 1, 1, c.num_kv_heads, c.head_dim), module.dtype)
    md = AttentionMetadata(slot_mapping=one, block_tables=jax.ShapeDtypeStruct((1, 1), jnp.int32), seq_lens=one,
                           query_start_loc=jax.ShapeDtypeStruct((2,), jnp.int32), max_query_len=1)
    kv = [KVPages(page, page)] * c.num_layers
    return jax.eval_shape(module.init, jax.random.key(0), one, one, kv, md)["params"]


def dummy_params(module: CausalLM, shardings, seed: int = 0) -> dict:
    """Random weights made directly on the devices, sharded like loaded ones: vLLM's load_format="dummy",
    for timing a model without its checkpoint (the text it writes is noise). Normal(0, 0.02) weights, unit
    norm scales; one small compiled generator per distinct shape, not the model's init program."""
    abstract = nn.unbox(abstract_params(module))
    makers: dict = {}
    counter = itertools.count()

    def make(path, leaf, sharding):
        norm = any("norm" in str(getattr(k, "key", "")) for k in path)
        key = (leaf.shape, leaf.dtype, sharding, norm)
        if key not in makers:
            def fill(k, shape=leaf.shape, dtype=leaf.dtype):
                if norm:
                    return jnp.ones(shape, dtype)
                return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
            makers[key] = jax.jit(fill, out_shardings=sharding)
        return makers[key](jax.random.fold_in(jax.random.key(seed), next(counter)))

    return jax.tree_util.tree_map_with_path(make, abstract, shardings)


QUANT_DTYPES = (jnp.int8, jnp.uint8, jnp.int4)  # how QuantDense holds int8, int4 ([K, N] layout), int4 (nk)


def quantize_params(params: dict, abstract: dict, shardings, nk: bool = False) -> dict:
    """The `params` of a model as the quantized model's tree `abstract` (unboxed) holds them: each int8 or int4
    kernel `[*in, *out]` still in floats quantized with its scale (and zero) `[groups, *out]` by
    pallas_kernels.quant_matmul.quantize; an int8 LM head missing from `params` (tied embeddings) made from the
    embedding, transposed; with `nk` every quantized kernel (already-quantized ones included) transposed to the
    nk layout (reference.to_nk); every other leaf as it is. Runs on the devices, one leaf at a time, placed by
    `shardings`."""
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    out = {}
    jitted: dict = {}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    for path, leaf in leaves:
        keys = tuple(k.key for k in path)
        if keys in out:
            continue  # made with its kernel
        value = flat_params.get(path)
        if value is None and keys == ("lm_head", "kernel"):
            value = params["embed_tokens"]["embedding"].T
        if keys[-1] == "kernel" and leaf.dtype in QUANT_DTYPES and (value.dtype != leaf.dtype or nk):
            bits = 8 if leaf.dtype == jnp.int8 else 4
            made = [keys, keys[:-1] + ("scale",)] + ([keys[:-1] + ("zero",)] if bits == 4 else [])
            shapes = tuple(_at(abstract, k).shape for k in made)
            quantized = value.dtype in QUANT_DTYPES
            cache_key = (value.shape, value.dtype, shapes, tuple(_at(shardings, k) for k in made))
            if cache_key not in jitted:
                fn = functools.partial(_transpose_leaf, bits=bits, shapes=shapes) if quantized else \
                    functools.partial(_quantize_leaf, bits=bits, shapes=shapes, nk=nk)
                jitted[cache_key] = jax.jit(fn, out_shardings=cache_key[3][:1] if quantized else cache_key[3])
            if quantized:  # its scale and zero stay as they are
                made = made[:1]
            for k, v in zip(made, jitted[cache_key](value)):
                out[k] = v
        else:
            out[keys] = value
    return jax.tree_util.tree_unflatten(treedef, [out[tuple(k.key for k in path)] for path, _ in leaves])


def _quantize_leaf(w: jax.Array, bits: int, shapes: tuple[tuple[int, ...], ...], nk: bool) -> tuple[jax.Array, ...]:
    """w [*in, *out] -> its stored kernel, scale (and zero) in `shapes`, quantized as a [K, N] matrix."""
    groups, *out = shapes[1]
    w2 = w.reshape(-1, math.prod(out))
    half = pack_half(out[-1]) if bits == 4 else None
    q, *rest = quantize(w2, bits, groups, half)
    q = to_nk(q, half) if nk else q
    return tuple(x.reshape(shape) for x, shape in zip((m for m in (q, *rest) if m is not None), shapes))


def _transpose_leaf(w: jax.Array, bits: int, shapes: tuple[tuple[int, ...], ...]) -> tuple[jax.Array]:
    """An already-quantized kernel as loaders store it ([*in, *out], int4 packed along the last out dim) -> the
    nk layout's kernel in shapes[0]."""
    _, *out = shapes[1]
    half = pack_half(out[-1]) if bits == 4 else None
    w2 = w.reshape(-1, math.prod(out) // (2 if half else 1))
    return (to_nk(w2, half).reshape(shapes[0]),)


def _at(tree, keys: tuple[str, ...]):
    for k in keys:
        tree = tree[k]
    return tree


__all__ = ["abstract_params", "build_model", "dummy_params", "quantize_params", "CausalLM", "FAMILIES"]
