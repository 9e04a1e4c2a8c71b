"""Host-side bookkeeping of the KV page pool: how many pages, which are free, who owns which.

The pages themselves live on the device (jaxllm.attention.allocate_kv_pages); this module only hands
out page indices. Prefix caching (hashed full pages, reference counts, LRU) comes with the engine.
"""

from __future__ import annotations

import math
from collections import deque

import jax
import jax.numpy as jnp

from jaxllm.config import ConfigError, EngineConfig, ModelConfig


def bytes_per_page(config: ModelConfig, page_size: int, dtype) -> int:
    """K and V of one page across all layers."""
    return 2 * config.num_layers * page_size * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize


def num_pages_for(config: ModelConfig, engine: EngineConfig, dtype, device: jax.Device) -> int:
    """The pool size: `num_kv_pages` if given; on CPU `cpu_kv_cache_bytes`; on an accelerator what
    `memory_utilization` of its memory leaves after what is already allocated (the parameters)."""
    if engine.num_kv_pages is not None:
        return engine.num_kv_pages
    per_page = bytes_per_page(config, engine.page_size, dtype)
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return max(1, engine.cpu_kv_cache_bytes // per_page)
    budget = int(stats["bytes_limit"] * engine.memory_utilization) - stats.get("bytes_in_use", 0)
    if budget < per_page:
        raise ConfigError(f"no accelerator memory left for the KV cache at memory_utilization="
                          f"{engine.memory_utilization}; raise it or use a smaller model/dtype")
    return budget // per_page


def pages_needed(num_tokens: int, page_size: int) -> int:
    return math.ceil(num_tokens / page_size)


class BlockAllocator:
    """A free list of page indices; a sequence's block table is the list of pages it was given."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV pages with {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)
