"""Pallas kernels, each beside its pure-jnp reference: paged attention (paged_attention/: GPU, TPU, and a jnp
ragged version) and weight-only quantized matmul (quant_matmul/: GPU)."""
