"""Model families (one file each) and the registry that picks one from `config.architectures`."""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.attention import AttentionMetadata, KVPages, kv_pages_shape
from jaxllm.config import ARCHITECTURES, ConfigError, ModelConfig
from jaxllm.models.gemma import GemmaForCausalLM
from jaxllm.models.layers import CausalLM
from jaxllm.models.llama import LlamaForCausalLM

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


def quantize_params(params: dict, abstract: dict, shardings) -> dict:
    """The float `params` of a model as the quantized model's tree `abstract` (unboxed) holds them: each int8
    kernel `[*in, *out]` with its scale `[*out]` = max |w| over the inputs / 127 (symmetric, per output
    channel), each int4 kernel (unsigned) with a scale and zero `[groups, *out]` spanning a group's
    [min, max], every other leaf as it is. Runs on the devices, one leaf at a time, placed by `shardings`."""
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    out = {}
    jitted: dict = {}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    for path, leaf in leaves:
        keys = tuple(k.key for k in path)
        if keys[-1] in ("scale", "zero") and keys[:-1] + ("kernel",) in out:
            continue  # made with its kernel
        sharding = _at(shardings, keys)
        value = flat_params[path]
        if keys[-1] == "kernel" and leaf.dtype in (jnp.int8, jnp.uint4):
            scale_keys = keys[:-1] + ("scale",)
            scale = _at(abstract, scale_keys)
            if leaf.dtype == jnp.int8:
                fn = functools.partial(_int8_per_channel, n_in=value.ndim - scale.ndim)
                made = (keys, scale_keys)
            else:  # scale and zero [groups, *out]
                fn = functools.partial(_int4_per_group, n_in=value.ndim - scale.ndim + 1, groups=scale.shape[0])
                made = (keys, scale_keys, keys[:-1] + ("zero",))
            cache_key = (value.shape, value.dtype, leaf.dtype, sharding, _at(shardings, scale_keys))
            if cache_key not in jitted:
                jitted[cache_key] = jax.jit(fn, out_shardings=tuple(_at(shardings, k) for k in made))
            for k, v in zip(made, jitted[cache_key](value)):
                out[k] = v
        else:
            out[keys] = value
    return jax.tree_util.tree_unflatten(treedef, [out[tuple(k.key for k in path)] for path, _ in leaves])


def _int8_per_channel(w: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array]:
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(range(n_in)))
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


def _int4_per_group(w: jax.Array, n_in: int, groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """w [*in, *out] -> unsigned int4 kernel of the same shape, scale and zero [groups, *out] with
    w ~ q * scale + zero: each group of inputs spans its [min, max] in 16 levels."""
    g = w.astype(jnp.float32).reshape(groups, -1, *w.shape[n_in:])
    lo, hi = jnp.min(g, axis=1), jnp.max(g, axis=1)
    scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
    q = jnp.clip(jnp.round((g - lo[:, None]) / scale[:, None]), 0, 15).astype(jnp.uint4)
    return q.reshape(w.shape), scale, lo


def _at(tree, keys: tuple[str, ...]):
    for k in keys:
        tree = tree[k]
    return tree


__all__ = ["abstract_params", "build_model", "dummy_params", "quantize_params", "CausalLM", "FAMILIES"]
