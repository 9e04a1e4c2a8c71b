"""Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3 (differences are config flags).

    h = x + Attention(RMSNorm(x))       # Qwen2: q/k/v bias; Qwen3: RMSNorm on q and k; Mistral: sliding window
    y = h + GatedMLP(RMSNorm(h))        # down(silu(gate(h)) * up(h))
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxllm.attention import AttentionMetadata, KVPages
from jaxllm.models.layers import Attention, CausalLM, DecoderLayer, GatedMLP, RMSNorm


class LlamaDecoderLayer(DecoderLayer):
    @nn.compact
    def __call__(self, x: jax.Array, rope, kv: KVPages, md: AttentionMetadata) -> tuple[jax.Array, KVPages]:
        c = self.config
        h, kv = Attention(c, self.layer_idx, self.dtype, self.backend, name="self_attn")(
            RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=self.dtype, name="input_layernorm")(x), rope, kv, md)
        x = x + h
        h = GatedMLP(c, self.dtype, self.backend, name="mlp")(
            RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=self.dtype, name="post_attention_layernorm")(x))
        return x + h, kv


class LlamaForCausalLM(CausalLM):
    layer_cls = LlamaDecoderLayer
