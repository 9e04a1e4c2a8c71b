"""Tiny random models built with transformers, one per architecture variant jaxllm supports.

Shapes are small (hidden 64, 4 query / 2 KV heads) and sliding windows short (8), so that test prompts of
~40 tokens run past the window. Weights are drawn wider than transformers' default so that logits are
peaked and greedy decoding is not decided by rounding noise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

VARIANTS: dict[str, tuple[type, dict]] = {
    "llama2": (transformers.LlamaConfig, dict(num_hidden_layers=2)),
    "llama3.1": (transformers.LlamaConfig, dict(num_hidden_layers=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama3.2": (transformers.LlamaConfig, dict(num_hidden_layers=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                                                tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(num_hidden_layers=2, sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, dict(num_hidden_layers=2)),
    "qwen3": (transformers.Qwen3Config, dict(num_hidden_layers=2, head_dim=32)),
    "gemma2": (transformers.Gemma2Config, dict(num_hidden_layers=2, head_dim=16, sliding_window=8,
                                               query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                               final_logit_softcapping=3.0)),
    "gemma3": (transformers.Gemma3TextConfig, dict(num_hidden_layers=3, head_dim=16, sliding_window=8,
                                                   layer_types=["sliding_attention", "full_attention",
                                                                "sliding_attention"],
                                                   query_pre_attn_scalar=16, rope_theta=1_000_000.0,
                                                   rope_local_base_freq=10_000.0,
                                                   rope_scaling={"rope_type": "linear", "factor": 8.0})),
}
ARCHITECTURE = {transformers.LlamaConfig: "LlamaForCausalLM", transformers.MistralConfig: "MistralForCausalLM",
                transformers.Qwen2Config: "Qwen2ForCausalLM", transformers.Qwen3Config: "Qwen3ForCausalLM",
                transformers.Gemma2Config: "Gemma2ForCausalLM", transformers.Gemma3TextConfig: "Gemma3ForCausalLM"}

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. Paged attention keeps keys and values in fixed-size pages; "
        "each sequence owns a block table. 0123456789 naïve café — üñí©ødé ✓")


def build_tokenizer(path: Path) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a few hundred tokens, saved to `path`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(path))
    return fast


def make_config(variant: str, **overrides) -> transformers.PretrainedConfig:
    cls, extra = VARIANTS[variant]
    kwargs = {**COMMON, **extra, **overrides}
    return cls(**kwargs, architectures=[ARCHITECTURE[cls]], initializer_range=0.08)


def build_model(variant: str, path: Path, tokenizer, *, dtype: torch.dtype = torch.float32,
                max_shard_size: str | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random model of `variant` saved (safetensors + tokenizer) to `path`; returns it in float32."""
    torch.manual_seed(seed)
    config = make_config(variant, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # wider weights -> peaked logits; norms random around their identity value
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if variant.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    copy.deepcopy(model).to(dtype).save_pretrained(str(path), **kwargs)
    tokenizer.save_pretrained(str(path))
    return model


def hf_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32 logits of one prompt."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def hf_greedy(model: torch.nn.Module, token_ids: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers' generate, not stopping at EOS."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([token_ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(token_ids):].tolist()
