"""The sampler chain against a slow, literal transcription of llama.cpp's samplers, plus its statistics,
seeding and speed over a Gemma-sized vocabulary."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nibble.runtime.sampling import (Sampler, SamplingParams, apply_logit_bias, apply_penalties, min_p_count,
                                     top_k_candidates, top_p_count)


# ---- the reference: llama.cpp's chain as loops over (id, logit) pairs, in its order ----

def reference_candidates(logits, params: SamplingParams, recent=()):
    """Ids left after logit bias, penalties, top-k, top-p and min-p, most likely first, as
    src/llama-sampling.cpp computes them (float64 sums instead of float32)."""
    cur = [[i, float(v)] for i, v in enumerate(logits)]
    for tok, b in (params.logit_bias or {}).items():
        cur[tok][1] += b
    counts = {}
    for t in recent:
        counts[t] = counts.get(t, 0) + 1
    if params.repeat_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        for c in cur:
            if c[0] in counts:
                n = counts[c[0]]
                c[1] = c[1] * params.repeat_penalty if c[1] <= 0 else c[1] / params.repeat_penalty
                c[1] -= n * params.frequency_penalty + params.presence_penalty
    cur.sort(key=lambda c: -c[1])  # stable: ties keep id order
    if params.top_k > 0:
        cur = cur[: params.top_k]
    if params.top_p < 1.0:
        m = cur[0][1]
        ps = [math.exp(c[1] - m) for c in cur]
        z = sum(ps)
        cum, last = 0.0, len(cur)
        for i, p in enumerate(ps):
            cum += p / z
            if cum >= params.top_p:
                last = i + 1
                break
        cur = cur[:last]
    if params.min_p > 0.0:
        threshold = cur[0][1] + math.log(params.min_p)
        i = 1
        while i < len(cur) and cur[i][1] >= threshold:
            i += 1
        cur = cur[:i]
    return [c[0] for c in cur]


def distinct_logits(rng, n, scale=3.0):
    """Random float32 logits without ties (ties make "the k largest" ambiguous)."""
    x = rng.permutation(n).astype(np.float64) / n * scale * 4 - scale * 2
    return (x + rng.normal(0, scale, n)).astype(np.float32)


# ---- each filter ----

def test_penalties_follow_llama_cpp_formula():
    logits = np.array([2.0, -2.0, 1.0, 0.5, 0.0], dtype=np.float32)
    apply_penalties(logits, [0, 1, 1, 4], repeat=2.0, frequency=0.25, presence=0.5)
    # token 0: positive, divided; once.  token 1: negative, multiplied; twice.  token 4: 0 counts as <= 0.
    np.testing.assert_allclose(logits, [2.0 / 2 - 0.25 - 0.5, -2.0 * 2 - 0.5 - 0.5, 1.0, 0.5, 0.0 - 0.25 - 0.5])


def test_penalties_off_by_default_values_change_nothing():
    logits = np.arange(8, dtype=np.float32)
    apply_penalties(logits, [1, 2, 3], repeat=1.0, frequency=0.0, presence=0.0)
    np.testing.assert_array_equal(logits, np.arange(8, dtype=np.float32))


def test_logit_bias_adds_and_bans():
    logits = np.zeros(4, dtype=np.float32)
    apply_logit_bias(logits, {1: 2.5, 3: -math.inf})
    assert logits.tolist() == [0.0, 2.5, 0.0, -math.inf]


def test_top_k_is_the_k_largest_in_order_over_a_gemma_sized_vocab():
    rng = np.random.default_rng(0)
    logits = distinct_logits(rng, 262_144)
    for k in (1, 40, 1000):
        np.testing.assert_array_equal(top_k_candidates(logits, k), np.argsort(-logits)[:k])
    assert len(top_k_candidates(logits, 0)) == 262_144
    # the subsampled threshold is fooled when the largest logits sit exactly on its stride: still exact
    logits[::64] += 100.0
    for k in (1, 40, 1000):
        np.testing.assert_array_equal(top_k_candidates(logits, k), np.argsort(-logits)[:k])


def test_top_p_and_min_p_counts():
    sorted_logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    assert top_p_count(sorted_logits, 0.5) == 1       # reaching p exactly is enough
    assert top_p_count(sorted_logits, 0.79) == 2
    assert top_p_count(sorted_logits, 0.9) == 3
    assert top_p_count(sorted_logits, 1.0) == 4
    assert top_p_count(sorted_logits, 0.0) == 1
    assert min_p_count(sorted_logits, 0.25) == 3       # p >= 0.25 * 0.5
    assert min_p_count(sorted_logits, 0.5) == 2
    assert min_p_count(sorted_logits, 0.05) == 4
    assert min_p_count(sorted_logits, 0.0) == 4
    assert min_p_count(sorted_logits, 1.0) == 1


# ---- the whole chain against the reference ----

@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300), top_k=st.sampled_from([0, 1, 5, 40, 500]),
       top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]), min_p=st.sampled_from([0.0, 0.05, 0.3]),
       repeat=st.sampled_from([1.0, 1.1, 1.5]), freq=st.sampled_from([0.0, 0.3]),
       presence=st.sampled_from([0.0, 0.7]))
def test_candidates_match_reference(seed, n, top_k, top_p, min_p, repeat, freq, presence):
    rng = np.random.default_rng(seed)
    logits = distinct_logits(rng, n)
    recent = rng.integers(0, n, size=int(rng.integers(0, 20))).tolist()
    bias = {int(rng.integers(0, n)): float(rng.normal(0, 2))} if seed % 3 == 0 else None
    params = SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat,
                            frequency_penalty=freq, presence_penalty=presence, logit_bias=bias, seed=1)
    sampler = Sampler(params, n)
    x = logits.copy()
    apply_logit_bias(x, bias or {})
    apply_penalties(x, recent, repeat, freq, presence)
    expected = reference_candidates(logits, params, recent)
    assert sampler._candidates(x).tolist() == expected
    token = sampler.sample(logits, recent)
    assert token in expected


def test_greedy_is_argmax_after_bias_and_penalties():
    logits = np.array([1.0, 3.0, 2.9, -1.0], dtype=np.float32)
    greedy = Sampler(SamplingParams(temperature=0.0), 4)
    assert greedy.sample(logits) == 1
    assert greedy.sample(logits, recent=[1]) == 1                     # repeat_penalty 1.0: no change
    penalised = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5), 4)
    assert penalised.sample(logits, recent=[1]) == 2
    biased = Sampler(SamplingParams(temperature=0.0, logit_bias={3: 10.0}), 4)
    assert biased.sample(logits) == 3
    np.testing.assert_array_equal(logits, np.float32([1.0, 3.0, 2.9, -1.0]))  # the caller's array is untouched


def test_draws_follow_the_softmax_at_the_temperature():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1])).astype(np.float32)
    for temperature in (1.0, 0.5, 2.0):
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, seed=7), 4)
        n = 20_000
        counts = np.bincount([sampler.sample(logits) for _ in range(n)], minlength=4)
        expected = np.array([0.4, 0.3, 0.2, 0.1]) ** (1 / temperature)
        expected /= expected.sum()
        # 5 standard deviations of a binomial count
        assert np.all(np.abs(counts / n - expected) < 5 * np.sqrt(expected * (1 - expected) / n)), counts


def test_filters_remove_tokens_from_the_draw():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    for params, allowed in [(SamplingParams(top_k=2, top_p=1.0, min_p=0.0, temperature=5.0), {0, 1}),
                            (SamplingParams(top_k=0, top_p=0.79, min_p=0.0, temperature=5.0), {0, 1}),
                            (SamplingParams(top_k=0, top_p=1.0, min_p=0.5, temperature=5.0), {0, 1})]:
        sampler = Sampler(params.with_(seed=3), 4)
        seen = {sampler.sample(logits) for _ in range(500)}
        assert seen == allowed, (params, seen)


def test_same_seed_same_draws_other_seed_other_draws():
    rng = np.random.default_rng(1)
    logits = distinct_logits(rng, 5000, scale=1.0)

    def draws(seed):
        s = Sampler(SamplingParams(seed=seed, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0), 5000)
        return [s.sample(logits) for _ in range(50)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)
    assert Sampler(SamplingParams(), 10).seed != Sampler(SamplingParams(), 10).seed  # None: fresh entropy


def test_penalty_window():
    s = Sampler(SamplingParams(repeat_last_n=3), 10)
    assert list(s.penalty_window([1, 2, 3, 4, 5])) == [3, 4, 5]
    assert list(s.penalty_window([1])) == [1]
    assert list(Sampler(SamplingParams(repeat_last_n=0), 10).penalty_window([1, 2])) == []
    assert list(Sampler(SamplingParams(repeat_last_n=-1), 10).penalty_window([1, 2])) == [1, 2]


@pytest.mark.parametrize("bad", [dict(top_k=-1), dict(top_p=1.5), dict(min_p=-0.1), dict(repeat_penalty=0.0),
                                 dict(temperature=math.nan), dict(logit_bias={10: 1.0}), dict(seed=-2),
                                 dict(repeat_last_n=-2)])
def test_out_of_range_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        Sampler(SamplingParams(**bad), 10)


def test_sampling_a_gemma_sized_vocabulary_sorts_a_small_part_of_it(monkeypatch):
    """A decode step of the 270M model takes ~25 ms and sorting 262,144 logits ~20 ms (argpartition ~3 ms),
    so the sampler must never sort or partition the whole vocabulary: counted here, not timed (the machine's
    load would decide a time)."""
    from nibble.runtime import sampling

    sizes = []

    class CountingNumpy:
        def __getattr__(self, name):
            return getattr(np, name)

    counting = CountingNumpy()
    for name in ("sort", "argsort", "partition", "argpartition"):
        def counted(a, *args, _sort=getattr(np, name), **kwargs):
            sizes.append(np.size(a))
            return _sort(a, *args, **kwargs)
        setattr(counting, name, counted)
    monkeypatch.setattr(sampling, "np", counting)
    rng = np.random.default_rng(2)
    logits = distinct_logits(rng, 262_144)
    recent = rng.integers(0, 262_144, 64).tolist()
    for name, params in [("defaults", SamplingParams(seed=1, repeat_penalty=1.1)),
                         ("no top-k", SamplingParams(seed=1, top_k=0)),
                         ("greedy", SamplingParams(temperature=0.0))]:
        sizes.clear()
        Sampler(params, 262_144).sample(logits, recent)
        assert max(sizes, default=0) <= 262_144 // 32, (name, sizes)
