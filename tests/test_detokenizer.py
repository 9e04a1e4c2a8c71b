"""IncrementalDetokenizer with real tokenizers: the tiny byte-level BPE, SmolLM2's byte-level BPE (from the
embedded GGUF), and SentencePiece-style ones (Metaspace, BPE with <0xNN> byte fallback) built here."""

from __future__ import annotations

import json

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxllm.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"
TEXTS = ["Héllo, naïve café — crème brûlée. Ça va? Straße .",
         "日本語のテキスト、中文字符。\n한국어 ok\n",
         "Emoji: 🙂🚀 👩‍💻 done!\n\nTwo  spaces\tand a tab , 's"]
PROMPT = "User: write something 🙂\nAssistant:"
BYTE_LEVEL = ("tiny_tokenizer", "smollm_tokenizer")
ALL_TOKENIZERS = (*BYTE_LEVEL, "sp_metaspace_tokenizer", "sp_llama_tokenizer")
SP_TRAINING_TEXT = ("Hello world. The capital of France is Paris. naïve café, crème brûlée. 日本語のテキスト. "
                    "Ça va? Straße über alles.\n")
SP_SPECIALS = ["<unk>", "<s>", "</s>", "<extra>"]


def build_sentencepiece_tokenizer(llama_decoder: bool) -> transformers.PreTrainedTokenizerFast:
    """Llama/Mistral-style: Metaspace pre-tokenizer, BPE whose unknown characters fall back to <0xNN> bytes.

    Either Llama 2's layout (pieces may hold inner ▁; decoder Replace, ByteFallback, Fuse, Strip) or a Metaspace
    decoder over pieces split at ▁. Both decoders drop the leading space of the first token. The small alphabet
    leaves many characters (some letters, emoji, Korean) to bytes.
    """
    pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=not llama_decoder)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizer
    trained.train_from_iterator([SP_TRAINING_TEXT] * 3, trainers.BpeTrainer(
        vocab_size=150, special_tokens=SP_SPECIALS, limit_alphabet=40))
    vocab = trained.get_vocab()
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizer
    tok.add_special_tokens(SP_SPECIALS)
    if llama_decoder:
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", additional_special_tokens=["<extra>"])


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from jaxllm.weights.gguf import GGUFModel
    from jaxllm.weights.hub import default_model_path

    return GGUFModel(default_model_path()).tokenizer()


@pytest.fixture(scope="module")
def sp_metaspace_tokenizer():
    return build_sentencepiece_tokenizer(llama_decoder=False)


@pytest.fixture(scope="module")
def sp_llama_tokenizer():
    return build_sentencepiece_tokenizer(llama_decoder=True)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def mixed_ids(tok) -> list[int]:
    """TEXTS with special tokens before, between and inside them (SmolLM2's <repo_name> is special only in the
    backend's added vocabulary, not in all_special_ids)."""
    specials = [i for i, t in sorted(tok.added_tokens_decoder.items()) if t.special][:4]
    return (specials[-1:] + encode(tok, TEXTS[0]) + specials[:1] + encode(tok, TEXTS[1]) + specials[1:]
            + encode(tok, TEXTS[2]))


def reference(tok, prompt: list[int], out: list[int], skip: bool) -> str:
    """The output's text as vLLM defines it: the full decode minus the prompt's."""
    full = tok.decode(prompt + out, skip_special_tokens=skip)
    head = tok.decode(prompt, skip_special_tokens=skip)
    assert full.startswith(head)
    return full[len(head):]


def stream(tok, prompt: list[int], out: list[int], **kwargs) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed `out` one token at a time until a stop fires; the deltas, the final one included."""
    d = IncrementalDetokenizer(tok, prompt, **kwargs)
    deltas, stop = [], None
    for t in out:
        stop = d.add_tokens([t])
        deltas.append(d.get_delta(finished=stop is not None))
        if stop is not None:
            break
    else:
        deltas.append(d.get_delta(finished=True))
    return d, deltas, stop


@pytest.mark.parametrize("with_prompt", [False, True], ids=["no-prompt", "prompt"])
@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_output_text_equals_decode_at_every_prefix(request, name, skip, with_prompt):
    tok = request.getfixturevalue(name)
    out = mixed_ids(tok)
    prompt = encode(tok, PROMPT) + [tok.eos_token_id] if with_prompt else []
    final = reference(tok, prompt, out, skip)
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    waited = 0
    for k in range(1, len(out) + 1):
        assert d.add_tokens(out[k - 1:k]) is None
        ref = reference(tok, prompt, out[:k], skip)
        if name in BYTE_LEVEL or not prompt:
            assert ref == tok.decode(out[:k], skip_special_tokens=skip)
        if ref.endswith(FFFD):
            # A character's bytes have not all arrived: it must not be emitted yet. (ByteFallback turns the
            # whole run of byte tokens into U+FFFDs, complete characters included, so compare with the end.)
            waited += 1
            assert final.startswith(d.output_text) and FFFD not in d.output_text
        else:
            assert d.output_text == ref, k
    assert waited > 0, "the texts should split some character across tokens"
    assert d.token_ids == out
    shown = [tok.convert_ids_to_tokens(i) in d.output_text for i in set(out) & set(tok.added_tokens_decoder)]
    assert shown and all(s != skip for s in shown)


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_split_characters_never_stream_replacement_char(request, name):
    tok = request.getfixturevalue(name)
    out = encode(tok, "🙂🚀 日本語 한국어 👩‍💻 é")
    d, deltas, stop = stream(tok, [], out)
    assert stop is None
    assert FFFD not in d.output_text and all(FFFD not in delta for delta in deltas)
    assert "".join(deltas) == d.output_text == tok.decode(out)
    assert "" in deltas[:-1], "some token should complete no character"
    # Without stop strings nothing is held back: each delta is exactly the new text.
    texts = [tok.decode(out[:k]) for k in range(1, len(out) + 1)]
    assert all("".join(deltas[:k]) == t for k, t in enumerate(texts, 1) if not t.endswith(FFFD))


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_several_tokens_per_call(request, name):
    tok = request.getfixturevalue(name)
    out = mixed_ids(tok)
    prompt = encode(tok, PROMPT)
    one, chunked = IncrementalDetokenizer(tok, prompt), IncrementalDetokenizer(tok, prompt)
    for k in range(0, len(out), 3):
        one.add_tokens(out[k:k + 1]), one.add_tokens(out[k + 1:k + 2]), one.add_tokens(out[k + 2:k + 3])
        chunked.add_tokens(out[k:k + 3])
        assert chunked.output_text == one.output_text
    assert chunked.output_text == reference(tok, prompt, out, True)


@pytest.mark.parametrize("name", ["sp_metaspace_tokenizer", "sp_llama_tokenizer"])
def test_prompt_tail_gives_first_token_its_leading_space(request, name):
    tok = request.getfixturevalue(name)
    prompt = encode(tok, "Hello " * 10 + "world.")  # longer than the context window the detokenizer keeps
    out = encode(tok, "The capital")
    assert tok.convert_ids_to_tokens(out)[0].startswith("▁")
    d = IncrementalDetokenizer(tok, prompt)
    d.add_tokens(out[:1])
    assert d.output_text.startswith(" ")
    d.add_tokens(out[1:])
    assert d.output_text == " The capital" == reference(tok, prompt, out, True)
    assert tok.decode(out) == "The capital"  # alone, the decoder strips the leading space
    # After special tokens that are skipped, the prompt text before them is the context.
    d = IncrementalDetokenizer(tok, prompt + [tok.eos_token_id] * 8, skip_special_tokens=True)
    d.add_tokens(out)
    assert d.output_text == " The capital"
    d = IncrementalDetokenizer(tok, [tok.bos_token_id], skip_special_tokens=True)
    d.add_tokens(out)
    assert d.output_text == "The capital"


def test_window_stays_short(smollm_tokenizer):
    tok = smollm_tokenizer
    d = IncrementalDetokenizer(tok, encode(tok, PROMPT))
    for t in encode(tok, " ".join(TEXTS) * 4):
        d.add_tokens([t])
        assert len(d._window) <= 8  # O(1) work per token: only the last few ids are decoded


def first_step_containing(tok, out: list[int], s: str) -> int:
    return next(k for k in range(1, len(out) + 1) if s in tok.decode(out[:k]))


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(smollm_tokenizer, include):
    tok = smollm_tokenizer
    out = encode(tok, "The capital of France is Paris. It is big.")
    stop = "is Paris"
    assert not any(stop in tok.decode([t]) for t in out)  # the stop string spans tokens
    k = first_step_containing(tok, out, stop)
    d, deltas, fired = stream(tok, [], out, stop=[stop], include_stop_str_in_output=include)
    assert fired == stop and d.stopped_by == stop
    assert d.token_ids == out[:k]  # it fires on the token that completes it, not before
    expected = "The capital of France is Paris" if include else "The capital of France "
    assert d.output_text == "".join(deltas) == expected
    with pytest.raises(RuntimeError):
        d.add_tokens(out[k:k + 1])


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_inside_one_token(smollm_tokenizer, include):
    tok = smollm_tokenizer
    out = encode(tok, "The capital of France")
    stop = "apit"
    k = first_step_containing(tok, out, stop)
    assert stop in tok.decode(out[k - 1:k]) and not tok.decode(out[k - 1:k]).endswith(stop)
    d, deltas, fired = stream(tok, [], out, stop=[stop], include_stop_str_in_output=include)
    assert fired == stop
    assert d.output_text == "".join(deltas) == ("The capit" if include else "The c")


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_stop_strings_with_multibyte_characters(request, name):
    tok = request.getfixturevalue(name)
    out = encode(tok, "Hello world. 日本語のテキスト 🙂 ok")
    d, deltas, fired = stream(tok, [], out, stop=["のテ", "🙂"])
    assert fired == "のテ"
    assert d.output_text == "".join(deltas) == "Hello world. 日本語"


@pytest.mark.parametrize("order", [1, -1])
def test_earliest_stop_wins(smollm_tokenizer, order):
    tok = smollm_tokenizer
    out = encode(tok, "one two three four five")
    d = IncrementalDetokenizer(tok, [], stop=["four", "two"][::order])
    assert d.add_tokens(out) == "two"  # both are in the text added by this one call
    assert d.output_text == "one "
    # Overlapping matches: the one completed first wins, as it would token by token.
    for stops in (["two three", "wo"], ["wo", "two three"]):
        d = IncrementalDetokenizer(tok, [], stop=stops)
        assert d.add_tokens(out) == "wo"
        assert d.output_text == "one t"
        _, _, fired = stream(tok, [], out, stop=stops)
        assert fired == "wo"
    # Two ending together: the longer one (starting earlier) wins.
    d = IncrementalDetokenizer(tok, [], stop=["ree", "three"][::order])
    assert d.add_tokens(out) == "three"
    assert d.output_text == "one two "


def test_check_stop_false(smollm_tokenizer):
    tok = smollm_tokenizer
    d = IncrementalDetokenizer(tok, [], stop=["STOP", "a much longer stop"])
    assert d.add_tokens(encode(tok, "a STOP"), check_stop=False) is None
    assert d.output_text == "a STOP"
    # A match that ended in the text added under check_stop=False is not reported later, even within
    # max(len(stop)) - 1 characters of the end.
    assert d.add_tokens(encode(tok, " b")) is None
    assert d.add_tokens(encode(tok, " STOP c")) == "STOP"
    assert d.output_text == "a STOP b "
    # A stop string begun under check_stop=False and completed after it fires.
    d = IncrementalDetokenizer(tok, [], stop=["STOP"])
    d.add_tokens(encode(tok, "x ST"), check_stop=False)
    assert d.add_tokens(encode(tok, "OP y")) == "STOP"
    assert d.output_text == "x "


@pytest.mark.parametrize("fires", [True, False])
@pytest.mark.parametrize("name", ["tiny_tokenizer", "smollm_tokenizer", "sp_llama_tokenizer"])
def test_get_delta_holds_back_what_could_start_a_stop_string(request, name, fires):
    tok = request.getfixturevalue(name)
    out = encode(tok, "Héllo wörld <END> more text")
    stops = ["<END>" if fires else "<NEVER>", "xyz"]
    holdback = max(map(len, stops)) - 1
    d = IncrementalDetokenizer(tok, [], stop=stops)
    streamed, fired = "", None
    for t in out:
        fired = d.add_tokens([t])
        if fired:
            break
        streamed += d.get_delta(finished=False)
        assert streamed == d.output_text[:max(0, len(d.output_text) - holdback)]
    streamed += d.get_delta(finished=True)
    final = "Héllo wörld " if fires else reference(tok, [], out, True)
    assert fired == ("<END>" if fires else None)
    assert streamed == d.output_text == final
    assert d.get_delta(finished=True) == ""


def test_get_delta_holds_nothing_back_when_stop_is_included(smollm_tokenizer):
    tok = smollm_tokenizer
    out = encode(tok, "Hello world <END> more")
    d = IncrementalDetokenizer(tok, [], stop=["<END>"], include_stop_str_in_output=True)
    streamed = ""
    for t in out:
        fired = d.add_tokens([t])
        streamed += d.get_delta(finished=False)
        assert streamed == d.output_text
        if fired:
            break
    assert fired == "<END>" and streamed == "Hello world <END>"
