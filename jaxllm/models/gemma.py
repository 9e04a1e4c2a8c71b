"""Gemma 2 and Gemma 3 text models.

    x = embed(ids) * sqrt(hidden_size)
    h = x + PostNorm(Attention(PreNorm(x)))      # scale query_pre_attn_scalar**-0.5; Gemma 2: logit soft cap;
                                                 # Gemma 3: RMSNorm on q and k; sliding/global layers alternate,
                                                 # each type with its own rope base
    y = h + PostNorm(GatedMLP(PreNorm(h)))       # gelu (tanh approximation)
    logits = cap * tanh(logits / cap)            # Gemma 2's final soft cap
Every RMSNorm scales by (1 + w).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxllm.attention import AttentionMetadata, KVPages
from jaxllm.models.layers import Attention, CausalLM, DecoderLayer, GatedMLP, RMSNorm


class GemmaDecoderLayer(DecoderLayer):
    @nn.compact
    def __call__(self, x: jax.Array, rope, kv: KVPages, md: AttentionMetadata) -> tuple[jax.Array, KVPages]:
        c = self.config

        def norm(name: str, deferred: bool = False) -> RMSNorm:  # deferred: the projections apply the 1 / rms
            return RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=True, dtype=self.dtype, deferred=deferred,
                           name=name)

        xw, inv_rms = norm("input_layernorm", deferred=True)(x)
        h, kv = Attention(c, self.layer_idx, self.dtype, self.backend, name="self_attn")(xw, rope, kv, md, inv_rms)
        x = x + norm("post_attention_layernorm")(h)
        h = GatedMLP(c, self.dtype, self.backend, name="mlp")(*norm("pre_feedforward_layernorm", deferred=True)(x))
        return x + norm("post_feedforward_layernorm")(h), kv


class GemmaForCausalLM(CausalLM):
    layer_cls = GemmaDecoderLayer
    scale_embeddings = True
