"""Batch invariance: a request's tokens do not depend on what else the model is evaluating, on how its
prompt is chunked, or on what the KV cache held before. Each row of a batched step carries the kind that a
lone evaluation gives it (runtime/engine.py), so these are exact equalities, on every catalogue model."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import nibble
from nibble.runtime import generate

MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
PROMPTS = ["Once upon a time", "The three primary colours are", "def fibonacci(n):",
           "A haiku about the sea:\n", "Paris is the capital of", "List of prime numbers: 2, 3, 5,",
           "Water boils at", "The quick brown fox"]


@pytest.fixture(scope="module", params=MODELS)
def model(request, pulled):
    m = nibble.load(pulled(request.param), n_ctx=512, parallel=4)
    yield m
    m.close()


def alone(model, prompt, **kw):
    model.reset()
    return model.generate(prompt, **kw).tokens


def test_concurrent_requests_give_the_tokens_of_lone_ones(model):
    """8 requests with their own seeds on 4 slots: they queue, join running batches mid-stream and share
    steps with other requests' prompt chunks and decode rows."""
    kw = [dict(temperature=0.8, seed=10 + i, max_tokens=10 + 2 * (i % 3)) for i in range(len(PROMPTS))]
    expected = [alone(model, p, **k) for p, k in zip(PROMPTS, kw)]
    steps = model.scheduler.steps
    got = [None] * len(PROMPTS)

    def run(i):
        got[i] = model.generate(PROMPTS[i], **kw[i]).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    # they did share steps: fewer steps than the requests would take one after the other
    assert model.scheduler.steps - steps < sum(len(t) + 1 for t in expected)


def test_reused_prefixes_and_chunking_do_not_change_tokens(model):
    a = model.tokenize("In the beginning was the word, and the word")   # prompt lengths not multiples of 4
    b = a + model.tokenize(" was with the sea; and the sea was")
    assert len(a) % 4 and len(b) % 4
    fresh_b = alone(model, b, temperature=0, max_tokens=12)
    model.reset()
    model.generate(a, temperature=0, max_tokens=6, cache_prompt=True)     # the cache now holds a and a reply
    s = model.stream(b, temperature=0, max_tokens=12, cache_prompt=True)
    assert s.completion().tokens == fresh_b
    assert 0 < s.usage.cached_tokens <= len(a)                          # reused only cells of fresh bits
    # a prompt longer than a step's prompt budget (the scheduler chunks it), beside a running stream
    long = (b * 8)[:300]
    fresh_long = alone(model, long, temperature=0, max_tokens=6)
    engine = model.engine
    budget, engine.max_batch = engine.max_batch, 64
    try:
        first = model.stream(PROMPTS[0], temperature=0, max_tokens=30)
        next(first)
        assert model.generate(long, temperature=0, max_tokens=6).tokens == fresh_long
        first.close()
    finally:
        engine.max_batch = budget


def test_a_session_gives_the_tokens_of_the_whole_conversation_from_scratch(model):
    session = model.session(system="You are terse.", temperature=0, max_tokens=10)
    first = session.send("Name a colour.")
    first.completion()
    second = session.send("Another one.")
    second.completion()
    conversation = session.conversation()[:-1]           # the second reply is what we check
    ids = generate.chat_prompt(model, conversation)
    assert second.prompt_ids == ids
    assert alone(model, ids, temperature=0, max_tokens=10) == second.tokens
    assert second.usage.cached_tokens >= len(first.prompt_ids) - 3      # the first prompt's cells are reused


def test_prefill_logits_equal_a_fresh_evaluation_after_any_history(model):
    ids = model.tokenize("Numbers: one two three four five six seven")
    model.reset()
    fresh = model.eval(ids)
    model.reset()
    for t in ids[:5]:
        model.eval([t])                                   # single-token cells: other bits
    model.eval(ids[5:9])
    logits, reused = model.prefill(ids)
    np.testing.assert_array_equal(logits, fresh)


def test_a_second_stream_in_the_same_thread_does_not_deadlock(pulled):
    with nibble.load(pulled("smollm2-135m"), n_ctx=128) as m:         # one slot
        a = m.stream("Hello", temperature=0, max_tokens=20)
        next(a)
        b = m.stream("World", temperature=0, max_tokens=5)
        with pytest.raises(nibble.NibbleError, match="another stream"):
            next(b)
        a.close()
        assert m.generate("World", temperature=0, max_tokens=5).text


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux's /proc tells the page size policy")
def test_kv_cache_memory_is_backed_in_small_pages(pulled):
    """A slot's first prompt writes a few KiB into each layer's part of the cache; in huge pages each of those
    writes faulted in a whole 2 MiB page (at n_ctx 4096 the first request into each slot took ~200 ms longer)."""
    with nibble.load(pulled("smollm2-135m"), n_ctx=1024, parallel=2) as m:
        for cache in (m.engine.k_cache, m.engine.v_cache):
            assert "nh" in _vm_flags(cache.__array_interface__["data"][0])
            assert cache.flags.writeable and cache.flags.c_contiguous and not cache.any()
        first = m.generate("Once upon a time", max_tokens=4, temperature=0).tokens
        m.reset()
        assert m.generate("Once upon a time", max_tokens=4, temperature=0).tokens == first


def test_lazy_zeros_is_np_zeros():
    from nibble.runtime.engine import lazy_zeros
    for shape, dtype in [((3, 5, 7), np.float16), ((0, 4), np.uint8), ((1 << 20,), np.float32)]:
        a = lazy_zeros(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and not a.any()
        a[...] = 1
        assert a.sum() == a.size
