"""From Hugging Face tensor names and layouts to our parameter tree, one tensor at a time.

Hugging Face stores `model.layers.3.self_attn.q_proj.weight` as `[out, in]`; our tree holds
`layers_3/self_attn/q_proj/kernel` as `[in, *out]` (here `[embed, heads, head_dim]`). `ParamTreeBuilder`
maps each incoming tensor, checks its shape against what the config implies, casts it, and places it on
the mesh at once, so the host never holds more than one tensor of the model.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxllm.config import ModelConfig, ModelLoadError

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.|num_batches_tracked)")


def hf_name_to_path(name: str) -> tuple[str, ...]:
    """`model.layers.3.mlp.up_proj.weight` -> ("layers_3", "mlp", "up_proj", "kernel")."""
    name = name.removeprefix("model.")
    m = _LAYER.match(name)
    if m:
        name = f"layers_{m.group(1)}.{m.group(2)}"
    *modules, leaf = name.split(".")
    if leaf == "weight":
        module = modules[-1] if modules else ""
        leaf = "embedding" if module == "embed_tokens" else "kernel" if module.endswith(("_proj", "lm_head")) else "scale"
    return (*modules, leaf)


class ParamTreeBuilder:
    """Collects parameters tensor by tensor into a tree that matches the model's abstract one."""

    def __init__(self, config: ModelConfig, abstract: Any, shardings: Any, dtype: Any, source: str) -> None:
        self.config, self.dtype, self.source = config, dtype, source
        self._targets = {path: (leaf, sharding) for (path, leaf), (_, sharding) in zip(
            _flatten(nn.unbox(abstract)), _flatten(shardings))}
        self._params: dict[tuple[str, ...], jax.Array] = {}

    def add(self, hf_name: str, tensor: np.ndarray) -> None:
        """Map, check, cast and place one Hugging Face-named tensor `[out, in]`."""
        if IGNORED.search(hf_name) or (hf_name == "lm_head.weight" and self.config.tie_word_embeddings):
            return
        path = hf_name_to_path(hf_name)
        if path not in self._targets:
            raise ModelLoadError(f"{self.source}: tensor {hf_name!r} has no place in a {self.config.architecture} "
                                 f"with this config (is config.json the one these weights were saved with?)")
        target, sharding = self._targets[path]
        tensor = np.asarray(tensor)
        if path[-1] == "kernel":  # [out, in] -> [*in, *out]
            in_ndim = 2 if path[-2] == "o_proj" else 1
            expected = (math.prod(target.shape[in_ndim:]), math.prod(target.shape[:in_ndim]))
            _check_shape(hf_name, tensor.shape, expected, self.source)
            tensor = tensor.T.reshape(target.shape)
        else:
            _check_shape(hf_name, tensor.shape, (math.prod(target.shape),) if path[-1] == "bias" else target.shape,
                         self.source)
            tensor = tensor.reshape(target.shape)
        self._params[path] = jax.device_put(tensor.astype(target.dtype), sharding)

    def build(self) -> dict:
        """The finished tree; a missing tensor is an error naming it."""
        missing = [p for p in self._targets if p not in self._params]
        if missing:
            names = ", ".join("/".join(p) for p in missing[:5])
            raise ModelLoadError(f"{self.source}: {len(missing)} parameter(s) missing from the checkpoint, "
                                 f"e.g. {names}")
        tree: dict = {}
        for path, value in self._params.items():
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        return tree


def _check_shape(name: str, got: tuple, expected: tuple, source: str) -> None:
    if tuple(got) != tuple(expected):
        raise ModelLoadError(f"{source}: tensor {name!r} has shape {tuple(got)}, but the config implies "
                             f"{tuple(expected)} (config.json and weights disagree)")


def _flatten(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    return [(tuple(k.key for k in path), leaf) for path, leaf in leaves]
