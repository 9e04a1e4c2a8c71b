"""Weight-only quantized matmul: the storage layouts, and the pure-jnp reference the kernels are checked against.

A layer's weight W [K, N] (its [*in, *out] kernel flattened) is stored as

    int8  q int8  [K, N]       w[k, n] = q[k, n] * scale[g, n]                  (symmetric)
    int4  p uint8 [K, N // 2]  w[k, n] = q[k, n] * scale[g, n] + zero[g, n]     (q unsigned, 0..15)

with scale, zero float32 [G, N] and group g = k // (K // G); G = 1 is one scale per output channel.

int4 packs two values per byte along N, in half-blocks of `half` (H) columns: byte [k, b*H + j] holds
q[k, 2bH + j] in its low nibble and q[k, 2bH + H + j] in its high nibble. A kernel's [rows, H] tile of bytes
so unpacks into two contiguous [rows, H] blocks of output columns, with no shuffle. H = pack_half(the last
output dim), so packing a [*in, *out] kernel along its last dim gives the same bytes as packing it flattened.

The "nk" layout (`nk=True`; Hopper GPUs, where a one-row matmul reads each output's K contiguous) stores the
same integers transposed, scales unchanged:

    int8  q int8  [N, K]       w[k, n] = q[n, k] * scale[g, n]
    int4  s int4  [N, K]       w[k, n] = (s[n, k] + 8) * scale[g, n] + zero[g, n]   (s = q - 8, -8..7)

int4 there is jnp.int4, two per byte along K as XLA packs it (element 2i in the low nibble): Mosaic GPU
converts signed int4 to bf16 in three instructions per two values, and XLA reads the bytes by bitcast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pack_half(n: int) -> int:
    """Columns per half-block when packing int4 along a dim of n: the largest of 64, 32, ..., 1 with 2H | n."""
    if n % 2:
        raise ValueError(f"int4 weights pack two output columns per byte: the output dim must be even, got {n}")
    return next(h for h in (64, 32, 16, 8, 4, 2, 1) if n % (2 * h) == 0)


def pack_int4(q: jax.Array, half: int) -> jax.Array:
    """Values 0..15 [..., n] (any integer dtype) -> bytes [..., n // 2] in the half-block layout."""
    n = q.shape[-1]
    blocks = q.astype(jnp.uint8).reshape(*q.shape[:-1], n // (2 * half), 2, half)
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(*q.shape[:-1], n // 2)


def unpack_int4(p: jax.Array, half: int) -> jax.Array:
    """Bytes [..., n // 2] -> values 0..15 uint8 [..., n]: the inverse of pack_int4."""
    blocks = p.reshape(*p.shape[:-1], p.shape[-1] // half, 1, half)
    return jnp.concatenate([blocks & 15, blocks >> 4], axis=-2).reshape(*p.shape[:-1], 2 * p.shape[-1])


def to_nk(w: jax.Array, half: int | None) -> jax.Array:
    """A stored [K, N] weight (int8, or int4 packed with `half`) -> the same integers in the nk layout (int8
    [N, K], or jnp.int4 [N, K] holding q - 8): exact, for loaders that read [K, N]."""
    if w.dtype != jnp.uint8:
        return w.T
    return (unpack_int4(w, half).T.astype(jnp.int8) - 8).astype(jnp.int4)


def checked_shapes(name: str, x: jax.Array, w: jax.Array, scale: jax.Array, half: int | None,
                   supported) -> tuple[int, int, int, int, bool]:
    """(M, K, N, group, int4) of x [M, K] @ W stored [K, N] (int4 packed with `half`), or a ValueError naming
    the kernel `name` when its `supported(rows, k, n, group, half)` does not take them."""
    m, k = x.shape
    groups, n = scale.shape
    int4 = w.dtype == jnp.uint8
    if not supported(m, k, n, k // groups, half if int4 else None):
        raise ValueError(f"{name} does not take M={m}, K={k}, N={n}, group {k // groups}, half {half}")
    return m, k, n, k // groups, int4


def alike(mats) -> bool:
    """Whether the (w, scale, zero) matrices share dtype, groups and zeros: what one kernel call over several
    matrices (a layer's q/k/v or gate/up) needs besides a common K."""
    w0, s0, z0 = mats[0]
    return all(w.dtype == w0.dtype and s.shape[0] == s0.shape[0] and (z is None) == (z0 is None) for w, s, z in mats)


def dequantize(w: jax.Array, scale: jax.Array, zero: jax.Array | None = None, half: int | None = None,
               dtype=jnp.float32, nk: bool = False) -> jax.Array:
    """The float weight [K, N] in `dtype` from its stored form (int8 [K, N], or int4 packed [K, N // 2] with
    its `half`; with `nk`, int8 [N, K] or jnp.int4 [N, K])."""
    q = unpack_int4(w, half) if w.dtype == jnp.uint8 else w
    q = q.astype(jnp.int32) + 8 if q.dtype == jnp.int4 else q
    q = q.T if nk else q
    groups, n = scale.shape
    deq = q.reshape(groups, -1, n).astype(dtype) * scale.astype(dtype)[:, None]
    if zero is not None:
        deq = deq + zero.astype(dtype)[:, None]
    return deq.reshape(-1, n)


def quant_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None = None,
                 half: int | None = None, nk: bool = False) -> jax.Array:
    """x [M, K] @ dequantize(w) -> [M, N] float32, computed in float32 throughout: the oracle."""
    deq = dequantize(w, scale, zero, half, jnp.float32, nk)
    return jnp.dot(x.astype(jnp.float32), deq, precision=jax.lax.Precision.HIGHEST)


def quantize(w: jax.Array, bits: int, groups: int, half: int | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Float w [K, N] -> (stored weight, scale [groups, N], zero [groups, N] or None): int8 symmetric (a
    group's max |w| -> 127), int4 asymmetric (a group's [min, max] in 16 levels, packed with `half`)."""
    wg = jnp.asarray(w, jnp.float32).reshape(groups, -1, w.shape[-1])
    if bits == 8:
        amax = jnp.max(jnp.abs(wg), axis=1)
        scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        return jnp.clip(jnp.round(wg / scale[:, None]), -127, 127).astype(jnp.int8).reshape(w.shape), scale, None
    lo, hi = jnp.min(wg, axis=1), jnp.max(wg, axis=1)
    scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
    q = jnp.clip(jnp.round((wg - lo[:, None]) / scale[:, None]), 0, 15).reshape(w.shape)
    return pack_int4(q, half or pack_half(w.shape[-1])), scale, lo
