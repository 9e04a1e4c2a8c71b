"""GGUF files (llama.cpp's format): config, tokenizer and chat template from the metadata; tensors
dequantized with the `gguf` package and renamed to Hugging Face names, undoing what llama.cpp's
converter changed (the Q/K row permutation of Llama, the +1 on Gemma's norm weights).

With quantization="gguf" the linear layers' Q4_0 / Q4_1 / Q8_0 blocks are kept instead (`QuantizedWeight`s):
each row of a weight [out, in] is blocks of 32 inputs, an fp16 scale d (Q4_1: and an fp16 minimum m) before
their values; Q4_0 w = (q - 8) * d, Q4_1 w = q * d + m (q 0..15, byte j of a block holding value j in its low
nibble and value j + 16 in its high one), Q8_0 w = q * d (q int8).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ConfigError, ModelLoadError
from jaxllm.weights.mapping import QuantizedWeight

# GGUF general.architecture -> (transformers model_type, architectures entry)
GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}

# {arch}.<key> -> transformers config field
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
    "rope.freq_base": "rope_theta",
}

_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# GGML block types that quantization="gguf" keeps -> how the linear layers then hold them
BLOCK_TYPES = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}
BLOCK_SIZE = 32  # inputs per block (a group of our layout) of each of BLOCK_TYPES


class GGUFModel:
    """An open GGUF file: `hf_config()`, `tokenizer()`, `tensors()`; metadata parsed once."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the reader raises ValueError/struct.error/IndexError on a damaged file
            raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.metadata: dict[str, Any] = {k: f.contents() for k, f in self.reader.fields.items()}
        self.arch = self.metadata.get("general.architecture")
        if self.arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(f"{path}: GGUF architecture {self.arch!r} is not supported; supported: "
                                 f"{', '.join(GGUF_ARCHITECTURES)}")
        self._tensors = {t.name: t for t in self.reader.tensors}

    def hf_config(self):
        """A transformers config built from the metadata, as llama.cpp's converter would have read it."""
        from transformers import CONFIG_MAPPING

        md, arch = self.metadata, self.arch
        model_type, architecture = GGUF_ARCHITECTURES[arch]
        kw: dict[str, Any] = {hf: md[f"{arch}.{key}"] for key, hf in _CONFIG_KEYS.items() if f"{arch}.{key}" in md}
        tokens = md.get("tokenizer.ggml.tokens")
        kw["vocab_size"] = int(md.get(f"{arch}.vocab_size") or (len(tokens) if tokens else
                                                                 self._tensors["token_embd.weight"].shape[-1]))
        kw["tie_word_embeddings"] = "output.weight" not in self._tensors
        kw["architectures"] = [architecture]
        for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            if f"tokenizer.ggml.{key}" in md:
                kw[hf] = int(md[f"tokenizer.ggml.{key}"])
        scaling = md.get(f"{arch}.rope.scaling.type")
        if scaling in ("linear", "yarn"):
            rope_scaling = {"rope_type": scaling, "factor": float(md[f"{arch}.rope.scaling.factor"])}
            if f"{arch}.rope.scaling.original_context_length" in md:
                rope_scaling["original_max_position_embeddings"] = int(md[f"{arch}.rope.scaling.original_context_length"])
            kw["rope_scaling"] = rope_scaling
        elif scaling not in (None, "none"):
            raise ModelLoadError(f"{self.path}: rope scaling {scaling!r} is not supported")
        if arch == "qwen2":
            kw["use_sliding_window"] = False
        if arch in ("gemma2", "gemma3"):
            # llama.cpp scales queries by head_dim**-0.5, except the 27B models (hidden / heads).
            head_dim = kw.get("head_dim") or kw["hidden_size"] // kw["num_attention_heads"]
            big = kw["num_hidden_layers"] in (46, 62)
            kw["query_pre_attn_scalar"] = kw["hidden_size"] // kw["num_attention_heads"] if big else head_dim
            kw["layer_types"] = self._layer_types(kw["num_hidden_layers"], default_period=6 if arch == "gemma3" else 2)
        if arch == "gemma3":
            kw["rope_local_base_freq"] = 10000.0
            kw.setdefault("final_logit_softcapping", None)
            kw.setdefault("attn_logit_softcapping", None)
        return CONFIG_MAPPING[model_type](**kw)

    def _layer_types(self, num_layers: int, default_period: int) -> list[str]:
        """Sliding/global per layer: llama.cpp's pattern key (a period, or one flag per layer), else its default."""
        pattern = self.metadata.get(f"{self.arch}.attention.sliding_window_pattern", default_period)
        if isinstance(pattern, list):
            sliding = [bool(p) for p in pattern]
        else:  # every `pattern`-th layer is global
            sliding = [(i + 1) % int(pattern) != 0 for i in range(num_layers)]
        return ["sliding_attention" if s else "full_attention" for s in sliding]

    def rope_freq_factors(self) -> tuple[float, ...] | None:
        """Llama 3.1-style rope scaling as llama.cpp stores it: a `rope_freqs` tensor dividing inv_freq."""
        t = self._tensors.get("rope_freqs.weight")
        return None if t is None else tuple(float(x) for x in np.asarray(t.data, np.float32).ravel())

    def eos_token_ids(self) -> tuple[int, ...]:
        keys = ("eos_token_id", "eot_token_id", "eom_token_id")
        return tuple(dict.fromkeys(int(self.metadata[f"tokenizer.ggml.{k}"]) for k in keys
                                   if f"tokenizer.ggml.{k}" in self.metadata))

    def tokenizer(self):
        """The tokenizer and chat template stored in the file, built without torch."""
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                           convert_gguf_tokenizer)

        md = self.metadata
        if "tokenizer.ggml.tokens" not in md:
            raise ModelLoadError(f"{self.path} carries no tokenizer; pass tokenizer=<a Hugging Face tokenizer dir>")
        fields = {name: md[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                  if f"tokenizer.{key}" in md}
        backend, _ = convert_gguf_tokenizer(self.arch, fields)
        tokens = fields["tokens"]
        special = {name: tokens[md[f"tokenizer.ggml.{key}"]] for name, key in (
            ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id")) if f"tokenizer.ggml.{key}" in md}
        add_bos = md.get("tokenizer.ggml.add_bos_token", fields.get("tokenizer_type") == "llama")
        return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=md.get("tokenizer.chat_template"),
                                       add_bos_token=bool(add_bos), add_eos_token=False, **special)

    def block_quantization(self) -> str:
        """"int4" (Q4_0 / Q4_1) or "int8" (Q8_0): how quantization="gguf" holds this file's linear layers, which
        must all be of one of those kinds (the model has one quantization); otherwise a ConfigError."""
        types = sorted({t.tensor_type.name for t in self.reader.tensors if _is_linear(t.name)})
        kinds = {BLOCK_TYPES.get(t) for t in types}
        if len(kinds) != 1 or None in kinds:
            raise ConfigError(f"{self.path}: quantization='gguf' keeps Q4_0/Q4_1 (as int4) or Q8_0 (as int8) blocks, "
                              f"one kind for every linear layer, but this file's linear layers are "
                              f"{', '.join(types)}: pass quantization='int4' or 'int8' (requantized at load) or "
                              "None (float)")
        return kinds.pop()

    def tensors(self, num_heads: int, num_kv_heads: int, keep_blocks: bool = False
                ) -> Iterator[tuple[str, np.ndarray | QuantizedWeight]]:
        """Yield (Hugging Face name, float32 array [out, in]) one tensor at a time; with `keep_blocks`, the
        linear layers' weights as QuantizedWeights of their blocks (block_quantization() says which kind)."""
        import gguf

        for t in self.reader.tensors:
            name = self.hf_name(t.name)
            if name is None:
                continue
            if keep_blocks and _is_linear(t.name):
                w = ggml_blocks(np.asarray(t.data), t.tensor_type)
            else:
                try:
                    w = gguf.dequantize(t.data, t.tensor_type)
                except NotImplementedError as e:
                    raise ModelLoadError(f"{self.path}: tensor {t.name} has quant type {t.tensor_type.name}, which "
                                         "the gguf package cannot dequantize") from e
                w = np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
            if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                n_head = num_heads if "q_proj" in name else num_kv_heads
                w = (w.map_rows(lambda x: unpermute_qk(x, n_head)) if isinstance(w, QuantizedWeight)
                     else unpermute_qk(w, n_head))
            if self.arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
                w = w - 1.0
            yield name, w

    def hf_name(self, gguf_name: str) -> str | None:
        """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for non-parameters."""
        if gguf_name == "rope_freqs.weight":
            return None
        m = _BLOCK.match(gguf_name)
        if m:
            layer, part, kind = m.groups()
            if part == "ffn_norm":  # Gemma normalises before the MLP, then again after it
                module = "pre_feedforward_layernorm" if self.arch.startswith("gemma") else "post_attention_layernorm"
            elif part in _TENSOR_NAMES:
                module = _TENSOR_NAMES[part]
            else:
                raise ModelLoadError(f"{self.path}: unexpected tensor {gguf_name!r} for architecture {self.arch}")
            return f"model.layers.{layer}.{module}.{kind}"
        base, _, kind = gguf_name.rpartition(".")
        if base not in _TENSOR_NAMES:
            raise ModelLoadError(f"{self.path}: unexpected tensor {gguf_name!r} for architecture {self.arch}")
        return f"{_TENSOR_NAMES[base]}.{kind}"


def _is_linear(gguf_name: str) -> bool:
    m = _BLOCK.match(gguf_name)
    return m is not None and m.group(2) in _LINEAR and m.group(3) == "weight"


def ggml_blocks(data: np.ndarray, qtype: Any) -> QuantizedWeight:
    """A Q4_0 / Q4_1 / Q8_0 tensor's bytes, uint8 [out, in // 32 * block bytes], -> its QuantizedWeight [out, in]
    with one group per block, read as stored (the float weight is never made). `qtype`: a GGMLQuantizationType."""
    import gguf

    if qtype.name not in BLOCK_TYPES:
        raise ConfigError(f"{qtype.name} blocks cannot be kept; quantization='gguf' keeps {', '.join(BLOCK_TYPES)}")
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, gguf.GGML_QUANT_SIZES[qtype][1])  # [out, in // 32, block bytes]
    fields = 2 if qtype.name == "Q4_1" else 1  # fp16 d (Q4_1: d, m) before each block's values
    head = np.ascontiguousarray(blocks[..., :2 * fields]).view(np.float16).astype(np.float32)  # [out, in // 32, fields]
    d = head[..., 0]  # [out, in // 32]
    values = blocks[..., 2 * fields:]  # Q8_0: [out, in // 32, 32] int8; Q4: [out, in // 32, 16] nibble pairs
    if qtype.name == "Q8_0":
        return QuantizedWeight(values.view(np.int8).reshape(rows, -1), d)
    q = np.concatenate([values & 15, values >> 4], axis=-1).reshape(rows, -1)  # [out, in] uint8: low nibbles first
    return QuantizedWeight(q, d, head[..., 1] if qtype.name == "Q4_1" else -8 * d)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary pairs in Q/K rows: [rows, cols] -> Hugging Face order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
