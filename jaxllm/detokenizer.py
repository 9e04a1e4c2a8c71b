"""Incremental detokenization and stop strings for one generated sequence, with vLLM's semantics.

Decoding each new token on its own is wrong: a byte-level BPE token may carry only some of a character's UTF-8
bytes, and a SentencePiece decoder strips the leading space of whatever token comes first. Decoding the whole
output at every step is right but costs O(length) per token. So we keep a short window of ids: the text of
window[:read] has already been emitted, and each step decodes the whole window and emits what it adds beyond
that. A step whose text ends in U+FFFD (a character whose bytes have not all arrived) emits nothing and waits;
once text is emitted, the window slides to start at the old read position. The first window is the tail of
the prompt, so the first output token is decoded in context (" Paris", not "Paris").
"""

from __future__ import annotations

import weakref
from typing import Any

CONTEXT_TOKENS = 5  # prompt ids decoded ahead of the output, as vLLM does
REPLACEMENT_CHAR = "\ufffd"

_skip_cache: weakref.WeakKeyDictionary[Any, tuple[int, frozenset[int]]] = weakref.WeakKeyDictionary()


def skipped_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids `tokenizer.decode(..., skip_special_tokens=True)` drops: the added tokens flagged special.

    This can be more than `all_special_ids` (SmolLM2 flags <repo_name> and friends), so it is read from the
    backend's added vocabulary. Cached per tokenizer, since some have thousands of added tokens.
    """
    size = len(tokenizer)
    cached = _skip_cache.get(tokenizer)
    if cached is None or cached[0] != size:
        ids = frozenset(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
        cached = _skip_cache[tokenizer] = (size, ids)
    return cached[1]


class IncrementalDetokenizer:
    """The text of one sequence's generated tokens, extended token by token, and its stop strings.

    `output_text` grows by what each token adds to `tokenizer.decode(output ids)` (decoded after the prompt,
    without clean-up of tokenization spaces, like vLLM), never by part of a character. `add_tokens` reports the
    stop string that ends the sequence and truncates the text at it; `get_delta` hands out the text for
    streaming, holding back what could still turn out to be the start of a stop string.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        self.include_stop_str_in_output = include_stop_str_in_output
        self.output_text = ""
        self.token_ids: list[int] = []
        self.stopped_by: str | None = None  # the stop string that fired, if one did

        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._skipped = skipped_token_ids(tokenizer) if skip_special_tokens else frozenset()
        context: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(context) == CONTEXT_TOKENS:
                break
            if token_id not in self._skipped:
                context.append(token_id)
        self._window = context[::-1]
        self._read = len(self._window)
        self._read_text = self._decode(self._window)
        max_stop_len = max(map(len, self.stop), default=0)
        self._holdback = max_stop_len - 1 if self.stop and not include_stop_str_in_output else 0
        self._sent = 0  # characters of output_text already returned by get_delta

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:  # the Rust tokenizer itself: what decode() calls, minus ~10 us of Python
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_tokens(self, token_ids: list[int], check_stop: bool = True) -> str | None:
        """Append generated ids and extend `output_text`; return the stop string they complete, if any.

        When one does (and `check_stop`), `output_text` is cut just before it (just after it with
        `include_stop_str_in_output`); the sequence is then finished and takes no more tokens. Only stop
        strings that end in the newly added text are looked for: the engine passes `check_stop=False` until
        `min_tokens`, and an occurrence completed then is not reported later.
        """
        if self.stopped_by is not None:
            raise RuntimeError(f"the sequence already stopped at {self.stopped_by!r}")
        old_len = len(self.output_text)
        for token_id in token_ids:
            self.token_ids.append(token_id)
            if token_id in self._skipped:
                continue
            self._window.append(token_id)
            text = self._decode(self._window)
            if len(text) > len(self._read_text) and not text.endswith(REPLACEMENT_CHAR):
                self.output_text += text[len(self._read_text):]
                self._window = self._window[self._read:]
                self._read = len(self._window)
                self._read_text = self._decode(self._window)
        if not check_stop or not self.stop or len(self.output_text) == old_len:
            return None
        return self._truncate_at_stop(old_len)

    def _truncate_at_stop(self, old_len: int) -> str | None:
        # The match that completes first wins (the longer one when two end together), so the result does not
        # depend on how the text was split into tokens.
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            start = self.output_text.find(s, max(0, old_len - len(s) + 1))
            if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        if best is None:
            return None
        end, start, s = best
        self.output_text = self.output_text[:end if self.include_stop_str_in_output else start]
        self.stopped_by = s
        return s

    def get_delta(self, finished: bool) -> str:
        """The text not returned before; while not `finished`, minus the last max(len(stop)) - 1 characters.

        Held-back characters could be the start of a stop string that a later token completes; streaming
        them would mean retracting them. Concatenating all deltas gives the final `output_text`.
        """
        end = len(self.output_text) if finished else len(self.output_text) - self._holdback
        if end <= self._sent:
            return ""
        delta = self.output_text[self._sent:end]
        self._sent = end
        return delta
