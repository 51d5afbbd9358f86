"""Generation on the real SmolLM2 model: greedy equals llama.cpp, seeds, streaming, stop strings and
end-of-generation tokens, cancellation, context limits, prompt caching and sessions; plus the stop-string
matcher on its own."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nibble
from nibble.errors import ContextOverflowError, NibbleError
from nibble.runtime import generate
from nibble.runtime.generate import StopMatcher
from nibble.runtime.session import Session

CAPITAL = "The capital of France is"
STORY = "Once upon a time, in a small village by the sea,"


# ---- StopMatcher ----

def run_matcher(pieces, stops):
    m = StopMatcher(stops)
    emitted = []
    for p in pieces:
        out, hit = m.push(p)
        emitted.append(out)
        if hit:
            return "".join(emitted), True, emitted
    emitted.append(m.flush())
    return "".join(emitted), False, emitted


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet="ab\nc", max_size=30), cuts=st.lists(st.integers(0, 30), max_size=8),
       stops=st.lists(st.text(alphabet="ab\nc", min_size=1, max_size=4), max_size=3))
def test_stop_matcher_cuts_at_the_first_stop_string_however_the_text_is_split(text, cuts, stops):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    # generation stops at the piece that completes a stop string; the cut is the earliest one seen by then
    expected, firsts = text, []
    for b in bounds[1:]:
        firsts = [i for i in (text[:b].find(s) for s in stops) if i >= 0]
        if firsts:
            expected = text[: min(firsts)]
            break
    out, hit, emitted = run_matcher(pieces, stops)
    assert out == expected
    assert hit == bool(firsts)
    # no prefix of what was emitted ever ends inside a stop string occurrence
    shown = ""
    for e in emitted:
        shown += e
        assert text.startswith(shown) and len(shown) <= len(expected)


def test_stop_matcher_holds_back_only_a_possible_start():
    m = StopMatcher(["</end>"])
    assert m.push("hello <") == ("hello ", False)
    assert m.push("/e") == ("", False)
    assert m.push("x") == ("</ex", False)       # not the stop string after all: released at once
    assert m.push(" </en") == (" ", False)
    assert m.push("d> tail") == ("", True)
    assert StopMatcher([]).push("abc") == ("abc", False)


# ---- the real model ----

@pytest.fixture(scope="module")
def smol(pulled):
    return nibble.load(pulled("smollm2-135m"), n_ctx=512)


@pytest.fixture(scope="module")
def capital(ref):
    return next(p for p in ref("smollm2-135m", "prompts.json") if p["prompt"] == CAPITAL)


def test_greedy_matches_llama_cpp(smol, capital):
    c = generate.generate(smol, CAPITAL, max_tokens=16, temperature=0)
    assert smol.tokenize(CAPITAL) == capital["ids"]
    assert c.tokens == capital["greedy_ids"][:16]
    assert c.text == smol.detokenize(capital["greedy_ids"][:16])
    assert capital["greedy_text"].startswith(c.text)
    assert c.finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(capital["ids"]), 16)
    assert c.timings.ttft_ms > 0 and c.timings.tpot_ms > 0 and c.timings.tokens_per_second > 0


def test_streamed_pieces_are_the_completion_and_the_detokenized_tokens(smol):
    pieces = list(s := generate.stream(smol, STORY, max_tokens=40, seed=5))
    c = generate.generate(smol, STORY, max_tokens=40, seed=5)
    assert "".join(pieces) == c.text == s.text == smol.detokenize(c.tokens)
    assert s.tokens == c.tokens and len(c.tokens) == 40
    assert all(pieces) and all("\ufffd" not in p for p in pieces)


def test_same_seed_same_text_other_seed_other_text(smol):
    a = generate.generate(smol, STORY, max_tokens=32, seed=1234, temperature=0.8)
    b = generate.generate(smol, STORY, max_tokens=32, seed=1234, temperature=0.8)
    c = generate.generate(smol, STORY, max_tokens=32, seed=4321, temperature=0.8)
    assert len(a.tokens) == 32
    assert a.text == b.text
    assert a.text != c.text


def test_repeat_penalty_changes_a_repetitive_greedy_continuation(smol, capital):
    plain = generate.generate(smol, CAPITAL, max_tokens=40, temperature=0)
    penalised = generate.generate(smol, CAPITAL, max_tokens=40, temperature=0, repeat_penalty=1.5)
    assert len(set(plain.tokens)) < len(plain.tokens)          # greedy repeats itself here
    assert penalised.tokens != plain.tokens


def test_stop_string_split_across_tokens_is_not_emitted(smol, capital):
    full = smol.detokenize(capital["greedy_ids"][:16])          # " Paris.\n\nThe United States ..."
    stop = "s.\n\nTh"                                            # spans " Paris", ".", "\n", "\n", "The"
    pieces = list(s := generate.stream(smol, CAPITAL, max_tokens=16, temperature=0, stop=[stop]))
    assert s.finish_reason == "stop"
    assert "".join(pieces) == s.text == full[: full.index(stop)] == " Pari"
    assert all(stop[:2] not in p for p in pieces)


def test_end_of_generation_token_stops_and_is_not_shown(smol):
    eog = sorted(smol.tokenizer.eog_ids)
    assert eog, "SmolLM2 marks end-of-generation tokens"
    # make an end-of-generation token overwhelmingly likely after a few tokens: bias it in a second call
    c = generate.generate(smol, CAPITAL, max_tokens=16, temperature=0, logit_bias={eog[0]: 100.0})
    assert (c.text, c.tokens, c.finish_reason) == ("", [], "stop")
    assert c.usage.completion_tokens == 0 and c.timings.ttft_ms is not None


def test_chat_ends_at_the_end_of_turn_token(smol):
    c = generate.chat(smol, [{"role": "user", "content": "What is 2+2?"}], temperature=0, max_tokens=100)
    assert c.finish_reason == "stop", c.text
    assert "4" in c.text and "<|im_end|>" not in c.text and len(c.tokens) < 100


def test_cancel_ends_with_cancelled_and_the_cache_holds_what_was_shown(smol):
    cancel = threading.Event()
    s = generate.stream(smol, STORY, max_tokens=100, seed=3, cancel=cancel)
    shown = []
    for piece in s:
        shown.append(piece)
        if len(s.tokens) >= 5:
            cancel.set()
    assert s.finish_reason == "cancelled"
    assert 5 <= len(s.tokens) <= 8 and "".join(shown) == s.text
    assert smol.cached_tokens() == s.prompt_ids + s.tokens


def test_breaking_out_of_the_loop_is_cancelled(smol):
    s = generate.stream(smol, STORY, max_tokens=100, seed=3)
    for i, _ in enumerate(s):
        if i == 2:
            break
    s.close()
    assert s.finish_reason == "cancelled" and s.timings is not None


def test_full_context_stops_with_length_never_overflows(pulled):
    small = nibble.load(pulled("smollm2-135m"), n_ctx=16)
    c = generate.generate(small, CAPITAL, temperature=0)
    assert c.finish_reason == "length"
    assert c.usage.total_tokens == 16 and small.n_past() == 16
    with pytest.raises(ContextOverflowError) as e:
        generate.stream(small, "word " * 40)
    assert e.value.n_ctx == 16 and e.value.n_tokens > 16
    assert small.n_past() == 16              # the cache was not touched


def scratch_logits(model, ids):
    """The logits after `ids` evaluated in one call from an empty cache."""
    model.reset()
    return model.eval(ids)


def test_prefill_reuses_the_cached_prefix_and_gives_the_logits_of_a_fresh_evaluation(smol):
    first = smol.tokenize(STORY)
    longer = first + smol.tokenize(" there lived an old fisherman")
    other = first + smol.tokenize(" a dragon slept")
    smol.reset()
    smol.prefill(first)
    logits, reused = smol.prefill(longer)
    assert reused == len(first) and smol.cached_tokens() == longer
    np.testing.assert_array_equal(logits, scratch_logits(smol, longer))
    # a prompt that diverges inside the cache rolls back to the common prefix
    smol.prefill(longer)
    logits, reused = smol.prefill(other)
    assert reused == len(first) and smol.cached_tokens() == other
    np.testing.assert_array_equal(logits, scratch_logits(smol, other))
    # the whole prompt cached: the last token is evaluated again for its logits
    smol.prefill(other)
    logits, reused = smol.prefill(other)
    assert reused == len(other) - 1 and smol.cached_tokens() == other
    np.testing.assert_array_equal(logits, scratch_logits(smol, other))
    # cells evaluated as single-token steps hold other bits than a prompt's: they are not reused
    smol.reset()
    for t in first:
        smol.eval([t])
    logits, reused = smol.prefill(longer)
    assert reused == 0
    np.testing.assert_array_equal(logits, scratch_logits(smol, longer))
    # without reuse the cache is emptied first
    smol.prefill(other)
    logits, reused = smol.prefill(other, reuse=False)
    assert reused == 0 and smol.cached_tokens() == other
    np.testing.assert_array_equal(logits, scratch_logits(smol, other))


def test_plain_generation_does_not_depend_on_the_cache(smol):
    a = generate.generate(smol, STORY, max_tokens=12, seed=8)
    generate.generate(smol, STORY + " there lived", max_tokens=3, seed=1)
    b = generate.generate(smol, STORY, max_tokens=12, seed=8)
    assert (a.tokens, a.usage.cached_tokens) == (b.tokens, 0)


# ---- sessions ----

LONG_SYSTEM = ("You are a helpful assistant for a small museum of maritime history. " * 12).strip()


def test_session_reuses_the_cache_so_the_second_turn_evaluates_only_its_new_tokens(smol, monkeypatch):
    """What the cache saves in time to first token, counted as the tokens evaluated before it (prefill), not
    timed: a time would depend on the machine's load (`nibble bench` and `nibble chat` report TTFT)."""
    evaluated = []                                   # rows of each engine step, prefill or decode
    forward_rows = smol.engine.forward_rows

    def counting_forward(work):
        evaluated.append(sum(len(ids) for _, ids, _, _ in work))
        return forward_rows(work)
    monkeypatch.setattr(smol.engine, "forward_rows", counting_forward)
    session = Session(smol, LONG_SYSTEM, temperature=0, max_tokens=12)
    smol.reset()
    one = session.send("Who built the lighthouse?")
    one.completion()
    prefill_one, evaluated[:] = evaluated[0], []
    two = session.send("And when?")
    two.completion()
    prefill_two = evaluated[0]
    assert one.usage.cached_tokens == 0 and prefill_one == one.usage.prompt_tokens
    assert two.usage.cached_tokens >= one.usage.prompt_tokens
    assert prefill_two == two.usage.prompt_tokens - two.usage.cached_tokens < prefill_one / 2
    assert len(session.messages) == 4 and session.messages[1]["content"] == one.text


def test_session_logits_after_reuse_and_after_save_load_equal_scratch(smol, tmp_path):
    session = Session(smol, "You are terse.", temperature=0, max_tokens=8)
    smol.reset()
    turn = session.send("Name a colour.")
    turn.completion()
    next_ids = generate.chat_prompt(smol, session.conversation("Another one."))
    path = session.save(tmp_path / "chat.session")
    assert path.exists() and not (tmp_path / "chat.session.npz").exists()
    saved_tokens = smol.cached_tokens()

    reused_logits, reused = smol.prefill(next_ids)
    first = turn.prompt_ids
    # the first prompt's cells are reused; the reply's, evaluated one token at a time, hold other bits
    assert reused == len(first) and next_ids[:len(first)] == first

    smol.reset()
    loaded = Session.load(smol, path, temperature=0, max_tokens=8)
    assert loaded.messages == session.messages and loaded.system == "You are terse."
    assert smol.cached_tokens() == saved_tokens
    loaded_logits, reused_after_load = smol.prefill(next_ids)
    assert reused_after_load == reused

    scratch = scratch_logits(smol, next_ids)
    np.testing.assert_array_equal(reused_logits, scratch)
    np.testing.assert_array_equal(loaded_logits, scratch)
    # and the conversation carries on from the loaded cache
    smol.reset()
    loaded = Session.load(smol, path, temperature=0, max_tokens=8)
    reply = loaded.send("Another one.")
    assert reply.completion().text and reply.usage.cached_tokens == reused


def test_session_file_is_checked_against_the_model(smol, pulled, tmp_path):
    session = Session(smol, None, temperature=0, max_tokens=4)
    session.send("Hi").completion()
    path = session.save(tmp_path / "s.npz")
    with pytest.raises(NibbleError, match="another model"):
        Session.load(SimpleNamespace(path=pulled("gemma3-270m")), path)
    (tmp_path / "junk.npz").write_bytes(b"not a session")
    with pytest.raises(NibbleError, match="not a nibble session"):
        Session.load(smol, tmp_path / "junk.npz")
    np.savez(tmp_path / "pickled.npz", meta=np.array([{"x": 1}], dtype=object))
    with pytest.raises(NibbleError, match="not a nibble session"):
        Session.load(smol, tmp_path / "pickled.npz")


def test_cancelled_session_turn_keeps_what_was_shown(smol):
    session = Session(smol, None, seed=9, max_tokens=200)
    smol.reset()
    cancel = threading.Event()
    s = session.send("Tell me a long story about a dragon.", cancel=cancel)
    for _ in s:
        if len(s.tokens) >= 4:
            cancel.set()
    assert s.finish_reason == "cancelled"
    assert session.messages[-1] == {"role": "assistant", "content": s.text}
    assert smol.cached_tokens() == s.prompt_ids + s.tokens
    # cancelled before anything was shown: the turn is dropped
    cancel = threading.Event()
    cancel.set()
    empty = session.send("Another?", cancel=cancel)
    assert empty.completion().text == "" and empty.finish_reason == "cancelled"
    assert len(session.messages) == 2
