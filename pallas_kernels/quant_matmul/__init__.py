"""Weight-only quantized matmul (int8, int4): the storage layouts and oracle (reference.py), the GPU kernel
for decode-sized batches (gpu.py), and `quant_linear`, which picks between the kernel and XLA per call shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import gpu
from pallas_kernels.quant_matmul.reference import dequantize, pack_half, pack_int4, quantize, unpack_int4

# The attention backends (jaxllm.attention.BACKENDS) whose platform runs the Pallas GPU kernel here.
KERNEL_BACKENDS = {"pallas-gpu": False, "pallas-interpret": True}  # -> interpret mode


def quant_linear(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None, half: int | None,
                 dtype, backend: str) -> jax.Array:
    """x [M, K] @ W [K, N] -> [M, N] in `dtype`, W stored as reference.py lays it out. Small M on a GPU backend
    runs the Pallas kernel (a weight read at the bandwidth); otherwise XLA dequantizes to `dtype` inside the
    matmul's fusion (int8 with one scale per channel scales the product instead)."""
    m, k = x.shape
    groups, n = scale.shape
    if backend in KERNEL_BACKENDS and gpu.supported(m, k, n, k // groups, half):
        return gpu.quant_matmul(x.astype(dtype), w, scale, zero, half=half,
                                interpret=KERNEL_BACKENDS[backend]).astype(dtype)
    if groups == 1 and zero is None:
        return jnp.dot(x.astype(dtype), w.astype(dtype)) * scale.astype(dtype)
    return jnp.dot(x.astype(dtype), dequantize(w, scale, zero, half, dtype))


__all__ = ["dequantize", "pack_half", "pack_int4", "quant_linear", "quantize", "unpack_int4"]
