"""Tokenizers: a Hugging Face tokenizer (tokenizer.json + chat template) or one rebuilt from a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxllm.config import ModelLoadError

Tokenizer = Any  # a transformers PreTrainedTokenizerBase


def load_hf_tokenizer(path: str | Path) -> Tokenizer:
    """AutoTokenizer from a local directory (fast tokenizers only: no torch, no sentencepiece needed)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"no usable tokenizer in {path} ({e}); pass tokenizer=<directory with "
                             "tokenizer.json>") from e


def has_hf_tokenizer(path: str | Path) -> bool:
    """Whether a directory holds a tokenizer AutoTokenizer can load without a download."""
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                            "tokenizer.model", "vocab.json"))


def synthetic_tokenizer(vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    """A word-level tokenizer whose token i is "<i>": gives a random-weight benchmark model (load_format
    "dummy") the vocabulary size and the detokenization work of a real one, without its files."""
    from tokenizers import Tokenizer as RustTokenizer, models
    from transformers import PreTrainedTokenizerFast

    eos = eos_token_ids[0] if eos_token_ids and eos_token_ids[0] < vocab_size else vocab_size - 1
    vocab = {f"<{i}>": i for i in range(vocab_size)}
    tok = RustTokenizer(models.WordLevel(vocab, unk_token=f"<{eos}>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"<{eos}>", unk_token=f"<{eos}>")


def generation_eos_ids(model_dir: Path) -> tuple[int, ...]:
    """EOS ids from generation_config.json (often more than config.json lists, e.g. Llama 3's <|eot_id|>)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e})") from e
    if eos is None:
        return ()
    return tuple(int(i) for i in eos) if isinstance(eos, list) else (int(eos),)


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict], *, add_generation_prompt: bool = True,
                        chat_template: str | None = None) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template (or `chat_template`)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; pass chat_template=... or use generate()")
    return list(tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=True,
                                              add_generation_prompt=add_generation_prompt, return_dict=False))
