"""The engine: requests in, a step at a time, outputs back (vLLM's LLMEngine), and the offline `LLM` API.

    engine = LLMEngine(model)                 # load, size the KV pool, compile the step shapes
    engine.add_request("a", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step():             # schedule -> run the jitted step -> append tokens, stop checks
            ...

A step: the scheduler picks the sequences and their token counts, the runner packs them into a static
shape and runs the model and the sampler on the device, and the engine appends the sampled tokens,
detokenizes them incrementally and applies the stop conditions (EOS, stop_token_ids, stop strings,
max_tokens, the context length).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time
from pathlib import Path
from typing import Any, Iterable, Sequence as Seq

from jaxllm.config import EngineConfig, enable_compilation_cache
from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.kv_cache import KVCacheManager
from jaxllm.runner import ModelRunner, SeqInput
from jaxllm.sampler import MAX_LOGPROBS, SAMPLING_EPS
from jaxllm.sampling import CompletionOutput, Logprob, RequestMetrics, RequestOutput, SamplingParams
from jaxllm.scheduler import PLACEHOLDER, ScheduledBatch, Scheduler, Sequence, SeqStatus
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer import apply_chat_template
from jaxllm.weights import load_model

logger = logging.getLogger("jaxllm")

PromptType = str | dict[str, Any]


@dataclasses.dataclass
class _Output:
    """A sequence's output bookkeeping: incremental text, logprobs."""

    detok: IncrementalDetokenizer
    text: str = ""  # what has been released (stop-string hold-back applied)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    metrics: RequestMetrics = dataclasses.field(default_factory=lambda: RequestMetrics(time.monotonic()))

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        completions = []
        for s in self.seqs:
            o: _Output = s.state
            completions.append(CompletionOutput(s.index, o.text, list(s.output_token_ids), s.finish_reason,
                                                s.stop_reason, o.cumulative_logprob if o.logprobs is not None
                                                else None, o.logprobs))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions, self.finished,
                             self.prompt_logprobs, self.metrics)


@dataclasses.dataclass
class _Launched:
    """A step on the device whose output the host has not processed yet."""

    batch: ScheduledBatch
    starts: list[int]  # each sequence's num_computed_tokens before the step
    sample_rows: list[bool]
    rows: dict[int, int]  # seq_id -> output row, for the sequences that sample
    handle: Any
    limits: list[int] | None = None  # several decode steps in one launch: the steps each sequence ran


def _needs_state(p: SamplingParams) -> bool:
    """Whether the sampler needs this sequence's history on the device (penalties, bias, min_tokens)."""
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            or bool(p.logit_bias) or p.min_tokens > 0)


def _needs_sampler(p: SamplingParams) -> bool:
    greedy = p.temperature < SAMPLING_EPS or p.top_k == 1
    return not greedy or _needs_state(p) or p.logprobs is not None


class LLMEngine:
    """Continuous batching over the paged KV cache, driven one `step()` at a time."""

    def __init__(self, model: str | Path | None = None, *, tokenizer: str | Path | None = None,
                 dtype: Any = "auto", revision: str | None = None, gpu_memory_utilization: float | None = None,
                 load_format: str = "auto", quantization: str | None = None, quantize_lm_head: bool = True,
                 quant_layout: str = "auto", **engine_kwargs: Any) -> None:
        if gpu_memory_utilization is not None:
            engine_kwargs["memory_utilization"] = gpu_memory_utilization
        self.config = EngineConfig(**engine_kwargs)
        enable_compilation_cache()
        t0 = time.monotonic()
        self.model = load_model(model, dtype=dtype, tokenizer=tokenizer, revision=revision, load_format=load_format,
                                quantization=quantization, quantize_lm_head=quantize_lm_head,
                                quant_layout=quant_layout, attention_backend=self.config.attention_backend,
                                mesh=make_mesh(self.config.tensor_parallel_size))
        self.tokenizer = self.model.tokenizer
        t1 = time.monotonic()
        self.runner = ModelRunner(self.model, self.config)
        logger.info("model loaded in %.1f s (%.2f GB of weights); KV pool of %d pages allocated in %.1f s", t1 - t0,
                    self.model.num_bytes / 1e9, self.runner.num_pages,
                    time.monotonic() - t1)
        self.kv = KVCacheManager(self.runner.num_pages, self.runner.page_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.kv)
        self.requests: dict[str, _Request] = {}
        self._inflight: _Launched | None = None
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._rng = random.Random(self.config.seed)
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0}
        self.finished_reasons: dict[str, int] = {}  # completions finished, by finish_reason
        self._last_log, self._logged = time.monotonic(), dict(self.stats)
        if self.config.warmup:
            self.runner.warmup(lambda msg: logger.info(msg))
        self._last_log = time.monotonic()

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # ---------------------------------------------------------------------------------- requests

    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None, *,
                    priority: int = 0) -> str:
        """Queue a prompt (a string, {"prompt": str} or {"prompt_token_ids": [...]}); returns its request id.
        Bad input raises ValueError/TypeError here, before anything is queued."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if params.n > self.config.max_num_seqs:  # all of a request's samples must fit in one step's batch
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}: lower n or start the "
                             f"engine with a larger max_num_seqs")
        text, token_ids = self._tokenize(prompt)
        max_tokens = self._check_lengths(token_ids, params)
        if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
            raise ValueError(f"logprobs must be at most {MAX_LOGPROBS}, got {params.logprobs}")
        if params.prompt_logprobs is not None and params.prompt_logprobs > MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be at most {MAX_LOGPROBS}, got {params.prompt_logprobs}")
        vocab = self.model.config.vocab_size
        if params.logit_bias and any(not 0 <= int(t) < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab})")
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        arrival = next(self._seq_ids)
        seqs: list[Sequence] = []
        for i in range(params.n):
            if params.seed is None:
                seed = self._rng.getrandbits(32)
            else:
                seed = params.seed if i == 0 else hash((params.seed, i)) & 0xFFFFFFFF
            seq = Sequence(next(self._seq_ids), request_id, i, list(token_ids), len(token_ids), params, max_tokens,
                           seed, arrival, priority, parent=seqs[0] if seqs else None)
            seq.state = _Output(IncrementalDetokenizer(self.tokenizer, token_ids,
                                                       skip_special_tokens=params.skip_special_tokens,
                                                       stop=params.stop,
                                                       include_stop_str_in_output=params.include_stop_str_in_output),
                                logprobs=[] if params.logprobs is not None else None)
            seqs.append(seq)
        request = _Request(request_id, text, list(token_ids), params, seqs,
                           [None] if params.prompt_logprobs is not None else None)
        self.requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests (finish_reason "abort") and free their pages; unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            request = self.requests.pop(rid, None)
            for seq in request.seqs if request else []:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")
                    self.finished_reasons["abort"] = self.finished_reasons.get("abort", 0) + 1

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
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
        return text, token_ids

    def _check_lengths(self, token_ids: list[int], params: SamplingParams) -> int:
        """max_tokens for this prompt; a request that cannot fit the context is refused (max_model_len never
        exceeds the pool, so a request that fits the context fits the pool alone, if need be by preempting)."""
        n, limit = len(token_ids), self.max_model_len
        if n >= limit:
            raise ValueError(f"the prompt has {n} tokens; this model's maximum context length is {limit} tokens, "
                             "which leaves no room to generate; shorten the prompt or raise max_model_len")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise ValueError(f"this model's maximum context length is {limit} tokens; you requested "
                             f"{n + max_tokens} ({n} in the prompt + max_tokens={max_tokens}); lower max_tokens "
                             "or shorten the prompt")
        return max_tokens

    # -------------------------------------------------------------------------------------- step

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Launch the next step, then finish the previous one; returns the outputs of the requests that
        advanced (cumulative, vLLM style).

        With async_scheduling the device runs step N while the host appends step N-1's tokens,
        detokenizes them and checks the stop conditions: a sequence samples into a placeholder token that
        step N+1 reads straight from step N's output on the device, and a sequence found finished one step
        late has its extra token dropped. Without it, each step is launched and finished in one call. With
        num_scheduler_steps > 1 a decode-only batch runs that many steps in one launch: each sequence gets that
        many placeholders (up to its max_tokens), and the stop conditions drop the tokens past a stop."""
        batch = self.scheduler.schedule()
        launched = self._launch(batch) if batch.seqs else None
        if launched is None and self._inflight is None and self.scheduler.has_unfinished():
            raise RuntimeError("the scheduler could not schedule any sequence; the KV pool is too small for the "
                               "waiting requests")
        previous, self._inflight = self._inflight, launched
        outputs = self._finish_step(previous) if previous is not None else []
        if not self.config.async_scheduling and self._inflight is not None:
            outputs += self._finish_step(self._inflight)
            self._inflight = None
        self._log_stats()
        return outputs

    def _launch(self, batch: ScheduledBatch) -> _Launched:
        for seq in batch.admitted:
            if _needs_state(seq.params):
                p = seq.params
                stop_ids = list(self.model.config.eos_token_ids) * (not p.ignore_eos) + p.stop_token_ids
                self.runner.register(seq.slot, seq.token_ids[:seq.num_prompt_tokens], seq.output_token_ids,
                                     p.logit_bias, stop_ids)
        prev_rows_of = self._inflight.rows if self._inflight is not None else {}
        inputs, sample_rows, row_params, targets, prev_rows = [], [], [], [], []
        use_sampler = want_plp = False
        for seq, n in zip(batch.seqs, batch.num_new_tokens):  # every sequence, every step: keep it lean
            start, p = seq.num_computed_tokens, seq.params
            ids = seq.token_ids[start:start + n]
            inputs.append(SeqInput([t if t >= 0 else 0 for t in ids], start, seq.block_table))
            prev_rows += [prev_rows_of[seq.seq_id] if t == PLACEHOLDER else -1 for t in ids]
            samples = start + n == len(seq.token_ids)
            sample_rows.append(samples)
            num_out = len(seq.token_ids) - seq.num_prompt_tokens
            row_params.append((p, seq.seed, num_out, seq.slot, num_out < p.min_tokens))
            if samples and not use_sampler:
                use_sampler = _needs_sampler(p)
            if p.prompt_logprobs is not None and start + 1 < seq.num_prompt_tokens:
                want_plp = True
                targets.append([seq.token_ids[i + 1] if i + 1 < seq.num_prompt_tokens else 0
                                for i in range(start, start + n)])
            else:
                targets.append(n)  # n tokens without prompt-logprob targets
        limits = None if want_plp or not all(sample_rows) else self._decode_limits(batch)
        handle = self.runner.launch(inputs, sample_rows, row_params, targets, use_sampler, want_plp, prev_rows,
                                    limits)
        now = time.monotonic()
        for seq in batch.admitted:
            request = self.requests.get(seq.request_id)
            if request is not None and request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
        self.scheduler.update(batch, limits)
        rows = {}
        for i, seq in enumerate(batch.seqs):
            if sample_rows[i]:  # its tokens arrive with the step's output
                new = limits[i] if limits else 1
                seq.token_ids += [PLACEHOLDER] * new
                seq.num_pending += new
                rows[seq.seq_id] = i
        return _Launched(batch, [s.num_computed_tokens for s in inputs], sample_rows, rows, handle, limits)

    def _decode_limits(self, batch: ScheduledBatch) -> list[int] | None:
        """When a decode-only batch runs runner.num_steps steps in one launch: the steps of each sequence (up to its
        max_tokens), with their KV pages allocated; None runs one step (a sequence under min_tokens, whose stop
        tokens are banned step by step, too few free pages, or its shape's multi-step forms still compiling)."""
        k = self.runner.num_steps
        if k == 1 or not batch.is_decode_only or not self.runner.multi_step_ready(len(batch.seqs)):
            return None
        limits, pages = [], 0
        for seq in batch.seqs:
            if seq.num_output_tokens < seq.params.min_tokens:
                return None
            limits.append(min(k, seq.max_tokens - seq.num_output_tokens))
            pages += self.kv.pages_short(seq, limits[-1])
        if pages > self.kv.num_free:
            return None
        for seq, n in zip(batch.seqs, limits):
            self.kv.allocate(seq, n)
        return limits

    def _finish_step(self, launched: _Launched) -> list[RequestOutput]:
        out = self.runner.fetch(launched.handle)
        batch = launched.batch
        touched: dict[str, _Request] = {}
        t = 0
        for i, (seq, n, start) in enumerate(zip(batch.seqs, batch.num_new_tokens, launched.starts)):
            request = self.requests.get(seq.request_id)
            if request is not None and request.prompt_logprobs is not None and seq.index == 0:
                self._record_prompt_logprobs(request, start, n, out.prompt_logprobs, t)
            t += n
            if start < seq.num_prompt_tokens:
                self.stats["prompt_tokens"] += n
            for j in range(launched.limits[i] if launched.limits else int(launched.sample_rows[i])):
                if seq.is_finished:  # stopped (or aborted): its later tokens are dropped
                    break
                self._accept_token(seq, int(out.tokens[j, i]), out.logprobs, j, i)
                self.stats["generated_tokens"] += 1
            if request is not None:
                touched[request.request_id] = request
        self.stats["steps"] += 1
        outputs, now = [], time.monotonic()
        for request in touched.values():
            m = request.metrics
            if m.first_token_time is None and any(s.num_output_tokens - s.num_pending > 0 for s in request.seqs):
                m.first_token_time = now
            if request.finished:
                m.finished_time = now
                for s in request.seqs:
                    self.finished_reasons[s.finish_reason] = self.finished_reasons.get(s.finish_reason, 0) + 1
                del self.requests[request.request_id]
            elif request.params.output_kind == "final_only":
                continue
            outputs.append(request.output())
        return outputs

    def _accept_token(self, seq: Sequence, token: int, logprobs: Any, step: int, row: int) -> None:
        """Put a sampled token in its placeholder, record its logprobs ([num_steps, num_seqs, ...]), detokenize,
        apply the stop rules."""
        p, o = seq.params, seq.state
        index = len(seq.token_ids) - seq.num_pending
        seq.token_ids[index] = token
        seq.num_pending -= 1
        if o.logprobs is not None:
            lp = float(logprobs.token_logprob[step, row])
            o.cumulative_logprob += lp
            o.logprobs.append(self._logprob_dict(token, lp, int(logprobs.token_rank[step, row]),
                                                 logprobs.top_ids[step, row], logprobs.top_logprobs[step, row],
                                                 p.logprobs))
        num_out = index + 1 - seq.num_prompt_tokens
        past_min = num_out >= p.min_tokens
        stop_str = o.detok.add_tokens([token], check_stop=past_min)
        reason: tuple[str, Any] | None = None
        if stop_str is not None:
            reason = ("stop", stop_str)
        elif past_min and token in p.stop_token_ids:
            reason = ("stop", token)
        elif past_min and not p.ignore_eos and token in self.model.config.eos_token_ids:
            reason = ("stop", None)
        elif num_out >= seq.max_tokens or index + 1 >= self.max_model_len:
            reason = ("length", None)
        if reason is not None:
            del seq.token_ids[index + 1:]  # tokens already launched past the end are dropped
            seq.num_pending = 0
            self.scheduler.finish(seq, *reason)
        o.text += o.detok.get_delta(finished=reason is not None)

    def _logprob_dict(self, token: int, logprob: float, rank: int, top_ids: Any, top_lps: Any, k: int
                      ) -> dict[int, Logprob]:
        """vLLM's per-position logprobs: the chosen token, then the top k (a dict keeps the first entry)."""
        entries = {token: Logprob(logprob, rank, self.tokenizer.decode([token]))}
        for r, (tid, tlp) in enumerate(zip(top_ids[:k], top_lps[:k])):
            entries.setdefault(int(tid), Logprob(float(tlp), r + 1, self.tokenizer.decode([int(tid)])))
        return entries

    def _record_prompt_logprobs(self, request: _Request, start: int, n: int, plp: Any, offset: int) -> None:
        """Entries for prompt positions start+1 .. (the first prompt token has none, as in vLLM)."""
        k = request.params.prompt_logprobs
        for j in range(n):
            pos = start + j + 1  # the prompt token these logits predict
            if pos >= len(request.prompt_token_ids) or pos < len(request.prompt_logprobs):
                continue  # past the prompt, or seen before a preemption
            request.prompt_logprobs.append(self._logprob_dict(
                request.prompt_token_ids[pos], float(plp.token_logprob[offset + j]),
                int(plp.token_rank[offset + j]), plp.top_ids[offset + j], plp.top_logprobs[offset + j], k))

    def _log_stats(self) -> None:
        now = time.monotonic()
        elapsed = now - self._last_log
        if elapsed < self.config.log_stats_interval:
            return
        prompt = self.stats["prompt_tokens"] - self._logged["prompt_tokens"]
        gen = self.stats["generated_tokens"] - self._logged["generated_tokens"]
        logger.info("running: %d, waiting: %d, prompt: %.1f tok/s, generation: %.1f tok/s, KV cache: %.1f%%, "
                    "prefix cache hits: %d tokens, preemptions: %d", len(self.scheduler.running),
                    len(self.scheduler.waiting), prompt / elapsed, gen / elapsed, 100 * self.kv.usage,
                    self.kv.num_cache_hits, self.scheduler.num_preemptions)
        self._last_log, self._logged = now, dict(self.stats)


class LLM:
    """The offline API, as vLLM users write it: `LLM(model).generate(prompts, SamplingParams(...))`.

    model: a Hugging Face directory, a GGUF file, a jaxllm checkpoint, or a hub id; None runs the embedded
    SmolLM2-135M-Instruct. dtype: "auto" (checkpoint dtype on GPU/TPU, float32 on CPU), "bfloat16",
    "float32" or "float16". Engine knobs (EngineConfig: max_model_len, page_size, num_kv_pages,
    memory_utilization / gpu_memory_utilization, max_num_seqs, max_num_batched_tokens,
    enable_prefix_caching, tensor_parallel_size, seed, attention_backend, ...) are keyword arguments;
    load_format="dummy" (vLLM's) makes random weights from the config alone, for benchmarks;
    quantization="int8" / "int4" keeps the linear layers' weights quantized (done at load), and the LM head in
    int8 unless quantize_lm_head=False;
    kv_cache_dtype="int8" stores the KV cache in int8 with a scale per token and KV head (half the bytes).
    """

    def __init__(self, model: str | Path | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(model, **kwargs)

    @property
    def engine_config(self) -> EngineConfig:
        return self.llm_engine.config

    @property
    def model(self) -> Any:
        return self.llm_engine.model

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt (a string, or {"prompt_token_ids": [...]}); outputs keep the prompts' order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                       else list(sampling_params))
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = []
        # Only the finished outputs are returned: the engine skips building the others every step.
        params_list = [dataclasses.replace(p, output_kind="final_only") for p in params_list]
        try:
            for prompt, params in zip(prompts, params_list):
                ids.append(engine.add_request(None, prompt, params))
        except Exception:
            engine.abort_request(ids)  # all or nothing: a bad prompt queues none of the batch
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to conversations rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": apply_chat_template(self.get_tokenizer(), conv, chat_template=chat_template,
                                                            add_generation_prompt=add_generation_prompt)}
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine, wanted = self.llm_engine, set(ids)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and ids:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]


__all__ = ["LLM", "LLMEngine", "SeqStatus"]
