"""The weight-only quantized matmul (int8, int4): layouts round-trip, the Pallas GPU kernels (Triton's and
Mosaic GPU's Hopper one) in interpret mode on CPU against the float32 oracle on fresh random inputs (interpret
mode fills outputs with NaN first, so an unwritten element fails), their lowering to CUDA (constraints
interpret mode lets through) and the dispatch to the Hopper kernel, the C++ CPU
kernel against the oracle (writing into a NaN-filled buffer), the CPU's int8 x int8 path, the model's
dispatch giving the same layer output through the kernels and through XLA, and the transposed nk layout (its
XLA row reduction, the Hopper nk kernel interpreted and lowered, the dispatch to them).

Tolerances: float32 inputs 1e-5 relative to the largest output; bfloat16 inputs (the kernel multiplies bf16
activations by exact integer weights, accumulating in float32; the oracle is float32 throughout) 1e-2. The
Hopper kernel rounds x and int4's dequantized weights to bf16 (measured 2e-3): 1e-2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.quant_matmul as quant_matmul
from pallas_kernels.quant_matmul import (cpu, gpu, hopper, hopper_nk, int8_dot_two_level, pack_half, pack_int4,
                                        quant_linear, quant_linear_many, quantize, reference, row_matmul,
                                        row_matmul_many, to_nk, tpu, unpack_int4)

H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def make(m: int, k: int, n: int, bits: int, groups: int, dtype, seed: int):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = 0.05 * jax.random.normal(kw, (k, n), jnp.float32) + 0.01  # an offset: zeros matter for int4
    half = pack_half(n) if bits == 4 else None
    return x, w, half, quantize(w, bits, groups, half)


@pytest.mark.parametrize("n", [2, 6, 64, 96, 256])
def test_int4_packing_round_trip(n):
    q = jax.random.randint(jax.random.key(n), (3, 5, n), 0, 16)
    half = pack_half(n)
    packed = pack_int4(q, half)
    assert packed.shape == (3, 5, n // 2) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_int4(packed, half), q)
    lo = np.asarray(packed[0, 0, :half]) & 15  # the first half-block's low nibbles: columns 0..half-1
    np.testing.assert_array_equal(lo, np.asarray(q[0, 0, :half]))
    with pytest.raises(ValueError, match="even"):
        pack_half(7)


@pytest.mark.parametrize("bits,groups", [(8, 1), (8, 8), (4, 2), (4, 8)])
def test_quantize_within_half_a_step(bits, groups):
    _, w, half, (q, scale, zero) = make(4, 256, 64, bits, groups, jnp.float32, seed=bits + groups)
    deq = reference.dequantize(q, scale, zero, half)
    step = jnp.repeat(scale, 256 // groups, axis=0)
    assert bool(jnp.all(jnp.abs(deq - w) <= step / 2 * (1 + 1e-5) + 1e-7))


@pytest.mark.parametrize("m,k,n,bits,groups,dtype,knobs", [
    (1, 256, 128, 8, 1, jnp.bfloat16, {}),   # int8, one scale per channel, K split across programs
    (5, 512, 96, 8, 16, jnp.float32, {}),    # int8 in GGUF Q8_0's 32-input groups, several groups per step
    (16, 128, 64, 4, 1, jnp.float32, {}),    # int4 with one group: the zero through the row sums of x
    (3, 256, 256, 4, 2, jnp.bfloat16, {}),   # int4 in groups of 128 (AWQ's), two column strips
    (40, 256, 384, 4, 8, jnp.bfloat16, {}),  # int4 in groups of 32 (GGUF Q4), rows padded to 64
    (2, 512, 512, 4, 4, jnp.float32, {"block_n": 256, "block_k": 256}),  # two packed pairs per strip
    (2, 256, 512, 8, 1, jnp.float32, {"block_n": 512, "num_splits": 1}),
    (1, 256, 256, 8, 1, jnp.bfloat16, {"body": "dot", "convert": "cast"}),  # the conversion instructions
    (3, 256, 256, 4, 2, jnp.bfloat16, {"convert": "cast"}),
    (3, 256, 256, 4, 2, jnp.bfloat16, {"body": "gemv"}),  # the CUDA-core body: int4 groups, rows padded to 4
    (5, 512, 96, 8, 16, jnp.bfloat16, {"body": "gemv", "block_k": 64}),  # int8 groups of 32, two per step
])
def test_kernel_matches_the_oracle(m, k, n, bits, groups, dtype, knobs):
    x, _, half, (q, scale, zero) = make(m, k, n, bits, groups, dtype, seed=m * k + n)
    got = gpu.quant_matmul(x, q, scale, zero, half=half, interpret=True, **knobs)
    want = reference.quant_matmul(x, q, scale, zero, half)
    assert got.shape == (m, n) and not bool(jnp.isnan(got).any())
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert err < TOL[dtype], err


@pytest.mark.parametrize("m,k,ns,bits,groups,dtype,knobs", [
    (1, 256, (256, 128, 128), 8, 1, jnp.bfloat16, {}),   # q/k/v at one row: the gemv body, strips of 128
    (3, 256, (256, 128, 128), 4, 2, jnp.float32, {}),    # int4 groups of 128 with zeros
    (8, 512, (384, 384), 8, 16, jnp.float32, {"num_splits": 4}),  # gate/up, int8 groups of 32, K split
])
def test_many_matrices_in_one_call(m, k, ns, bits, groups, dtype, knobs):
    """q/k/v (gate/up) in one kernel: each matrix's slice of the output is its own product, every element written."""
    mats = []
    for i, n in enumerate(ns):
        x, _, half, (q, scale, zero) = make(m, k, n, bits, groups, dtype, seed=100 * i + n)
        mats.append((q, scale, zero))
    x = jax.random.normal(jax.random.key(m + k), (m, k), jnp.float32).astype(dtype)
    got = gpu.quant_matmul_many(x, tuple(mats), half=half, interpret=True, **knobs)
    assert gpu.supported_many(m, k, mats, half)
    for (q, scale, zero), g, n in zip(mats, got, ns):
        want = reference.quant_matmul(x, q, scale, zero, half)
        assert g.shape == (m, n) and not bool(jnp.isnan(g).any())
        assert float(jnp.max(jnp.abs(g - want)) / jnp.max(jnp.abs(want))) < TOL[dtype]
    fused = quant_linear_many(x, mats, half, jnp.float32, "pallas-interpret")
    apart = [quant_linear(x, *mat, half, jnp.float32, "xla") for mat in mats]
    for a, b in zip(fused, apart):
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < TOL[dtype]
    assert not gpu.supported_many(gpu.MANY_MAX_ROWS + 1, k, mats, half)
    with pytest.raises(ValueError, match="same K, groups"):
        gpu.quant_matmul_many(x, (mats[0], (mats[1][0], jnp.concatenate([mats[1][1]] * 2), mats[1][2])), half=half,
                              interpret=True)


def test_kernel_rejects_what_it_cannot_tile():
    x, _, half, (q, scale, zero) = make(65, 128, 64, 4, 1, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="at most 64 rows"):
        gpu.quant_matmul(x, q, scale, zero, half=half, interpret=True)
    with pytest.raises(ValueError, match="gemv body takes at most 8 rows"):
        gpu.quant_matmul(x[:9], q, scale, zero, half=half, body="gemv", interpret=True)
    with pytest.raises(ValueError, match="convert must be one of"):
        gpu.quant_matmul(x[:8], q, scale, zero, half=half, convert="fast", interpret=True)
    with pytest.raises(ValueError, match="packed"):
        gpu.quant_matmul(x[:8], q, scale, zero, half=None, interpret=True)
    assert not gpu.supported(65, 128, 64, 128, None) and gpu.supported(64, 128, 64, 128, None)


@pytest.mark.parametrize("m,k,n,bits,groups", [
    (1, 576, 1536, 8, 1),   # SmolLM2's gate/up: chunks of 64 columns, one scale per channel
    (9, 512, 96, 8, 16),    # int8 in GGUF Q8_0's 32-input groups; rows in blocks of 4, 4, then 1
    (3, 256, 80, 8, 4),     # N = 5 x 16: chunks of one vector
    (2, 128, 24, 8, 1),     # N not a multiple of 16: the one-column-at-a-time path
    (1, 576, 1536, 4, 18),  # int4 in groups of 32 (GGUF Q4), half-blocks of 64
    (6, 256, 96, 4, 2),     # int4 half-blocks of 16: chunks of 16 bytes
    (5, 128, 64, 4, 1),     # int4 with one group: the zero through each row's sum of x
    (2, 64, 24, 4, 2),      # int4 half-blocks of 4: the one-column path
])
def test_cpu_kernel_matches_the_oracle(m, k, n, bits, groups):
    if not cpu.available():
        pytest.fail("the CPU kernel did not build: see the logged compiler error")
    x, _, half, (q, scale, zero) = make(m, k, n, bits, groups, jnp.float32, seed=m * k + n + bits)
    got = cpu.quant_matmul(x, q, scale, zero, half, out=jnp.full((m, n), jnp.nan, jnp.float32))
    want = reference.quant_matmul(x, q, scale, zero, half)
    assert got.shape == (m, n) and not bool(jnp.isnan(got).any())
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert err < TOL[jnp.float32], err


def test_cpu_kernel_rejects_bad_layouts():
    x, _, half, (q, scale, zero) = make(2, 128, 64, 4, 2, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="packed"):
        cpu.quant_matmul(x, q, scale, zero, None)
    with pytest.raises(ValueError, match=r"int8 weights must be \[K, N\]"):
        cpu.quant_matmul(x, jnp.zeros((128, 32), jnp.int8), scale)
    with pytest.raises(ValueError, match="groups must divide K"):
        cpu.quant_matmul(x, q, jnp.ones((3, 64)), jnp.zeros((3, 64)), half)


@pytest.mark.parametrize("bits,groups", [(8, 1), (4, 32)])
def test_dispatch_kernels_and_xla_agree(bits, groups):
    """The layer's paths at a decode-sized batch: the GPU kernel (interpret mode), the C++ kernel (a CPU
    backend) and XLA's ("sharded": int8 per channel through int8_dot_two_level, hence its tolerance; int4:
    the fused dequantize)."""
    x, _, half, (q, scale, zero) = make(8, 1024, 128, bits, groups, jnp.float32, seed=bits)
    gpu_kernel = quant_linear(x, q, scale, zero, half, jnp.float32, "pallas-interpret")
    cpu_kernel = quant_linear(x, q, scale, zero, half, jnp.float32, "xla")
    xla = quant_linear(x, q, scale, zero, half, jnp.float32, "sharded")
    top = float(jnp.max(jnp.abs(xla)))
    np.testing.assert_allclose(cpu_kernel, gpu_kernel, rtol=0, atol=1e-5 * top)
    np.testing.assert_allclose(xla, gpu_kernel, rtol=0, atol=(1e-4 if bits == 8 else 1e-5) * top)


@pytest.mark.parametrize("m", [1, 5])
def test_int8_two_level_dot(m):
    """The CPU path for int8 per channel: x split in two int8 levels is off by <= 1/64516 of its row's max per
    element, so each output is within K * that * max|W| of the oracle; rows of zeros and rows with one large
    outlier (the activations that made one level lose 4% perplexity) included."""
    x, _, _, (q, scale, _) = make(m, 512, 96, 8, 1, jnp.float32, seed=m)
    x = x.at[0, 7].set(300.0)  # an outlier: the row's max is 100x its typical entry
    if m > 1:
        x = x.at[1].set(0.0)
    got = int8_dot_two_level(x, q, scale)
    want = reference.quant_matmul(x, q, scale)
    w_max = float(jnp.max(jnp.abs(reference.dequantize(q, scale))))
    bound = 512 * jnp.max(jnp.abs(x), axis=1, keepdims=True) / 64516 * w_max
    assert got.shape == (m, 96) and bool(jnp.all(jnp.abs(got - want) <= bound + 1e-6))
    assert m == 1 or not bool(jnp.any(got[1]))
    rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert rel < 5e-4, rel  # with the outlier; bf16 activations would be off by ~4e-3


@pytest.mark.parametrize("m,k,n,bits,groups,body", [(1, 4096, 4096, 8, 1, None), (8, 4096, 14336, 4, 32, None),
                                                    (64, 14336, 4096, 4, 112, None), (16, 4096, 1024, 8, 128, None),
                                                    (4, 14336, 4096, 4, 112, "gemv")])
def test_lowers_for_h100(m, k, n, bits, groups, body):
    """Llama-3.1-8B's layer shapes lower to Triton for an H100 (int8 at one row: the gemv body), alone and
    as q/k/v-like triples in one call."""
    half = 64 if bits == 4 else None
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)

    def mat(n):
        w = jax.ShapeDtypeStruct((k, n // 2), jnp.uint8) if bits == 4 else jax.ShapeDtypeStruct((k, n), jnp.int8)
        s = jax.ShapeDtypeStruct((groups, n), jnp.float32)
        return w, s, s if bits == 4 else None

    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
        lowered = jax.jit(lambda x, m: gpu.quant_matmul(x, *m, half=half, body=body)).trace(
            x, mat(n)).lower(lowering_platforms=("cuda",))
        assert "quant_matmul" in lowered.as_text()
        if m <= gpu.MANY_MAX_ROWS:
            triple = jax.jit(lambda x, ms: gpu.quant_matmul_many(x, ms, half=half, body=body)).trace(
                x, (mat(n), mat(n // 4), mat(n // 4))).lower(lowering_platforms=("cuda",))
            assert "quant_matmul" in triple.as_text()


@pytest.mark.parametrize("m,k,n,bits,groups,layout,knobs", [
    (1, 256, 128, 8, 1, "kn", {}),   # int8, one scale per channel (applied to the result), K split across programs
    (20, 256, 256, 4, 2, "kn", {}),  # int4 in groups of 128 with zeros, rows padded to 32, two strips of 128
    (3, 256, 128, 4, 4, "kn", {}),   # int4 in groups of 64: steps of 64 rows
    (2, 256, 128, 8, 4, "kn", {}),   # int8 in groups of 64: scaled per step, steps of 64 rows
    (2, 512, 128, 4, 2, "kn", {"piped_scales": True}),  # scales and zeros by TMA with the weights
    (3, 512, 256, 4, 2, "kn", {"piped_scales": True, "tile_k": 64, "splits": 2}),  # a group over two steps
    # The nk layout (its shared-memory path: the interpreter has no register-operand MMA):
    (1, 256, 128, 8, 1, "nk", {}),    # int8, one scale per channel, K split across programs
    (9, 256, 192, 8, 2, "nk", {"stages": 2}),  # int8 in groups of 128 (scales by TMA), rows padded to 16
    (20, 512, 128, 4, 4, "nk", {}),   # int4 (jnp.int4 q - 8) in groups of 128, with zeros
    (3, 256, 128, 4, 4, "nk", {"tile_n": 128, "piped_scales": False}),  # groups of 64, scales read per step
    (3, 512, 256, 8, 1, "nk", {"splits": 2}),  # x's 3 rows read as 8 (zeros from the copy), K in 2 programs
])
def test_hopper_kernel_matches_the_oracle(m, k, n, bits, groups, layout, knobs):
    """hopper.py's kernels in Mosaic GPU's interpreter (NaN-filled memory) on fresh inputs, against the oracle."""
    x, _, half, (q, scale, zero) = make(m, k, n, bits, groups, jnp.bfloat16, seed=7 * m + k + n + len(layout))
    if layout == "kn":
        assert hopper.supported(m, k, n, k // groups, half)
        got = hopper.quant_matmul(x, q, scale, zero, half=half, interpret=True, **knobs)
    else:
        assert hopper_nk.supported(m, k, n, k // groups)
        got = hopper_nk.quant_matmul(x, to_nk(q, half), scale, zero, interpret=True, **knobs)
    want = reference.quant_matmul(x, q, scale, zero, half)
    assert got.shape == (m, n) and not bool(jnp.isnan(got).any())
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert err < 1e-2, err


@pytest.mark.parametrize("m,k,ns,bits,groups", [
    (1, 512, (256, 128, 128), 4, 4),  # q/k/v-like int4 with zeros: three matrices, strips of 64
    (3, 256, (128, 128), 8, 1),       # gate/up-like int8, one scale per channel
    (9, 256, (192, 64), 8, 2),        # int8 in groups of 128, rows read as 16
])
def test_hopper_nk_many_matches_the_oracle(m, k, ns, bits, groups):
    """hopper_nk.quant_matmul_many (one kernel call over several matrices) in Mosaic GPU's interpreter: each
    output against its own matrix's oracle (distinct weights of equal shapes, one x)."""
    x = make(m, k, ns[0], bits, groups, jnp.bfloat16, seed=m)[0]
    layers = [make(m, k, n, bits, groups, jnp.bfloat16, seed=100 * i + m)[2:] for i, n in enumerate(ns)]
    outs = hopper_nk.quant_matmul_many(x, tuple((to_nk(q, half), s, z) for half, (q, s, z) in layers),
                                       interpret=True)
    for got, (half, (q, s, z)) in zip(outs, layers):
        want = reference.quant_matmul(x, q, s, z, half)
        assert got.shape == want.shape and not bool(jnp.isnan(got).any())
        assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 1e-2


def test_hopper_kernel_rejects_what_it_cannot_tile():
    x, _, half, (q, scale, zero) = make(2, 256, 96, 4, 8, jnp.bfloat16, seed=1)  # half-blocks of 16, groups of 32
    assert not hopper.supported(2, 256, 96, 32, half) and not hopper.supported(65, 256, 128, 256, None)
    with pytest.raises(ValueError, match="does not take"):
        hopper.quant_matmul(x, q, scale, zero, half=half, interpret=True)
    x, _, half, (q, scale, zero) = make(2, 256, 128, 4, 4, jnp.bfloat16, seed=2)  # groups of 64
    with pytest.raises(ValueError, match="at most one group"):  # a step's tile takes one group's scales
        hopper.quant_matmul(x, q, scale, zero, half=half, tile_k=128, interpret=True)


def abstract_layer(m: int, k: int, n: int, bits: int, groups: int, nk: bool = False) -> tuple:
    """(x, w, scale, zero or None, half) as shapes for lowering: x bf16 [m, k], W stored [k, n] with int4 in
    half-blocks of 64, or in the nk layout [n, k] (int4 as jnp.int4)."""
    half = 64 if bits == 4 and not nk else None
    if nk:
        w = jax.ShapeDtypeStruct((n, k), jnp.int4 if bits == 4 else jnp.int8)
    else:
        w = jax.ShapeDtypeStruct((k, n // 2), jnp.uint8) if half else jax.ShapeDtypeStruct((k, n), jnp.int8)
    s = jax.ShapeDtypeStruct((groups, n), jnp.float32)
    return jax.ShapeDtypeStruct((m, k), jnp.bfloat16), w, s, s if bits == 4 else None, half


@pytest.mark.parametrize("m,k,n,bits,groups", [(64, 4096, 14336, 4, 32), (17, 14336, 4096, 4, 112),
                                               (1, 4096, 4096, 8, 1)])
def test_hopper_kernel_lowers_for_h100(m, k, n, bits, groups, monkeypatch):
    """Llama-3.1-8B's layer shapes lower through Mosaic GPU for an H100, and quant_linear sends int4 at
    HOPPER_MIN_ROWS-64 rows there on a Hopper GPU (the Triton kernel otherwise)."""
    x, w, s, z, half = abstract_layer(m, k, n, bits, groups)
    monkeypatch.setattr(quant_matmul, "_is_hopper", lambda backend: True)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
        kernel = jax.jit(lambda x, w, s, z: hopper.quant_matmul(x, w, s, z, half=half)).trace(
            x, w, s, z).lower(lowering_platforms=("cuda",))
        assert "quant_matmul_hopper" in kernel.as_text()
        layer = jax.jit(lambda x, w, s, z: quant_linear(x, w, s, z, half, jnp.bfloat16, "pallas-gpu")).trace(
            x, w, s, z).lower(lowering_platforms=("cuda",)).as_text()
        hopper_rows = bits == 4 and m >= quant_matmul.HOPPER_MIN_ROWS
        assert ("quant_matmul_hopper" in layer) == hopper_rows and ("quant_matmul_int" in layer) != hopper_rows


@pytest.mark.parametrize("k,n,bits,groups", [(256, 64, 8, 1), (256, 96, 4, 8)])
def test_nk_layout_holds_the_same_weights(k, n, bits, groups):
    """to_nk re-lays the stored integers exactly: the nk layout ([N, K]; int4 as jnp.int4 q - 8) dequantizes
    to the same W, and its int4 bytes are XLA's packing (K 2i in the low nibble, 2i + 1 in the high)."""
    _, _, half, (q, scale, zero) = make(2, k, n, bits, groups, jnp.float32, seed=k + n + bits)
    wt = to_nk(q, half)
    assert wt.shape == (n, k) and wt.dtype == (jnp.int8 if bits == 8 else jnp.int4)
    np.testing.assert_array_equal(reference.dequantize(wt, scale, zero, None, nk=True),
                                  reference.dequantize(q, scale, zero, half))
    if bits == 4:
        values = unpack_int4(q, half).T.astype(jnp.int32)  # [N, K], 0..15
        data = jax.lax.bitcast_convert_type(wt.reshape(n, k // 2, 2), jnp.uint8).astype(jnp.int32)
        np.testing.assert_array_equal(data & 15, (values[:, 0::2] - 8) & 15)
        np.testing.assert_array_equal(data >> 4, (values[:, 1::2] - 8) & 15)


@pytest.mark.parametrize("m,bits,groups", [(1, 8, 1), (1, 4, 2), (3, 4, 8), (2, 8, 4)])
def test_row_matmul_matches_the_oracle(m, bits, groups):
    """The nk layout's one-row form in XLA (what quant_linear runs at one row there), and the layer's other
    nk paths (XLA's dot beyond one row) against the float32 oracle."""
    x, _, half, (q, scale, zero) = make(m, 512, 192, bits, groups, jnp.float32, seed=m + bits + groups)
    wt = to_nk(q, half)
    want = reference.quant_matmul(x, q, scale, zero, half)
    top = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(row_matmul(x, wt, scale, zero), want, rtol=0, atol=1e-5 * top)
    for backend in ("xla", "pallas-interpret", "sharded"):
        got = quant_linear(x, wt, scale, zero, None, jnp.float32, backend, nk=True)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * top)


@pytest.mark.parametrize("bits,groups", [(8, 1), (4, 4)])
def test_row_matmul_many_is_one_pass_over_every_matrix(bits, groups):
    """One row of q/k/v-like matrices (N 256, 64, 64) through xla.row_matmul_many: each output equals the
    oracle's and the HLO sums [64, K] pieces only. quant_linear_many in the nk layout takes that path for int8
    (int4 pieces were copied out on an H200: one reduction each there)."""
    mats, wants = [], []
    x = jax.random.normal(jax.random.key(bits), (1, 512), jnp.float32)
    for i, n in enumerate((256, 64, 64)):
        _, _, half, (q, scale, zero) = make(1, 512, n, bits, groups, jnp.float32, seed=10 * i + bits)
        mats.append((to_nk(q, half), scale, zero))
        wants.append(reference.quant_matmul(x, q, scale, zero, half))
    for got in (row_matmul_many(x, mats), quant_linear_many(x, mats, None, jnp.float32, "xla", nk=True)):
        for g, want in zip(got, wants):
            np.testing.assert_allclose(g, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    pieces = f"tensor<64x{groups}xf32>"  # per-group sums of a 64-row piece
    assert pieces in jax.jit(row_matmul_many).lower(x, mats).as_text()
    layer = jax.jit(lambda x, mats: quant_linear_many(x, mats, None, jnp.float32, "xla", nk=True)).lower(x, mats)
    assert (pieces in layer.as_text() and f"tensor<256x{groups}xf32>" not in layer.as_text()) == (bits == 8)
    assert row_matmul_many(x, [mats[0], (mats[1][0][:1], mats[1][1][:, :1], None)]) is None  # 256 pieces of one
    assert row_matmul_many(x, mats, piece=96) is None  # 96 divides no N here


def test_row_pieces_cut_a_lone_matrix(monkeypatch):
    """quant_matmul.ROW_PIECES: one row of a lone int8 nk matrix (o_proj) as [P, K] pieces in one reduction."""
    _, _, half, (q, scale, zero) = make(1, 512, 256, 8, 1, jnp.float32, seed=5)
    x = jax.random.normal(jax.random.key(5), (1, 512), jnp.float32)
    mats = [(to_nk(q, half), scale, zero)]
    want = reference.quant_matmul(x, q, scale, zero, half)
    monkeypatch.setattr(quant_matmul, "ROW_PIECES", 64)
    got = quant_linear_many(x, mats, None, jnp.float32, "xla", nk=True)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    layer = jax.jit(lambda x, mats: quant_linear_many(x, mats, None, jnp.float32, "xla", nk=True)).lower(x, mats)
    assert "tensor<64x1xf32>" in layer.as_text() and "tensor<256x1xf32>" not in layer.as_text()


def test_hopper_nk_kernel_rejects_what_it_cannot_take():
    x, _, half, (q, scale, zero) = make(2, 256, 128, 4, 8, jnp.bfloat16, seed=3)  # groups of 32
    assert not hopper_nk.supported(2, 256, 128, 32) and not hopper_nk.supported(65, 256, 128, 256)
    with pytest.raises(ValueError, match="does not take"):
        hopper_nk.quant_matmul(x, to_nk(q, half), scale, zero, interpret=True)
    x, _, half, (q, scale, zero) = make(2, 256, 128, 4, 2, jnp.bfloat16, seed=4)
    with pytest.raises(ValueError, match="registers=True needs a GPU"):
        hopper_nk.quant_matmul(x, to_nk(q, half), scale, zero, registers=True, interpret=True)
    _, _, _, (q8, scale8, _) = make(2, 256, 128, 8, 2, jnp.bfloat16, seed=5)  # int8 beside int4: two calls
    with pytest.raises(ValueError, match="same K, groups, dtype and zeros"):
        hopper_nk.quant_matmul_many(x, ((to_nk(q, half), scale, zero), (to_nk(q8, None), scale8, None)),
                                    interpret=True)


@pytest.mark.parametrize("m,k,n,bits,groups", [(8, 4096, 14336, 8, 1), (64, 14336, 4096, 8, 1),
                                               (64, 4096, 14336, 4, 32), (1, 4096, 4096, 4, 32),
                                               (1, 4096, 14336, 4, 32), (1, 4096, 4096, 8, 1),
                                               (1, 4096, 128256, 8, 1)])
def test_hopper_nk_lowers_for_h100(m, k, n, bits, groups, monkeypatch):
    """The nk kernel lowers at Llama-3.1-8B's shapes for an H100 (through the MMA's register operand, the path
    the interpreter lacks), and quant_linear in the nk layout on a Hopper GPU sends 2-64 rows there, and one
    row of the larger layers (int4 gate/up/down, an int8 LM head or down_proj); the rest of one row to XLA's
    row reduction."""
    x, w, s, z, _ = abstract_layer(m, k, n, bits, groups, nk=True)
    monkeypatch.setattr(quant_matmul, "_is_hopper", lambda backend: True)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
        layer = jax.jit(lambda x, w, s, z: quant_linear(x, w, s, z, None, jnp.bfloat16, "pallas-gpu", nk=True)
                        ).trace(x, w, s, z).lower(lowering_platforms=("cuda",)).as_text()
    kernel = m > 1 or (k * n >= quant_matmul.ROW_KERNEL_INT4 if bits == 4 else n > quant_matmul.ROW_MAX_N or k > n)
    assert ("quant_matmul_hopper_nk" in layer) == kernel
    assert ("_reg" in layer) == kernel


@pytest.mark.parametrize("m,ns,bits,groups,calls", [
    (1, (14336, 14336), 4, 32, "_x2"),        # int4 gate/up at one row: both through the kernel, one call
    (1, (4096, 1024, 1024), 4, 32, "_x3"),    # int4 q/k/v at one row: one call (ROW_MANY_INT4_KERNEL)
    (8, (4096, 1024, 1024), 8, 1, "_x3"),     # int8 q/k/v at 8 rows: one call
    (64, (14336, 14336), 4, 32, "_x2"),       # int4 gate/up at 64 rows (fits the H100's shared memory)
])
def test_nk_layers_share_one_kernel_call_on_hopper(m, ns, bits, groups, calls, monkeypatch):
    """quant_linear_many in the nk layout on a Hopper GPU: q/k/v or gate/up in one hopper_nk call when each
    would run that kernel alone (lowered for an H100 on CPU)."""
    monkeypatch.setattr(quant_matmul, "_is_hopper", lambda backend: True)
    x = abstract_layer(m, 4096, ns[0], bits, groups, nk=True)[0]
    mats = [abstract_layer(m, 4096, n, bits, groups, nk=True)[1:4] for n in ns]
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
        text = jax.jit(lambda x, mats: quant_linear_many(x, list(mats), None, jnp.bfloat16, "pallas-gpu", nk=True)
                       ).trace(x, tuple(mats)).lower(lowering_platforms=("cuda",)).as_text()
    assert ("_reg_x" in text) == (calls is not None) and (calls is None or f"_reg{calls}" in text)


@pytest.mark.parametrize("m,k,n,bits,groups,dtype", [
    (1, 256, 128, 8, 1, jnp.float32),    # int8, one scale per channel (applied to the sum)
    (9, 512, 256, 8, 4, jnp.float32),    # int8 in groups of 128: each K block's dot scaled; rows padded to 16
    (3, 512, 512, 4, 4, jnp.bfloat16),   # int4 with zeros: two nibble dots per block, columns put back in order
])
def test_tpu_kernel_matches_the_oracle(m, k, n, bits, groups, dtype):
    """tpu.py's kernel in Pallas' TPU interpreter on fresh inputs, against the oracle, and quant_linear sending
    a TPU backend's layer there."""
    x, _, half, (q, scale, zero) = make(m, k, n, bits, groups, dtype, seed=m + k + n + bits)
    assert tpu.supported(m, k, n, k // groups, half)
    want = reference.quant_matmul(x, q, scale, zero, half)
    top = float(jnp.max(jnp.abs(want)))
    got = tpu.quant_matmul(x, q, scale, zero, half=half, interpret=True)
    assert got.shape == (m, n) and not bool(jnp.isnan(got).any())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * top)
    layer = quant_linear(x, q, scale, zero, half, jnp.float32, "pallas-tpu-interpret")
    np.testing.assert_allclose(layer, want, rtol=0, atol=2e-2 * top if dtype == jnp.bfloat16 else 1e-5 * top)


def test_tpu_kernel_lowers_for_v6e():
    """Llama-3.1-8B's gate/up (int4, groups of 128) and an int8 LM head lower through Mosaic for a TPU v6e
    on this CPU, and quant_linear on the "pallas-tpu" backend runs the kernel; GGUF's groups of 32 go to XLA."""
    v6e = jax.sharding.AbstractDevice(device_kind="TPU v6 lite", num_cores=1, platform="tpu")
    assert not tpu.supported(1, 4096, 4096, 32, 64) and not tpu.supported(65, 4096, 4096, 4096, None)
    for m, k, n, bits, groups in [(1, 4096, 14336, 4, 32), (16, 4096, 128256, 8, 1)]:
        x, w, s, z, half = abstract_layer(m, k, n, bits, groups)
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=v6e)):
            text = jax.jit(lambda x, w, s, z: quant_linear(x, w, s, z, half, jnp.bfloat16, "pallas-tpu")).trace(
                x, w, s, z).lower(lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in text
