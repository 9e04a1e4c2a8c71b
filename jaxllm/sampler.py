"""The on-device, batched sampler: one row per sequence of an engine step, each row with its own parameters.

Everything here except the host helpers (`SamplingTensors.from_rows`, `init_state`, `register`) is a pure,
jit-compatible function of static shapes. A sequence's history lives in `SamplerState`, one row per slot,
so penalties never need the token lists on the host.

Order of operations in `sample(logits, t, state)` (vLLM's semantics):

1. Raw logprobs: log_softmax of the logits as given; the returned `Logprobs` (chosen token, its rank,
   top-k) come from these, as vLLM returns them by default.
2. `process_logits`, per row, on the slot's history:
   a. ban_stop: the slot's stop tokens (EOS + stop_token_ids) -> -inf (min_tokens not reached yet);
   b. has_bias: += the slot's logit_bias row;
   c. repetition penalty on tokens seen in the prompt or the output: logit > 0 -> logit / rp, else logit * rp;
   d. logit -= frequency_penalty * count + presence_penalty * (count > 0), count = times generated.
3. Greedy rows (temperature < 1e-5, or top_k == 1): argmax of the processed logits.
4. Other rows: divide by the temperature, then keep tokens by
   a. min_p: probability >= min_p * (max probability), i.e. exp(logit - max logit) >= min_p;
   b. top_k: the k most likely;
   c. top_p: the smallest set of most likely tokens whose probability, renormalised over what a and b
      kept, sums to at least top_p (the most likely token is always kept);
   then draw from the renormalised survivors with the key fold_in(key(seed), step), so a row's draw
   depends only on its own seed, step and logits, never on the rest of the batch or its position.

Ties: every filter keeps tokens by value, so tokens with equal logits are kept or dropped together. At a
top-k boundary all tokens equal to the k-th largest are kept (as vLLM does); at a top-p boundary a token is
kept iff the mass of the tokens strictly more likely than it is below top_p, so a tie group straddling the
boundary is kept whole. Top-p is then measured over that tie-extended top-k set. The kept set is
therefore independent of sort stability and token order. The one sort (top_k, top_p) is skipped when no
sampled row of the batch uses them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jaxllm.sampling import SamplingParams

MAX_LOGPROBS = 20  # top-k logprobs are computed for this static k; requests may ask for 0..20
SAMPLING_EPS = 1e-5  # a temperature below this is greedy (vLLM's _SAMPLING_EPS)
REGISTER_CHUNK = 512  # prompt / output ids go to the device in chunks of this many (one compiled shape)
MAX_BIAS_ENTRIES = 512  # logit_bias entries per request (one compiled shape)
MAX_STOP_IDS = 512  # EOS + stop_token_ids per request (one compiled shape)


@flax.struct.dataclass
class SamplingTensors:
    """Per-row sampling parameters of one engine step, every field of shape [num_rows]."""

    temperature: jax.Array  # f32; 0 means greedy (argmax of the processed logits)
    top_k: jax.Array  # i32; <= 0 or >= vocab means off
    top_p: jax.Array  # f32 in (0, 1]
    min_p: jax.Array  # f32 in [0, 1]
    repetition_penalty: jax.Array  # f32 > 0 (1 = off)
    presence_penalty: jax.Array  # f32
    frequency_penalty: jax.Array  # f32
    seed: jax.Array  # u32: the row's seed
    step: jax.Array  # i32: index of the token this row generates now (its number of output tokens so far)
    slot: jax.Array  # i32: the SamplerState row that holds this sequence's history
    ban_stop: jax.Array  # bool: mask the row's stop tokens (min_tokens not reached)
    has_bias: jax.Array  # bool: add the slot's logit_bias row

    @classmethod
    def from_rows(cls, params: list["SamplingParams"], seeds: list[int], steps: list[int], slots: list[int],
                  ban_stop: list[bool], num_rows: int, pad_slot: int) -> "SamplingTensors":
        """Host side: the rows' parameters as numpy arrays, padded to num_rows with greedy rows on pad_slot.

        Seeds are taken modulo 2**32. A temperature below SAMPLING_EPS or top_k == 1 makes the row greedy
        (its temperature is stored as 0).
        """
        n = len(params)
        if not len(seeds) == len(steps) == len(slots) == len(ban_stop) == n:
            raise ValueError(f"from_rows needs one seed, step, slot and ban_stop per row ({n} params), got "
                             f"{len(seeds)}, {len(steps)}, {len(slots)}, {len(ban_stop)}")
        if n > num_rows:
            raise ValueError(f"{n} rows do not fit num_rows={num_rows}")

        def column(values: list, pad: Any, dtype: Any) -> np.ndarray:  # numpy: the caller ships them in one transfer
            return np.asarray(list(values) + [pad] * (num_rows - n), dtype=dtype)

        greedy = [p.temperature < SAMPLING_EPS or p.top_k == 1 for p in params]
        return cls(
            temperature=column([0.0 if g else p.temperature for p, g in zip(params, greedy)], 0.0, np.float32),
            top_k=column([p.top_k if p.top_k < 2**31 else 0 for p in params], 0, np.int32),  # beyond int32: all
            top_p=column([p.top_p for p in params], 1.0, np.float32),
            min_p=column([p.min_p for p in params], 0.0, np.float32),
            repetition_penalty=column([p.repetition_penalty for p in params], 1.0, np.float32),
            presence_penalty=column([p.presence_penalty for p in params], 0.0, np.float32),
            frequency_penalty=column([p.frequency_penalty for p in params], 0.0, np.float32),
            seed=column([int(s) % 2**32 for s in seeds], 0, np.uint32),
            step=column(steps, 0, np.int32),
            slot=column(slots, pad_slot, np.int32),
            ban_stop=column(ban_stop, False, np.bool_),
            has_bias=column([bool(p.logit_bias) for p in params], False, np.bool_),
        )


@flax.struct.dataclass
class SamplerState:
    """Each slot's history on the device, one row per slot."""

    output_counts: jax.Array  # i32 [num_slots, vocab]: how often each token was generated
    prompt_mask: jax.Array  # bool [num_slots, vocab]: token occurs in the prompt
    logit_bias: jax.Array  # f32 [num_slots, vocab]
    stop_mask: jax.Array  # bool [num_slots, vocab]: EOS + stop_token_ids, banned while ban_stop


@flax.struct.dataclass
class Logprobs:
    """Logprobs of the chosen tokens under the raw logits, and the top-k alternatives."""

    token_logprob: jax.Array  # f32 [n]
    token_rank: jax.Array  # i32 [n]: 1 + number of tokens with a strictly greater logprob
    top_ids: jax.Array  # i32 [n, k], most likely first
    top_logprobs: jax.Array  # f32 [n, k]


def init_state(num_slots: int, vocab_size: int, sharding: Any = None) -> SamplerState:
    """An empty state for num_slots sequences (placed with `sharding`, a sharding or a tree of them, if given)."""
    state = SamplerState(
        output_counts=jnp.zeros((num_slots, vocab_size), jnp.int32),
        prompt_mask=jnp.zeros((num_slots, vocab_size), jnp.bool_),
        logit_bias=jnp.zeros((num_slots, vocab_size), jnp.float32),
        stop_mask=jnp.zeros((num_slots, vocab_size), jnp.bool_),
    )
    return state if sharding is None else jax.device_put(state, sharding)


def _in_range(ids: jax.Array, vocab: int) -> jax.Array:
    """ids with every id outside [0, vocab) (padding) replaced by vocab, which mode='drop' scatters skip."""
    return jnp.where((ids >= 0) & (ids < vocab), ids, vocab)


@functools.partial(jax.jit, donate_argnums=0)
def _register_chunk(state: SamplerState, slot: jax.Array, reset: jax.Array, prompt_ids: jax.Array,
                    output_ids: jax.Array, bias_ids: jax.Array, bias_values: jax.Array,
                    stop_ids: jax.Array) -> SamplerState:
    """Optionally clear row `slot`, then record a chunk of prompt / output ids, bias and stop ids (-1 = padding)."""
    vocab = state.output_counts.shape[1]

    def row(table: jax.Array) -> jax.Array:  # [vocab]: the slot's row, zeroed when resetting
        return jnp.where(reset, jnp.zeros_like(table[slot]), table[slot])

    counts = row(state.output_counts).at[_in_range(output_ids, vocab)].add(1, mode="drop")
    prompt = row(state.prompt_mask).at[_in_range(prompt_ids, vocab)].set(True, mode="drop")
    bias = row(state.logit_bias).at[_in_range(bias_ids, vocab)].set(bias_values, mode="drop")
    stop = row(state.stop_mask).at[_in_range(stop_ids, vocab)].set(True, mode="drop")
    return SamplerState(
        output_counts=state.output_counts.at[slot].set(counts),
        prompt_mask=state.prompt_mask.at[slot].set(prompt),
        logit_bias=state.logit_bias.at[slot].set(bias),
        stop_mask=state.stop_mask.at[slot].set(stop),
    )


def _padded(values: list, size: int, pad: Any, dtype: Any) -> np.ndarray:
    """values as a [size] array, padded with `pad`."""
    out = np.full(size, pad, dtype=dtype)
    out[:len(values)] = values
    return out


def register(state: SamplerState, slot: int, prompt_ids: list[int], output_ids: list[int],
             logit_bias: dict[int, float] | None, stop_ids: list[int]) -> SamplerState:
    """Host side: give `slot` to a sequence (its prompt, the outputs it already has, bias, stop ids).

    Clears the slot's previous occupant. The ids go through one jitted function in fixed-size chunks, so it
    compiles once whatever the lengths. The state passed in is donated (consumed): use the returned one.
    Stop ids outside the vocabulary are ignored (they can never be sampled); out-of-range prompt, output or
    logit_bias ids, or more than MAX_BIAS_ENTRIES / MAX_STOP_IDS entries, raise ValueError naming the field.
    """
    num_slots, vocab = state.output_counts.shape
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} is out of range [0, {num_slots})")
    bias = {int(k): float(v) for k, v in (logit_bias or {}).items()}
    if len(bias) > MAX_BIAS_ENTRIES:
        raise ValueError(f"logit_bias has {len(bias)} entries; at most {MAX_BIAS_ENTRIES} are supported")
    if len(stop_ids) > MAX_STOP_IDS:
        raise ValueError(f"stop_token_ids (with EOS) has {len(stop_ids)} entries; at most {MAX_STOP_IDS} are supported")
    for name, ids in (("logit_bias", list(bias)), ("prompt_token_ids", prompt_ids), ("output_token_ids", output_ids)):
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{name} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    stop_ids = [i for i in stop_ids if 0 <= i < vocab]

    bias_ids = _padded(list(bias), MAX_BIAS_ENTRIES, -1, np.int32)
    bias_values = _padded(list(bias.values()), MAX_BIAS_ENTRIES, 0.0, np.float32)
    stops = _padded(stop_ids, MAX_STOP_IDS, -1, np.int32)
    no_bias_ids, no_stops = np.full(MAX_BIAS_ENTRIES, -1, np.int32), np.full(MAX_STOP_IDS, -1, np.int32)
    num_chunks = max(1, -(-max(len(prompt_ids), len(output_ids)) // REGISTER_CHUNK))
    for c in range(num_chunks):
        part = slice(c * REGISTER_CHUNK, (c + 1) * REGISTER_CHUNK)
        first = c == 0
        state = _register_chunk(
            state, np.int32(slot), np.bool_(first),
            _padded(prompt_ids[part], REGISTER_CHUNK, -1, np.int32),
            _padded(output_ids[part], REGISTER_CHUNK, -1, np.int32),
            bias_ids if first else no_bias_ids, bias_values, stops if first else no_stops)
    return state


def update_counts(state: SamplerState, slot: jax.Array, tokens: jax.Array, valid: jax.Array) -> SamplerState:
    """output_counts[slot[i], tokens[i]] += 1 where valid[i]: record the tokens just generated ([num_rows] each)."""
    vocab = state.output_counts.shape[1]
    tokens = jnp.where(valid, tokens, vocab)  # vocab is out of bounds: dropped
    return state.replace(output_counts=state.output_counts.at[slot, tokens].add(1, mode="drop"))


def exact_top_k(x: jax.Array, k: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """lax.top_k(x [n, vocab], k) (values, ids; ties: lower id first), without sorting whole rows.

    XLA sorts whole rows for lax.top_k on a GPU (2.8 ms for [256, 152k] f32 on an H200). The top k lie in
    the k blocks of `block` tokens with the largest maxima (ties: lower block first), so one pass of block
    maxima, a top-k over those and a top-k over the k * block candidates (in token order) give exactly
    lax.top_k's answer.
    """
    n, vocab = x.shape
    num_blocks = -(-vocab // block)
    if num_blocks <= 4 * k:
        return jax.lax.top_k(x, k)
    blocks = jnp.pad(x, ((0, 0), (0, num_blocks * block - vocab)), constant_values=-jnp.inf)
    blocks = blocks.reshape(n, num_blocks, block)  # [n, num_blocks, block]
    best = jnp.sort(jax.lax.top_k(blocks.max(axis=-1), k)[1], axis=-1)  # [n, k] block indices, ascending
    candidates = jnp.take_along_axis(blocks, best[:, :, None], axis=1).reshape(n, k * block)
    values, pos = jax.lax.top_k(candidates, k)  # [n, k]
    ids = (best[:, :, None] * block + jnp.arange(block)).reshape(n, k * block)
    return values, jnp.take_along_axis(ids, pos, axis=-1)


def compute_logprobs(logits: jax.Array, token_ids: jax.Array, k: int = MAX_LOGPROBS) -> Logprobs:
    """Logprob and rank of token_ids [n] and the top-k under log_softmax(logits [n, vocab]) (k capped at vocab)."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [n, vocab]
    token_logprob = jnp.take_along_axis(logprobs, token_ids[:, None].astype(jnp.int32), axis=-1)[:, 0]  # [n]
    token_rank = 1 + jnp.sum(logprobs > token_logprob[:, None], axis=-1, dtype=jnp.int32)  # [n]
    top_logprobs, top_ids = exact_top_k(logprobs, min(k, logprobs.shape[-1]))  # [n, k]
    return Logprobs(token_logprob=token_logprob, token_rank=token_rank, top_ids=top_ids.astype(jnp.int32),
                    top_logprobs=top_logprobs)


def process_logits(logits: jax.Array, t: SamplingTensors, state: SamplerState) -> jax.Array:
    """Step 2: stop-token ban, logit_bias, repetition / frequency / presence penalties -> f32 [num_rows, vocab]."""
    logits = logits.astype(jnp.float32)  # [num_rows, vocab]
    counts = state.output_counts[t.slot]  # [num_rows, vocab]
    generated = counts > 0  # [num_rows, vocab]
    logits = jnp.where(t.ban_stop[:, None] & state.stop_mask[t.slot], -jnp.inf, logits)
    logits = logits + jnp.where(t.has_bias[:, None], state.logit_bias[t.slot], 0.0)
    rp = t.repetition_penalty[:, None]  # [num_rows, 1]
    seen = state.prompt_mask[t.slot] | generated
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - (t.frequency_penalty[:, None] * counts.astype(jnp.float32)
                     + t.presence_penalty[:, None] * generated.astype(jnp.float32))


def _kept_from(sorted_logits: jax.Array, keep: jax.Array) -> jax.Array:
    """[num_rows, vocab] sorted descending + a prefix mask -> the mask extended to every tie of its last value."""
    count = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)  # [num_rows, 1]
    threshold = jnp.take_along_axis(sorted_logits, count - 1, axis=-1)  # [num_rows, 1]
    return sorted_logits >= threshold


def truncation_threshold(scaled: jax.Array, t: SamplingTensors, sort: bool | None = None) -> jax.Array:
    """Step 4a-c on temperature-scaled logits [num_rows, vocab]: the smallest kept logit per row, [num_rows, 1].

    The kept set is {token: scaled >= threshold}. min_p compares p / p_max = exp(logit - max logit) with
    min_p, elementwise, so it needs no sort; top_k and top_p share one descending sort per row, which is
    skipped (lax.cond) when no sampled row uses them. A row without top_k / top_p gets bitwise the same
    threshold on both paths, so its draw does not depend on whether other rows needed the sort. `sort`
    (static) picks the path on the host instead: a GPU runs a lax.cond by waiting for its predicate on the
    host, which stalls the engine's pipelined steps.
    """
    vocab = scaled.shape[-1]
    min_p = t.min_p[:, None]  # [num_rows, 1]
    top_k = jnp.where((t.top_k <= 0) | (t.top_k >= vocab), vocab, t.top_k)[:, None]  # [num_rows, 1]
    top_p = t.top_p[:, None]
    sampled = (t.temperature >= SAMPLING_EPS) & (t.top_k != 1)  # [num_rows]
    needs_sort = jnp.any(sampled & ((top_k[:, 0] < vocab) | (t.top_p < 1.0)))

    def min_p_only() -> jax.Array:
        keep = jnp.exp(scaled - scaled.max(axis=-1, keepdims=True)) >= min_p  # [num_rows, vocab]
        return jnp.min(jnp.where(keep, scaled, jnp.inf), axis=-1, keepdims=True)

    def with_sort() -> jax.Array:
        s = -jnp.sort(-scaled, axis=-1)  # [num_rows, vocab], descending
        keep = jnp.exp(s - s[:, :1]) >= min_p  # min_p (a prefix: s is sorted)
        keep = _kept_from(s, keep & (jnp.arange(vocab)[None, :] < top_k))  # top_k, ties at the k-th kept
        survivors = jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1)  # renormalised over min_p & top_k
        mass_before = jnp.cumsum(survivors, axis=-1) - survivors  # [num_rows, vocab]: mass of the tokens ahead
        keep = _kept_from(s, keep & ((mass_before < top_p) | (top_p >= 1.0)))
        return jnp.min(jnp.where(keep, s, jnp.inf), axis=-1, keepdims=True)

    if sort is not None:
        return with_sort() if sort else min_p_only()
    return jax.lax.cond(needs_sort, with_sort, min_p_only)


def sample(logits: jax.Array, t: SamplingTensors, state: SamplerState, sort: bool | None = None
           ) -> tuple[jax.Array, Logprobs]:
    """Sample one token per row of logits [num_rows, vocab] -> (tokens i32 [num_rows], their raw logprobs).
    sort: see truncation_threshold (True is always correct; False only when no row uses top_k / top_p)."""
    processed = process_logits(logits, t, state)  # [num_rows, vocab]
    greedy = (t.temperature < SAMPLING_EPS) | (t.top_k == 1)  # [num_rows]
    scaled = processed / jnp.where(greedy, 1.0, t.temperature)[:, None]
    masked = jnp.where(scaled >= truncation_threshold(scaled, t, sort), scaled, -jnp.inf)  # [num_rows, vocab]
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(t.seed, t.step)
    drawn = jax.vmap(jax.random.categorical)(keys, masked)  # [num_rows]
    tokens = jnp.where(greedy, jnp.argmax(processed, axis=-1), drawn).astype(jnp.int32)
    return tokens, compute_logprobs(logits, tokens)
