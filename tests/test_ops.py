"""The non-matmul kernels of models/ops.py against plain float64 numpy: RoPE (adjacent pairs and NEOX),
Gemma 3's per-head RMSNorm, GeGLU, the bias add and attention with a sliding window.

These kernels reproduce ggml's f32 (and fp16) arithmetic, which test_exact.py holds bit for bit where
llama.cpp's logits depend on it; here each is held to the plain formula, with a tolerance from the
roundings it makes (f32: ~1e-7 relative; the fp16 roundings of attention and GeGLU: 2^-11)."""

from __future__ import annotations

import numpy as np
import pytest

from nibble.models import ops
from nibble.quant.ggml_exact import batch_kinds

F32, F64 = np.float32, np.float64


def f16(a):
    return np.asarray(a, F32).astype(np.float16).astype(F64)


# ---- RoPE ----

def rope_ref(x, positions, n_heads, head_dim, rope_dim, base, neox):
    """x (B, n_heads*head_dim) rotated in float64: pair i turns by pos * base^(-2i/rope_dim); pairs are
    (2i, 2i+1) (normal) or (i, i + rope_dim/2) (NEOX); dimensions from rope_dim on are left as they are."""
    B, half = x.shape[0], rope_dim // 2
    y = x.astype(F64).reshape(B, n_heads, head_dim)
    i = np.arange(half)
    theta = positions[:, None].astype(F64) * float(base) ** (-2.0 * i / rope_dim)      # (B, half)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    i0, i1 = (i, i + half) if neox else (2 * i, 2 * i + 1)
    x0, x1 = y[..., i0].copy(), y[..., i1].copy()
    y[..., i0] = x0 * c - x1 * s
    y[..., i1] = x0 * s + x1 * c
    return y.reshape(B, -1)


@pytest.mark.parametrize("neox", [False, True], ids=["adjacent", "neox"])
@pytest.mark.parametrize("rope_dim", [64, 32])                   # 32: only part of each head rotates
def test_rope(neox, rope_dim):
    rng = np.random.default_rng(1)
    n_heads, head_dim, base = 3, 64, 10000.0
    positions = np.array([0, 1, 7, 100, 511], np.int64)
    x = rng.standard_normal((len(positions), n_heads * head_dim)).astype(F32)
    out = x.copy()
    cs = np.empty((len(positions), rope_dim), F32)                # the angles, as a forward shares them
    ops.rope_table(cs, positions, rope_dim, base)
    ops.rope_apply(out, cs, n_heads, head_dim, rope_dim, neox)
    ref = rope_ref(x, positions, n_heads, head_dim, rope_dim, base, neox)
    assert np.array_equal(out[0], x[0])                            # position 0: no rotation at all
    # the angle is carried from pair to pair by f32 multiplications (as ggml): its error grows with the
    # position and the pair index, ~1e-7 * pos * i radians
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * np.abs(x).max())
    untouched = np.arange(n_heads * head_dim).reshape(n_heads, head_dim)[:, rope_dim:].reshape(-1)
    assert np.array_equal(out[:, untouched], x[:, untouched])
    # a rotation keeps each pair's length
    pairs = (np.arange(rope_dim // 2), np.arange(rope_dim // 2) + rope_dim // 2) if neox else \
        (np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2))
    lengths = lambda a: np.hypot(*(a.reshape(-1, n_heads, head_dim)[..., p].astype(F64) for p in pairs))  # noqa: E731
    np.testing.assert_allclose(lengths(out), lengths(x), rtol=1e-6)


# ---- norms, activations, bias ----

def test_rmsnorm_heads():
    rng = np.random.default_rng(2)
    B, n_heads, head_dim, eps = 3, 4, 32, 1e-6
    x = (rng.standard_normal((B, n_heads * head_dim)) * 20).astype(F32)
    weight = rng.standard_normal(head_dim).astype(F32)
    out = x.copy()
    ops.rmsnorm_heads(out, weight, n_heads, head_dim, eps)
    heads = x.astype(F64).reshape(B, n_heads, head_dim)
    ref = heads / np.sqrt((heads ** 2).mean(-1, keepdims=True) + eps) * weight
    np.testing.assert_allclose(out.reshape(B, n_heads, head_dim), ref, rtol=1e-6, atol=1e-6)
    # the same arithmetic as the row RMSNorm (bit for bit against llama.cpp in test_exact.py), per head
    rows = np.empty((B * n_heads, head_dim), F32)
    ops.rmsnorm(rows, x.reshape(B * n_heads, head_dim), weight, eps)
    assert np.array_equal(out, rows.reshape(B, -1))


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_gelu_mul():
    rng = np.random.default_rng(3)
    gate = np.concatenate([np.linspace(-12, 12, 1001), rng.standard_normal(1000) * 3,
                           [-10.0, 10.0, -1e-3, 0.0, 1e-3, 30.0, -30.0]]).astype(F32)[None, :]
    up = rng.standard_normal(gate.shape).astype(F32)
    out = gate.copy()
    ops.gelu_mul(out, up)
    g, u = gate.astype(F64), up.astype(F64)
    # ggml (GGML_GELU_FP16): zero from -10 down, the identity from 10 up, between them a table over fp16
    # inputs holding fp16 results; so the error is that of two fp16 roundings, x's and gelu(x)'s
    low, high = g <= -10, g >= 10
    assert np.array_equal(out[low], np.zeros(low.sum(), F32))
    assert np.array_equal(out[high], (gate * up)[high])
    mid = ~(low | high)
    slope = np.abs(np.gradient(gelu_tanh(np.linspace(-10, 10, 20001)), 1e-3)).max()        # |gelu'| <= 1.13
    tolerance = (np.abs(gelu_tanh(g)) * 2.0 ** -11 + slope * np.abs(g) * 2.0 ** -11) * np.abs(u) * 1.01 + 1e-7
    assert (np.abs(out - gelu_tanh(g) * u)[mid] <= tolerance[mid]).all()


def test_add_bias():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 96)).astype(F32)
    bias = rng.standard_normal(96).astype(F32)
    out = x.copy()
    ops.add_bias(out, bias)
    assert np.array_equal(out, x + bias)


# ---- attention ----

def attention_ref(q, k, v, positions, slots, n_head, n_head_kv, head_dim, scale, window):
    """Row b attends to the cached positions j <= p of its slot with p - j < window (window > 0), in float64
    over the fp16 values llama.cpp's arithmetic sees: q, the cache, and the probabilities rounded to fp16."""
    group = n_head // n_head_kv
    out = np.zeros((len(q), n_head * head_dim))
    for b, (p, s) in enumerate(zip(positions, slots)):
        j = np.arange(max(0, p - window + 1) if window > 0 else 0, p + 1)
        for h in range(n_head):
            qh = f16(q[b, h * head_dim:(h + 1) * head_dim])
            kh, vh = k[s, j, h // group].astype(F64), v[s, j, h // group].astype(F64)
            w = kh @ qh * scale
            e = np.exp(w - w.max())
            out[b, h * head_dim:(h + 1) * head_dim] = f16(e / e.sum()) @ vh
    return out


@pytest.mark.parametrize("batch", [1, 6])
def test_attention_with_a_sliding_window(batch):
    """Rows past the window (positions 20.. with a window of 8) in two slots; a single row takes ggml's
    32-lane decode path, a batch the 8-lane one (both held bit for bit in test_exact.py)."""
    rng = np.random.default_rng(5)
    n_head, n_head_kv, head_dim, n_ctx, layer, window, scale = 4, 2, 32, 40, 1, 8, 1 / np.sqrt(32)
    k_cache = np.zeros((2, 2, n_ctx, n_head_kv, head_dim), np.float16)   # the kernels take the halves' bits
    v_cache = np.zeros_like(k_cache)
    n = 32                                                  # positions 0..31 cached in both slots
    for slot in (0, 1):
        k = (rng.standard_normal((n, n_head_kv * head_dim)) * 2).astype(F32)
        v = rng.standard_normal((n, n_head_kv * head_dim)).astype(F32)
        ops.kv_store(k_cache.view(np.uint16), v_cache.view(np.uint16), layer, np.full(n, slot, np.int64),
                     np.arange(n), k, v, n_head_kv, head_dim)
    positions = np.array([31, 20, 25, 31, 7, 26][:batch], np.int64)  # 7: a row that starts inside the window
    slots = np.array([1, 0, 0, 0, 1, 1][:batch], np.int64)
    q = (rng.standard_normal((batch, n_head * head_dim)) * 2).astype(F32)
    kinds = batch_kinds(batch)

    def run(k_cache, v_cache):
        out = np.zeros_like(q)
        ops.attention(out, q, k_cache.view(np.uint16), v_cache.view(np.uint16), layer, slots, positions, kinds,
                      n_head, n_head_kv, head_dim, F32(scale), window)
        return out
    out = run(k_cache, v_cache)
    ref = attention_ref(q, k_cache[:, layer].astype(F32), v_cache[:, layer].astype(F32), positions, slots, n_head,
                        n_head_kv, head_dim, scale, window)
    # f32 sums and ggml's expf (~1 ulp) against float64; the fp16 roundings are in the reference too
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * float(np.abs(v_cache).max()))
    # the cells before each row's window are not read: changing them changes nothing, bit for bit
    stale_k, stale_v = k_cache.copy(), v_cache.copy()
    for s in set(slots.tolist()):
        first = min(max(0, p - window + 1) for p in positions[slots == s])   # the earliest cell read in s
        stale_k[s, layer, :first] = 1e4
        stale_v[s, layer, :first] = np.nan
    assert np.array_equal(run(stale_k, stale_v), out)
    # without the window the far cells do count
    full = np.zeros_like(q)
    ops.attention(full, q, k_cache.view(np.uint16), v_cache.view(np.uint16), layer, slots, positions, kinds, n_head,
                  n_head_kv, head_dim, F32(scale), 0)
    assert not np.allclose(full[positions >= window], out[positions >= window], atol=1e-3)
