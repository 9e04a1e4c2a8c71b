"""Device mesh and the logical-axis rules that turn parameter annotations into shardings.

Model code names axes logically (vocab, embed, heads, kv_heads, head_dim, mlp, norm); the rules below
map them to mesh axes. The default mesh is one device, so every rule resolves to "replicated"; tensor
parallelism is a bigger `model` axis, without touching the models.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm.config import ConfigError

MESH_AXES = ("data", "model")

LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "model"),
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("norm", None),
)


def check_tensor_parallel(config: Any, tensor_parallel_size: int) -> None:
    """Every sharded dimension must split evenly over the model axis; say which one does not."""
    dims = {"num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size}
    for name, n in dims.items():
        if n % tensor_parallel_size:
            raise ConfigError(f"tensor_parallel_size={tensor_parallel_size} must divide the model's {name} ({n})")


def make_mesh(tensor_parallel_size: int = 1, devices: list | None = None) -> Mesh:
    """A (data=1, model=tensor_parallel_size) mesh over the first devices of the default backend."""
    devices = devices if devices is not None else jax.devices()
    if tensor_parallel_size > len(devices):
        raise ConfigError(f"tensor_parallel_size={tensor_parallel_size} but only {len(devices)} device(s) are visible")
    return Mesh(np.asarray(devices[:tensor_parallel_size]).reshape(1, tensor_parallel_size), MESH_AXES)


def param_shardings(abstract_params: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of logically partitioned (boxed) abstract parameters."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_params), mesh, LOGICAL_RULES)
