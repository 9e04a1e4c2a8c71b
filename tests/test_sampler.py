"""The on-device sampler against independent numpy implementations of vLLM's definitions.

The distribution test draws thousands of samples in one jitted call (many rows of the same logits, each
with its own seed) and compares the histogram with the exactly computed truncated softmax by a chi-square
test; the other tests compare processed logits, greedy tokens and logprobs with numpy directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import chi2

from jaxllm import sampler
from jaxllm.sampler import SamplingTensors
from jaxllm.sampling import SamplingParams

VOCAB = 50
_sample = jax.jit(sampler.sample)
_process = jax.jit(sampler.process_logits)


def tensors(params: list[SamplingParams], seeds=None, steps=None, slots=None, ban_stop=None,
            num_rows: int | None = None, pad_slot: int = 0) -> SamplingTensors:
    """from_rows with defaults: seed i, step 0, slot 0, no ban, no padding."""
    n = len(params)
    return SamplingTensors.from_rows(params, list(range(n)) if seeds is None else seeds,
                                     [0] * n if steps is None else steps, [0] * n if slots is None else slots,
                                     [False] * n if ban_stop is None else ban_stop,
                                     n if num_rows is None else num_rows, pad_slot)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def truncated_softmax(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                      min_p: float = 0.0, variant: str = "vllm") -> np.ndarray:
    """The distribution a row samples from, token by token from the definitions (float64).

    variant "vllm" is the documented order (min_p, top_k, then top_p on the renormalised survivors);
    "no_renorm" measures top_p on the unrenormalised probabilities, "top_p_first" applies top_p to the whole
    distribution before min_p / top_k: the two mistakes the distribution test must be able to catch.
    """
    x = np.asarray(logits, np.float64) / temperature
    p = np.exp(log_softmax(x))
    vocab = len(x)

    def min_p_top_k(keep: np.ndarray) -> np.ndarray:
        keep = keep & (p >= min_p * p[keep].max())
        if 0 < top_k < vocab:
            keep = keep & (x >= np.sort(x)[::-1][top_k - 1])
        return keep

    def top_p_(keep: np.ndarray, q: np.ndarray) -> np.ndarray:
        if top_p >= 1.0:
            return keep
        return np.array([keep[i] and q[keep & (q > q[i])].sum() < top_p for i in range(vocab)])

    keep = np.ones(vocab, bool)
    if variant == "vllm":
        keep = min_p_top_k(keep)
        keep = top_p_(keep, np.where(keep, p, 0.0) / p[keep].sum())
    elif variant == "no_renorm":
        keep = top_p_(min_p_top_k(keep), p)
    else:
        assert variant == "top_p_first"
        keep = min_p_top_k(top_p_(keep, p))
    out = np.where(keep, p, 0.0)
    return out / out.sum()


def boundary_margin(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> float:
    """How far the case is from a filter boundary (f32 rounding must not be able to flip a token)."""
    x = np.asarray(logits, np.float64) / temperature
    p = np.exp(log_softmax(x))
    margins = [np.abs(p / p.max() - min_p).min()] if min_p > 0 else []
    if top_p < 1.0:
        q = truncated_softmax(logits, temperature, top_k, 1.0, min_p)
        before = np.array([q[q > q[i]].sum() for i in range(len(q))])
        margins.append(np.abs(before[q > 0] - top_p).min())
    return min(margins, default=1.0)


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square p-value of a histogram against probs; cells expected < 5 are pooled, and any draw
    of a token with probability 0 gives 0."""
    n = counts.sum()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = n * probs
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    if expected[~big].sum() > 0:
        obs.append(counts[~big & (probs > 0)].sum())
        exp.append(expected[~big].sum())
    obs, exp = np.asarray(obs, np.float64), np.asarray(exp)
    if len(obs) < 2:
        return 1.0
    return float(chi2.sf(((obs - exp) ** 2 / exp).sum(), len(obs) - 1))  # float32: ~1e-6 relative


# (temperature, top_k, top_p, min_p, discriminating): a discriminating case is one where both mistaken
# variants of truncated_softmax are at total-variation distance >= 0.1 from the right distribution.
CASES = [
    (1.0, 0, 1.0, 0.0, False),  # plain softmax
    (0.7, 10, 1.0, 0.0, False),
    (1.3, 0, 0.8, 0.0, False),
    (1.3, 0, 1.0, 0.1, False),
    (0.7, 20, 0.9, 0.05, False),  # all three
    (1.3, 0, 0.6, 0.2, True),  # min_p then top_p: order and renormalisation matter
    (1.3, 10, 0.7, 0.0, True),  # top_k then top_p
    (0.7, 0, 0.8, 0.1, True),
]
DRAWS = 12_000  # per case


def test_distribution_matches_truncated_softmax():
    """Chi-square p-value > 1e-6 per case, and no token outside the truncated support is ever drawn.

    Under a correct sampler the p-value is uniform, so a case fails with probability 1e-6 for a random choice
    of seeds (the seeds are fixed, so the outcome is deterministic). A mistake shifting total variation by
    >= 0.1 gives a chi-square non-centrality >= 4 * DRAWS * 0.1**2 = 480, far past the 1e-6 critical value
    (< 100 at <= 49 degrees of freedom); the test checks that on the actual draws for the discriminating
    cases. Changing the sampler to top_p before min_p, or top_p without renormalisation, fails this test.
    """
    logits = np.random.default_rng(0).normal(size=VOCAB).astype(np.float32) * 2
    params = [SamplingParams(temperature=temp, top_k=k, top_p=tp, min_p=mp) for temp, k, tp, mp, _ in CASES]
    rows = [p for p in params for _ in range(DRAWS)]
    t = tensors(rows, seeds=list(range(len(rows))), steps=[7] * len(rows))
    state = sampler.init_state(1, VOCAB)
    tokens, _ = _sample(jnp.broadcast_to(jnp.asarray(logits), (len(rows), VOCAB)), t, state)
    tokens = np.asarray(tokens).reshape(len(CASES), DRAWS)
    for (temp, k, tp, mp, discriminating), drawn in zip(CASES, tokens):
        assert boundary_margin(logits, temp, k, tp, mp) > 1e-3, "case too close to a filter boundary"
        probs = truncated_softmax(logits, temp, k, tp, mp)
        counts = np.bincount(drawn, minlength=VOCAB)
        case = (temp, k, tp, mp)
        assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(probs)), f"{case}: token outside the support"
        assert chi_square_pvalue(counts, probs) > 1e-6, f"{case}: {counts} vs {np.round(probs * DRAWS)}"
        if discriminating:
            for variant in ("no_renorm", "top_p_first"):
                wrong = truncated_softmax(logits, temp, k, tp, mp, variant)
                assert 0.5 * np.abs(wrong - probs).sum() >= 0.1
                assert chi_square_pvalue(counts, wrong) < 1e-6, f"{case}: cannot tell {variant} apart"


def test_truncation_ties_are_kept_together():
    """Tokens equal to the k-th largest are all kept; a tie group straddling the top-p mass is kept whole."""
    x = jnp.asarray([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0],  # top_k=2: the three 2.0s tie for 2nd
                     [1.0, 1.0, 1.0, 1.0, 0.0, 0.0],  # top_p=0.3: two 1.0s reach it, their ties stay
                     [5.0, 1.0, 1.0, 0.0, 0.0, 0.0],  # top_p=0.5: the top token alone (mass before = 0)
                     [0.0, 0.0, 3.0, 2.0, 1.0, 0.0],  # top_k=3, min_p=0.3: e^-1 >= 0.3 > e^-2 keeps 2.0
                     [2.0, 1.0, 1.0, 0.0, 0.0, 0.0]])  # top_k=2 keeps both 1.0s, so top_p=0.7 sees mass 0.58
    t = tensors([SamplingParams(top_k=2), SamplingParams(top_p=0.3), SamplingParams(top_p=0.5),
                 SamplingParams(top_k=3, min_p=0.3), SamplingParams(top_k=2, top_p=0.7)])
    threshold = np.asarray(jax.jit(sampler.truncation_threshold)(x, t))[:, 0]
    # The last row would be 2.0 if top_k kept only one of the tied 1.0s (mass before them 0.73 >= 0.7).
    np.testing.assert_array_equal(threshold, [2.0, 1.0, 5.0, 2.0, 1.0])
    for i in (0, 1):  # each alone: a batch with only top_k, or only top_p, still takes the sorting path
        alone = jax.jit(sampler.truncation_threshold)(x[i:i + 1], jax.tree.map(lambda a: a[i:i + 1], t))
        assert float(alone[0, 0]) == threshold[i]


def test_min_p_rows_do_not_depend_on_the_sort_path():
    """Rows without top_k / top_p get bitwise the same threshold whether or not another row needs the sort."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(5, VOCAB)).astype(np.float32) * 3)
    alone = tensors([SamplingParams(min_p=m) for m in (0.0, 0.01, 0.1, 0.5, 1.0)])
    mixed = tensors([SamplingParams(min_p=m) for m in (0.0, 0.01, 0.1, 0.5, 1.0)] + [SamplingParams(top_p=0.5)])
    threshold = jax.jit(sampler.truncation_threshold)
    without_sort = np.asarray(threshold(x, alone))
    with_sort = np.asarray(threshold(jnp.concatenate([x, x[:1]]), mixed))[:5]
    np.testing.assert_array_equal(without_sort, with_sort)
    ratio = np.exp(np.asarray(x, np.float64) - np.asarray(x).max(axis=1, keepdims=True))
    want = [np.asarray(x)[i][ratio[i] >= m].min() for i, m in enumerate((0.0, 0.01, 0.1, 0.5, 1.0))]
    np.testing.assert_array_equal(without_sort[:, 0], want)


def test_exact_top_k_equals_lax_top_k():
    """The blocked top-k gives lax.top_k's values and ids exactly, ties (lower id first) and padding included."""
    rng = np.random.default_rng(6)
    x = np.round(rng.normal(size=(4, 3001)) * 2).astype(np.float32)  # many ties; 3001 = 187 blocks of 16 + 9
    x[1, :] = 0.0  # all tied
    x[2, -5:] = 50.0  # the top in the padded last block
    for k in (1, 7, 20):
        got = jax.jit(sampler.exact_top_k, static_argnums=(1, 2))(jnp.asarray(x), k, 16)
        want = jax.lax.top_k(jnp.asarray(x), k)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(want[1])[1], np.arange(20))


def penalty_reference(logits, params: SamplingParams, ban: bool, prompt, outputs, bias, stops) -> np.ndarray:
    """Step 2 of the sampler for one row, token by token (float64)."""
    out = np.asarray(logits, np.float64).copy()
    counts = np.bincount(outputs, minlength=len(out))
    for tok in range(len(out)):
        if ban and tok in stops:
            out[tok] = -np.inf
        if params.logit_bias:
            out[tok] += params.logit_bias.get(tok, 0.0)
        if tok in prompt or counts[tok] > 0:
            rp = params.repetition_penalty
            out[tok] = out[tok] / rp if out[tok] > 0 else out[tok] * rp
        out[tok] -= params.frequency_penalty * counts[tok] + params.presence_penalty * (counts[tok] > 0)
    return out


def test_process_logits_penalties_bias_and_stop_ban():
    """Processed logits equal the numpy definition (rtol 1e-5: float32 vs float64 on values of order 1-10)."""
    vocab = 16
    prompt, outputs, bias, stops = [1, 2, 2, 5, 12], [3, 3, 5, 7, 3, 12], {4: 2.5, 9: -1.0, 3: 0.5}, [0, 11, 7]
    state = sampler.init_state(3, vocab)
    state = sampler.register(state, 1, prompt, outputs, bias, stops)
    rows = [  # (params, slot, ban_stop)
        (SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25, logit_bias=bias), 1,
         True),
        (SamplingParams(repetition_penalty=0.8, presence_penalty=-0.4, frequency_penalty=0.6), 1, False),
        (SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=1.0), 2, True),  # empty slot
        (SamplingParams(), 1, False),  # no penalty
    ]
    logits = np.random.default_rng(1).normal(size=(len(rows), vocab)).astype(np.float32) * 3
    logits[:, [2, 3]] = [[2.0, -1.5]]  # a prompt token with a positive logit, a generated one with a negative
    t = tensors([p for p, _, _ in rows], slots=[s for _, s, _ in rows], ban_stop=[b for _, _, b in rows])
    got = np.asarray(_process(jnp.asarray(logits), t, state))
    for i, (params, slot, ban) in enumerate(rows):
        history = (prompt, outputs, bias, stops) if slot == 1 else ([], [], {}, [])
        want = penalty_reference(logits[i], params, ban, *history)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6, err_msg=f"row {i}")
    assert np.isneginf(got[0, stops]).all() and np.isfinite(got[1:]).all()
    np.testing.assert_array_equal(got[3], logits[3])
    assert got[0, 4] == pytest.approx(logits[0, 4] + 2.5)  # bias on a token never seen


def test_min_tokens_bans_stop_tokens_until_reached():
    """Greedy decoding where the stop token is the favourite: banned while step < min_tokens, then chosen."""
    vocab, min_tokens, stop = 8, 3, 5
    state = sampler.register(sampler.init_state(2, vocab), 1, [1, 2], [], None, [stop, 6])
    logits = jnp.asarray([[0.0, 1.0, 2.0, 0.5, 3.0, 9.0, 8.0, -1.0]])
    chosen, update = [], jax.jit(sampler.update_counts)
    for step in range(5):
        t = tensors([SamplingParams(temperature=0, min_tokens=min_tokens, max_tokens=10)], steps=[step],
                    slots=[1], ban_stop=[step < min_tokens], num_rows=2, pad_slot=0)
        tokens, _ = _sample(jnp.concatenate([logits, logits]), t, state)
        state = update(state, t.slot, tokens, jnp.asarray([True, False]))
        chosen.append(int(tokens[0]))
    assert chosen == [4, 4, 4, stop, stop]
    assert int(state.output_counts[1, 4]) == 3 and int(state.output_counts[1, stop]) == 2
    assert int(state.output_counts[0].sum()) == 0  # the padding row was not counted


def test_seeded_draws_do_not_depend_on_the_batch():
    """A row's token depends only on its own seed, step, logits and parameters."""
    rng = np.random.default_rng(2)
    n = 8
    logits = rng.normal(size=(n, VOCAB)).astype(np.float32)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=30),
              SamplingParams(temperature=1.3, top_p=0.9), SamplingParams(temperature=1.0, min_p=0.05)] * 2
    seeds, steps = [11, 12, 13, 14, 15, 16, 2**32 + 17, 18], [0, 5, 9, 3, 0, 1, 2, 40]
    state = sampler.init_state(2, VOCAB)
    padded = np.concatenate([logits, np.zeros((n, VOCAB), np.float32)])  # 2n rows: one compiled shape below
    base = np.asarray(_sample(jnp.asarray(padded), tensors(params, seeds, steps, num_rows=2 * n), state)[0])[:n]

    # The same rows reversed, interleaved with other rows (other logits, seeds, parameters), in a bigger batch.
    order = list(range(n))[::-1]
    others = rng.normal(size=(n, VOCAB)).astype(np.float32)
    mixed_logits = np.stack([row for i in order for row in (logits[i], others[i])])
    mixed_params = [p for i in order for p in (params[i], SamplingParams(temperature=0.9, top_k=5))]
    mixed_seeds = [s for i in order for s in (seeds[i], 1000 + i)]
    mixed_steps = [s for i in order for s in (steps[i], 3)]
    mixed = _sample(jnp.asarray(mixed_logits), tensors(mixed_params, mixed_seeds, mixed_steps, slots=[1] * 2 * n),
                    state)[0]
    np.testing.assert_array_equal(np.asarray(mixed)[::2], base[order])
    alone = _sample(jnp.asarray(np.roll(padded, -3, axis=0)), tensors(params[3:4], seeds[3:4], steps[3:4],
                                                                     num_rows=2 * n), state)[0]
    # row 3 (min_p only) alone with greedy padding rows: no row needs the sort, the other path of the lax.cond
    assert int(alone[0]) == base[3]

    # Different steps (and different seeds) give different draws: 64 draws from a uniform row.
    flat = jnp.zeros((64, VOCAB))
    by_step = np.asarray(_sample(flat, tensors([SamplingParams()] * 64, [5] * 64, list(range(64))), state)[0])
    by_seed = np.asarray(_sample(flat, tensors([SamplingParams()] * 64, list(range(64)), [5] * 64), state)[0])
    # 64 uniform draws over 50 tokens hit 36 distinct tokens on average; <= 20 has probability 7e-13.
    assert len(set(by_step)) > 20 and len(set(by_seed)) > 20
    again = np.asarray(_sample(flat, tensors([SamplingParams()] * 64, [5] * 64, list(range(64))), state)[0])
    np.testing.assert_array_equal(again, by_step)


def test_greedy_rows_and_logprobs():
    """Greedy rows are the argmax of the processed logits; the logprobs are those of the raw logits (rtol 1e-5)."""
    vocab = 40
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, vocab)).astype(np.float32) * 2
    logits[5] = np.round(logits[5])  # ties, for the rank
    state = sampler.register(sampler.init_state(2, vocab), 1, [int(np.argmax(logits[2]))], [], {7: 50.0}, [])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=1),  # greedy both
              SamplingParams(temperature=0, repetition_penalty=100.0),  # the prompt's favourite is penalised
              SamplingParams(temperature=1.0, logit_bias={7: 50.0}),  # bias makes 7 certain, raw logprob
              SamplingParams(temperature=1.0), SamplingParams(temperature=1.2)]
    slots = [0, 0, 1, 1, 0, 0]
    t = tensors(params, slots=slots, num_rows=8, pad_slot=0)
    assert t.temperature.shape == (8,) and bool(t.temperature[1] == 0) and not bool(t.has_bias[4:].any())
    padded = np.concatenate([logits, logits[:2]])
    tokens, lp = _sample(jnp.asarray(padded), t, state)
    tokens = np.asarray(tokens)
    processed = np.asarray(_process(jnp.asarray(padded), t, state))
    assert tokens[0] == np.argmax(logits[0]) and tokens[1] == np.argmax(logits[1])
    assert tokens[2] == np.argmax(processed[2]) != np.argmax(logits[2])
    assert tokens[3] == 7 and tokens[6] == np.argmax(logits[0]) and tokens[7] == np.argmax(logits[1])

    raw = log_softmax(padded)
    np.testing.assert_allclose(np.asarray(lp.token_logprob), raw[np.arange(8), tokens], rtol=1e-5, atol=1e-5)
    ranks = 1 + (raw > raw[np.arange(8), tokens][:, None]).sum(axis=1)
    np.testing.assert_array_equal(np.asarray(lp.token_rank), ranks)
    assert int(lp.token_rank[3]) > 1  # chosen through the bias, ranked under the raw logits
    assert lp.top_ids.shape == (8, sampler.MAX_LOGPROBS)
    top = np.argsort(-raw[:5], axis=1, kind="stable")[:, :sampler.MAX_LOGPROBS]  # rows 0-4 have no ties
    np.testing.assert_array_equal(np.asarray(lp.top_ids)[:5], top)
    np.testing.assert_allclose(np.asarray(lp.top_logprobs), -np.sort(-raw, axis=1)[:, :sampler.MAX_LOGPROBS],
                               rtol=1e-5, atol=1e-5)

    # Rank with ties: 1 + the number of strictly greater logprobs; k is capped at the vocabulary.
    small = jax.jit(sampler.compute_logprobs, static_argnums=2)(jnp.asarray([[1.0, 3.0, 3.0, 0.0]]),
                                                                jnp.asarray([2]), 20)
    assert int(small.token_rank[0]) == 1 and small.top_ids.shape == (1, 4)
    assert int(sampler.compute_logprobs(jnp.asarray([[1.0, 3.0, 3.0, 0.0]]), jnp.asarray([0])).token_rank[0]) == 3


def test_register_chunks_counts_and_reset():
    vocab, chunk = 64, sampler.REGISTER_CHUNK
    rng = np.random.default_rng(4)
    state = sampler.register(sampler.init_state(4, vocab), 0, [], [], None, [])  # compiled for this shape
    compilations = sampler._register_chunk._cache_size()
    old_prompt = rng.integers(0, vocab, 3 * chunk + 17).tolist()
    state = sampler.register(state, 2, old_prompt, [1, 1, 2], {5: 1.0, 60: -3.0}, [0, 63])
    other = ([9, 10], [11, 11, 12], {13: 2.0}, [14])
    state = sampler.register(state, 1, *other)
    prompt = rng.integers(10, 30, chunk + 5).tolist()  # > 1 chunk, never touches 0..9
    outputs = rng.integers(0, 20, 2 * chunk + 3).tolist()
    state = sampler.register(state, 2, prompt, outputs, {6: 0.5}, [3, 1000])  # 1000: out of vocab, ignored

    def row(s: int):
        return [np.asarray(a[s]) for a in (state.output_counts, state.prompt_mask, state.logit_bias, state.stop_mask)]

    counts, mask, bias, stop = row(2)
    np.testing.assert_array_equal(counts, np.bincount(outputs, minlength=vocab))
    np.testing.assert_array_equal(np.flatnonzero(mask), sorted(set(prompt)))  # the old prompt is gone
    np.testing.assert_array_equal(bias, np.eye(vocab)[6] * 0.5)
    np.testing.assert_array_equal(np.flatnonzero(stop), [3])
    counts, mask, bias, stop = row(1)  # the neighbour is untouched
    np.testing.assert_array_equal(np.flatnonzero(counts), [11, 12])
    assert counts[11] == 2 and list(np.flatnonzero(mask)) == [9, 10] and bias[13] == 2.0 and stop[14]
    assert all(not r.any() for s in (0, 3) for r in row(s))
    assert sampler._register_chunk._cache_size() == compilations  # no recompilation whatever the lengths

    with pytest.raises(ValueError, match="logit_bias"):
        sampler.register(state, 0, [1], [], {i: 1.0 for i in range(sampler.MAX_BIAS_ENTRIES + 1)}, [])
    with pytest.raises(ValueError, match="logit_bias"):
        sampler.register(state, 0, [1], [], {vocab: 1.0}, [])
    with pytest.raises(ValueError, match="logit_bias"):
        sampler.register(state, 0, [1], [], {-1: 1.0}, [])
    with pytest.raises(ValueError, match="stop_token_ids"):
        sampler.register(state, 0, [1], [], None, [0] * (sampler.MAX_STOP_IDS + 1))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        sampler.register(state, 0, [vocab], [], None, [])


def test_update_counts_respects_valid():
    state = sampler.register(sampler.init_state(3, 10), 2, [], [3], None, [])
    update = jax.jit(sampler.update_counts)
    state = update(state, jnp.asarray([0, 2, 1, 2]), jnp.asarray([3, 3, 9, 3]), jnp.asarray([True, True, False, True]))
    want = np.zeros((3, 10), np.int32)
    want[0, 3], want[2, 3] = 1, 3
    np.testing.assert_array_equal(np.asarray(state.output_counts), want)


def test_from_rows_pads_with_greedy_rows():
    t = tensors([SamplingParams(temperature=0.5, top_k=-1, seed=3), SamplingParams(temperature=1e-6)],
                seeds=[-1, 7], steps=[4, 2], slots=[3, 1], ban_stop=[True, False], num_rows=4, pad_slot=5)
    np.testing.assert_array_equal(np.asarray(t.temperature), [0.5, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(t.slot), [3, 1, 5, 5])
    np.testing.assert_array_equal(np.asarray(t.seed), [2**32 - 1, 7, 0, 0])
    np.testing.assert_array_equal(np.asarray(t.ban_stop), [True, False, False, False])
    assert t.seed.dtype == jnp.uint32 and t.step.dtype == jnp.int32 and t.top_k.dtype == jnp.int32
    with pytest.raises(ValueError):
        tensors([SamplingParams()] * 3, num_rows=2)


def test_top_k_beyond_int32_keeps_every_token():
    """A top_k past int32 (the server fuzzer sent 2758556568) keeps every token, as any k >= vocab does."""
    huge = tensors([SamplingParams(temperature=0.7, top_k=2758556568)])
    assert int(huge.top_k[0]) == 0
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((1, VOCAB)), jnp.float32)
    scaled = logits / 0.7
    np.testing.assert_array_equal(sampler.truncation_threshold(scaled, huge, sort=True),
                                  sampler.truncation_threshold(scaled, tensors([SamplingParams(temperature=0.7)]),
                                                               sort=True))
