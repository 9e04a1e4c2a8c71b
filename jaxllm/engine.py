"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, as vLLM users write it.

This release runs a simple loop over the paged KV cache: requests are admitted while pages last, each
prompt is prefilled (batched with others, under a token budget), then all admitted sequences decode one
token per step; a finished sequence gives its pages back and the next waiting request takes them.
The continuous-batching scheduler (chunked prefill mixed with decode, preemption, prefix caching,
the on-device sampler) replaces this loop in the engine issue.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from pathlib import Path
from typing import Any, Sequence

from jaxllm.config import EngineConfig
from jaxllm.kv_cache import BlockAllocator, pages_needed
from jaxllm.runner import ModelRunner, SeqInput
from jaxllm.sampling import CompletionOutput, RequestOutput, SamplingParams
from jaxllm.tokenizer import apply_chat_template
from jaxllm.weights import load_model

PromptType = str | dict[str, Any]


@dataclasses.dataclass
class _Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    block_table: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


class LLM:
    """Load a model and generate from it.

    model: a Hugging Face directory, a GGUF file, a jaxllm checkpoint, or a hub id; None runs the
    embedded SmolLM2-135M-Instruct. dtype: "auto" (checkpoint dtype on GPU/TPU, float32 on CPU),
    "bfloat16", "float32" or "float16". Engine knobs (max_model_len, page_size, num_kv_pages,
    memory_utilization / gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, attention_backend)
    go to EngineConfig.
    """

    def __init__(self, model: str | Path | None = None, *, tokenizer: str | Path | None = None,
                 dtype: Any = "auto", revision: str | None = None, gpu_memory_utilization: float | None = None,
                 **engine_kwargs: Any) -> None:
        if gpu_memory_utilization is not None:
            engine_kwargs["memory_utilization"] = gpu_memory_utilization
        self.engine_config = EngineConfig(**engine_kwargs)
        self.model = load_model(model, dtype=dtype, tokenizer=tokenizer, revision=revision,
                                attention_backend=self.engine_config.attention_backend)
        self.tokenizer = self.model.tokenizer
        self.runner = ModelRunner(self.model, self.engine_config)
        self.allocator = BlockAllocator(self.runner.num_pages)
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt (a string, or {"prompt_token_ids": [...]}); outputs keep the prompts' order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams(temperature=0.0)
        params_list = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                       else list(sampling_params))
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        seqs = [self._make_sequence(p, sp) for p, sp in zip(prompts, params_list)]
        self._run(seqs)
        return [self._output(s) for s in seqs]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to conversations rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": apply_chat_template(self.tokenizer, conv, chat_template=chat_template,
                                                            add_generation_prompt=add_generation_prompt)}
                   for conv in conversations]
        return self.generate(prompts, sampling_params)

    # ------------------------------------------------------------------------------------------------

    def _make_sequence(self, prompt: PromptType, params: SamplingParams) -> _Sequence:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        params.check_supported()
        if isinstance(prompt, str):
            text, token_ids = prompt, list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, token_ids = prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        elif isinstance(prompt, dict) and "prompt" in prompt:
            text, token_ids = prompt["prompt"], list(self.tokenizer.encode(prompt["prompt"]))
        else:
            raise TypeError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}")
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        room = self.max_model_len - len(token_ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; this model's maximum context length is "
                             f"{self.max_model_len} tokens, which leaves no room to generate")
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if len(token_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; you requested "
                             f"{len(token_ids) + max_tokens} ({len(token_ids)} in the prompt + max_tokens="
                             f"{max_tokens}); lower max_tokens or shorten the prompt")
        return _Sequence(str(next(self._ids)), text, token_ids, params, max_tokens)

    def _run(self, seqs: list[_Sequence]) -> None:
        waiting, running = deque(seqs), []
        while waiting or running:
            prefill = self._admit(waiting, len(running))
            if prefill:
                batch = [SeqInput(s.prompt_token_ids, 0, s.block_table) for s in prefill]
                self._append(prefill, self.runner.execute(batch))
                running += [s for s in prefill if s.finish_reason is None]
            elif running:
                batch = [SeqInput(s.output_token_ids[-1:], len(s.all_token_ids) - 1, s.block_table) for s in running]
                self._append(running, self.runner.execute(batch))
                running = [s for s in running if s.finish_reason is None]
            else:  # submission checks that every request fits the pool on its own
                raise RuntimeError("no request could be admitted")

    def _admit(self, waiting: deque[_Sequence], num_running: int) -> list[_Sequence]:
        """Take waiting requests in order while sequence slots, the token budget and pages allow.

        Pages for the prompt and all max_tokens are taken up front, so a running sequence never waits."""
        admitted: list[_Sequence] = []
        num_tokens = 0
        while waiting and num_running + len(admitted) < self.engine_config.max_num_seqs:
            seq = waiting[0]
            n = len(seq.prompt_token_ids)
            if admitted and num_tokens + n > self.engine_config.max_num_batched_tokens:
                break
            need = pages_needed(n + seq.max_tokens, self.runner.page_size)
            if need > self.allocator.num_free:
                break
            seq.block_table = self.allocator.allocate(need)
            admitted.append(waiting.popleft())
            num_tokens += n
        return admitted

    def _append(self, seqs: list[_Sequence], tokens: list[int]) -> None:
        eos = set(self.model.config.eos_token_ids)
        for seq, token in zip(seqs, tokens):
            seq.output_token_ids.append(token)
            if token in seq.params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif token in eos and not seq.params.ignore_eos:
                seq.finish_reason = "stop"
            elif len(seq.output_token_ids) >= seq.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                self.allocator.free(seq.block_table)
                seq.block_table = []

    def _output(self, seq: _Sequence) -> RequestOutput:
        tokens = seq.output_token_ids
        text = self.tokenizer.decode(tokens, skip_special_tokens=seq.params.skip_special_tokens)
        completion = CompletionOutput(0, text, tokens, seq.finish_reason, seq.stop_reason)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion])
