"""Write a tiny Hugging Face model as a GGUF file the way llama.cpp's converter does (for loader tests).

It follows convert_hf_to_gguf.py's conventions: llama.cpp tensor names, Q/K rows permuted for the
llama architecture, +1 on Gemma's norm weights, and the tokenizer as gpt2-style tokens + merges.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
        "gemma3_text": "gemma3"}
NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: interleave the rotary halves of each head's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_freq_factors(rope: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp's converter stores as `rope_freqs` for Llama 3.1 rope scaling (inv_freq is divided by it)."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


def gguf_name(hf_name: str, arch: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    gemma = arch.startswith("gemma")
    if module == "post_attention_layernorm":
        part = "post_attention_norm" if gemma else "ffn_norm"
    elif module == "pre_feedforward_layernorm":
        part = "ffn_norm"
    else:
        part = NAMES[module]
    return f"blk.{layer}.{part}.{kind}"


def write_gguf(model: torch.nn.Module, tokenizer_dir: Path, out: Path,
               qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
               part_qtypes: dict[str, gguf.GGMLQuantizationType] | None = None) -> Path:
    """Write `model` (a transformers model) to `out`; 2-D weights in `qtype`, or in the type `part_qtypes` gives
    their llama.cpp name part (e.g. {"ffn_down": Q8_0}); everything else F32."""
    cfg = model.config
    arch = ARCH[cfg.model_type]
    w = gguf.GGUFWriter(str(out), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_freq_factors(rope, head_dim))
    if getattr(cfg, "sliding_window", None) and arch.startswith("gemma"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_vocab_size(cfg.vocab_size)

    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [""] * cfg.vocab_size
    types = [gguf.TokenType.UNUSED] * cfg.vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for t in tok["added_tokens"]:
        types[t["id"]] = gguf.TokenType.CONTROL
    for i in range(cfg.vocab_size):
        tokens[i] = tokens[i] or f"[PAD{i}]"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_add_bos_token(False)

    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = p.detach().float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            data = permute(data, heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1.0
        out_name = gguf_name(name, arch)
        tensor_qtype = (part_qtypes or {}).get(out_name.split(".")[-2], qtype)
        if data.ndim == 2 and tensor_qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(out_name, gguf.quantize(data, tensor_qtype), raw_dtype=tensor_qtype)
        else:
            w.add_tensor(out_name, np.ascontiguousarray(data, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
