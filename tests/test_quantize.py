"""`nibble quantize` against llama-quantize, and KL divergence against llama-perplexity.

The fixtures (tests/data/quantize/, see its README) are llama.cpp 0c1e570's own output: the type and sha256 of
every tensor that `llama-quantize --allow-requantize` writes for the three catalogue models and eight types,
and llama-perplexity's KL divergence statistics. SmolLM2 is requantized whole for every type and every tensor
compared; for Gemma and Qwen one tensor per (type, row length) is quantized, which covers every code path
(the mixes, the fallbacks, each quantizer) in seconds instead of minutes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from numba import njit

from nibble import quant
from nibble.errors import NibbleError
from nibble.formats.gguf import GGUFFile
from nibble.quant import kquants, quantize_kernels
from nibble.quant.quantize_gguf import plan, quantize_model, quantize_tensor

DATA = Path(__file__).parent / "data" / "quantize"
EXPECTED = json.loads((DATA / "expected.json").read_text())
APACHE = Path(__file__).parent / "data" / "reference" / "apache-2.0.txt"
K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
FILE_TYPES = list(EXPECTED["models"]["smollm2-135m"]["types"])


def sha256(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def quantizer_inputs(rng, rows: int) -> np.ndarray:
    """Rows of 256 values that reach every branch: Gaussian, heavy-tailed, all zero, constant, tiny, huge,
    one outlier, rows of one sign, exact ties."""
    x = rng.standard_normal((rows, 256)).astype(np.float32) * np.float32(0.02)
    x[1] = rng.laplace(size=256)
    x[2] = 0
    x[3] = 0.5
    x[4] *= np.float32(1e-12)
    x[5] *= np.float32(1e4)
    x[6, 17] = 3.0
    x[7] = np.abs(x[7])
    x[8] = -np.abs(x[8])
    x[9, ::2] = 0.25
    x[10, :32] = 0                  # one all-zero sub-block among others
    x[11] = np.where(rng.random(256) < 0.5, np.float32(0.0), np.float32(-0.0))    # signed zeros
    x[12, :128] = -0.0
    return x


# ---- the quantizers: Numba kernels against the numpy references ----

@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_kernel_is_bit_exact_with_reference(qtype):
    x = quantizer_inputs(np.random.default_rng(int(qtype)), 24)
    reference = quant.quantize(x, qtype)
    fast = quantize_kernels.quantize_k(x, qtype).reshape(reference.shape)
    assert np.array_equal(fast, reference)
    back = quant.dequantize(reference, qtype, x.shape)
    rel = np.abs(back[13:] - x[13:]).mean() / np.abs(x[13:]).mean()
    assert rel < {T.Q2_K: 0.4, T.Q3_K: 0.2, T.Q4_K: 0.1, T.Q5_K: 0.05, T.Q6_K: 0.03}[qtype]


def test_nearest_int_and_f16_rounding_match_c():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.4999998, 4194303.0, -4194303.0], np.float32)
    assert kquants.nearest_int(v).tolist() == [0, 2, 2, 0, -2, 3, 4194303, -4194303]      # half to even
    # beyond 2^22 C reads whatever bits the sum has; so do we (written out with struct, independently)
    wild = np.array([1e7, -1e7, 3e38, np.inf, np.nan], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        c_like = [(struct.unpack("<i", struct.pack("<f", np.float32(x) + np.float32(12582912.0)))[0] & 0x7FFFFF)
                  - 0x400000 for x in wild]
        assert kquants.nearest_int(wild).tolist() == c_like

        @njit
        def nearest(values, out):
            for i in range(values.size):
                out[i] = quantize_kernels.nearest_int(values[i])
        out = np.empty(wild.size, np.int64)
        nearest(wild, out)
        assert out.tolist() == c_like
    rng = np.random.default_rng(0)
    f = (rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000)).astype(np.float32)
    f = np.concatenate([f, np.array([0, -0.0, 65504, 65519, 65520, 6e-8, 2.98e-8, np.inf, -np.inf], np.float32)])

    @njit
    def halves(values, out):
        for i in range(values.size):
            out[i] = quantize_kernels.fp16_bits(values[i])
    out = np.empty(f.size, np.int64)
    with np.errstate(over="ignore"):
        halves(f, out)
        assert np.array_equal(out, f.astype(np.float16).view(np.uint16))


# ---- which type each tensor gets ----

@pytest.mark.parametrize("model", list(EXPECTED["models"]))
def test_plan_matches_llama_quantize(model, pulled):
    gguf = GGUFFile(pulled(model))
    for file_type, expected in EXPECTED["models"][model]["types"].items():
        got = {p.name: T(p.dst_type).name for p in plan(gguf, file_type)}
        assert list(got) == list(expected["tensors"]), "llama.cpp's tensor order"
        assert got == {name: t[0] for name, t in expected["tensors"].items()}, file_type


def test_mixes_on_a_synthetic_layer_count():
    """The use_more_bits / first-layers rules on 32 layers, where they pick different layers than on 30."""
    from nibble.quant.quantize_gguf import _MixState, _mix_type
    state = lambda: _MixState("llama", 32, 1.0, 0, False, False, n_attention_wv=32)
    for ftype, want in (("Q4_K_M", {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}), ("Q4_K_S", {0, 1, 2, 3}),
                        ("Q3_K_M", {0, 1})):
        s = state()
        types = [_mix_type(s, T.Q4_K if "Q4" in ftype else T.Q3_K, f"blk.{i}.attn_v.weight", 4096, ftype, "attn_v", None)
                 for i in range(32)]
        assert {i for i, t in enumerate(types) if t in (T.Q6_K, T.Q5_K)} == want, ftype
    s = state()
    down = [_mix_type(s, T.Q3_K, f"blk.{i}.ffn_down.weight", 4096, "Q3_K_M", "ffn_down", None) for i in range(32)]
    assert down[:2] == [T.Q5_K] * 2 and set(down[2:]) == {T.Q4_K}


# ---- the bytes: every tensor of SmolLM2, one tensor per (type, row length) of the others ----

@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_smollm2_every_tensor_equals_llama_quantize(file_type, pulled, tmp_path):
    expected = EXPECTED["models"]["smollm2-135m"]["types"][file_type]
    dst = tmp_path / "out.gguf"
    quantize_model(pulled("smollm2-135m"), dst, file_type, allow_requantize=True)
    out = GGUFFile(dst)
    got = {name: [t.type_name, t.shape[-1], sha256(t.data)] for name, t in out.tensors.items()}
    assert got == expected["tensors"]
    # the header too: the whole file is llama-quantize's, byte for byte
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == expected["file_sha256"]


def _one_tensor_per_kind(model: str):
    for file_type, expected in EXPECTED["models"][model]["types"].items():
        seen = set()
        for name, (type_name, ncols, digest) in expected["tensors"].items():
            if (type_name, ncols) not in seen:
                seen.add((type_name, ncols))
                yield pytest.param(model, file_type, name, type_name, digest, id=f"{model}-{file_type}-{name}")


@pytest.mark.parametrize("model,file_type,name,type_name,digest",
                         [p for m in ("gemma3-270m", "qwen2.5-coder-0.5b") for p in _one_tensor_per_kind(m)])
def test_one_tensor_per_type_and_row_length(model, file_type, name, type_name, digest, pulled):
    gguf = GGUFFile(pulled(model))
    info = gguf.tensors[name]
    target = T[type_name]
    data = info.data if target == info.qtype else quantize_tensor(info, target, quant.get_threads())
    assert sha256(data) == digest


# ---- the command, the guard, no partial output, the result runs ----

def test_requantizing_needs_the_flag(pulled, tmp_path, cli):
    dst = tmp_path / "out.gguf"
    with pytest.raises(NibbleError, match="--allow-requantize"):
        quantize_model(pulled("smollm2-135m"), dst, "Q4_0")
    r = cli("quantize", str(pulled("smollm2-135m")), str(dst), "Q4_0")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "error:" in r.stderr and "--allow-requantize" in r.stderr
    r = cli("quantize", str(pulled("smollm2-135m")), str(dst), "Q4_Z", "--allow-requantize")
    assert r.returncode == 1 and "unknown quantization type 'Q4_Z'" in r.stderr
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_an_interrupted_run_leaves_nothing(pulled, tmp_path):
    dst = tmp_path / "out.gguf"

    def interrupt(i, n, p):
        if i == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        quantize_model(pulled("smollm2-135m"), dst, "Q8_0", allow_requantize=True, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_cli_quantizes_and_the_models_generate(pulled, tmp_path, cli):
    import nibble
    for file_type in ("Q4_0", "Q4_K_M"):
        dst = tmp_path / f"smollm2-{file_type}.gguf"
        r = cli("quantize", str(pulled("smollm2-135m")), str(dst), file_type.lower(), "--allow-requantize", "--json")
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["type"] == file_type and summary["bytes_out"] == dst.stat().st_size
        assert "requantizing" in r.stderr                          # the warning
        out = GGUFFile(dst)
        assert out.get("general.file_type") == {"Q4_0": 2, "Q4_K_M": 15}[file_type]
        assert out.get("general.quantization_version") == 2
        with nibble.load(dst) as m:
            done = m.generate("The capital of France is", max_tokens=8, temperature=0)
        assert done.usage.completion_tokens == 8 and done.text.strip()


def test_pure_and_tensor_type_overrides(pulled):
    gguf = GGUFFile(pulled("qwen2.5-coder-0.5b"))
    types = {p.name: T(p.dst_type) for p in plan(gguf, "Q4_K_M", pure=True)}
    assert types["blk.0.ffn_down.weight"] == T.Q4_K and types["blk.0.attn_v.weight"] == T.Q5_0   # no mix, fallback
    types = {p.name: T(p.dst_type) for p in plan(gguf, "Q4_K_M", output_tensor_type=T.F16,
                                                 token_embedding_type=T.Q8_0)}
    assert types["output.weight"] == T.F16 and types["token_embd.weight"] == T.Q8_0
    assert types["blk.0.attn_norm.weight"] == T.F32                   # norms are never quantized


# ---- KL divergence against llama-perplexity ----

def test_kl_divergence_matches_llama_perplexity(pulled, tmp_path, cli):
    """SmolLM2 requantized to Q4_0 against the original, ctx 256 on the Apache-2.0 text: nibble's mean KLD
    and same-top-p within 2% of llama-perplexity's on the same files (Qwen's figures are in the README of
    tests/data/quantize; its run is too slow for every test run)."""
    ref = json.loads((DATA / "kld.json").read_text())["smollm2-135m"]
    other = tmp_path / "q4_0.gguf"
    quantize_model(pulled("smollm2-135m"), other, "Q4_0", allow_requantize=True)
    base = tmp_path / "base.kld"
    r = cli("perplexity", str(pulled("smollm2-135m")), str(APACHE), "-c", "256", "--kl-divergence-base", str(base))
    assert r.returncode == 0, r.stderr
    r = cli("perplexity", str(other), "--kl-divergence-base", str(base), "--kl-divergence", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["count"] == ref["count"]
    assert got["kld"] == pytest.approx(ref["kld"], rel=0.02)
    assert got["same_top_p"] == pytest.approx(ref["same_top_p"], rel=0.02)
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=0.01) and got["ppl_base"] == pytest.approx(ref["ppl_base"], rel=0.01)
    r = cli("perplexity", str(other), "--kl-divergence-base", str(base), "--kl-divergence")
    assert "Mean    KLD:" in r.stdout and "Same top p:" in r.stdout and "99.0%   KLD:" in r.stdout


def test_library_kl_divergence_equals_the_two_run_method(pulled, tmp_path):
    import nibble
    from nibble.runtime import kld
    other = tmp_path / "q8.gguf"
    quantize_model(pulled("smollm2-135m"), other, "Q8_0", allow_requantize=True)
    text = APACHE.read_text()[:3000]
    with nibble.load(pulled("smollm2-135m"), n_ctx=128) as base, nibble.load(other, n_ctx=128) as m:
        direct = base.kl_divergence(m, text, n_ctx=128)
        kld.save_base(base, text, tmp_path / "base.kld", n_ctx=128)
        from_file = kld.kl_divergence_from_file(m, tmp_path / "base.kld")
    assert direct == from_file
    assert 0 < direct.kld < 0.05 and direct.same_top_p > 0.9          # Q8_0 is close to the Q4_1 original


def test_zero_blocks_keep_cs_signs():
    """An all-zero block: C's Q4_0 starts from max = +0.0 and writes d = 0.0 / -8 = -0.0 whatever the zeros'
    signs; Q5_1 keeps the first element reaching the minimum (its sign is the f16 m's). Qwen's blk.3.ffn_down
    holds such a block."""
    z = np.zeros((1, 32), np.float32)
    neg_first = z.copy()
    neg_first[0, 0] = -0.0
    for x in (z, neg_first):
        assert quant.quantize(x, T.Q4_0)[0, :2].tolist() == [0x00, 0x80]
    assert quant.quantize(z, T.Q5_1)[0, :4].tolist() == [0, 0, 0, 0]
    pos_then_neg = z.copy()
    pos_then_neg[0, 1:] = -0.0
    assert quant.quantize(pos_then_neg, T.Q5_1)[0, :4].tolist() == [0, 0, 0, 0]
    assert quant.quantize(neg_first, T.Q5_1)[0, :4].tolist() == [0, 0, 0, 0x80]
