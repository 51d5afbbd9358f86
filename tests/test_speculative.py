"""Speculative decoding gives exactly the tokens of plain decoding (greedy and seeded), leaves the KV cache as
plain decoding leaves it, and refuses a draft model whose vocabulary differs."""

from __future__ import annotations

import numpy as np
import pytest

import nibble
from nibble.runtime.sampling import Sampler, SamplingParams
from nibble.runtime.speculative import DraftLength, NgramDrafter

MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
QUOTE = ("Licensed under the Apache License, Version 2.0 (the \"License\"); you may not use this file except in "
         "compliance with the License. You may obtain a copy of the License at")


def requantized(src, dst, qtype="Q4_0"):
    """`src` with every Q4_1/Q4_K/Q5_0 matrix dequantized and quantized to `qtype` (a different model for
    drafting: same vocabulary, other weights)."""
    import gguf
    from gguf import GGUFReader
    from nibble.quant import dequantize, quantize

    reader = GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), arch=reader.get_field("general.architecture").contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    target = gguf.GGMLQuantizationType[qtype]
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))       # numpy order
        if t.tensor_type in (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q5_0) and len(shape) == 2:
            values = dequantize(np.asarray(t.data), t.tensor_type, shape)
            writer.add_tensor(t.name, quantize(values, target), raw_dtype=target)     # (rows, row bytes)
        elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(t.name, np.asarray(t.data).reshape(shape))
        else:
            writer.add_tensor(t.name, np.asarray(t.data).reshape(shape[0] if len(shape) > 1 else 1, -1),
                              raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module", params=MODELS)
def model(request, pulled):
    m = nibble.load(pulled(request.param), n_ctx=1024)
    yield m
    m.close()


def test_ngram_speculation_gives_plain_greedy_tokens(model, ref):
    name = {"llama": "smollm2-135m", "gemma3": "gemma3-270m", "qwen2": "qwen2.5-coder-0.5b"}[model.architecture]
    for p in ref(name, "prompts.json"):
        plain = model.generate(p["ids"], temperature=0, max_tokens=32)
        spec = model.generate(p["ids"], temperature=0, max_tokens=32, speculative="ngram")
        assert spec.tokens == plain.tokens
    # a text that quotes its prompt: proposals are made and most are accepted
    messages = [{"role": "user", "content": "Repeat exactly: " + QUOTE}]
    plain = model.chat(messages, temperature=0, max_tokens=40)
    spec = model.chat(messages, temperature=0, max_tokens=40, speculative="ngram")
    assert spec.tokens == plain.tokens
    assert spec.timings.draft_tokens > 0 and spec.timings.accepted_tokens > 0


def test_seeded_sampling_with_speculation_reproduces_plain_sampling(model):
    messages = [{"role": "user", "content": "Repeat exactly: " + QUOTE}]
    for seed in (1, 2, 3):
        plain = model.chat(messages, temperature=0.7, seed=seed, max_tokens=30)
        spec = model.chat(messages, temperature=0.7, seed=seed, max_tokens=30, speculative="ngram", draft_max=8)
        assert spec.tokens == plain.tokens


def test_speculation_across_a_session(model):
    plain, spec = model.session(temperature=0, max_tokens=16), model.session(temperature=0, max_tokens=16)
    for message in ("Repeat exactly: " + QUOTE, "Once more, please."):
        a = plain.send(message).completion()
        b = spec.send(message, speculative="ngram").completion()
        assert b.tokens == a.tokens


def test_draft_model_with_rejections_gives_plain_tokens_and_the_plain_kv_cache(pulled, tmp_path):
    target = nibble.load(pulled("smollm2-135m"), n_ctx=512)
    draft = nibble.load(requantized(pulled("smollm2-135m"), tmp_path / "draft-q4_0.gguf"), n_ctx=512)
    try:
        messages = [{"role": "user", "content": "Write two sentences about lighthouses."}]
        target.reset()
        plain = target.chat(messages, temperature=0, max_tokens=40)
        plain_state = target.kv_state()
        target.reset()
        spec = target.chat(messages, temperature=0, max_tokens=40, speculative=draft, draft_max=6)
        assert spec.tokens == plain.tokens
        t = spec.timings
        assert 0 < t.accepted_tokens < t.draft_tokens              # the draft differs: some are rejected
        state = target.kv_state()
        for key in ("tokens", "kinds", "k", "v"):
            np.testing.assert_array_equal(state[key], plain_state[key])
        # seeded sampling too
        plain = target.chat(messages, temperature=0.9, seed=5, max_tokens=30)
        spec = target.chat(messages, temperature=0.9, seed=5, max_tokens=30, speculative=draft)
        assert spec.tokens == plain.tokens
    finally:
        draft.close()
        target.close()


def test_a_draft_with_another_vocabulary_is_refused(pulled):
    qwen = nibble.load(pulled("qwen2.5-coder-0.5b"), n_ctx=256)
    smol = nibble.load(pulled("smollm2-135m"), n_ctx=256)
    try:
        with pytest.raises(nibble.NibbleError, match="BOS token is 1 but the target.s is 151643"):
            qwen.generate("Hello", max_tokens=4, speculative=smol)
    finally:
        smol.close()
        qwen.close()


def test_ngram_drafter_proposes_what_followed_the_last_occurrence():
    d = NgramDrafter()
    assert d.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2, 3], 3, 0) == [7, 1, 2]
    assert d.propose([5, 6, 7, 8], 4, 0) == []
    assert d.propose([4, 1, 4], 2, 0) == []                          # a lone token is not enough by default
    assert NgramDrafter(n_min=1).propose([4, 1, 4], 2, 0) == [1, 4]


def test_draft_length_adapts():
    length = DraftLength(16, start=4, pause=3)
    length.update(4, 4)
    assert length.next() == 8
    length.update(8, 2)
    assert length.next() == 3
    length.update(3, 0)
    length.update(1, 0)                                             # two misses: pause, then one token
    assert [length.next() for _ in range(4)] == [0, 0, 0, 1]


def test_the_verification_rule_keeps_the_target_distribution():
    """Accept the proposal while the draw equals it, else keep the draw: with a one-hot drafter this is
    min(1, p/q) acceptance with residual resampling, so the emitted token follows p exactly (chi-square over
    a tiny vocabulary, for a draft that is often wrong)."""
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32))
    p = np.exp(logits.astype(np.float64))
    p /= p.sum()
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    n = 4000
    counts = np.zeros(5)
    accepted = 0
    for i in range(n):
        sampler = Sampler(params.with_(seed=i), 5)
        proposal = 3                                                # a poor guess
        draw = sampler.sample(logits)
        accepted += draw == proposal
        counts[draw] += 1
    expected = p * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47          # the chi-square critical value for 4 degrees of freedom at p = 0.001
    assert abs(accepted / n - p[3]) < 0.03                          # acceptance = p(proposal)
