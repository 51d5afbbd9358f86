"""Block formats and kernels: the numpy references against gguf-py bit for bit (random blocks and every tensor
of the three real models), the Numba kernels against the references, quantizers against gguf-py."""

from __future__ import annotations

import numba
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

from nibble import quant
from nibble.errors import UnsupportedQuantError
from nibble.formats.gguf import GGUFFile
from nibble.quant import ggml_exact, kernels
from nibble.quant.blocks import FORMATS

ALL_TYPES = sorted(quant.SUPPORTED_TYPES)
FLOAT_TYPES = {T.F32, T.F16, T.BF16}
# byte offsets of the f16 fields in each block (random bytes there could be NaN or inf)
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q2_K: [80, 82],
              T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
NMSE_LIMIT = 5e-4


def random_blocks(qtype: T, n_blocks: int, rng) -> np.ndarray:
    """(n_blocks, type_size) uint8: random quants, random small finite scales."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    if qtype == T.F32:
        return rng.standard_normal((n_blocks, 1), dtype=np.float32).view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal((n_blocks, 1)).astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        bits = rng.standard_normal((n_blocks, 1), dtype=np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scales = rng.standard_normal((n_blocks, 1)) * 0.02
        scales[::7] = 0                          # all-zero scales happen in real files
        scales[1::11] = 6e-6                     # subnormal halves
        blocks[:, offset:offset + 2] = scales.astype(np.float16).view(np.uint8)
    return blocks


def weights(qtype: T, m: int, k: int, rng) -> np.ndarray:
    """An (m, k) tensor's bytes: Gaussian rows quantized where nibble can quantize, else random blocks."""
    fmt = FORMATS[qtype]
    if fmt.can_quantize():
        return quant.quantize(rng.standard_normal((m, k), dtype=np.float32) * 0.05, qtype)
    return random_blocks(qtype, m * k // fmt.block_size, rng).reshape(m, -1)


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def nmse(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(((ours.astype(np.float64) - ref) ** 2).sum() / (ref ** 2).sum())


def gguf_dequantize(blocks: np.ndarray, qtype: T) -> np.ndarray:
    return np.asarray(gguf_quants.dequantize(np.ascontiguousarray(blocks), qtype), dtype=np.float32)


# ---- reference dequantizers ----

@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_reference_dequantizers_are_bit_exact_with_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    fmt = FORMATS[qtype]
    blocks = random_blocks(qtype, 4096 if fmt.block_size > 1 else 1 << 14, rng)
    ours = fmt.dequantize_blocks(blocks)
    assert ours.dtype == np.float32 and ours.shape == (blocks.shape[0], fmt.block_size)
    theirs = gguf_dequantize(blocks.reshape(-1) if qtype in (T.F32, T.F16) else blocks, qtype)
    assert bits_equal(ours.reshape(-1), theirs.reshape(-1))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_kernel_dequantize_is_bit_exact_with_reference(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    k = 512 if qtype not in FLOAT_TYPES else 515           # float rows of any length: vector body + tail
    data = weights(qtype, 37, k, rng)
    ref = quant.dequantize_reference(data, qtype, (37, k))
    assert bits_equal(quant.dequantize(data, qtype, (37, k)), ref)
    ids = np.array([36, 0, 5, 5, 17], dtype=np.int64)
    out = np.empty((ids.size, k), np.float32)
    kernels.get_rows(out, ids, quant._prepare(data, qtype, (37, k))[0], int(qtype), k)
    assert bits_equal(out, ref[ids])


def tensor_rows(info, max_rows: int = 24) -> tuple[np.ndarray, tuple[int, ...]]:
    """A tensor's bytes and shape, cut to its first and last rows if it is big."""
    block_size, type_size = GGML_QUANT_SIZES[T(info.qtype)]
    k = info.shape[-1]
    rows = info.n_elements // k
    data = info.data.reshape(rows, k // block_size * type_size)
    if rows > max_rows:
        data = np.concatenate([data[:max_rows // 2], data[-max_rows // 2:]])
    return np.ascontiguousarray(data), (data.shape[0], k)


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_every_tensor_of_the_real_models(model, pulled):
    gguf = GGUFFile(pulled(model))
    rng = np.random.default_rng(0)
    seen = set()
    for name, info in gguf.tensors.items():
        qtype = T(info.qtype)
        quant.check_supported(qtype, name)
        data, shape = tensor_rows(info)
        seen.add(qtype)
        ref = quant.dequantize_reference(data, qtype, shape)
        assert np.isfinite(ref).all(), name
        assert bits_equal(ref.reshape(-1), gguf_dequantize(data.reshape(-1) if qtype in (T.F32, T.F16)
                                                           else data, qtype).reshape(-1)), name
        assert bits_equal(quant.dequantize(data, qtype, shape), ref), name
        if len(info.shape) == 2:
            x = rng.standard_normal((3, shape[1]), dtype=np.float32)
            exact = x.astype(np.float64) @ ref.astype(np.float64).T
            assert nmse(quant.matmul(x[0], data, qtype, shape), exact[0]) <= NMSE_LIMIT, name
            assert nmse(quant.matmul(x, data, qtype, shape), exact) <= NMSE_LIMIT, name
    assert len(gguf.tensors) > 50 and len(seen) >= 2


# ---- fused matmul against the references ----

@pytest.mark.parametrize("n", [1, 2, 7, 64, 512])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_against_float64_reference(qtype, n):
    rng = np.random.default_rng(1000 * int(qtype) + n)
    # odd m; m * k large enough that matvec runs in parallel; odd k for the float types
    m, k = (131, 512) if qtype not in FLOAT_TYPES else (133, 523)
    data = weights(qtype, m, k, rng)
    x = rng.standard_normal((n, k), dtype=np.float32)
    x[0, :64] = 0                                   # an all-zero activation block quantizes to scale 0
    exact = x.astype(np.float64) @ quant.dequantize_reference(data, qtype, (m, k)).astype(np.float64).T
    out = quant.matmul(x, data, qtype, (m, k))
    assert out.shape == (n, m) and out.dtype == np.float32
    assert nmse(out, exact) <= NMSE_LIMIT


@pytest.mark.parametrize("qtype", sorted(set(ALL_TYPES) - {T(t) for t in ggml_exact.EXACT_TYPES}),
                         ids=lambda t: t.name)
def test_one_kernel_for_every_batch_size(qtype):
    """The types without llama.cpp's arithmetic have one kernel: a row's result is the same in any batch."""
    rng = np.random.default_rng(int(qtype))
    m, k = 131, 512
    data = weights(qtype, m, k, rng)
    x = rng.standard_normal((64, k), dtype=np.float32)
    batch = quant.matmul(x, data, qtype, (m, k)).copy()
    for i in (0, 31, 63):
        assert bits_equal(quant.matmul(x[i], data, qtype, (m, k)), batch[i])


def test_matmul_writes_into_out_and_takes_vectors():
    rng = np.random.default_rng(7)
    data = weights(T.Q4_K, 96, 768, rng)
    ref = quant.dequantize_reference(data, T.Q4_K, (96, 768)).astype(np.float64)
    x = rng.standard_normal((5, 768), dtype=np.float32)
    out = np.full((5, 96), np.nan, np.float32)
    assert quant.matmul(x, data, T.Q4_K, (96, 768), out=out) is out
    assert nmse(out, x @ ref.T) <= NMSE_LIMIT
    vec = np.full(96, np.nan, np.float32)
    assert quant.matmul(x[2], data, T.Q4_K, (96, 768), out=vec) is vec
    assert nmse(vec, x[2] @ ref.T) <= NMSE_LIMIT
    with pytest.raises(ValueError, match="out must be"):
        quant.matmul(x, data, T.Q4_K, (96, 768), out=np.empty((5, 95), np.float32))
    with pytest.raises(ValueError, match="does not match"):
        quant.matmul(x[:, :512], data, T.Q4_K, (96, 768))
    with pytest.raises(ValueError, match="bytes"):
        quant.matmul(x, data[:95], T.Q4_K, (96, 768))


def test_thread_counts_agree():
    rng = np.random.default_rng(8)
    data = weights(T.Q6_K, 512, 1024, rng)
    x = rng.standard_normal((1, 1024), dtype=np.float32)
    before = quant.get_threads()
    try:
        results = []
        for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            assert quant.set_threads(threads) == threads
            results.append(quant.matmul(x, data, T.Q6_K, (512, 1024)).copy())
        for r in results[1:]:
            np.testing.assert_allclose(r, results[0], rtol=1e-5, atol=1e-6)
        assert quant.set_threads(10_000) == numba.config.NUMBA_NUM_THREADS
        assert quant.set_threads(0) == quant.set_threads(-1) == quant.set_threads(None) or \
            "NIBBLE_THREADS" in os.environ                 # llama.cpp's convention: 0 or negative, every core
        with pytest.raises(ValueError, match="whole number"):
            quant.set_threads(2.5)
    finally:
        quant.set_threads(before)


def test_nibble_threads_environment(monkeypatch):
    from nibble.quant import jit
    monkeypatch.setenv("NIBBLE_THREADS", "1")
    assert jit.default_threads() == 1
    monkeypatch.setenv("NIBBLE_THREADS", "many")
    with pytest.raises(ValueError, match="NIBBLE_THREADS"):
        jit.default_threads()
    monkeypatch.delenv("NIBBLE_THREADS")
    assert 1 <= jit.default_threads() <= numba.config.NUMBA_NUM_THREADS


def test_kernels_compose_inside_njit():
    """The forward pass may call the kernels from its own compiled code."""
    rng = np.random.default_rng(9)
    m, k, vocab = 64, 256, 50
    w = quant._prepare(weights(T.Q5_1, m, k, rng), T.Q5_1, (m, k))[0]
    emb = quant._prepare(weights(T.Q4_0, vocab, k, rng), T.Q4_0, (vocab, k))[0]

    get_rows_q4_0 = kernels.get_rows_kernel(T.Q4_0)

    @numba.njit
    def two_tokens(tokens, emb, w, h, y, y1, xq, xs):
        get_rows_q4_0(h, tokens, emb, k)                        # Q4_0 embeddings
        kernels.gemm(y, h, xq, xs, w, 7, m, k)                  # Q5_1 projection, both tokens
        kernels.gemm(y1, h[1:], xq[1:], xs[1:], w, 7, m, k)     # and the second alone

    tokens = np.array([3, 41], dtype=np.int64)
    h, y, y1 = np.empty((2, k), np.float32), np.empty((2, m), np.float32), np.empty((1, m), np.float32)
    two_tokens(tokens, emb, w, h, y, y1, np.empty((2, k), np.int8), np.empty((2, k // 16), np.float32))
    ref_h = quant.dequantize_reference(emb, T.Q4_0, (vocab, k))[tokens]
    assert bits_equal(h, ref_h)
    exact = ref_h.astype(np.float64) @ quant.dequantize_reference(w, T.Q5_1, (m, k)).astype(np.float64).T
    assert nmse(y, exact) <= NMSE_LIMIT
    assert bits_equal(y1[0], y[1])                              # a row's value does not depend on its batch


# ---- quantizers ----

def quantizer_inputs(rng, rows: int, k: int) -> np.ndarray:
    x = rng.standard_normal((rows, k), dtype=np.float32)
    x[0, :32] = 0                                  # all-zero block: scale 0
    x[1, :32] = 1.5                                # constant block
    x[2, :32] = np.linspace(-4, 4, 32)             # exact halves: rounding ties
    x[3] *= 1e-6                                   # subnormal scales
    x[4] *= 1e4
    return x


# gguf-py has no K-quant quantizers: tests/test_quantize.py holds those to llama.cpp's own output
@pytest.mark.parametrize("qtype", sorted(quant.QUANTIZABLE_TYPES - {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}),
                         ids=lambda t: t.name)
def test_quantizers_are_bit_exact_with_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    x = quantizer_inputs(rng, 64, 256)
    ours = quant.quantize(x, qtype)
    theirs = np.asarray(gguf_quants.quantize(x, qtype)).view(np.uint8).reshape(64, -1)
    assert ours.dtype == np.uint8 and ours.shape == (64, quant.row_bytes(qtype, 256))
    assert np.array_equal(ours, theirs)
    # and the round trip is as close as the format allows
    back = quant.dequantize(ours, qtype, (64, 256))
    assert nmse(back[5:], x[5:].astype(np.float64)) < {T.Q4_0: 2e-2, T.Q4_1: 2e-2, T.Q5_0: 5e-3,
                                                      T.Q5_1: 5e-3}.get(qtype, 1e-4)


def test_quantize_refuses_what_it_cannot_write():
    with pytest.raises(UnsupportedQuantError, match="IQ4_NL, which nibble cannot read"):
        quant.quantize(np.zeros((1, 256), np.float32), T.IQ4_NL)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize(np.zeros((1, 100), np.float32), T.Q8_0)


# ---- supported types ----

def test_supported_types_and_the_error_for_the_rest():
    assert quant.SUPPORTED_TYPES == {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                                     T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
    for qtype in quant.SUPPORTED_TYPES:
        quant.check_supported(qtype, "blk.0.ffn_up.weight")
        quant.check_supported(int(qtype), "blk.0.ffn_up.weight")
    for qtype in set(T) - quant.SUPPORTED_TYPES:
        with pytest.raises(UnsupportedQuantError) as e:
            quant.check_supported(qtype, "blk.3.attn_q.weight")
        assert qtype.name in str(e.value) and "blk.3.attn_q.weight" in str(e.value)
    with pytest.raises(UnsupportedQuantError, match="type 99"):
        quant.check_supported(99, "output.weight")
    with pytest.raises(UnsupportedQuantError, match="IQ2_XXS"):
        quant.dequantize(np.zeros(66, np.uint8), T.IQ2_XXS, (256,))


# ---- the portable code paths (no AVX2 pmaddubsw, no F16C), as used on CPUs other than recent x86 ----

PORTABLE_CHECK = r"""
import numpy as np
from numba import njit
from nibble.quant import simd
from nibble.quant.simd import (bits32, bytes32, dot_i8, dot_u8, f16x8_at, half_to_float, hsum, load_f16,
                               load_f32x8, nibbles16, round_f16x8, store_f32x8, to_f32)
assert not simd.USE_PMADDUBSW and not simd._F16C

@njit
def halves(bits, out, out8):
    for i in range(bits.size):
        out[i] = half_to_float(bits[i])
    raw = bits.view(np.uint8)
    for i in range(0, bits.size, 8):
        store_f32x8(out8, i, f16x8_at(raw, 2 * i))

@njit
def dots(w, xq, out):
    for b in range(w.size // 32):
        out[b, 0] = hsum(to_f32(dot_u8(nibbles16(w, 32 * b) | (bits32(np.uint32(b * 2654435761)) << 4), xq, 32 * b)))
        out[b, 1] = hsum(to_f32(dot_i8(bytes32(w, 32 * b), xq, 32 * b)))
        out[b, 2] = load_f16(w, 32 * b)

bits = np.arange(65536, dtype=np.uint16)
out, out8 = np.empty(65536, np.float32), np.empty(65536, np.float32)
halves(bits, out, out8)
ref = bits.view(np.float16).astype(np.float32)
finite = ~np.isnan(ref)          # every half but NaNs (whose payload bits may differ), infinities included
assert np.array_equal(out.view(np.uint32)[finite], ref.view(np.uint32)[finite])
assert np.array_equal(out8.view(np.uint32)[finite], ref.view(np.uint32)[finite])
assert np.isnan(out[np.isnan(ref)]).all() and np.isnan(out8[np.isnan(ref)]).all()

@njit
def rounded(x, out):
    for i in range(0, x.size, 8):
        store_f32x8(out, i, round_f16x8(load_f32x8(x, i)))

rng = np.random.default_rng(0)
x = np.concatenate([rng.integers(0, 2**32, 40000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                    np.array([0, -0.0, 65504, 65519.99, 65520, -65520, 2**-24, 2**-25, 3 * 2**-26, 2**-14,
                              np.inf, -np.inf, 1e-30, -7e-6], np.float32)])
x = np.concatenate([x, np.zeros(-x.size % 8, np.float32)])
r = np.empty_like(x)
rounded(x, r)
with np.errstate(over="ignore"):
    expected = x.astype(np.float16).astype(np.float32)
same = (r.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(r) & np.isnan(expected))
assert same.all(), x[~same][:5]

w = rng.integers(0, 256, size=32 * 64, dtype=np.uint8)
xq = rng.integers(-127, 128, size=32 * 64).astype(np.int8)
got = np.empty((64, 3), np.float32)
dots(w, xq, got)
for b in range(64):
    block = w[32 * b:32 * b + 16]
    nib = np.concatenate([block & 15, block >> 4]).astype(np.int64)
    fifth = (np.uint32(b * 2654435761 % 2**32) >> np.arange(32, dtype=np.uint32)) & 1
    x = xq[32 * b:32 * b + 32].astype(np.int64)
    assert got[b, 0] == ((nib | (fifth.astype(np.int64) << 4)) * x).sum()
    assert got[b, 1] == (w[32 * b:32 * b + 32].view(np.int8).astype(np.int64) * x).sum()
    half = w[32 * b:32 * b + 2].view(np.float16).astype(np.float32)[0]
    assert got[b, 2] == half or (np.isnan(half) and np.isnan(got[b, 2]))
print("portable ok")
"""


def test_portable_simd_paths(tmp_path):
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("NUMBA_CPU_FEATURES", None)
    result = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "portable ok" in result.stdout, result.stderr[-3000:]
