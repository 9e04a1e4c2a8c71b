"""A one-row quantized matmul in plain XLA over the nk layout (reference.py): a row reduction.

At one row of x a linear layer is a read of its weights. With W stored [N, K] each output's K is contiguous,
and x . W[n] is a sum along a row: XLA fuses the conversion into one row-reduction fusion, its best-tuned
kind, which read int4 weights up to 1.4x faster than the Pallas kernels on an H200 (benchmarks/RESULTS.md).
Each group's sum comes first and is scaled (and shifted by the zero times the group's sum of x) once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def row_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None = None) -> jax.Array:
    """x [M, K] @ W with W in the nk layout (int8 [N, K], or jnp.int4 [N, K] holding q - 8), scale (zero)
    [G, N] -> float32 [M, N]. Meant for M = 1: each row of x is another pass over W."""
    return jnp.concatenate([_one_row(x[i], w, scale, zero) for i in range(x.shape[0])])


MAX_PIECES = 16  # row_matmul_many cuts no matrix into more pieces than this (else each runs apart)


def row_matmul_many(x: jax.Array, mats: list[tuple], piece: int | None = None) -> list[jax.Array] | None:
    """row_matmul of x by several nk matrices (w, scale, zero) of one K and group count (a layer's q/k/v) in one
    pass over their weights: each matrix is cut into [P, K] pieces, P the largest size dividing every N (or
    `piece`), so that all the row sums have one shape and XLA fuses them into one multi-output reduction, as it
    fuses gate/up (alike already). None when P would cut a matrix into more than MAX_PIECES, or `piece` does not
    divide every N."""
    p = piece or math.gcd(*(scale.shape[1] for _, scale, _ in mats))
    if any(scale.shape[1] % p or scale.shape[1] // p > MAX_PIECES for _, scale, _ in mats):
        return None
    outs = []
    for w, scale, zero in mats:
        cuts = [slice(i, i + p) for i in range(0, scale.shape[1], p)]
        outs.append(jnp.concatenate([
            jnp.concatenate([_one_row(row, w[c], scale[:, c], None if zero is None else zero[:, c]) for c in cuts],
                            axis=1) for row in x]))
    return outs


def _one_row(x: jax.Array, w: jax.Array, scale: jax.Array, zero: jax.Array | None) -> jax.Array:
    """x [K] -> [1, N]. (Written without a rows axis: with one, XLA's reduction ran up to 1.6x slower on an
    H200.)"""
    groups, n = scale.shape
    xs = x.astype(jnp.float32).reshape(groups, -1)  # [G, g]
    if w.dtype == jnp.int4:  # read as bytes: byte i of a row holds K 2i (low nibble) and 2i + 1, each q - 8
        q = jax.lax.bitcast_convert_type(w.reshape(n, -1, 2), jnp.uint8) ^ 0x88  # [N, K / 2]: q's nibbles
        q = q.reshape(n, groups, -1)  # [N, G, g / 2]
        xh = xs.reshape(groups, -1, 2)  # [G, g / 2, 2]
        inner = jnp.sum((q & 15).astype(jnp.float32) * xh[..., 0] + (q >> 4).astype(jnp.float32) * xh[..., 1],
                        axis=2)  # [N, G]
    else:
        inner = jnp.sum(w.reshape(n, groups, -1).astype(jnp.float32) * xs, axis=2)
    out = inner * scale.T.astype(jnp.float32)
    if zero is not None:
        out = out + zero.T.astype(jnp.float32) * jnp.sum(xs, axis=1)
    return jnp.sum(out, axis=1)[None]


__all__ = ["row_matmul", "row_matmul_many"]
