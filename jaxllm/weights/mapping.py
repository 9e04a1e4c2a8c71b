"""From Hugging Face tensor names and layouts to our parameter tree, one tensor at a time.

Hugging Face stores `model.layers.3.self_attn.q_proj.weight` as `[out, in]`; our tree holds
`layers_3/self_attn/q_proj/kernel` as `[in, *out]` (here `[embed, heads, head_dim]`). `ParamTreeBuilder`
maps each incoming tensor, checks its shape against what the config implies, casts it, and places it on
the mesh at once, so the host never holds more than one tensor of the model. A pre-quantized checkpoint's linear
weights come as `QuantizedWeight`s and are placed in QuantDense's layout (pallas_kernels.quant_matmul) as
they are stored, never as floats.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxllm.config import ModelConfig, ModelLoadError
from pallas_kernels.quant_matmul import pack_half, pack_int4

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


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A linear weight as a pre-quantized checkpoint stores it, oriented like a Hugging Face float weight
    `[out, in]`: w[n, k] = q[n, k] * scale[n, k // group] (+ zero[n, k // group]).

    q: [out, in] uint8 (int4 values 0..15) or int8; scale, zero: [out, in // group] float32; int8 has no zero.
    """

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None = None

    @property
    def bits(self) -> int:
        return 8 if self.q.dtype == np.int8 else 4

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> QuantizedWeight:
        """`fn` (a reordering of the output rows, e.g. GGUF's Q/K unpermute) applied to q, scale and zero alike."""
        return QuantizedWeight(fn(self.q), fn(self.scale), None if self.zero is None else fn(self.zero))


class ParamTreeBuilder:
    """Collects parameters tensor by tensor into a tree that matches the model's abstract one."""

    def __init__(self, config: ModelConfig, abstract: Any, shardings: Any, dtype: Any, source: str) -> None:
        self.config, self.dtype, self.source = config, dtype, source
        self._targets = {path: (leaf, sharding) for (path, leaf), (_, sharding) in zip(
            _flatten(nn.unbox(abstract)), _flatten(shardings))}
        self._params: dict[tuple[str, ...], jax.Array] = {}

    def add(self, hf_name: str, tensor: np.ndarray | QuantizedWeight) -> None:
        """Map, check, cast and place one Hugging Face-named tensor `[out, in]` (or quantized weight)."""
        if IGNORED.search(hf_name) or (hf_name == "lm_head.weight" and self.config.tie_word_embeddings):
            return
        path = hf_name_to_path(hf_name)
        if path not in self._targets:
            raise ModelLoadError(f"{self.source}: tensor {hf_name!r} has no place in a {self.config.architecture} "
                                 f"with this config (is config.json the one these weights were saved with?)")
        target = self._targets[path][0]
        stored = f"int{tensor.bits}" if isinstance(tensor, QuantizedWeight) else "float"
        holds = {"int8": "int8", "uint8": "int4"}.get(np.dtype(target.dtype).name, "float")
        if stored != holds:
            raise ModelLoadError(f"{self.source}: tensor {hf_name!r} is stored as {stored} weights, but the model "
                                 f"was built to hold {holds} ones there (one kind for every linear layer)")
        if isinstance(tensor, QuantizedWeight):
            self._add_quantized(hf_name, path, tensor)
            return
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
        self._place(path, tensor)

    def _add_quantized(self, hf_name: str, path: tuple[str, ...], w: QuantizedWeight) -> None:
        """Place a kept-quantized weight as QuantDense holds it: kernel [*in, *out] int8, or uint8
        [*in, *out[:-1], out[-1] // 2] (two int4 a byte, pack_int4); scale, zero [groups, *out] float32."""
        layer = path[:-1]
        kernel = self._targets[path][0]
        groups, *out = self._targets[layer + ("scale",)][0].shape
        in_shape = kernel.shape[:kernel.ndim - len(out)]
        n, k = math.prod(out), math.prod(in_shape)
        _check_shape(hf_name, w.q.shape, (n, k), self.source)
        _check_shape(f"{hf_name} (scales)", w.scale.shape, (n, groups), self.source)
        q = w.q.T.reshape(*in_shape, *out)  # [*in, *out]
        self._place(path, q if w.bits == 8 else pack_int4(q, pack_half(out[-1])))
        self._place(layer + ("scale",), w.scale.T.reshape(groups, *out))
        if w.zero is not None:
            _check_shape(f"{hf_name} (zeros)", w.zero.shape, (n, groups), self.source)
            self._place(layer + ("zero",), w.zero.T.reshape(groups, *out))

    def _place(self, path: tuple[str, ...], tensor: np.ndarray) -> None:
        target, sharding = self._targets[path]
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
