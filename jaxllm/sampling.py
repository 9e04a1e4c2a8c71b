"""SamplingParams with vLLM's fields, defaults and validation.

This release decodes greedily on the device; the parameters that need the sampler (temperature > 0,
top-k/p, penalties, logprobs, stop strings, n > 1, ...) are validated now and refused with a clear error
until the continuous-batching engine brings the on-device sampler.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class SamplingParams:
    """How to decode one request (vLLM's SamplingParams; invalid values raise ValueError naming the field)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (disable) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                             f"got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a string or a list of non-empty strings")
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def unsupported(self) -> list[str]:
        """The fields set to values this release cannot honour yet (the engine issue brings them)."""
        defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(self)}
        pending = ("n", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                   "seed", "stop", "min_tokens", "logprobs", "prompt_logprobs", "logit_bias")
        bad = [] if self.greedy else ["temperature"]
        for name in pending:
            value = getattr(self, name)
            if name == "top_k" and value in (0, -1, 1):
                continue
            if value not in (defaults[name], None, [], {}):
                bad.append(name)
        return bad

    def check_supported(self) -> None:
        bad = self.unsupported()
        if bad:
            raise NotImplementedError(
                f"this release decodes greedily; {', '.join(bad)} need the sampler of the continuous-batching "
                "engine (not built yet). Use SamplingParams(temperature=0, max_tokens=..., ignore_eos=..., "
                "stop_token_ids=...)")


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request (vLLM's CompletionOutput)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or a stop token) or "length"
    stop_reason: int | str | None = None  # the stop token id that ended it, None for EOS or length
    cumulative_logprob: float | None = None
    logprobs: Any = None


@dataclasses.dataclass
class RequestOutput:
    """A finished request (vLLM's RequestOutput)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_logprobs: Any = None
