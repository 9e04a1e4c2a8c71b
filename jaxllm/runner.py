"""ModelRunner: owns the device state (parameters, KV pages, sampler state) and runs the one jitted step.

A step feeds each scheduled sequence some new tokens (a whole prompt, a chunk of one, or one decode
token) after the `num_computed_tokens` already in its pages, and samples the next token of every
sequence whose known tokens are then all computed. The batch is padded up to one of a few static
shapes (buckets), each compiled ahead of time, so no request ever triggers a compilation:

    decode buckets:  num_tokens = num_seqs = b              (b = 1, 2, 4, ... up to max_num_seqs)
    mixed buckets:   num_tokens = b, num_seqs = min(b, max_num_seqs)   (b = 16, 32, ... up to
                     max_num_batched_tokens)

The step: embed -> layers over the paged KV cache -> logits of the sampled rows -> sampler, all on the
device, with the KV pages and the sampler state donated (updated in place). One transfer brings the
sampled tokens (and logprobs, when asked for) back to the host.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm import sampler
from jaxllm.attention import AttentionMetadata, KVPages, allocate_kv_pages
from jaxllm.config import EngineConfig
from jaxllm.kv_cache import num_pages_for
from jaxllm.sampler import Logprobs, SamplerState, SamplingTensors
from jaxllm.weights import LoadedModel

MIXED_MIN_TOKENS = 16
PROMPT_LOGPROBS_CHUNK = 256  # rows projected to the vocabulary at a time for prompt logprobs


class SeqInput(NamedTuple):
    """One sequence's share of a step: feed `token_ids` at positions num_computed_tokens, ...;
    its pages are `block_table` (enough for num_computed_tokens + len(token_ids))."""

    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]


@struct.dataclass
class StepInputs:
    input_ids: jax.Array  # [num_tokens]
    positions: jax.Array  # [num_tokens]
    md: AttentionMetadata
    logits_indices: jax.Array  # [num_seqs] last fed token of each sequence
    sample_mask: jax.Array  # [num_seqs] bool: this row's token is kept (its sequence is fully computed)
    prompt_targets: jax.Array  # [num_tokens] the next prompt token after each fed token (for prompt logprobs)
    prev_rows: jax.Array  # [num_tokens] row of the previous step whose sampled token this input is; -1: input_ids
    use_sampler: jax.Array  # [] bool: some row needs more than argmax (sampling, penalties, logprobs)
    want_prompt_logprobs: jax.Array  # [] bool


@struct.dataclass
class StepOutput:
    tokens: jax.Array  # [num_seqs]
    logprobs: Logprobs  # [num_seqs, ...] of the sampled tokens (zeros unless use_sampler)
    prompt_logprobs: Logprobs  # [num_tokens, ...] of prompt_targets (zeros unless want_prompt_logprobs)


def pow2_ladder(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... below hi, then hi itself."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


def bucket(n: int, minimum: int) -> int:
    """The next power of two >= n, at least `minimum` (for tests that call the model directly)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def prepare_batch(seqs: list[SeqInput], page_size: int, num_pages: int, max_pages_per_seq: int, *,
                  num_tokens: int | None = None, num_seqs: int | None = None, max_query_len: int | None = None
                  ) -> tuple[jax.Array, jax.Array, AttentionMetadata, jax.Array]:
    """Padded (input_ids [T], positions [T], metadata, logits_indices [S]) for a ragged batch.

    Padding tokens write to slot num_pages * page_size (dropped) and padding sequences have no tokens.
    Without explicit sizes, T, S and the query bound are powers of two and the block table as wide as
    the longest sequence needs (for callers that run the model directly, e.g. tests).
    """
    total = sum(len(s.token_ids) for s in seqs)
    longest = max(s.num_computed_tokens + len(s.token_ids) for s in seqs)
    t_pad = num_tokens or bucket(total, 8)
    s_pad = num_seqs or bucket(len(seqs), 1)
    max_q = max_query_len or bucket(max(len(s.token_ids) for s in seqs), 1)
    p_pad = max_pages_per_seq if num_tokens else min(bucket(math.ceil(longest / page_size), 8), max_pages_per_seq)
    input_ids = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slot_mapping = np.full(t_pad, num_pages * page_size, np.int32)
    block_tables = np.zeros((s_pad, p_pad), np.int32)
    seq_lens = np.zeros(s_pad, np.int32)
    query_start_loc = np.zeros(s_pad + 1, np.int32)
    logits_indices = np.zeros(s_pad, np.int32)
    t = 0
    for i, s in enumerate(seqs):
        n, start = len(s.token_ids), s.num_computed_tokens
        pos = np.arange(start, start + n)
        table = np.asarray(s.block_table, np.int32)
        input_ids[t:t + n] = s.token_ids
        positions[t:t + n] = pos
        slot_mapping[t:t + n] = table[pos // page_size] * page_size + pos % page_size
        block_tables[i, :len(table)] = table[:p_pad]
        seq_lens[i] = start + n
        t += n
        query_start_loc[i + 1] = t
        logits_indices[i] = t - 1
    query_start_loc[len(seqs) + 1:] = t
    md = AttentionMetadata(slot_mapping=slot_mapping, block_tables=block_tables, seq_lens=seq_lens,
                           query_start_loc=query_start_loc, max_query_len=max_q)
    return input_ids, positions, md, logits_indices


class ModelRunner:
    """Device state, the bucketed step executables, and the host side of one step."""

    def __init__(self, loaded: LoadedModel, engine: EngineConfig) -> None:
        self.loaded, self.engine = loaded, engine
        c = loaded.config
        device = loaded.mesh.devices.flat[0]
        self.platform = device.platform
        self.page_size = engine.page_size
        self.num_slots = engine.max_num_seqs + 1  # the last slot belongs to padding rows
        self.replicated = NamedSharding(loaded.mesh, PartitionSpec())
        self.sampler_state: SamplerState = sampler.init_state(self.num_slots, c.vocab_size, self.replicated)
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(self.sampler_state))
        self.num_pages = num_pages_for(c, engine, loaded.dtype, device, reserved_bytes=state_bytes)
        capacity = self.num_pages * self.page_size
        self.max_model_len = engine.max_model_len or min(c.max_position_embeddings or capacity, capacity)
        if self.max_model_len > capacity:
            raise ValueError(f"max_model_len={self.max_model_len} needs {math.ceil(self.max_model_len / self.page_size)}"
                             f" KV pages but the pool has {self.num_pages}; lower max_model_len or raise num_kv_pages")
        self.max_pages_per_seq = math.ceil(self.max_model_len / self.page_size)
        self.kv_caches: list[KVPages] = allocate_kv_pages(
            loaded.module.backend, c.num_layers, self.num_pages, self.page_size, c.num_kv_heads, c.head_dim,
            loaded.dtype, loaded.mesh)
        min_decode = 1 if self.platform == "cpu" else 8
        self.decode_buckets = pow2_ladder(min(min_decode, engine.max_num_seqs), engine.max_num_seqs)
        self.mixed_buckets = pow2_ladder(min(MIXED_MIN_TOKENS, engine.max_num_batched_tokens),
                                         engine.max_num_batched_tokens)
        self._jitted = jax.jit(self._step_fn, donate_argnums=(1, 2, 3))
        # [max_num_seqs] the previous step's sampled tokens, on the device
        self.prev_tokens = jax.device_put(np.zeros(engine.max_num_seqs, np.int32), self.replicated)
        self._seen: set[tuple[int, int, int]] = set()
        self.num_compilations = 0  # step shapes compiled (or loaded from the persistent cache) so far
        self.last_bucket: tuple[int, int, int] | None = None  # (num_tokens, num_seqs, max_query_len) of the last step

    # ------------------------------------------------------------------------------ device side

    def _step_fn(self, params: Any, kv_caches: list[KVPages], state: SamplerState, prev_tokens: jax.Array,
                 x: StepInputs, st: SamplingTensors) -> tuple[StepOutput, jax.Array, list[KVPages], SamplerState]:
        module, variables = self.loaded.module, {"params": params}
        # Decode inputs sampled by the previous step come from its output on the device, so the host can
        # launch this step before it has seen them.
        input_ids = jnp.where(x.prev_rows >= 0, prev_tokens[jnp.maximum(x.prev_rows, 0)], x.input_ids)
        hidden, kv_caches = module.apply(variables, input_ids, x.positions, kv_caches, x.md,
                                         method="hidden_states")  # [num_tokens, embed]
        logits = module.apply(variables, hidden[x.logits_indices], method="logits")  # [num_seqs, vocab]
        num_seqs, k = logits.shape[0], min(sampler.MAX_LOGPROBS, logits.shape[1])

        def greedy() -> tuple[jax.Array, Logprobs]:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), _zero_logprobs(num_seqs, k)

        tokens, logprobs = jax.lax.cond(x.use_sampler, lambda: sampler.sample(logits, st, state), greedy)
        state = sampler.update_counts(state, st.slot, tokens, x.sample_mask)

        def prompt_logprobs() -> Logprobs:
            chunk = math.gcd(hidden.shape[0], PROMPT_LOGPROBS_CHUNK)
            rows = hidden.reshape(-1, chunk, hidden.shape[-1])
            targets = x.prompt_targets.reshape(-1, chunk)
            out = jax.lax.map(lambda a: sampler.compute_logprobs(module.apply(variables, a[0], method="logits"),
                                                                 a[1]), (rows, targets))
            return jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), out)

        plp = jax.lax.cond(x.want_prompt_logprobs, prompt_logprobs,
                           lambda: _zero_logprobs(hidden.shape[0], k))
        next_prev = jnp.zeros(prev_tokens.shape, jnp.int32).at[:num_seqs].set(tokens)
        return StepOutput(tokens, logprobs, plp), next_prev, kv_caches, state

    # -------------------------------------------------------------------------------- host side

    def bucket_for(self, num_tokens: int, num_seqs: int, decode_only: bool) -> tuple[int, int, int]:
        """(num_tokens, num_seqs, max_query_len) of the smallest bucket that holds this batch."""
        if decode_only:
            b = next(b for b in self.decode_buckets if b >= num_seqs)
            return b, b, 1
        b = next(b for b in self.mixed_buckets if b >= num_tokens)
        return b, min(b, self.engine.max_num_seqs), b

    def all_buckets(self) -> list[tuple[int, int, int]]:
        return ([(b, b, 1) for b in self.decode_buckets]
                + [(b, min(b, self.engine.max_num_seqs), b) for b in self.mixed_buckets])

    def _run_step(self, key: tuple[int, int, int], x: StepInputs, st: SamplingTensors) -> StepOutput:
        """The jitted step on a packed batch (jit's C++ dispatch: a few microseconds of host time)."""
        if key not in self._seen:
            self._seen.add(key)
            self.num_compilations += 1
        with jax.set_mesh(self.loaded.mesh):  # tensor parallel: attention runs per device (shard_map)
            out, self.prev_tokens, self.kv_caches, self.sampler_state = self._jitted(
                self.loaded.params, self.kv_caches, self.sampler_state, self.prev_tokens, x, st)
        self.last_bucket = key
        return out

    def warmup(self, progress: Callable[[str], None] | None = None) -> None:
        """Compile every bucket now, by running it once on an empty batch (its writes go to the dropped
        padding slot); the persistent compilation cache makes a restart fast."""
        keys = self.all_buckets()
        t0 = time.perf_counter()
        for i, key in enumerate(keys):
            if progress:
                progress(f"compiling step {i + 1}/{len(keys)} (tokens={key[0]}, seqs={key[1]})")
            x, st = self._pack([], [], [], key, [], False, False)
            jax.block_until_ready(self._run_step(key, x, st))
        self.register(self.num_slots - 1, [], [], None, [])  # the sampler's register compiles its one shape
        if progress:
            progress(f"compiled {len(keys)} step shapes in {time.perf_counter() - t0:.1f} s")

    def _pack(self, seqs: list[SeqInput], sample_rows: list[bool], row_params: list[tuple], key: tuple[int, int, int],
              prompt_targets: list[list[int]], use_sampler: bool, want_prompt_logprobs: bool,
              prev_rows: list[int] | None = None) -> tuple[StepInputs, SamplingTensors]:
        num_tokens, num_seqs, max_q = key
        if seqs:
            ids, pos, md, li = prepare_batch(seqs, self.page_size, self.num_pages, self.max_pages_per_seq,
                                             num_tokens=num_tokens, num_seqs=num_seqs, max_query_len=max_q)
        else:  # an empty batch of the bucket's shape (warm-up)
            ids, pos, md, li = prepare_batch([SeqInput([0], 0, [0])], self.page_size, self.num_pages,
                                             self.max_pages_per_seq, num_tokens=num_tokens, num_seqs=num_seqs,
                                             max_query_len=max_q)
        mask = np.zeros(num_seqs, bool)
        mask[:len(sample_rows)] = sample_rows
        targets = np.zeros(num_tokens, np.int32)
        flat = [t for row in prompt_targets for t in row]
        targets[:len(flat)] = flat
        prev = np.full(num_tokens, -1, np.int32)
        if prev_rows:
            prev[:len(prev_rows)] = prev_rows
        x = StepInputs(ids, pos, md, li, mask, targets, prev, np.asarray(use_sampler),
                       np.asarray(want_prompt_logprobs))
        params, seeds, steps, slots, ban = (list(z) for z in zip(*row_params)) if row_params else ([], [], [], [], [])
        st = SamplingTensors.from_rows(params, seeds, steps, slots, ban, num_rows=num_seqs,
                                       pad_slot=self.num_slots - 1)
        return jax.device_put((x, st), self.replicated)

    def launch(self, seqs: list[SeqInput], sample_rows: list[bool], row_params: list[tuple],
               prompt_targets: list[list[int]], use_sampler: bool, want_prompt_logprobs: bool,
               prev_rows: list[int]) -> tuple[StepOutput, int, int]:
        """Start one step on the device and return without waiting (fetch() waits).

        row_params[i] = (SamplingParams, seed, step, slot, ban_stop) of sequence i; prompt_targets[i] the next
        prompt token after each fed token of sequence i (0 where none); prev_rows[t] the row of the previous
        step that samples fed token t (-1: take it from the SeqInput)."""
        decode_only = all(len(s.token_ids) == 1 for s in seqs)
        num_tokens = sum(len(s.token_ids) for s in seqs)
        key = self.bucket_for(num_tokens, len(seqs), decode_only)
        x, st = self._pack(seqs, sample_rows, row_params, key, prompt_targets, use_sampler, want_prompt_logprobs,
                           prev_rows)
        return self._run_step(key, x, st), len(seqs), num_tokens

    @staticmethod
    def fetch(handle: tuple[StepOutput, int, int]) -> StepOutput:
        """Wait for a launched step; its output as numpy arrays, cut to the real rows and tokens."""
        out, n, t = handle
        out = jax.device_get(out)
        return StepOutput(out.tokens[:n], jax.tree.map(lambda a: a[:n], out.logprobs),
                          jax.tree.map(lambda a: a[:t], out.prompt_logprobs))

    def register(self, slot: int, prompt_ids: list[int], output_ids: list[int], logit_bias: dict | None,
                 stop_ids: list[int]) -> None:
        """Load a newly admitted sequence's history into its sampler slot (penalties, bias, min_tokens)."""
        self.sampler_state = sampler.register(self.sampler_state, slot, prompt_ids, output_ids, logit_bias, stop_ids)


def _zero_logprobs(n: int, k: int) -> Logprobs:
    return Logprobs(token_logprob=jnp.zeros(n, jnp.float32), token_rank=jnp.zeros(n, jnp.int32),
                    top_ids=jnp.zeros((n, k), jnp.int32), top_logprobs=jnp.zeros((n, k), jnp.float32))
