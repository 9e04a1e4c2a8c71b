"""Attention kernels over a paged KV cache, each beside its pure-jnp reference.

This release has the references only (pallas_kernels.paged_attention.reference); the Pallas GPU/TPU
kernels come next and will sit behind the same functions.
"""
