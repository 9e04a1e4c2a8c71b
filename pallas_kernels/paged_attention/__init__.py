"""Paged attention and the KV-cache write. `reference` is the jnp oracle every backend is checked against."""

from pallas_kernels.paged_attention.reference import ragged_paged_attention, write_kv

__all__ = ["ragged_paged_attention", "write_kv"]
