"""The forward pass: every architecture through one runner on tiny synthetic models, then the three real
models' perplexity against llama.cpp's (their logits and greedy tokens are held to llama.cpp's bit for bit in
test_exact.py)."""

from __future__ import annotations

import numpy as np
import pytest

import nibble
from nibble.models import ARCHITECTURES


def nmse(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(((ours - ref) ** 2).sum() / (ref ** 2).sum())


# ---- one runner for every architecture: adding an architecture adds a line to TINY in conftest.py ----

@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_runner(arch, tiny_gguf):
    model = nibble.load(tiny_gguf(arch), n_ctx=64)
    tokens = np.random.default_rng(1).integers(0, model.n_vocab, 12).tolist()
    batched = model.logits(tokens)                                    # one prefill
    assert batched.shape == (12, model.n_vocab) and np.isfinite(batched).all()

    # the fast path equals the readable reference forward (up to 8-bit activation rounding)
    reference = model.arch.forward_reference(model.args, model.engine.weights, tokens)
    assert nmse(batched, reference) < 2e-3

    # decoding token by token gives the logits of the batched prefill
    model.reset()
    for t, tok in enumerate(tokens):
        assert nmse(model.eval([tok]), batched[t]) < 1e-3, f"position {t}"  # 8-bit activations in matvec
    assert model.n_past() == 12 and model.cached_tokens() == tokens

    # a prefill split into chunks gives the same logits as one
    model.engine.max_batch = 5
    model.reset()
    assert nmse(model.eval(tokens), batched[-1]) < 1e-3


def test_sliding_window_matters(tiny_gguf):
    """Gemma 3's local layers see only the last `sliding_window` positions: a token far outside the window
    changes the logits only through the global layer."""
    path = tiny_gguf("gemma3")
    model = nibble.load(path, n_ctx=64)
    args = model.args
    assert args.sliding_window == 5 and [args.is_global(i) for i in range(6)] == [False] * 5 + [True]
    toks = np.random.default_rng(2).integers(0, model.n_vocab, 10).tolist()
    ref = model.arch.forward_reference(model.args, model.engine.weights, toks)
    assert nmse(model.logits(toks), ref) < 2e-3


# ---- errors ----

def test_context_overflow(tiny_gguf):
    model = nibble.load(tiny_gguf("llama"), n_ctx=16)
    with pytest.raises(nibble.ContextOverflowError) as info:
        model.eval(list(range(17)))
    assert (info.value.n_tokens, info.value.n_ctx) == (17, 16)
    assert model.n_past() == 0                     # nothing was evaluated
    model.eval(list(range(10)))
    with pytest.raises(nibble.ContextOverflowError) as info:
        model.eval(list(range(7)))
    assert (info.value.n_tokens, info.value.n_ctx) == (17, 16) and model.n_past() == 10


def test_n_ctx_above_the_model_is_refused(tiny_gguf):
    with pytest.raises(nibble.ContextOverflowError, match="context length 256"):
        nibble.load(tiny_gguf("llama"), n_ctx=512)


def test_out_of_memory_says_what_fits(tiny_gguf, monkeypatch, pulled):
    path = pulled("smollm2-135m")
    monkeypatch.setenv("NIBBLE_MAX_MEMORY", str(200 * 2**20))
    with pytest.raises(nibble.OutOfMemoryError) as info:
        nibble.load(path, n_ctx=4096)
    e = info.value
    assert e.required > e.available == 200 * 2**20 and "n_ctx=" in str(e)
    fits = int(str(e).split("n_ctx=")[-1].split()[0])
    assert 0 < fits < 4096
    assert nibble.load(path, n_ctx=fits).n_ctx == fits              # and that n_ctx does fit


def test_vocab_only_cannot_evaluate(tiny_gguf):
    model = nibble.load(tiny_gguf("llama"), vocab_only=True)
    with pytest.raises(nibble.NibbleError, match="vocab_only"):
        model.logits([1, 2, 3])


def test_unknown_architecture(tiny_gguf, tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba9")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(nibble.UnsupportedModelError, match="gemma3, llama, qwen2"):
        nibble.load(tmp_path / "x.gguf")


def test_unsupported_quant_type_names_type_and_tensor(tiny_gguf):
    path = tiny_gguf("llama", qtype="IQ4_NL")
    info = nibble.load(path, vocab_only=True).info()
    assert "IQ4_NL" in info["quant_types"]                          # the reader accepts it, show lists it
    with pytest.raises(nibble.UnsupportedQuantError, match=r"'blk\.0\.attn_q\.weight' is stored as IQ4_NL"):
        nibble.load(path)


def test_inconsistent_shapes_are_a_format_error(tiny_gguf):
    with pytest.raises(nibble.ModelFormatError, match="blk.0.attn_q.weight"):
        nibble.load(tiny_gguf("llama", head_dim=8))                   # wq written (32, 64), expected (64, 64)


# ---- the real models' perplexity against llama.cpp ----

@pytest.fixture(scope="module")
def real_model(request):
    cache = {}

    def get(name):
        if name not in cache:
            cache.clear()
            cache[name] = nibble.load(name, n_ctx=1024)
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_perplexity_matches_llama_cpp(name, real_model, ref, reference_root, pulled):
    pulled(name)
    expected = ref(name, "perplexity_apache-2_0_txt.json")
    text = (reference_root / expected["text"]).read_text()
    from nibble.runtime.perplexity import perplexity
    result = perplexity(real_model(name), text, n_ctx=expected["ctx"])
    assert result.n_chunks == expected["chunks"]
    assert abs(result.ppl - expected["ppl"]) / expected["ppl"] < 0.01, (result.ppl, expected["ppl"])


def test_perplexity_cli(cli, pulled, reference_root, tmp_path):
    pulled("smollm2-135m")
    text = reference_root / "apache-2.0.txt"
    r = cli("perplexity", "smollm2-135m", str(text), "--n-ctx", "256")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("PPL = ") and " +/- " in last
    assert abs(float(last.split()[2]) - 17.7561) / 17.7561 < 0.01
    short = tmp_path / "short.txt"
    short.write_text("Too short to score.")
    r = cli("perplexity", "smollm2-135m", str(short), "--n-ctx", "256", "--json")
    assert r.returncode == 1 and "two chunks" in r.stderr


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_q8_0_kv_cache_perplexity_matches_llama_cpp(name, ref, reference_root, pulled):
    """A q8_0 KV cache (llama.cpp's -ctk q8_0 -ctv q8_0) takes 34/64 of the f16 cache's bytes, and its
    perplexity is within 1% of llama-perplexity's with the same cache types."""
    expected = ref(name, "perplexity_apache-2_0_txt_kv_q8_0.json")
    text = (reference_root / expected["text"]).read_text()
    from nibble.runtime.perplexity import perplexity
    with nibble.load(pulled(name), n_ctx=expected["ctx"], cache_type_k="q8_0", cache_type_v="q8_0") as m:
        assert m.cache_types == ("q8_0", "q8_0") and m.engine.k_cache.dtype == np.uint8
        f16 = m.info()["kv_bytes_per_token"] / (34 / 64)
        assert f16 == nibble.load(pulled(name), vocab_only=True).kv_bytes_per_token
        result = perplexity(m, text, n_ctx=expected["ctx"])
    assert result.n_chunks == expected["chunks"]
    assert abs(result.ppl - expected["ppl"]) / expected["ppl"] < 0.01, (result.ppl, expected["ppl"])


def test_cache_types_are_checked_and_sessions_need_f16(pulled, tmp_path, cli, tiny_gguf):
    with pytest.raises(nibble.ConfigError, match="q8_0"):
        nibble.load(pulled("smollm2-135m"), n_ctx=64, cache_type_k="q4_0")
    with pytest.raises(nibble.ConfigError, match="multiple of 32"):     # the tiny llama's heads are 16 wide
        nibble.load(tiny_gguf("llama"), n_ctx=32, cache_type_v="q8_0")
    # Gemma 3's sliding-window layers read a q8_0 cache too: close to the f16 cache's logits, not equal
    ids = list(range(3, 23))
    with nibble.load(tiny_gguf("gemma3"), n_ctx=32) as f16, \
            nibble.load(tiny_gguf("gemma3"), n_ctx=32, cache_type_k="q8_0", cache_type_v="q8_0") as q8:
        a, b = f16.logits(ids), q8.logits(ids)
    assert not np.array_equal(a, b) and ((a - b) ** 2).sum() / (a ** 2).sum() < 1e-3
    with nibble.load(pulled("smollm2-135m"), n_ctx=64, cache_type_k="q8_0") as m:
        assert m.cache_types == ("q8_0", "f16") and m.engine.v_cache.dtype == np.float16
        assert m.generate("Hello", max_tokens=4, temperature=0).usage.completion_tokens == 4
        with pytest.raises(nibble.ConfigError, match="f16"):
            m.kv_state()
    r = cli("run", "smollm2-135m", "Hello", "-n", "4", "--temperature", "0", "-ctk", "q8_0", "-ctv", "q8_0")
    assert r.returncode == 0 and r.stdout, r.stderr
    r = cli("show", "smollm2-135m")
    assert "with --cache-type-k/-v q8_0" in r.stdout
