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

        def norm(name: str) -> RMSNorm:  # (x * w, 1 / rms): the projections apply the 1 / rms
            return RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=self.dtype, deferred=True, name=name)

        xw, inv_rms = norm("input_layernorm")(x)
        h, kv = Attention(c, self.layer_idx, self.dtype, self.backend, name="self_attn")(xw, rope, kv, md, inv_rms)
        x = x + h
        h = GatedMLP(c, self.dtype, self.backend, name="mlp")(*norm("post_attention_layernorm")(x))
        return x + h, kv


class LlamaForCausalLM(CausalLM):
    layer_cls = LlamaDecoderLayer
