"""Building blocks shared by the model families: RMSNorm, rotary embeddings, attention, gated MLP, the LM stack.

Shapes: a step's tokens are flattened across sequences (`[num_tokens, ...]`); there is no batch axis.
Parameters carry logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp, norm) that
jaxllm.sharding maps onto a device mesh.
"""

from __future__ import annotations

import functools

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import AttentionMetadata, KVPages, paged_attention, tensor_parallel
from jaxllm.config import ModelConfig, RopeConfig
from pallas_kernels.quant_matmul import pack_half, quant_linear_many

Dtype = Any


def _init(names: tuple[str, ...], init=nn.initializers.normal(0.02)):
    return nn.with_logical_partitioning(init, names)


def dense(features, names: tuple[str, ...], use_bias: bool, dtype: Dtype, name: str, axis=-1,
          quantization: str | None = None, group_size: int | None = None, backend: str = "xla",
          nk: bool = False) -> nn.Module:
    """A linear layer whose kernel is `[*in_axes, *out_axes]` with logical axis `names` (int8 or int4 weights
    with quantization="int8" / "int4", transposed with `nk`; `backend` picks their matmul,
    pallas_kernels.quant_matmul)."""
    if quantization in QUANT_BITS:
        return QuantDense(features, names, axis, use_bias, dtype, QUANT_BITS[quantization], group_size, backend,
                          nk, name=name)
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=dtype,
                           kernel_init=_init(names), bias_init=_init(names[-n_out:], nn.initializers.zeros),
                           name=name)


QUANT_BITS = {"int8": 8, "int4": 4}


def quant_group_size(num_inputs: int, bits: int, preferred: int | None = None) -> int:
    """Inputs sharing one scale. `preferred` None: every input for int8 (one scale per output channel), 128
    for int4 (AWQ's usual size); 32 for int4 from GGUF sources (their blocks). Falls back to the largest of 64, 32
    that divides the layer's inputs, else all of them."""
    preferred = preferred or (num_inputs if bits == 8 else 128)
    return next((g for g in (preferred, 64, 32) if g <= preferred and num_inputs % g == 0), num_inputs)


class QuantDense(nn.Module):
    """Weight-only quantized linear layer, stored as pallas_kernels.quant_matmul lays it out: kernel
    `[*in, *out]` in int8 (bits=8, symmetric) or two unsigned int4 per byte along the last output dim (bits=4,
    `[*in, *out[:-1], out[-1] // 2]`), a float32 scale (and, int4, zero) `[groups, *out]` per group of inputs.
    With `nk` the kernel is `[*out, K]` over the flattened inputs K (int4: jnp.int4 holding q - 8).
    The device holds one byte (half a byte) per weight; contracts the trailing `axis` dims of x."""

    features: int | tuple[int, ...]
    names: tuple[str, ...]
    axis: int | tuple[int, ...]
    use_bias: bool
    dtype: Dtype
    bits: int = 8
    group_size: int | None = None
    backend: str = "xla"
    nk: bool = False

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.features if isinstance(self.features, tuple) else (self.features,)

    @nn.compact
    def weights(self, in_shape: tuple[int, ...]) -> tuple[tuple, int | None, jax.Array | None]:
        """The stored weights as 2-D (kernel [K, N] or [K, N // 2], nk: [N, K]; scale [G, N],
        zero [G, N] or None), int4's half, and the bias [*out] (None without)."""
        out = self.out_shape
        n_in = len(in_shape)
        num_in, num_out = math.prod(in_shape), math.prod(out)
        groups = num_in // quant_group_size(num_in, self.bits, self.group_size)
        group_names = (None,) + self.names[n_in:]  # groups replicated: a layer may have one, and scales are small
        names = self.names
        if self.nk:  # K flattened
            half, stored = None, ((*out, num_in), jnp.int8 if self.bits == 8 else jnp.int4)
            names = (*self.names[n_in:], None)
        elif self.bits == 8:
            half, stored = None, ((*in_shape, *out), jnp.int8)
        else:
            half, stored = pack_half(out[-1]), ((*in_shape, *out[:-1], out[-1] // 2), jnp.uint8)
        kernel = self.param("kernel", _init(names, nn.initializers.zeros), *stored)
        scale = self.param("scale", _init(group_names, nn.initializers.ones), (groups, *out), jnp.float32)
        zero = None
        if self.bits == 4:
            zero = self.param("zero", _init(group_names, nn.initializers.zeros), (groups, *out), jnp.float32)
            zero = zero.reshape(groups, num_out)
        bias = None
        if self.use_bias:
            bias = self.param("bias", _init(self.names[n_in:], nn.initializers.zeros), out, self.dtype)
        kernel = kernel.reshape(num_out, -1) if self.nk else kernel.reshape(num_in, -1)
        return (kernel, scale.reshape(groups, num_out), zero), half, bias

    def __call__(self, x: jax.Array) -> jax.Array:
        return project_many([self], x)[0]

    def finish(self, y: jax.Array, lead: tuple[int, ...], bias: jax.Array | None) -> jax.Array:
        """[*lead, N] -> [*lead, *out], plus the bias."""
        y = y.reshape(*lead, *self.out_shape)
        return y if bias is None else y + bias


def project_many(layers: list[nn.Module], x: jax.Array, x_scale: jax.Array | None = None) -> list[jax.Array]:
    """Each layer applied to x * x_scale (x_scale [*lead, 1] float32 or None: a factor of each row of x, applied
    to the outputs, before any bias). Quantized layers that contract the same input dims run as one matmul call
    (one kernel launch for q/k/v or gate/up on a GPU: pallas_kernels.quant_matmul.quant_linear_many)."""
    n_in = len(layers[0].axis) if isinstance(layers[0].axis, tuple) else 1
    lead, in_shape = x.shape[:-n_in], x.shape[-n_in:]

    def scaled(y: jax.Array) -> jax.Array:  # y [*lead, ...] times x_scale
        return y if x_scale is None else (y * x_scale.reshape(*lead, *[1] * (y.ndim - len(lead)))).astype(y.dtype)

    if not all(isinstance(layer, QuantDense) for layer in layers):
        if x_scale is not None and any(layer.use_bias for layer in layers):  # the bias is added inside: scale x
            return [layer((x * x_scale).astype(x.dtype)) for layer in layers]
        return [scaled(layer(x)) for layer in layers]
    stored = [layer.weights(in_shape) for layer in layers]
    backend = "sharded" if tensor_parallel() else layers[0].backend  # the quantized kernels have no sharded form
    x2 = x.reshape(-1, math.prod(in_shape))
    many = functools.partial(quant_linear_many, dtype=layers[0].dtype, backend=backend, nk=layers[0].nk)
    if len({half for _, half, _ in stored}) == 1:
        ys = many(x2, [mats for mats, _, _ in stored], stored[0][1])
    else:  # int4 packed in different half-blocks: one call each
        ys = [many(x2, [mats], half)[0] for mats, half, _ in stored]
    return [layer.finish(scaled(y.reshape(*lead, -1)), lead, bias)
            for layer, y, (_, _, bias) in zip(layers, ys, stored)]


class RMSNorm(nn.Module):
    """RMSNorm in float32. Llama style: `w * norm(x)`; Gemma style (`plus_one`): `norm(x) * (1 + w)`.

    `deferred` (a norm before linear layers): returns (x * w in x's dtype, 1 / rms [..., 1] float32), and the
    layers scale their outputs by the second (project_many's x_scale). x * w needs no reduction's result, so XLA
    computes it in the kernel that sums the squares, not in a multiply of its own (XLA fuses no producer into a
    one-row matmul's reduction)."""

    dim: int
    eps: float
    plus_one: bool = False
    dtype: Dtype = jnp.float32
    deferred: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", _init(("norm",), init), (self.dim,), self.dtype)
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.deferred:
            w = 1.0 + scale.astype(jnp.float32) if self.plus_one else scale.astype(jnp.float32)
            return (x32 * w).astype(x.dtype), inv_rms
        y = x32 * inv_rms
        if self.plus_one:
            return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return scale * y.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Rotary position embeddings (non-interleaved halves, as Hugging Face lays out q/k).


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies `[dim // 2]` (float32, as transformers computes them) and the cos/sin scale."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponent)).astype(np.float32)
    scaling = 1.0
    if rope.rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif rope.rope_type == "yarn":
        inv_freq, scaling = _yarn(rope, dim)
    if rope.freq_factors is not None:
        inv_freq = inv_freq / np.asarray(rope.freq_factors, np.float32)
    return inv_freq.astype(np.float32), float(scaling)


def _yarn(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, base = rope.factor, rope.theta
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), attention_factor


def rope_cos_sin(positions: jax.Array, rope: RopeConfig, dim: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [num_tokens, dim // 2] float32 for integer `positions` [num_tokens]."""
    inv_freq, scaling = rope_inv_freq(rope, dim)
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(angles) * scaling, jnp.sin(angles) * scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x: [num_tokens, num_heads, head_dim] by per-token angles (cos, sin: [num_tokens, head_dim // 2]):
    halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). Written with a reverse of the halves, not a
    concatenation, so that it is elementwise and XLA fuses it into the KV cache write."""
    t, h, d = x.shape
    halves = x.astype(jnp.float32).reshape(t, h, 2, d // 2)  # [..., (x1, x2), d/2]
    swapped = halves[:, :, ::-1] * jnp.asarray([-1.0, 1.0], jnp.float32)[:, None]  # (-x2, x1)
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    return (halves * cos + swapped * sin).reshape(t, h, d).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """GQA self-attention over the paged KV cache: project, (q/k norm), rotate, write pages, attend, project."""

    config: ModelConfig
    layer_idx: int
    dtype: Dtype
    backend: str

    @nn.compact
    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], kv: KVPages,
                 md: AttentionMetadata, x_scale: jax.Array | None = None) -> tuple[jax.Array, KVPages]:
        """x [num_tokens, embed] (times x_scale [num_tokens, 1], a deferred RMSNorm's 1 / rms, if given)."""
        c = self.config
        proj = functools.partial(dense, dtype=self.dtype, quantization=c.quantization, group_size=c.quant_group_size,
                                 backend=self.backend, nk=c.quant_layout == "nk")
        heads, kv_heads = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        q, k, v = project_many([proj((c.num_heads, c.head_dim), heads, c.qkv_bias, name="q_proj"),
                                proj((c.num_kv_heads, c.head_dim), kv_heads, c.qkv_bias, name="k_proj"),
                                proj((c.num_kv_heads, c.head_dim), kv_heads, c.qkv_bias, name="v_proj")], x,
                               x_scale)
        if c.qk_norm:  # Qwen3, Gemma 3: RMSNorm over head_dim before the rotation
            q = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_plus_one, self.dtype, name="q_norm")(q)
            k = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_plus_one, self.dtype, name="k_norm")(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out, kv = paged_attention(q, k, v, kv, md, scale=c.attention_scale,
                                  sliding_window=c.sliding_windows[self.layer_idx],
                                  soft_cap=c.attn_logit_softcap, backend=self.backend)
        out = proj(c.hidden_size, ("heads", "head_dim", "embed"), c.o_bias, name="o_proj", axis=(-2, -1))(out)
        return out, kv


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): [num_tokens, embed] -> [num_tokens, embed]."""

    config: ModelConfig
    dtype: Dtype
    backend: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, x_scale: jax.Array | None = None) -> jax.Array:
        """x [num_tokens, embed] (times x_scale [num_tokens, 1], a deferred RMSNorm's 1 / rms, if given)."""
        c = self.config
        proj = functools.partial(dense, dtype=self.dtype, quantization=c.quantization, group_size=c.quant_group_size,
                                 backend=self.backend, nk=c.quant_layout == "nk")
        gate, up = project_many([proj(c.intermediate_size, ("embed", "mlp"), c.mlp_bias, name="gate_proj"),
                                 proj(c.intermediate_size, ("embed", "mlp"), c.mlp_bias, name="up_proj")], x,
                                x_scale)
        return proj(c.hidden_size, ("mlp", "embed"), c.mlp_bias, name="down_proj")(ACTIVATIONS[c.hidden_act](gate) * up)


class DecoderLayer(nn.Module):
    """What every family's decoder layer is given; a family defines
    __call__(x [num_tokens, embed], rope (cos, sin), kv: KVPages, md) -> (x, kv)."""

    config: ModelConfig
    layer_idx: int
    dtype: Dtype
    backend: str


class CausalLM(nn.Module):
    """Embed -> decoder layers (over the paged KV cache) -> final norm -> logits.

    A family subclasses this and names its decoder layer; the layer is where the families differ.
    __call__(input_ids [num_tokens], positions [num_tokens], kv_caches [one KVPages per layer], md,
    logits_indices [n] or None) -> (logits [n or num_tokens, vocab] float32, new kv_caches).
    The engine calls the two halves, `hidden_states` and `logits`, so that it can project only the rows
    it samples from (and every row when prompt logprobs are asked for).
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    backend: str = "reference"

    layer_cls: ClassVar[type[DecoderLayer]]
    scale_embeddings: ClassVar[bool] = False  # Gemma multiplies embeddings by sqrt(hidden_size)

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                                     embedding_init=_init(("vocab", "embed")))
        self.layers = [self.layer_cls(c, i, self.dtype, self.backend) for i in range(c.num_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_plus_one, self.dtype)
        if c.lm_head_int8 or not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, ("embed", "vocab"), False, self.dtype, None,
                                 quantization="int8" if c.lm_head_int8 else None, backend=self.backend,
                                 nk=c.quant_layout == "nk")

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_caches: list[KVPages],
                 md: AttentionMetadata, logits_indices: jax.Array | None = None
                 ) -> tuple[jax.Array, list[KVPages]]:
        x, new_caches = self.hidden_states(input_ids, positions, kv_caches, md)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.logits(x), new_caches

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array, kv_caches: list[KVPages],
                      md: AttentionMetadata) -> tuple[jax.Array, list[KVPages]]:
        """The final-normed hidden states [num_tokens, embed] and the updated KV caches."""
        c = self.config
        x = self.embed_tokens(input_ids)  # [num_tokens, embed]
        if self.scale_embeddings:
            x = x * jnp.asarray(c.hidden_size ** 0.5, self.dtype)
        ropes = {r: rope_cos_sin(positions, r, c.head_dim) for r in dict.fromkeys(c.ropes)}
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, ropes[c.ropes[i]], kv_caches[i], md)
            new_caches.append(kv)
        return self.norm(x), new_caches

    def logits(self, x: jax.Array) -> jax.Array:
        """[n, embed] -> float32 logits [n, vocab] (Gemma 2: soft-capped)."""
        c = self.config
        if c.tie_word_embeddings and not c.lm_head_int8:  # E [vocab, embed] on its own last dim: no copy of E.T
            logits = jnp.einsum("ve,te->tv", self.embed_tokens.embedding.astype(self.dtype), x.astype(self.dtype))
        else:
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if c.final_logit_softcap is not None:
            logits = c.final_logit_softcap * jnp.tanh(logits / c.final_logit_softcap)
        return logits
