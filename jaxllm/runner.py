"""ModelRunner: owns the device state (parameters, KV pages, sampler state) and runs the jitted step.

A step feeds each scheduled sequence some new tokens (a whole prompt, a chunk of one, or one decode
token) after the `num_computed_tokens` already in its pages, and samples the next token of every
sequence whose known tokens are then all computed. The batch is padded up to one of a few static
shapes (buckets), all compiled at start-up, so no request ever triggers a compilation:

    decode buckets:  num_tokens = num_seqs = b              (b = 1, 2, 4, ... up to max_num_seqs; from 8 up
                     on accelerators, where 8 rows ran faster than 1)
    mixed buckets:   num_tokens = b, num_seqs = min(b, max rows)   (b = 16, 32, ... up to
                     max_num_batched_tokens)

On the device: the model (embed -> layers over the paged KV cache -> logits of the sampled rows), then
argmax or the full sampler, then prompt logprobs when asked for; three jitted functions the host
chooses between, with the KV pages and the sampler state donated (updated in place); with
num_scheduler_steps > 1, a decode-only batch runs a fourth: that many steps, model and sampler, in one
`lax.scan` (vLLM's multi-step scheduling), so the host's launch cost is paid once per several tokens. The inputs travel
in one packed buffer per function group and the output comes back in one, once per step. On one device
the step's buffers keep their addresses from step to step (a staging copy of the inputs, the previous
step's logits donated back), so a GPU replays its CUDA graph without re-recording it. `launch`
returns at once; `fetch` waits, so the engine can launch the next step first.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import logging
import math
import os
import threading
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
MIN_DECODE_ROWS = {"cpu": 1}  # smallest decode bucket per platform; others (GPU, TPU): 8
# Weights whose matmuls run fastest at one row on a GPU (int8: the quantized kernel's gemv body; 8B on an H200:
# 4.24 ms/token as one row, 5.63 as eight; any quantization in the nk layout: XLA's row reduction): a lone
# sequence decodes as one row there too.
ONE_ROW_QUANTIZATIONS = ("int8",)
SAMPLER_MODES = ("greedy", "sample", "sample-sort")
PROMPT_LOGPROBS_CHUNK = 256  # rows projected to the vocabulary at a time for prompt logprobs
# step executables warm-up compiles at a time (at most one per CPU core; env JAXLLM_COMPILE_THREADS): 1, on the
# calling thread, until worker threads are proven safe (two CI runs that had compiled on a worker thread aborted
# later in an executable's serialization, cause unknown) and measured on a GPU (compilations that overlap there
# also autotune its matmuls at once)
COMPILE_THREADS: dict[str, int] = {}
# Platforms where warm-up leaves the multi-step forms (num_scheduler_steps > 1) to one background thread (env
# JAXLLM_MULTI_STEP_BACKGROUND=1 / 0 overrides): a decode shape runs single steps until its forms are compiled.
# On an H200 each is a whole-model compile (the 8B int4: start-up 206 s as with single steps, all 15 forms ready
# 232 s later, then 3.25 ms/token at batch 1; RESULTS.md).
BACKGROUND_MULTI_STEP: dict[str, bool] = {"gpu": True}
# num_scheduler_steps where the engine config leaves it None, for quantized weights, per platform (else 1): where
# measured faster (the 8B on an H200 at batch 1: int8 4.20 -> 3.27, int4 5.28 -> 3.26 ms/token; bf16 4.54 -> 4.61)
QUANTIZED_SCHEDULER_STEPS = {"gpu": 8}
STABLE_ADDRESSES = True  # one device: the step's inputs and outputs keep their buffers (ModelRunner.__init__)


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
    prompt_targets: jax.Array  # [num_tokens] the next prompt token after each fed token (for prompt logprobs)
    prev_rows: jax.Array  # [num_tokens] row of the previous step whose sampled token this input is; -1: input_ids


@struct.dataclass
class StepOutput:
    tokens: jax.Array  # [num_steps, num_seqs] (num_steps: decode steps in the launch, usually 1)
    logprobs: Logprobs  # [num_steps, num_seqs, ...] of the sampled tokens (zeros when the step decoded greedily)
    prompt_logprobs: Logprobs | None  # [num_tokens, ...] of prompt_targets, when the step asked for them


def pack(tree: Any) -> tuple[np.ndarray, tuple]:
    """Every leaf of a tree of numpy arrays (int32, uint32, float32 or bool) in one int32 buffer, and the
    layout that undoes it: a step's inputs cross to the device in one transfer, its outputs come back in one."""
    leaves, treedef = jax.tree.flatten(tree)
    parts, shapes = [], []
    for a in leaves:
        a = np.asarray(a)
        shapes.append((a.shape, a.dtype.str))
        parts.append((a.astype(np.int32) if a.dtype == np.bool_ else a).reshape(-1).view(np.int32))
    return np.concatenate(parts), (treedef, tuple(shapes))


def unpack(buf: Any, layout: tuple, xp: Any = jnp) -> Any:
    """The tree `pack` flattened into `buf` (xp = jnp inside the jitted step, np on the host)."""
    treedef, shapes = layout
    leaves, offset = [], 0
    for shape, dtype in shapes:
        size = math.prod(shape)
        part, dtype = buf[offset:offset + size].reshape(shape), np.dtype(dtype)
        offset += size
        if dtype == np.bool_:
            part = part != 0
        elif dtype != np.int32:
            part = jax.lax.bitcast_convert_type(part, dtype) if xp is jnp else part.view(dtype)
        leaves.append(part)
    return jax.tree.unflatten(treedef, leaves)


def pack_device(tree: Any) -> jax.Array:
    """pack() inside a jitted function: leaves of 4-byte types (or bool) -> one int32 vector."""
    parts = []
    for a in jax.tree.leaves(tree):
        a = a.astype(jnp.int32) if a.dtype == jnp.bool_ else a
        parts.append((a if a.dtype == jnp.int32 else jax.lax.bitcast_convert_type(a, jnp.int32)).reshape(-1))
    return jnp.concatenate(parts)


def pow2_ladder(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... below hi, then hi itself."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


def decode_buckets(platform: str, quantization: str | None, max_num_seqs: int, quant_layout: str = "kn") -> list[int]:
    """Rows of each decode step shape: at least MIN_DECODE_ROWS on accelerators even when max_num_seqs is
    smaller (padding rows: on the H100 an 8B model's batch-1 decode step took 8.13 ms with 1 row, 6.00 with 8),
    plus one row for ONE_ROW_QUANTIZATIONS (and any in the nk layout) on a GPU."""
    min_rows = MIN_DECODE_ROWS.get(platform, 8)
    buckets = pow2_ladder(min_rows, max(max_num_seqs, min_rows))
    one_row = quantization in ONE_ROW_QUANTIZATIONS or (quantization is not None and quant_layout == "nk")
    if min_rows > 1 and platform == "gpu" and one_row:
        buckets.insert(0, 1)
    return buckets


def bucket(n: int, minimum: int) -> int:
    """The next power of two >= n, at least `minimum` (for tests that call the model directly)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def prepare_batch(seqs: list[SeqInput], page_size: int, num_pages: int, max_pages_per_seq: int, *,
                  num_tokens: int | None = None, num_seqs: int | None = None, max_query_len: int | None = None
                  ) -> tuple[jax.Array, jax.Array, AttentionMetadata, jax.Array]:
    """Padded (input_ids [T], positions [T], metadata, logits_indices [S]) for a ragged batch.

    Padding tokens write to slot num_pages * page_size (the spare page past the pool: allocate_kv_pages) and
    padding sequences have no tokens.
    Without explicit sizes, T, S and the query bound are powers of two and the block table as wide as
    the longest sequence needs (for callers that run the model directly, e.g. tests).
    """
    n_seq = len(seqs)
    q_lens = np.fromiter((len(s.token_ids) for s in seqs), np.int32, n_seq)
    starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int32, n_seq)
    total = int(q_lens.sum())
    longest = int((starts + q_lens).max())
    t_pad = num_tokens or bucket(total, 8)
    s_pad = num_seqs or bucket(n_seq, 1)
    max_q = max_query_len or bucket(int(q_lens.max()), 1)
    p_pad = max_pages_per_seq if num_tokens else min(bucket(math.ceil(longest / page_size), 8), max_pages_per_seq)
    # One pass of C-level fills (no per-sequence numpy calls): this runs every step for every sequence.
    query_start_loc = np.zeros(s_pad + 1, np.int32)
    np.cumsum(q_lens, out=query_start_loc[1:n_seq + 1])
    query_start_loc[n_seq + 1:] = total
    seq_of_token = np.repeat(np.arange(n_seq, dtype=np.int32), q_lens)  # [total]
    pos = starts[seq_of_token] + np.arange(total, dtype=np.int32) - query_start_loc[seq_of_token]
    block_tables = np.zeros((s_pad, p_pad), np.int32)
    t_lens = np.fromiter((min(len(s.block_table), p_pad) for s in seqs), np.int32, n_seq)
    flat = np.fromiter(itertools.chain.from_iterable(s.block_table[:p_pad] for s in seqs), np.int32,
                       int(t_lens.sum()))
    rows = np.repeat(np.arange(n_seq, dtype=np.int32), t_lens)
    block_tables[rows, np.arange(flat.size) - np.repeat(np.cumsum(t_lens) - t_lens, t_lens)] = flat
    input_ids = np.zeros(t_pad, np.int32)
    input_ids[:total] = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs), np.int32, total)
    positions = np.zeros(t_pad, np.int32)
    positions[:total] = pos
    slot_mapping = np.full(t_pad, num_pages * page_size, np.int32)
    slot_mapping[:total] = block_tables[seq_of_token, pos // page_size] * page_size + pos % page_size
    seq_lens = np.zeros(s_pad, np.int32)
    seq_lens[:n_seq] = starts + q_lens
    logits_indices = np.zeros(s_pad, np.int32)
    logits_indices[:n_seq] = query_start_loc[1:n_seq + 1] - 1
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
            loaded.dtype, loaded.mesh, engine.kv_cache_dtype)
        self.decode_buckets = decode_buckets(self.platform, loaded.quantization, engine.max_num_seqs,
                                             loaded.config.quant_layout)
        self.max_rows = self.decode_buckets[-1]
        self.mixed_buckets = pow2_ladder(min(MIXED_MIN_TOKENS, engine.max_num_batched_tokens),
                                         engine.max_num_batched_tokens)
        # A GPU replays the step as a CUDA graph, which XLA re-records (~1.5 ms of host time on the 8B shape) when
        # an address it uses moves. So on one device the step sees no fresh buffer: the inputs are copied into a
        # staging buffer per shape (_stage) and the outputs land in the previous step's (donated) ones.
        self._stable_addresses = STABLE_ADDRESSES and loaded.mesh.size == 1
        self._staged: dict[tuple, jax.Array] = {}  # (input name, shape) -> its staging buffer
        # the last step's bucket and its (logits, hidden): kept for one bucket only (logits are up to [rows, vocab]
        # float32), which is the steady state of decoding
        self._last_out: tuple[tuple[int, int, int], tuple[jax.Array, jax.Array]] | None = None
        # (keep_unused: a donated buffer that only gives its shape is otherwise dropped, and with it the reuse)
        self._stage = jax.jit(lambda buf, new: jnp.copy(new), donate_argnums=(0,), keep_unused=True)
        self._forward = jax.jit(self._forward_fn, donate_argnums=(1, 5), static_argnums=(4,), keep_unused=True)
        self._greedy = jax.jit(self._greedy_fn, donate_argnums=(1,), keep_unused=True)
        self._sample = jax.jit(self._sample_fn, donate_argnums=(1, 2), static_argnums=(4, 5), keep_unused=True)
        self._prompt_logprobs = jax.jit(self._prompt_logprobs_fn, static_argnums=(3,))
        self._decode_steps = jax.jit(self._decode_steps_fn, donate_argnums=(1, 2, 3), static_argnums=(5, 7, 8, 9),
                                     keep_unused=True)
        self.num_steps = scheduler_steps(engine, self.platform, loaded.quantization)  # per decode-only launch
        # [max_rows] the previous step's sampled tokens, on the device
        self.prev_tokens = jax.device_put(np.zeros(self.max_rows, np.int32), self.replicated)
        self._seen: set[tuple[int, int, int]] = set()
        self.num_compilations = 0  # step shapes compiled (or loaded from the persistent cache) so far
        self.num_multi_step_launches = 0  # launches that ran num_steps > 1 decode steps
        # decode bucket sizes whose multi-step forms a background compile has not finished (warmup)
        self._multi_step_pending: set[int] = set()
        self._background: concurrent.futures.Future | None = None
        self.last_bucket: tuple[int, int, int] | None = None  # (num_tokens, num_seqs, max_query_len) of the last step

    # ------------------------------------------------------------------------------ device side
    # Three jitted functions, chosen on the host: a lax.cond on a device value would make a GPU wait for the
    # predicate on the host, which stalls pipelined steps.

    def _forward_fn(self, params: Any, kv_caches: list[KVPages], prev_tokens: jax.Array, packed: jax.Array,
                    layout: tuple, out_bufs: tuple) -> tuple[jax.Array, jax.Array, list[KVPages]]:
        """The model: -> logits of the sampled rows [num_seqs, vocab], hidden states [num_tokens, embed].
        out_bufs: () or the previous (logits, hidden) of this shape, donated so that the outputs reuse them."""
        del out_bufs
        x = unpack(packed, layout)  # StepInputs
        return self._model(params, kv_caches, _input_ids(x, prev_tokens), x.positions, x.md, x.logits_indices)

    def _model(self, params: Any, kv_caches: list[KVPages], input_ids: jax.Array, positions: jax.Array,
               md: AttentionMetadata, logits_indices: jax.Array) -> tuple[jax.Array, jax.Array, list[KVPages]]:
        """-> logits [num_seqs, vocab] of the tokens at logits_indices, hidden [num_tokens, embed], the KV pages."""
        module, variables = self.loaded.module, {"params": params}
        hidden, kv_caches = module.apply(variables, input_ids, positions, kv_caches, md, method="hidden_states")
        logits = module.apply(variables, hidden[logits_indices], method="logits")
        return logits, hidden, kv_caches

    def _decode_steps_fn(self, params: Any, kv_caches: list[KVPages], prev_tokens: jax.Array, state: SamplerState,
                         packed: jax.Array, layout: tuple, st_packed: jax.Array, st_layout: tuple, num_steps: int,
                         mode: str) -> tuple[jax.Array, jax.Array, list[KVPages], SamplerState]:
        """`num_steps` decode steps in one launch (vLLM's multi-step scheduling): each step feeds every row the
        token the last one sampled, at the next position. Row i runs limit[i] steps; its later steps write to the
        spare page and their tokens are never read. -> the packed (tokens [num_steps, num_seqs], logprobs),
        the next prev_tokens (each row's last kept token), the KV pages and the sampler state."""
        x = unpack(packed, layout)  # StepInputs of a decode bucket: one token per row
        st, sample_mask, limit = unpack(st_packed, st_layout)  # SamplingTensors, [num_seqs] bool, [num_seqs] int32
        block_tables, ps = x.md.block_tables, self.page_size
        rows = jnp.arange(block_tables.shape[0])

        def step(carry: tuple, i: jax.Array) -> tuple[tuple, tuple]:
            input_ids, kv_caches, state = carry
            live = i < limit  # [num_seqs]
            positions = x.positions + jnp.minimum(i, jnp.maximum(limit - 1, 0))
            page = block_tables[rows, jnp.minimum(positions // ps, block_tables.shape[1] - 1)]
            md = x.md.replace(slot_mapping=jnp.where(live, page * ps + positions % ps, self.num_pages * ps),
                              seq_lens=jnp.where(x.md.seq_lens > 0, positions + 1, 0))
            logits, _, kv_caches = self._model(params, kv_caches, input_ids, positions, md, x.logits_indices)
            if mode == "greedy":
                tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                logprobs = _zero_logprobs(*logits.shape[:1], min(sampler.MAX_LOGPROBS, logits.shape[1]))
            else:
                tokens, logprobs = sampler.sample(logits, st.replace(step=st.step + i), state,
                                                  sort=mode == "sample-sort")
                state = sampler.update_counts(state, st.slot, tokens, sample_mask & live)
            return (tokens, kv_caches, state), (tokens, logprobs)

        first = _input_ids(x, prev_tokens)
        (_, kv_caches, state), (tokens, logprobs) = jax.lax.scan(step, (first, kv_caches, state),
                                                                 jnp.arange(num_steps))
        last = tokens[jnp.maximum(limit - 1, 0), rows]  # [num_seqs]
        next_prev = jnp.zeros(prev_tokens.shape, jnp.int32).at[:last.shape[0]].set(last)
        return pack_device((tokens, logprobs)), next_prev, kv_caches, state

    def _greedy_fn(self, logits: jax.Array, prev_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """argmax per row (no row needs the sampler): the packed (tokens, zero logprobs), the next prev_tokens."""
        num_seqs, k = logits.shape[0], min(sampler.MAX_LOGPROBS, logits.shape[1])
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        next_prev = jnp.zeros(prev_tokens.shape, jnp.int32).at[:num_seqs].set(tokens)
        return pack_device((tokens, _zero_logprobs(num_seqs, k))), next_prev

    def _sample_fn(self, logits: jax.Array, state: SamplerState, prev_tokens: jax.Array, packed: jax.Array,
                   layout: tuple, sort: bool) -> tuple[jax.Array, jax.Array, SamplerState]:
        """The full sampler (with the top-k/top-p sort if `sort`): the packed (tokens, logprobs), the next
        prev_tokens, the state with the new tokens counted."""
        st, sample_mask = unpack(packed, layout)  # SamplingTensors, [num_seqs] bool (the row's token is kept)
        tokens, logprobs = sampler.sample(logits, st, state, sort=sort)
        state = sampler.update_counts(state, st.slot, tokens, sample_mask)
        next_prev = jnp.zeros(prev_tokens.shape, jnp.int32).at[:logits.shape[0]].set(tokens)
        return pack_device((tokens, logprobs)), next_prev, state

    def _prompt_logprobs_fn(self, params: Any, hidden: jax.Array, packed: jax.Array, layout: tuple) -> jax.Array:
        """Logprobs of each fed token's next prompt token, projecting PROMPT_LOGPROBS_CHUNK rows at a time."""
        module, variables = self.loaded.module, {"params": params}
        x = unpack(packed, layout)
        chunk = math.gcd(hidden.shape[0], PROMPT_LOGPROBS_CHUNK)
        rows = hidden.reshape(-1, chunk, hidden.shape[-1])
        targets = x.prompt_targets.reshape(-1, chunk)
        out = jax.lax.map(lambda a: sampler.compute_logprobs(module.apply(variables, a[0], method="logits"), a[1]),
                          (rows, targets))
        return pack_device(jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), out))

    # -------------------------------------------------------------------------------- host side

    def bucket_for(self, num_tokens: int, num_seqs: int, decode_only: bool) -> tuple[int, int, int]:
        """(num_tokens, num_seqs, max_query_len) of the smallest bucket that holds this batch."""
        if decode_only:
            b = next(b for b in self.decode_buckets if b >= num_seqs)
            return b, b, 1
        b = next(b for b in self.mixed_buckets if b >= num_tokens)
        return b, min(b, self.max_rows), b

    def all_buckets(self) -> list[tuple[int, int, int]]:
        return ([(b, b, 1) for b in self.decode_buckets]
                + [(b, min(b, self.max_rows), b) for b in self.mixed_buckets])

    def _run_step(self, key: tuple[int, int, int], inputs: tuple, mode: str, prompt_logprobs: bool,
                  num_steps: int = 1) -> tuple[jax.Array, jax.Array | None]:
        """Queue the step's device work (not waited for): packed (tokens, logprobs), packed prompt logprobs.
        num_steps > 1: that many decode steps in one launch (a decode bucket, no prompt logprobs)."""
        if num_steps > 1:
            return self._run_decode_steps(key, inputs, mode, num_steps), None
        for variant in (key, (key[1], mode), (*key, "prompt_logprobs") if prompt_logprobs else None):
            self._count_variant(variant)
        (x, x_layout), (st, st_layout) = inputs
        x, st = self._device_inputs(x, st)
        out_bufs = ()
        if self._stable_addresses:
            last, self._last_out = self._last_out, None
            out_bufs = last[1] if last and last[0] == key else self._new_out_bufs(key)
        with self._mesh():
            logits, hidden, self.kv_caches = self._forward(self.loaded.params, self.kv_caches, self.prev_tokens,
                                                           x, x_layout, out_bufs)
            if self._stable_addresses:
                self._last_out = (key, (logits, hidden))
            if mode == "greedy":
                out, self.prev_tokens = self._greedy(logits, self.prev_tokens)
            else:
                out, self.prev_tokens, self.sampler_state = self._sample(
                    logits, self.sampler_state, self.prev_tokens, st, st_layout, mode == "sample-sort")
            plp = self._prompt_logprobs(self.loaded.params, hidden, x, x_layout) if prompt_logprobs else None
        self.last_bucket = key
        return out, plp

    def _run_decode_steps(self, key: tuple[int, int, int], inputs: tuple, mode: str, num_steps: int) -> jax.Array:
        self._count_variant((*key, mode, num_steps))
        (x, x_layout), (st, st_layout) = inputs
        x, st = self._device_inputs(x, st, stage_st=True)
        with self._mesh():
            out, self.prev_tokens, self.kv_caches, self.sampler_state = self._decode_steps(
                self.loaded.params, self.kv_caches, self.prev_tokens, self.sampler_state, x, x_layout, st, st_layout,
                num_steps, mode)
        self.last_bucket = key
        self.num_multi_step_launches += 1
        return out

    def _count_variant(self, variant: tuple | None) -> None:
        """Count an executable shape the first time a step uses it (num_compilations: what warm-up must cover)."""
        if variant is not None and variant not in self._seen:
            self._seen.add(variant)
            self.num_compilations += 1

    def _device_inputs(self, x: np.ndarray, st: np.ndarray, stage_st: bool = False) -> tuple[jax.Array, jax.Array]:
        """The packed inputs as global arrays (every process, multi-host after jax.distributed.initialize, holds the
        same batch); on one device copied into their staging buffers (x always, st when it is a jit input kept
        across steps)."""
        x, st = (jax.make_array_from_process_local_data(self.replicated, a) for a in (x, st))
        if self._stable_addresses:
            x = self._staged_copy("x", x)
            st = self._staged_copy("st", st) if stage_st else st
        return x, st

    def _mesh(self) -> contextlib.AbstractContextManager:
        """The mesh as the current one when the model spans several devices (tensor parallelism)."""
        return jax.set_mesh(self.loaded.mesh) if self.loaded.mesh.size > 1 else contextlib.nullcontext()

    def _staged_copy(self, name: str, a: jax.Array) -> jax.Array:
        """`a` copied into the staging buffer of its name and shape (the one the last step of that shape read)."""
        buf = self._staged.pop((name, a.shape), None)
        self._staged[(name, a.shape)] = self._stage(jnp.zeros_like(a) if buf is None else buf, a)
        return self._staged[(name, a.shape)]

    def _new_out_bufs(self, key: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
        """A bucket's first (logits [num_seqs, vocab] float32, hidden [num_tokens, embed]) buffers."""
        num_tokens, num_seqs, _ = key
        c = self.loaded.config
        return (jnp.zeros((num_seqs, c.vocab_size), jnp.float32, device=self.replicated),
                jnp.zeros((num_tokens, c.hidden_size), self.loaded.dtype, device=self.replicated))

    def warmup(self, progress: Callable[[str], None] | None = None) -> None:
        """Compile every bucket now: the model's executables ahead of time (_compile_ahead), then
        each bucket run once on an empty batch (its writes go to the spare page) with each sampler mode
        (and, for prefill shapes, prompt logprobs); the persistent compilation cache makes a restart fast. With
        num_scheduler_steps > 1 each decode bucket's multi-step forms too, or, where multi_step_background(), on
        one background thread after warm-up returns (multi_step_ready, wait_for_multi_step)."""
        keys = self.all_buckets()
        t0 = time.perf_counter()
        # (one process only: several would each see their forms ready at another step, and run different programs)
        background = self.num_steps > 1 and multi_step_background(self.platform) and jax.process_count() == 1
        self._compile_ahead(keys, progress, multi_step=not background)
        for key in keys:
            inputs = self._pack([], [], [], key, [])
            for mode in SAMPLER_MODES:
                jax.block_until_ready(self._run_step(key, inputs, mode, prompt_logprobs=mode == "greedy"))
            if self.num_steps > 1 and key[2] == 1 and not background:  # a decode bucket's multi-step launches
                inputs = self._pack([], [], [], key, [], limits=[])
                for mode in SAMPLER_MODES:
                    jax.block_until_ready(self._run_step(key, inputs, mode, False, self.num_steps))
        self.register(self.num_slots - 1, [], [], None, [])  # the sampler's register compiles its one shape
        if progress:
            progress(f"compiled {len(keys)} step shapes in {time.perf_counter() - t0:.1f} s")
        if background:
            self._compile_multi_step_in_background([k for k in keys if k[2] == 1], progress)

    def multi_step_ready(self, num_seqs: int) -> bool:
        """Whether a decode-only batch of num_seqs sequences may run num_steps steps in one launch now (False
        while a background compile of its bucket's multi-step forms is under way: it runs single steps)."""
        return self.num_steps > 1 and self.bucket_for(num_seqs, num_seqs, True)[0] not in self._multi_step_pending

    def wait_for_multi_step(self) -> None:
        """Block until the background compile of the multi-step forms is done (raising what it raised)."""
        if self._background is not None:
            self._background.result()

    def _compile_multi_step_in_background(self, keys: list[tuple[int, int, int]],
                                          progress: Callable[[str], None] | None) -> None:
        """Compile each decode bucket's multi-step forms (smallest bucket first) on one long-lived worker thread,
        from shapes taken here (their staging buffers made here too): the steps that run meanwhile donate the
        arrays themselves. A failure is logged; its buckets keep running single steps."""
        jobs = [(key, jax.tree.map(_abstract, self._multi_step_jobs(key))) for key in sorted(keys)]
        self._multi_step_pending = {key[0] for key in keys}

        def run() -> None:
            t0 = time.perf_counter()
            try:
                for key, key_jobs in jobs:
                    for job in key_jobs:
                        if _EXITING.is_set():
                            return
                        self._compile_job(job)
                    self._multi_step_pending.discard(key[0])
                    if progress:
                        progress(f"multi-step forms of decode batches <= {key[0]} ready "
                                 f"({time.perf_counter() - t0:.1f} s in the background)")
            except Exception:
                logging.getLogger("jaxllm").exception("compiling the multi-step forms failed; single steps go on")
                raise

        self._background = _compile_worker().submit(run)

    def _compile_ahead(self, keys: list[tuple[int, int, int]], progress: Callable[[str], None] | None,
                       multi_step: bool = True) -> None:
        """Compile each bucket's model executables (the forward, and with `multi_step` a decode bucket's
        multi-step forms) on compile_threads() threads: XLA compiles with the GIL released, so the compilations
        overlap. Each is traced with the very arrays its run will get, so the run finds it in jit's cache (prompt
        logprobs, whose input is the forward's output, and the small sampler functions compile in the runs)."""
        jobs = []
        for key in keys:
            (x, layout), (st, _) = self._pack([], [], [], key, [])
            x, _ = self._device_inputs(x, st)
            out_bufs = self._new_out_bufs(key) if self._stable_addresses else ()
            jobs.append((self._forward, (self.loaded.params, self.kv_caches, self.prev_tokens, x, layout, out_bufs)))
            if key[2] == 1 and self.num_steps > 1 and multi_step:
                jobs += self._multi_step_jobs(key)
        threads = min(compile_threads(self.platform), os.cpu_count() or 1, max(len(jobs), 1))
        with (concurrent.futures.ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext()) as pool:
            # one thread: this one (CI aborted twice, later in the process, after compiling on a worker thread)
            for i, _ in enumerate(pool.map(self._compile_job, jobs) if pool else map(self._compile_job, jobs)):
                if progress:
                    progress(f"compiled {i + 1}/{len(jobs)} step executables ({threads} threads)")

    def _multi_step_jobs(self, key: tuple[int, int, int]) -> list[tuple]:
        """(jitted function, arguments) of a decode bucket's multi-step forms, one per sampler mode."""
        (x, layout), (st, st_layout) = self._pack([], [], [], key, [], limits=[])
        x, st = self._device_inputs(x, st, stage_st=True)
        return [(self._decode_steps, (self.loaded.params, self.kv_caches, self.prev_tokens, self.sampler_state,
                                      x, layout, st, st_layout, self.num_steps, mode)) for mode in SAMPLER_MODES]

    def _compile_job(self, job: tuple) -> None:
        fn, args = job
        with self._mesh():
            fn.trace(*args).lower().compile()

    def _pack(self, seqs: list[SeqInput], sample_rows: list[bool], row_params: list[tuple], key: tuple[int, int, int],
              prompt_targets: list[list[int] | int], prev_rows: list[int] | None = None,
              limits: list[int] | None = None) -> tuple:
        """The step's inputs as two packed buffers: the model's (StepInputs) and the sampler's (with `limits`, the
        steps each row runs in a multi-step launch)."""
        num_tokens, num_seqs, max_q = key
        if seqs:
            ids, pos, md, li = prepare_batch(seqs, self.page_size, self.num_pages, self.max_pages_per_seq,
                                             num_tokens=num_tokens, num_seqs=num_seqs, max_query_len=max_q)
        else:  # a one-token batch of the bucket's shape (warm-up) whose write goes to the spare page
            ids, pos, md, li = prepare_batch([SeqInput([0], 0, [0])], self.page_size, self.num_pages,
                                             self.max_pages_per_seq, num_tokens=num_tokens, num_seqs=num_seqs,
                                             max_query_len=max_q)
            md.slot_mapping[:] = self.num_pages * self.page_size
        mask = np.zeros(num_seqs, bool)
        mask[:len(sample_rows)] = sample_rows
        targets = np.zeros(num_tokens, np.int32)
        if any(not isinstance(row, int) for row in prompt_targets):  # an int row: that many tokens, no targets
            flat = [t for row in prompt_targets for t in ([0] * row if isinstance(row, int) else row)]
            targets[:len(flat)] = flat
        prev = np.full(num_tokens, -1, np.int32)
        if prev_rows:
            prev[:len(prev_rows)] = prev_rows
        x = StepInputs(ids, pos, md, li, targets, prev)
        params, seeds, steps, slots, ban = (list(z) for z in zip(*row_params)) if row_params else ([], [], [], [], [])
        st = SamplingTensors.from_rows(params, seeds, steps, slots, ban, num_rows=num_seqs,
                                       pad_slot=self.num_slots - 1)
        if limits is None:
            return pack(x), pack((st, mask))
        limit = np.zeros(num_seqs, np.int32)
        limit[:len(limits)] = limits
        return pack(x), pack((st, mask, limit))

    def launch(self, seqs: list[SeqInput], sample_rows: list[bool], row_params: list[tuple],
               prompt_targets: list[list[int] | int], use_sampler: bool, want_prompt_logprobs: bool,
               prev_rows: list[int], limits: list[int] | None = None) -> tuple:
        """Start one step on the device and return without waiting (fetch() waits).

        row_params[i] = (SamplingParams, seed, step, slot, ban_stop) of sequence i; prompt_targets[i] the next
        prompt token after each fed token of sequence i (or just its token count: no targets); prev_rows[t]
        the row of the previous step that samples fed token t (-1: take it from the SeqInput). limits: a
        decode-only batch runs self.num_steps steps in this launch, sequence i the first limits[i] of them."""
        decode_only = all(len(s.token_ids) == 1 for s in seqs)
        num_tokens = sum(len(s.token_ids) for s in seqs)
        key = self.bucket_for(num_tokens, len(seqs), decode_only)
        num_steps = self.num_steps if limits is not None else 1
        if num_steps > 1 and not (decode_only and not want_prompt_logprobs):
            raise ValueError("several steps per launch need a decode-only batch without prompt logprobs")
        inputs = self._pack(seqs, sample_rows, row_params, key, prompt_targets, prev_rows, limits)
        sort = use_sampler and any(p.top_k not in (0, -1, 1) or p.top_p < 1.0
                                   for (p, *_), s in zip(row_params, sample_rows) if s)
        mode = "sample-sort" if sort else "sample" if use_sampler else "greedy"
        out, plp = self._run_step(key, inputs, mode, want_prompt_logprobs, num_steps)
        return out, plp, self._output_layouts(key, num_steps), len(seqs), num_tokens

    @functools.lru_cache(maxsize=None)  # noqa: B019  (one runner per engine; a handful of buckets)
    def _output_layouts(self, key: tuple[int, int, int], num_steps: int = 1) -> tuple[tuple, tuple]:
        """How a bucket's packed (tokens [num_steps, num_seqs], logprobs) and prompt logprobs unpack on the host
        (built once per bucket, not on every step)."""
        num_tokens, num_seqs, _ = key
        k = min(sampler.MAX_LOGPROBS, self.loaded.config.vocab_size)

        def logprobs(*n: int) -> Logprobs:
            return Logprobs(np.zeros(n, np.float32), np.zeros(n, np.int32), np.zeros((*n, k), np.int32),
                            np.zeros((*n, k), np.float32))

        return (pack((np.zeros((num_steps, num_seqs), np.int32), logprobs(num_steps, num_seqs)))[1],
                pack(logprobs(num_tokens))[1])

    @staticmethod
    def fetch(handle: tuple) -> StepOutput:
        """Wait for a launched step; its output as numpy arrays (tokens and logprobs [num_steps, num_seqs, ...]), cut
        to the real rows and tokens."""
        packed, packed_plp, (layout, plp_layout), n, t = handle
        packed.block_until_ready()  # waits with the GIL released, so other threads (an event loop) run meanwhile
        tokens, logprobs = unpack(np.asarray(packed), layout, np)
        plp = unpack(np.asarray(packed_plp), plp_layout, np) if packed_plp is not None else None
        out = StepOutput(tokens, logprobs, plp)
        return StepOutput(out.tokens[:, :n], jax.tree.map(lambda a: a[:, :n], out.logprobs),
                          jax.tree.map(lambda a: a[:t], out.prompt_logprobs) if plp is not None else None)

    def register(self, slot: int, prompt_ids: list[int], output_ids: list[int], logit_bias: dict | None,
                 stop_ids: list[int]) -> None:
        """Load a newly admitted sequence's history into its sampler slot (penalties, bias, min_tokens)."""
        self.sampler_state = sampler.register(self.sampler_state, slot, prompt_ids, output_ids, logit_bias, stop_ids)


def compile_threads(platform: str) -> int:
    """How many step executables warm-up compiles at once: JAXLLM_COMPILE_THREADS, else COMPILE_THREADS."""
    value = os.environ.get("JAXLLM_COMPILE_THREADS", str(COMPILE_THREADS.get(platform, 1)))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"JAXLLM_COMPILE_THREADS must be a whole number >= 1, got {value!r}")
    return int(value)


def _abstract(a: Any) -> Any:
    """An array as its shape, dtype and sharding (what tracing needs); anything else as it is."""
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) if isinstance(a, jax.Array) else a


_EXITING = threading.Event()  # the interpreter is shutting down: a background compile stops between executables


@functools.cache
def _compile_worker() -> concurrent.futures.ThreadPoolExecutor:
    """One compile thread for the process, never shut down before exit (a worker thread that ended came before both
    of CI's unexplained aborts, see COMPILE_THREADS)."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxllm-compile")
    # Set at exit before the pool's thread is joined (the stdlib hook concurrent.futures itself uses; registered
    # after the pool's, so it runs first): an exiting process waits for one compile at most.
    getattr(threading, "_register_atexit", lambda fn: None)(_EXITING.set)
    return pool


def scheduler_steps(engine: EngineConfig, platform: str, quantization: str | None) -> int:
    """Decode steps per launch of a decode-only batch: engine.num_scheduler_steps, or where that is None,
    QUANTIZED_SCHEDULER_STEPS for quantized weights on the platform, else 1."""
    if engine.num_scheduler_steps is not None:
        return engine.num_scheduler_steps
    return QUANTIZED_SCHEDULER_STEPS.get(platform, 1) if quantization else 1


def multi_step_background(platform: str) -> bool:
    """Whether warm-up compiles the multi-step forms on a background thread: JAXLLM_MULTI_STEP_BACKGROUND (1 or 0),
    else BACKGROUND_MULTI_STEP."""
    value = os.environ.get("JAXLLM_MULTI_STEP_BACKGROUND")
    if value is None:
        return BACKGROUND_MULTI_STEP.get(platform, False)
    if value not in ("0", "1"):
        raise ValueError(f"JAXLLM_MULTI_STEP_BACKGROUND must be 1 or 0, got {value!r}")
    return value == "1"


def _input_ids(x: StepInputs, prev_tokens: jax.Array) -> jax.Array:
    """The step's input ids [num_tokens]: decode inputs sampled by the previous step come from its output on the
    device (prev_tokens [max_rows]), so the host can launch this step before it has seen them."""
    return jnp.where(x.prev_rows >= 0, prev_tokens[jnp.maximum(x.prev_rows, 0)], x.input_ids)


def _zero_logprobs(n: int, k: int) -> Logprobs:
    return Logprobs(token_logprob=jnp.zeros(n, jnp.float32), token_rank=jnp.zeros(n, jnp.int32),
                    top_ids=jnp.zeros((n, k), jnp.int32), top_logprobs=jnp.zeros((n, k), jnp.float32))
