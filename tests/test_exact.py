"""llama.cpp's arithmetic, bit for bit: the kernels of quant.ggml_exact and models.ops against slow numpy
transcriptions of the ggml code they reproduce, then SmolLM2 end to end against llama.cpp's logits.

The numpy references write each ggml step out in order; a fused multiply-add is computed in float64 (the
product of two float32 is exact there) and rounded once more to float32, which equals a true fma except
at exact float32 ties, which the fixed inputs here do not hit."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import njit

import nibble
from nibble.quant import simd
from nibble.formats.gguf import GGUFFile
from nibble.quant import ggml_exact
from nibble.models import ops

F32, F64 = np.float32, np.float64


def fma(a, b, c):
    return (np.asarray(a, F64) * np.asarray(b, F64) + np.asarray(c, F64)).astype(F32)


def f16(a):
    return np.asarray(a, F32).astype(np.float16).astype(F32)


def hsum8(a):
    """hsum_float_8 over the last axis (8): ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3))."""
    r = (a[..., 4:] + a[..., :4]).astype(F32)
    return ((r[..., 0] + r[..., 2]).astype(F32) + (r[..., 1] + r[..., 3]).astype(F32)).astype(F32)


def reduce32(a):
    """GGML_F32x8_REDUCE over the last axis (32 = four accumulators of 8 lanes)."""
    s = a.reshape(a.shape[:-1] + (4, 8))
    v = ((s[..., 0, :] + s[..., 2, :]).astype(F32) + (s[..., 1, :] + s[..., 3, :]).astype(F32)).astype(F32)
    t = (v[..., :4] + v[..., 4:]).astype(F32)
    return ((t[..., 0] + t[..., 1]).astype(F32) + (t[..., 2] + t[..., 3]).astype(F32)).astype(F32)


def quantize_q8_ref(x):
    """quantize_row_q8_1 (x86): q (nb, 32) int, d16 (nb,), s16 (nb,)."""
    xb = np.asarray(x, F32).reshape(-1, 32)
    amax = np.abs(xb).max(1)
    d = (amax / F32(127)).astype(F32)
    inv = np.where(amax > 0, F32(127) / np.where(amax > 0, amax, F32(1)), F32(0)).astype(F32)
    q = np.rint((xb * inv[:, None]).astype(F32)).astype(np.int64)
    return q, f16(d), f16((d * q.sum(1).astype(F32)).astype(F32))


def matvec_ref(w: np.ndarray, qtype: int, m: int, k: int, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_q4_1_q8_1 / ggml_vec_dot_q8_0_q8_0 (AVX2) for every row, in numpy."""
    nb = k // 32
    qx, dx, sx = quantize_q8_ref(x)
    if qtype == ggml_exact.Q4_1:
        blk = w.reshape(m, nb, 20)
        d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(F32)
        mn = blk[..., 2:4].copy().view(np.float16)[..., 0].astype(F32)
        qs = blk[..., 4:].astype(np.int64)
        qw = np.concatenate([qs & 15, qs >> 4], -1)                              # (m, nb, 32)
    else:
        blk = w.reshape(m, nb, 34)
        d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(F32)
        qw = blk[..., 2:].copy().view(np.int8).astype(np.int64)
    isum = (qw * qx[None]).reshape(m, nb, 8, 4).sum(-1).astype(F32)             # (m, nb, 8) exact
    acc = np.zeros((m, 8), F32)
    summs = np.zeros(m, F32)
    for b in range(nb):
        acc = fma((d[:, b] * dx[b]).astype(F32)[:, None], isum[:, b], acc)
        if qtype == ggml_exact.Q4_1:
            summs = fma(mn[:, b], sx[b], summs)
    out = hsum8(acc)
    return (out + summs).astype(F32) if qtype == ggml_exact.Q4_1 else out


def v_expf_ref(x):
    """ggml_v_expf (AVX2), elementwise."""
    x = np.asarray(x, F32)
    h = lambda s: F32(float.fromhex(s))  # noqa: E731
    r = h("0x1.8p23")
    with np.errstate(all="ignore"):
        z = fma(x, h("0x1.715476p+0"), r)
        n = (z - r).astype(F32)
        b = fma(-n, h("0x1.7f7d1cp-20"), fma(-n, h("0x1.62e4p-1"), x))
        e = (z.view(np.uint32) << np.uint32(23)).astype(np.uint32)
        k = (e + np.array(1.0, F32).view(np.uint32)).astype(np.uint32).view(F32)
        u = (b * b).astype(F32)
        j = fma(fma(fma(h("0x1.0e4020p-7"), b, h("0x1.573e2ep-5")), u, fma(h("0x1.555e66p-3"), b, h("0x1.fffdb6p-2"))),
                u, (h("0x1.ffffecp-1") * b).astype(F32))
        g = np.where(n <= 0, np.uint32(0x82000000), np.uint32(0))
        s1 = (g + np.uint32(0x7F000000)).astype(np.uint32).view(F32)
        s2 = (e - g).astype(np.uint32).view(F32)
        big = np.abs(n) > 126
        huge = np.abs(n) > 192
        return np.where(huge, (s1 * s1).astype(F32),
                        np.where(big, (fma(s2, j, s2) * s1).astype(F32), fma(k, j, k))).astype(F32)


# ---- scalar helpers ----

def test_round_f16_is_ieee_round_to_nearest_even():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        (rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000)).astype(F32),
        rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(F32),       # every bit pattern
        np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 2**-24, 2**-25, 3 * 2**-26, 2**-14, np.inf, -np.inf],
                 F32),
        (np.arange(1, 2049, dtype=F32) + F32(0.5)) * F32(2**-13),                            # halfway cases
    ])
    ours = np.array([simd.round_f16(v) for v in x], F32)
    expected = f16(x)
    same = (ours == expected) | (np.isnan(ours) & np.isnan(expected))
    assert same.all(), x[~same][:5]
    lanes = _in_lanes(x, _round_f16x8)                         # the 8-lane form the attention kernels use
    assert np.array_equal(lanes.view(np.uint32)[~np.isnan(x)], ours.view(np.uint32)[~np.isnan(x)])
    # the f16 KV cache stores the same value as IEEE half bits
    with np.errstate(over="ignore"):
        bits = np.array([simd.half_bits(v) for v in x], np.int64).astype(np.uint16).view(np.float16)
        halves = x.astype(np.float16)
    same = (bits == halves) | (np.isnan(bits) & np.isnan(halves))
    assert same.all() and np.array_equal(np.signbit(bits), np.signbit(halves)), x[~same][:5]
    assert (np.signbit(ours) == np.signbit(expected))[~np.isnan(x)].all()


def test_v_expf_matches_ggml_v_expf():
    x = np.concatenate([np.linspace(-200, 100, 30001, dtype=F32),
                        np.random.default_rng(1).standard_normal(5000).astype(F32) * 4,
                        np.array([0.0, -0.0, -87.5, -88.8, -103.9, -104.0, 88.7, -np.inf], F32)])
    ours = np.array([simd.v_expf(v) for v in x], F32)
    assert np.array_equal(ours, v_expf_ref(x))
    assert np.array_equal(_in_lanes(x, _v_expf8), ours)        # ggml_v_expf on 8 lanes, its blends included


@njit
def _round_f16x8(x, out):
    for i in range(0, x.size, 8):
        simd.store_f32x8(out, i, simd.round_f16x8(simd.load_f32x8(x, i)))


@njit
def _v_expf8(x, out):
    for i in range(0, x.size, 8):
        simd.store_f32x8(out, i, simd.v_expf8(simd.load_f32x8(x, i)))


def _in_lanes(x, kernel):
    """kernel over x padded to a multiple of 8 lanes, the padding dropped."""
    padded = np.concatenate([x, np.zeros(-x.size % 8, F32)])
    out = np.empty_like(padded)
    kernel(padded, out)
    return out[:x.size]
    assert simd.v_expf(F32(-np.inf)) == 0
    close = np.abs(x) < 80
    assert np.allclose(ours[close], np.exp(x[close].astype(F64)), rtol=2e-7, atol=0)   # and it is exp


def test_quantize_q8_matches_quantize_row_q8_1():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(32 * 64) * 10.0 ** rng.integers(-3, 4, 32 * 64)).astype(F32)
    x[:32] = 0                                                      # amax = 0: d = 0, every q = 0
    x[32:64] = np.arange(32, dtype=F32) - F32(15.5)                 # exact .5 ties: round half to even
    xq, xs = np.zeros(x.size, np.int8), np.zeros(x.size // 16, F32)
    ggml_exact.quantize_q8(x, xq, xs)
    q, d16, s16 = quantize_q8_ref(x)
    assert np.array_equal(xq.astype(np.int64), q.reshape(-1))
    assert np.array_equal(xs[0::2], d16) and np.array_equal(xs[1::2], s16)


# ---- matmuls on the real SmolLM2 tensors ----

@pytest.fixture(scope="module")
def smollm2(pulled):
    return GGUFFile(pulled("smollm2-135m"))


@pytest.mark.parametrize("name", ["blk.0.attn_k.weight", "blk.3.ffn_down.weight", "blk.29.ffn_gate.weight",
                                  "token_embd.weight"])
def test_matvec_and_gemm_are_ggml_vec_dot(smollm2, name):
    t = smollm2.tensors[name]
    m, k = t.shape
    qtype = int(t.qtype)
    assert qtype in ggml_exact.EXACT_TYPES
    rows = np.arange(m) if m <= 2048 else np.r_[0:700, m - 300:m]        # the reference is slow on 49152 rows
    w = np.asarray(t.data).reshape(m, -1)[rows].reshape(-1)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, k)) * rng.gamma(0.5, 20, (5, k))).astype(F32)   # heavy-tailed, like SmolLM2's
    expected = np.stack([matvec_ref(w, qtype, len(rows), k, xi) for xi in x])[:, :]

    out = np.zeros(m, F32)
    ggml_exact.matvec(out, x[0], np.zeros(k, np.int8), np.zeros(k // 16, F32), t.data, qtype, m, k)
    assert np.array_equal(out[rows], expected[0])
    # gemm gives every row the same bits as matvec (llama.cpp's results do not depend on the batch size),
    # whether the rows go one, four or eight at a time
    for n in (2, 3, 5):
        out2 = np.zeros((n, m), F32)
        ggml_exact.gemm(out2, x[:n], np.zeros((n, k), np.int8), np.zeros((n, k // 16), F32), t.data, qtype, m, k,
                        ggml_exact.batch_kinds(n))
        assert np.array_equal(out2[:, rows], expected[:n]), n


# ---- Q5_0 and the K-quants (Gemma 3, Qwen2.5) ----

def quantize_q8_k_ref(x, fused):
    """quantize_row_q8_K_ref as compiled (iscale * x + 1.5 * 2^23 contracted to an fma: the exact product
    rounds to an integer) when fused, else quantize_mat_q8_K_4x8 (product rounded to f32, then to an
    integer): q (nsb, 256) int, d (nsb,)."""
    xb = np.asarray(x, F32).reshape(-1, 256)
    q = np.zeros(xb.shape, np.int64)
    d = np.zeros(len(xb), F32)
    for s, row in enumerate(xb):
        mx = row[np.argmax(np.abs(row))]                       # the first value of largest |x|
        if mx == 0:
            continue
        iscale = F32(-127) / mx
        prod = iscale.astype(F64) * row.astype(F64) if fused else (iscale * row).astype(F32)
        q[s] = np.minimum(127, np.rint(prod))
        d[s] = F32(1) / iscale
    return q, d


def blocks_f16(blk, at):
    return blk[..., at:at + 2].copy().view(np.float16)[..., 0].astype(F32)


def q5_0_ref(w, m, k, x):
    """ggml_vec_dot_q5_0_q8_0 / tinyBLAS_Q0_AVX: the Q8_0 lanes with q = nibble | fifth bit << 4, minus 16."""
    nb = k // 32
    qx, dx, _ = quantize_q8_ref(x)
    blk = w.reshape(m, nb, 22)
    d = blocks_f16(blk, 0)
    bits = (blk[..., 2:6].copy().view(np.uint32)[..., 0][..., None] >> np.arange(32, dtype=np.uint32)) & 1
    qs = blk[..., 6:].astype(np.int64)
    qw = (np.concatenate([qs & 15, qs >> 4], -1) | (bits.astype(np.int64) << 4)) - 16
    isum = (qw * qx[None]).reshape(m, nb, 8, 4).sum(-1).astype(F32)
    acc = np.zeros((m, 8), F32)
    for b in range(nb):
        acc = fma((d[:, b] * dx[b]).astype(F32)[:, None], isum[:, b], acc)
    return hsum8(acc)


def q4_k_ref(w, m, k, x, gemm4):
    """Repacked Q4_K (q4_K_8x8_q8_K, AVX2): exact integer sums of scale · dot and min · bsum folded in by an fma
    per super-block (gemv) or per 64 values (gemm, for activation rows in groups of 4, quantized 4 at a time)."""
    nsb = k // 256
    qx, dx = quantize_q8_k_ref(x, fused=not gemm4)
    blk = w.reshape(m, nsb, 144)
    d, dmin = blocks_f16(blk, 0), blocks_f16(blk, 2)
    sb = blk[..., 4:16].astype(np.int64)
    j = np.arange(4)
    sc = np.concatenate([sb[..., j] & 63, (sb[..., j + 8] & 15) | ((sb[..., j] >> 6) << 4)], -1)      # (m, nsb, 8)
    mn = np.concatenate([sb[..., j + 4] & 63, (sb[..., j + 8] >> 4) | ((sb[..., j + 4] >> 6) << 4)], -1)
    qs = blk[..., 16:].astype(np.int64).reshape(m, nsb, 4, 32)
    qw = np.stack([qs & 15, qs >> 4], 3).reshape(m, nsb, 256)                # element 64c + 32h + l
    dots = (qw * qx[None]).reshape(m, nsb, 8, 32).sum(-1)
    isub, msub = sc * dots, mn * qx.reshape(nsb, 8, 32).sum(-1)[None]
    groups = 4 if gemm4 else 1
    isub, msub = isub.reshape(m, nsb, groups, -1).sum(-1), msub.reshape(m, nsb, groups, -1).sum(-1)
    acc, accm = np.zeros(m, F32), np.zeros(m, F32)
    for s in range(nsb):
        for g in range(groups):
            acc = fma(isub[:, s, g].astype(F32), (d[:, s] * dx[s]).astype(F32), acc)
            accm = fma(msub[:, s, g].astype(F32), (dmin[:, s] * dx[s]).astype(F32), accm)
    return (acc - accm).astype(F32)


def q6_k_ref(w, m, k, x, tiled):
    """Q6_K: ggml's tiled kernel (batches of 8+: an exact integer per super-block, fma(d · isum, d8, acc)) or
    ggml_vec_dot_q6_K_q8_K (AVX2: 8 int lanes of unsigned 6-bit products, the -32 offset taken from bsums)."""
    nsb = k // 256
    qx, dx = quantize_q8_k_ref(x, fused=True)
    blk = w.reshape(m, nsb, 210)
    ql, qh = blk[..., :128].astype(np.int64), blk[..., 128:192].astype(np.int64)
    sc = blk[..., 192:208].copy().view(np.int8).astype(np.int64)
    d = blocks_f16(blk, 208)
    q = np.zeros((m, nsb, 256), np.int64)
    for h in range(2):
        lo, hi, bits = ql[..., 64 * h:64 * h + 32], ql[..., 64 * h + 32:64 * h + 64], qh[..., 32 * h:32 * h + 32]
        q[..., 128 * h:128 * h + 32] = (lo & 15) | ((bits & 3) << 4)
        q[..., 128 * h + 32:128 * h + 64] = (hi & 15) | (((bits >> 2) & 3) << 4)
        q[..., 128 * h + 64:128 * h + 96] = (lo >> 4) | (((bits >> 4) & 3) << 4)
        q[..., 128 * h + 96:128 * h + 128] = (hi >> 4) | (((bits >> 6) & 3) << 4)
    if tiled:
        isum = (sc * ((q - 32) * qx[None]).reshape(m, nsb, 16, 16).sum(-1)).sum(-1)
        acc = np.zeros(m, F32)
        for s in range(nsb):
            acc = fma((d[:, s] * isum[:, s].astype(F32)).astype(F32), dx[s], acc)
        return acc
    prod = (q * qx[None]).reshape(m, nsb, 8, 8, 4).sum(-1)                  # (m, nsb, chunk C, lane l)
    lane_scale = sc.reshape(m, nsb, 8, 2)[..., np.arange(8) // 4]            # sc[2C + l // 4]
    bs16 = qx.reshape(nsb, 16, 16).sum(-1)
    lanes = (prod * lane_scale).sum(2) - 32 * (bs16[None] * sc).reshape(m, nsb, 8, 2).sum(-1)
    acc = np.zeros((m, 8), F32)
    for s in range(nsb):
        acc = fma((dx[s] * d[:, s]).astype(F32)[:, None], lanes[:, s].astype(F32), acc)
    return hsum8(acc)


def test_quantize_q8_k_both_roundings():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(256 * 12) * 10.0 ** rng.integers(-3, 4, 256 * 12)).astype(F32)
    x[:256] = 0
    for fused in (True, False):
        xq, xs = np.zeros(x.size, np.int8), np.zeros(x.size // 16, F32)
        ggml_exact.quantize_q8_k(x, xq, xs, fused, True)
        q, d = quantize_q8_k_ref(x, fused)
        assert np.array_equal(xq.astype(np.int64), q.reshape(-1)) and np.array_equal(xs[0::16], d)
        assert np.array_equal(xs.reshape(-1, 16)[:, 1:9], q.reshape(-1, 8, 32).sum(-1).astype(F32))


@pytest.fixture(scope="module")
def gemma3(pulled):
    return GGUFFile(pulled("gemma3-270m"))


@pytest.mark.parametrize("qtype", [ggml_exact.Q4_1, ggml_exact.Q5_0, ggml_exact.Q8_0])
@pytest.mark.parametrize("m", [1, 3, 6, 37, 2053])
def test_row_kernels_with_any_number_of_rows(qtype, m):
    """The one-row kernels take four weight rows at a time and the gemm's small groups two: every remainder
    (small matrices as one task, large ones in tasks of TASK_ROWS, an odd last row) gives each row
    ggml_vec_dot's bits: alone, as a row of gemm batches of 2, 3, 4 and 6 single-row-kind rows (decode steps
    of that many sequences) and as a one-row gemm batch of another kind (alone in its group, the one-row
    kernel)."""
    k = 96
    rng = np.random.default_rng(m)
    w = nibble.quant.quantize(rng.standard_normal((m, k)).astype(F32), qtype).reshape(-1)
    x = (rng.standard_normal((6, k)) * rng.gamma(0.5, 20, (6, k))).astype(F32)
    ref = q5_0_ref if qtype == ggml_exact.Q5_0 else (lambda w, m, k, x: matvec_ref(w, qtype, m, k, x))
    out = np.zeros(m, F32)
    ggml_exact.matvec(out, x[0], np.zeros(k, np.int8), np.zeros(k // 16, F32), w, qtype, m, k)
    assert np.array_equal(out, ref(w, m, k, x[0]))
    for n in (2, 3, 4, 6):
        outn = np.zeros((n, m), F32)
        ggml_exact.gemm(outn, x[:n], np.zeros((n, k), np.int8), np.zeros((n, k // 16), F32), w, qtype, m, k,
                        np.zeros(n, np.int8))
        assert np.array_equal(outn[0], out)
        for i in range(1, n):
            assert np.array_equal(outn[i], ref(w, m, k, x[i])), (n, i)
    lone = np.zeros((1, m), F32)
    ggml_exact.gemm(lone, x[:1], np.zeros((1, k), np.int8), np.zeros((1, k // 16), F32), w, qtype, m, k,
                    np.full(1, ggml_exact.ROW_BATCHED, np.int8))
    assert np.array_equal(lone[0], out)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight",
                                  "blk.2.ffn_down.weight", "blk.0.attn_v.weight"])
@pytest.mark.parametrize("batch", [1, 6, 9, 14])
def test_gemma_matmuls_are_ggmls_for_each_batch_size(gemma3, name, batch):
    """Q5_0, Q4_K (gemv/gemm by groups of 4 rows), Q6_K (vec_dot below 8 rows, tiled from 8), Q8_0."""
    t = gemma3.tensors[name]
    m, k = t.shape
    qtype = int(t.qtype)
    w = np.asarray(t.data)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((batch, k)) * rng.gamma(0.5, 20, (batch, k))).astype(F32)
    out = np.zeros((batch, m), F32)
    xq, xs = np.zeros((batch, k), np.int8), np.zeros((batch, k // 16), F32)
    if batch == 1:
        ggml_exact.matvec(out[0], x[0], xq[0], xs[0], t.data, qtype, m, k)
    else:
        ggml_exact.gemm(out, x, xq, xs, t.data, qtype, m, k, ggml_exact.batch_kinds(batch))
    for i in range(batch):
        if qtype == ggml_exact.Q5_0:
            expected = q5_0_ref(w, m, k, x[i])
        elif qtype == ggml_exact.Q8_0:
            expected = matvec_ref(w, qtype, m, k, x[i])
        elif qtype == ggml_exact.Q4_K:
            expected = q4_k_ref(w, m, k, x[i], gemm4=i < batch - batch % 4)
        else:
            assert qtype == ggml_exact.Q6_K
            expected = q6_k_ref(w, m, k, x[i], tiled=batch >= 8)
        assert np.array_equal(out[i], expected), (qtype, i)


@pytest.mark.parametrize("name", ["blk.2.ffn_down.weight", "blk.0.ffn_down.weight"])     # Q4_K, Q6_K
def test_wide_gemm_split_into_activation_blocks_is_ggmls(pulled, name):
    """k = 4864 and 203 rows: gemm splits the activation rows into blocks that stay in L2 (here two, one of them
    ending in an incomplete group of 4); rows at the block edges and in the tail are still ggml's."""
    t = GGUFFile(pulled("qwen2.5-coder-0.5b")).tensors[name]
    m, k = t.shape
    qtype, batch = int(t.qtype), 203
    assert qtype == (ggml_exact.Q4_K if name == "blk.2.ffn_down.weight" else ggml_exact.Q6_K)
    assert batch * k > ggml_exact.X_BLOCK_BYTES
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((batch, k)) * rng.gamma(0.5, 20, (batch, k))).astype(F32)
    out = np.zeros((batch, m), F32)
    ggml_exact.gemm(out, x, np.zeros((batch, k), np.int8), np.zeros((batch, k // 16), F32), t.data, qtype, m, k,
                    ggml_exact.batch_kinds(batch))
    w = np.asarray(t.data)
    for i in (0, 7, 8, 99, 100, 103, 104, 111, 195, 199, 200, 202):
        if qtype == ggml_exact.Q4_K:
            expected = q4_k_ref(w, m, k, x[i], gemm4=i < 200)
        else:
            expected = q6_k_ref(w, m, k, x[i], tiled=True)
        assert np.array_equal(out[i], expected), i


@pytest.mark.parametrize("batch", [36, 45])
@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.attn_v.weight"])          # Q5_0, Q8_0
def test_batched_q5_0_q8_0_gemm_with_decoded_weights_is_ggmls(gemma3, name, batch):
    """From DECODED_MIN_GROUPS groups of 8 rows, each task decodes its Q5_0/Q8_0 weight rows once and takes the
    activation scales from a lane-repeated copy, two weight rows at a time; every row (whole groups, a last
    group of 5 padded to 8, or of 4; the odd last weight row) keeps ggml's bits."""
    t = gemma3.tensors[name]
    m, k = t.shape
    qtype = int(t.qtype)
    assert qtype in (ggml_exact.Q5_0, ggml_exact.Q8_0)
    assert -(-batch // 8) >= ggml_exact.DECODED_MIN_GROUPS
    m -= 1                                    # an odd number of weight rows: the last tile ends in a single row
    w = np.asarray(t.data)[:m * (t.data.size // (m + 1))]
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((batch, k)) * rng.gamma(0.5, 20, (batch, k))).astype(F32)
    out = np.zeros((batch, m), F32)
    ggml_exact.gemm(out, x, np.zeros((batch, k), np.int8), np.zeros((batch, k // 16), F32), w, qtype, m, k,
                    ggml_exact.batch_kinds(batch))
    for i in (0, 7, 8, 31, 32, 35, batch - 1):
        expected = q5_0_ref(w, m, k, x[i]) if qtype == ggml_exact.Q5_0 else matvec_ref(w, qtype, m, k, x[i])
        assert np.array_equal(out[i], expected), i


@pytest.mark.parametrize("batch", [36, 45])
@pytest.mark.parametrize("name", ["blk.0.ffn_gate.weight", "blk.3.ffn_down.weight"])      # Q4_1, k 576 and 1536
def test_batched_q4_1_gemm_with_unpacked_weights_is_ggmls(smollm2, name, batch):
    """From DECODED_MIN_GROUPS groups of 8 rows, each task unpacks its Q4_1 weight rows once and takes every
    group's eight rows per weight row (`_eight_rows_unpacked`); every row (whole groups, a last group of 5
    padded to 8, or of 4; an odd number of weight rows) keeps ggml_vec_dot_q4_1_q8_1's bits."""
    t = smollm2.tensors[name]
    m, k = t.shape
    assert int(t.qtype) == ggml_exact.Q4_1
    assert -(-batch // 8) >= ggml_exact.DECODED_MIN_GROUPS
    m -= 1
    w = np.asarray(t.data)[:m * (t.data.size // (m + 1))]
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((batch, k)) * rng.gamma(0.5, 20, (batch, k))).astype(F32)
    out = np.zeros((batch, m), F32)
    ggml_exact.gemm(out, x, np.zeros((batch, k), np.int8), np.zeros((batch, k // 16), F32), w, ggml_exact.Q4_1,
                    m, k, ggml_exact.batch_kinds(batch))
    for i in (0, 7, 8, 31, 32, 35, batch - 1):
        assert np.array_equal(out[i], matvec_ref(w, ggml_exact.Q4_1, m, k, x[i])), i


# ---- the non-matmul kernels ----

def rmsnorm_ref(x, w, eps):
    sq = (x * x).astype(F32).astype(F64)
    total = np.zeros(x.shape[0], F64)
    for i in range(x.shape[1]):
        total = total + sq[:, i]
    mean = (total / x.shape[1]).astype(F32)
    scale = (F32(1) / np.sqrt((mean + F32(eps)).astype(F32))).astype(F32)
    return ((x * scale[:, None]).astype(F32) * w).astype(F32)


def test_rmsnorm_and_silu_mul():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 576)) * 30).astype(F32)
    w = rng.standard_normal(576).astype(F32)
    out = np.zeros_like(x)
    ops.rmsnorm(out, x, w, 1e-5)
    assert np.array_equal(out, rmsnorm_ref(x, w, 1e-5))
    g, u = (rng.standard_normal((2, 1536)) * 6).astype(F32), rng.standard_normal((2, 1536)).astype(F32)
    g[0, :10] = [-100, 100, -88, 88, -200, 200, 0, -0.0, 126, -127]     # ggml_v_expf's out-of-range lanes
    expected = ((g / (F32(1) + v_expf_ref(-g)).astype(F32)).astype(F32) * u).astype(F32)
    ops.silu_mul(g, u)
    assert np.array_equal(g, expected)


def attention_ref(q, k, v, scale, lanes):
    """One (row, head): q (D,), k, v (n, D) as cached (fp16 values), llama.cpp's non-flash path with the
    F16 matmul of tinyBLAS (lanes 8) or ggml_vec_dot_f16 (lanes 32)."""
    n, D = k.shape
    q16 = f16(q)
    if lanes == 8:
        acc = np.zeros((n, 8), F32)
        for i in range(0, D, 8):
            acc = fma(k[:, i:i + 8], q16[i:i + 8], acc)
        kq = hsum8(acc)
    else:
        n32 = D - D % 32
        acc = np.zeros((n, 32), F32)
        for i in range(0, n32, 32):
            acc = fma(k[:, i:i + 32], q16[i:i + 32], acc)
        kq = reduce32(acc)
        if n32 < D:                   # ggml_vec_dot_f16's leftovers: each f32 product added in double, in order
            total = kq.astype(F64)
            for i in range(n32, D):
                total = total + (k[:, i] * q16[i]).astype(F32).astype(F64)
            kq = total.astype(F32)
    w = (kq * F32(scale)).astype(F32)
    n8 = -(-n // 8) * 8
    e = np.zeros(n8, F32)
    e[:n] = v_expf_ref((w - w.max()).astype(F32))
    total = 0.0
    for s in hsum8(e.reshape(-1, 8)):
        total += float(s)
    p = f16((e[:n] * F32(1.0 / total)).astype(F32))
    nl = -(-n // lanes) * lanes
    pp, vv = np.zeros(nl, F32), np.zeros((nl, D), F32)
    pp[:n], vv[:n] = p, v
    acc = np.zeros((D, lanes), F32)
    for j in range(0, nl, lanes):
        acc = fma(vv[j:j + lanes].T, pp[j:j + lanes], acc)
    return hsum8(acc) if lanes == 8 else reduce32(acc)


@pytest.mark.parametrize("batch,n,mixed,D,Hk", [(1, 70, False, 64, 2), (3, 70, False, 64, 2), (5, 70, False, 64, 2),
                                                (3, 70, True, 64, 2), (1, 1100, False, 64, 2), (5, 1100, True, 64, 2),
                                                (1, 70, False, 40, 2), (3, 70, True, 40, 2), (1, 2100, False, 64, 3),
                                                (2, 2100, True, 64, 3), (1, 2100, False, 256, 1)])
def test_attention_lanes_follow_the_batch_size(batch, n, mixed, D, Hk):
    """One query row (decode) takes ggml_vec_dot_f16's 32 lanes, several take tinyBLAS's 8; a batch that mixes
    both kinds (a server step) gives each row its kind's lanes. Rows in tasks of their own or sharing a K/V
    head (4+ rows, or a cache of 1024+ cells), each K/V head split between tasks (single rows over 2048+
    cells whose heads do not fill the threads evenly: SmolLM2's 3, Gemma's 1), whole and partial 8-cell
    groups, a head size that is not a multiple of 32 (the one-cell paths of the 32 lanes): every head as the
    reference."""
    rng = np.random.default_rng(5)
    H, layer = 6, 1
    n_ctx = n + 10
    k_cache = np.zeros((2, 2, n_ctx, Hk, D), np.float16)      # the kernels take the halves' bits
    v_cache = np.zeros_like(k_cache)
    k = (rng.standard_normal((n, Hk * D)) * 3).astype(F32)    # cached positions 0..n-1 of slot 1
    v = rng.standard_normal((n, Hk * D)).astype(F32)
    ops.kv_store(k_cache.view(np.uint16), v_cache.view(np.uint16), layer, np.ones(n, np.int64), np.arange(n),
                 k, v, Hk, D)
    assert np.array_equal(k_cache[1, layer, :n].astype(F32), f16(k).reshape(n, Hk, D))
    positions = np.arange(n - batch, n)
    kinds = ggml_exact.batch_kinds(batch)
    if mixed:
        kinds[::2] = 0                                        # rows 0, 2, ...: decode rows of other requests
    q = (rng.standard_normal((batch, H * D)) * 3).astype(F32)
    out = np.zeros_like(q)
    single = np.flatnonzero((kinds & ggml_exact.ROW_BATCHED) == 0)
    if n >= ops.SPLIT_MIN_CELLS and numba.get_num_threads() > 1:     # the split path is the one under test
        assert ops._split_parts(k_cache.view(np.uint16), v_cache.view(np.uint16), positions, single, Hk, D, 0)
    ops.attention(out, q, k_cache.view(np.uint16), v_cache.view(np.uint16), layer, np.ones(batch, np.int64),
                  positions, kinds, H, Hk, D, F32(0.125), 0)
    k_cache, v_cache = k_cache.astype(F32), v_cache.astype(F32)
    for b, p in enumerate(positions):
        lanes = 8 if kinds[b] & ggml_exact.ROW_BATCHED else 32
        for h in range(H):
            hk = h // (H // Hk)
            expected = attention_ref(q[b, h * D:(h + 1) * D], k_cache[1, layer, :p + 1, hk], v_cache[1, layer, :p + 1, hk],
                                     0.125, lanes)
            assert np.array_equal(out[b, h * D:(h + 1) * D], expected), (b, h)


# ---- SmolLM2 end to end ----

@pytest.fixture(scope="module")
def smol_model(pulled):
    return nibble.load(pulled("smollm2-135m"), n_ctx=512)


def test_smollm2_logits_are_llama_cpps_bit_for_bit(smol_model, ref):
    """Prefill (tinyBLAS lanes, the 64-row output matmul) and the last position's logits equal llama.cpp's
    reference exactly (it was produced on this kind of CPU: x86 AVX2 + FMA, glibc's cosf/sinf/powf)."""
    for i, p in enumerate(ref("smollm2-135m", "prompts.json")):
        logits = smol_model.logits(p["ids"])
        expected = np.load(ref("smollm2-135m", p["last_logits_file"]))
        assert np.array_equal(logits[-1], expected), f"prompt {i}: NMSE " \
            f"{((logits[-1] - expected) ** 2).sum() / (expected ** 2).sum():.2e}"
        assert logits.argmax(1).tolist() == [row[0] for row in p["top10_per_position"]]


def test_smollm2_greedy_decoding_is_llama_cpps(smol_model, ref):
    """Token by token (one-row matmuls, 32-lane attention), every reference greedy token, not only 16."""
    for i, p in enumerate(ref("smollm2-135m", "prompts.json")):
        smol_model.reset()
        out = [int(smol_model.eval(p["ids"]).argmax())]
        while len(out) < len(p["greedy_ids"]):
            out.append(int(smol_model.eval(out[-1:]).argmax()))
        assert out == p["greedy_ids"], f"prompt {i}"


# ---- Gemma 3 and Qwen2.5 end to end ----

# Qwen2.5's prompt 2 reference differs by NMSE 1.2e-4 from the same llama.cpp version built on this machine
# (whose logits nibble's equal bit for bit, prefill and decode); the other prompts' references equal that
# build's. Until the reference run's setting is known, that prompt is held to the logits bar only.
NOT_REPRODUCED = {("qwen2.5-coder-0.5b", 2)}


@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b"])
def test_gemma_and_qwen_are_llama_cpps_bit_for_bit(name, pulled, ref):
    """Q5_0/Q8_0 (tinyBLAS lanes), repacked Q4_K, Q6_K (vec_dot below 8 rows, tiled from 8) in prefill, and
    every reference greedy token decoded one at a time."""
    model = nibble.load(pulled(name), n_ctx=512)
    for i, p in enumerate(ref(name, "prompts.json")):
        logits = model.logits(p["ids"])
        expected = np.load(ref(name, p["last_logits_file"]))
        nmse = float(((logits[-1] - expected) ** 2).sum() / (expected ** 2).sum())
        if (name, i) in NOT_REPRODUCED:
            assert nmse <= 5e-4, f"prompt {i}: NMSE {nmse:.2e}"
        else:
            assert np.array_equal(logits[-1], expected), f"prompt {i}: NMSE {nmse:.2e}"
        assert logits.argmax(1).tolist() == [row[0] for row in p["top10_per_position"]]
        model.reset()
        out = [int(model.eval(p["ids"]).argmax())]
        while len(out) < len(p["greedy_ids"]):
            out.append(int(model.eval(out[-1:]).argmax()))
        assert out == p["greedy_ids"], f"prompt {i}"


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.2.ffn_down.weight", "blk.0.attn_q.weight",
                                  "blk.0.attn_v.weight"])        # Q6_K, Q4_K, Q5_0, Q8_0
def test_gemm_rows_of_mixed_kinds_each_get_their_kinds_arithmetic(gemma3, name):
    """One gemm over rows of every kind in a shuffled order (a server's step: decode rows beside a prompt's
    grouped and tiled rows) gives each row what a batch of its kind alone gives it."""
    t = gemma3.tensors[name]
    m, k = t.shape
    qtype = int(t.qtype)
    w = np.asarray(t.data)
    rng = np.random.default_rng(11)
    kinds = np.array([0, 0, 0] + [ggml_exact.ROW_GROUP4 | ggml_exact.ROW_TILED | ggml_exact.ROW_BATCHED] * 9
                     + [ggml_exact.ROW_TILED | ggml_exact.ROW_BATCHED] * 2 + [ggml_exact.ROW_GROUP4] * 3, np.int8)
    rng.shuffle(kinds)
    n = len(kinds)
    x = (rng.standard_normal((n, k)) * rng.gamma(0.5, 20, (n, k))).astype(F32)
    out = np.zeros((n, m), F32)
    ggml_exact.gemm(out, x, np.zeros((n, k), np.int8), np.zeros((n, k // 16), F32), t.data, qtype, m, k, kinds)
    for i in range(n):
        group4, tiled = bool(kinds[i] & ggml_exact.ROW_GROUP4), bool(kinds[i] & ggml_exact.ROW_TILED)
        if qtype == ggml_exact.Q4_K:
            expected = q4_k_ref(w, m, k, x[i], gemm4=group4)
        elif qtype == ggml_exact.Q6_K:
            expected = q6_k_ref(w, m, k, x[i], tiled=tiled)
        elif qtype == ggml_exact.Q5_0:
            expected = q5_0_ref(w, m, k, x[i])
        else:
            expected = matvec_ref(w, qtype, m, k, x[i])
        assert np.array_equal(out[i], expected), (qtype, i, kinds[i])
