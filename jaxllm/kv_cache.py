"""Host-side bookkeeping of the KV page pool: free pages, block tables, prefix caching.

The pages themselves live on the device (jaxllm.attention.allocate_kv_pages); this module only decides
which page holds which tokens. Prefix caching (vLLM's automatic prefix caching): every full page is
keyed by a hash chained over the token ids of all pages before it and its own (plus an optional extra
key), pages are reference-counted, and a page nobody uses stays cached in a least-recently-used free
queue until it is needed for new tokens. A new sequence reuses the longest run of cached pages that
starts its prompt and only computes the rest.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxllm.config import ConfigError, EngineConfig, ModelConfig


def bytes_per_page(config: ModelConfig, page_size: int, dtype, kv_cache_dtype: str = "auto") -> int:
    """K and V of one page across all layers (int8: a byte per value and a float32 scale per token and head)."""
    per_head = config.head_dim + 4 if kv_cache_dtype == "int8" else config.head_dim * jnp.dtype(dtype).itemsize
    return 2 * config.num_layers * page_size * config.num_kv_heads * per_head


def num_pages_for(config: ModelConfig, engine: EngineConfig, dtype, device: jax.Device, reserved_bytes: int = 0) -> int:
    """The pool size: `num_kv_pages` if given; on CPU `cpu_kv_cache_bytes`; on an accelerator what
    `memory_utilization` of its memory leaves after what is already allocated (the parameters) and
    `reserved_bytes` (the sampler's state, activations)."""
    if engine.num_kv_pages is not None:
        return engine.num_kv_pages
    per_page = bytes_per_page(config, engine.page_size, dtype, engine.kv_cache_dtype)
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return max(1, engine.cpu_kv_cache_bytes // per_page)
    budget = int(stats["bytes_limit"] * engine.memory_utilization) - stats.get("bytes_in_use", 0) - reserved_bytes
    if budget < per_page:
        raise ConfigError(f"no accelerator memory left for the KV cache at memory_utilization="
                          f"{engine.memory_utilization}; raise it or use a smaller model/dtype")
    return budget // per_page


def pages_needed(num_tokens: int, page_size: int) -> int:
    return math.ceil(num_tokens / page_size)


class PagedSequence(Protocol):
    """What the manager reads and writes on a sequence (jaxllm.scheduler.Sequence)."""

    block_table: list[int]
    num_computed_tokens: int
    num_cached_pages: int  # leading pages of block_table already registered in the prefix cache
    block_hashes: list[bytes]  # chained hash of each full page of all_token_ids, computed lazily
    num_known_tokens: int  # leading tokens whose ids are known (the rest are placeholders still on the device)

    @property
    def all_token_ids(self) -> list[int]: ...


class KVCacheManager:
    """Pages of a pool of `num_pages`, handed to sequences in block tables; full pages cached by prefix hash."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.page_hash: list[bytes | None] = [None] * num_pages
        self.cached: dict[bytes, int] = {}  # hash -> page holding those tokens
        # Pages with no user, least recently used first; cached ones are evicted only when taken.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self.num_cache_hits = 0  # tokens served from the cache, since start-up (for logs, metrics, tests)
        self.num_cache_queries = 0  # tokens looked up in the cache

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_pages

    # -------------------------------------------------------------------------------------- hashing

    def _hashes(self, seq: PagedSequence, extra_key: Any = None) -> list[bytes]:
        """The chained hash of each full page of the sequence's tokens (extended as it grows)."""
        tokens, ps = seq.all_token_ids, self.page_size
        for i in range(len(seq.block_hashes), seq.num_known_tokens // ps):
            parent = seq.block_hashes[i - 1] if i else repr(extra_key).encode()
            h = hashlib.blake2b(parent, digest_size=16)
            h.update(b",".join(str(t).encode() for t in tokens[i * ps:(i + 1) * ps]))
            seq.block_hashes.append(h.digest())
        return seq.block_hashes

    def lookup_prefix(self, seq: PagedSequence, extra_key: Any = None) -> list[int]:
        """The cached pages that hold the longest prefix of the sequence, leaving at least one token to
        compute (its logits are needed to sample)."""
        if not self.enable_prefix_caching:
            return []
        max_pages = (len(seq.all_token_ids) - 1) // self.page_size
        self.num_cache_queries += len(seq.all_token_ids)
        pages = []
        for h in self._hashes(seq, extra_key)[:max_pages]:
            page = self.cached.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    # ---------------------------------------------------------------------------------- allocation

    def pages_short(self, seq: PagedSequence, num_new_tokens: int) -> int:
        """Pages the block table lacks for num_computed_tokens + num_new_tokens."""
        return max(0, pages_needed(seq.num_computed_tokens + num_new_tokens, self.page_size) - len(seq.block_table))

    def can_allocate(self, seq: PagedSequence, num_new_tokens: int, reuse: list[int] = ()) -> bool:
        """Whether the pages for `num_new_tokens` more tokens can be found (after reusing `reuse`)."""
        have = len(seq.block_table) + len(reuse)
        need = pages_needed(seq.num_computed_tokens + len(reuse) * self.page_size + num_new_tokens, self.page_size)
        idle_reused = sum(1 for p in reuse if self.ref_counts[p] == 0)
        return need - have <= self.num_free - idle_reused

    def admit(self, seq: PagedSequence, reuse: list[int]) -> None:
        """Start (or restart) a sequence on the pages `reuse` that already hold its first tokens: cached
        pages from lookup_prefix, or (n > 1) the prompt pages of its first sibling, shared."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for page in reuse:
            self._take(page)
        seq.block_table = list(reuse)
        seq.num_computed_tokens = seq.num_cached_pages = len(reuse)
        seq.num_computed_tokens *= self.page_size
        self.num_cache_hits += seq.num_computed_tokens

    def allocate(self, seq: PagedSequence, num_new_tokens: int) -> None:
        """Append pages so the block table covers num_computed_tokens + num_new_tokens."""
        need = self.pages_short(seq, num_new_tokens)
        if need > self.num_free:
            raise RuntimeError(f"asked for {need} KV pages with {self.num_free} free")
        for _ in range(need):
            page, _ = self.free_queue.popitem(last=False)
            h = self.page_hash[page]
            if h is not None:  # evict the least recently used cached page
                del self.cached[h]
                self.page_hash[page] = None
            self.ref_counts[page] = 1
            seq.block_table.append(page)

    def cache_full_pages(self, seq: PagedSequence, extra_key: Any = None) -> None:
        """Register the sequence's pages that became full (after its computed tokens grew)."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.page_size
        if full <= seq.num_cached_pages:
            return
        hashes = self._hashes(seq, extra_key)
        for i in range(seq.num_cached_pages, full):
            page, h = seq.block_table[i], hashes[i]
            if h not in self.cached and self.page_hash[page] is None:
                self.cached[h] = page
                self.page_hash[page] = h
        seq.num_cached_pages = full

    def free(self, seq: PagedSequence) -> None:
        """Give back a sequence's pages; cached ones stay findable until evicted. The tail goes to the
        queue first so that a shared prefix's head is evicted last."""
        for page in reversed(seq.block_table):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self.free_queue[page] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_pages = 0

    def _take(self, page: int) -> None:
        if self.ref_counts[page] == 0:
            del self.free_queue[page]
        self.ref_counts[page] += 1
