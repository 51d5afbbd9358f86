"""The transformer's non-matmul kernels: RMSNorm, RoPE, KV-cache writes, attention, gated activations.

Every kernel works on a batch of B rows, and each row carries its own (slot, position): a prefill chunk is B
consecutive positions of one slot; a batched decode step (the server, later) is B sequences in B slots, one
position each. Output first, arrays and scalars only.

The arithmetic is llama.cpp's (ggml-cpu, x86 AVX2 + FMA build), operation for operation, so that together
with `quant.ggml_exact` a SmolLM2 forward gives llama.cpp's logits bit for bit. Each kernel names the ggml
function it reproduces. They are compiled without fast-math (`exact_kernel`): the order of the f32
operations is what makes them exact.

KV cache layout: k_cache, v_cache (slots, layers, n_ctx, n_head_kv, row), C-contiguous, each head's row of
head_dim values in the cache type: F16 (the default), IEEE halves as llama.cpp's F16 cache holds them,
passed to the kernels as their uint16 bits (Numba has no float16 arithmetic; every load widens them to
float32 exactly, so the arithmetic is llama.cpp's); or Q8_0 (`--cache-type-k/-v q8_0`, uint8), head_dim / 32
blocks of an fp16 scale and 32 int8, read as their dequantized values (about half the memory; llama.cpp's
quantized cache needs its flash-attention path, whose arithmetic nibble does not reproduce). The kernels
take either, by the array's dtype (`cell_store`, `cell8`, `cell1`).
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from ..quant.ggml_exact import ROW_BATCHED, get_lane
from ..quant.jit import EXACT_OPTIONS, exact_kernel, exact_parallel_kernel, kernel
from ..quant.simd import (at, fma1, fma8, hadd8x8, half_bits, half_to_float, halves8, hsum8, hsum8_hadd, hsum8x8,
                          i8x8_at, load_f16, load_f32x8, max8, round_f16, round_f16x8, splat, store_f32x8, v_expf, v_expf8,
                          zeros)

f32 = np.float32


@exact_kernel
def _rms_scale(total, n, eps):
    """ggml_compute_forward_rms_norm_f32's scale from the double sum of the squares: mean = (float)(sum / n);
    scale = 1.0f / sqrtf(mean + eps)."""
    mean = f32(total / n)
    # sqrt in double then rounded is sqrtf: both are correctly rounded, and 53 >= 2 * 24 + 2
    return f32(1) / f32(math.sqrt(mean + f32(eps)))


@exact_kernel
def _rms_scale_row(xf, o, scale, weight, n):
    """xf[o : o + n] = (xf[o : o + n] * scale) * weight, each product rounded."""
    n8 = n - n % 8
    for i in range(0, n8, 8):
        store_f32x8(xf, o + i, (load_f32x8(xf, o + i) * scale) * load_f32x8(weight, i))
    for i in range(n8, n):
        xf[o + i] = (xf[o + i] * scale) * weight[i]


@exact_kernel
def _rms_normalize(x, weight, units, n_units, head_dim, eps):
    """In place: each unit u < n_units, the head_dim values of x (B, n) from flat column units * head_dim
    (a row, or one head of a row), becomes x / sqrt(mean(x²) + eps) * weight (head_dim,). As ggml: each
    square rounded to f32 and summed in order in double, then x * scale rounded before a separate mul by the
    weight. Four units at a time: their sums are independent chains, so the additions overlap."""
    xf = x.reshape(-1)
    n = x.shape[1]
    u = 0
    while u < n_units:
        m = min(4, n_units - u)
        o0 = (u // units) * n + (u % units) * head_dim
        o1 = ((u + 1) // units) * n + ((u + 1) % units) * head_dim if m > 1 else o0
        o2 = ((u + 2) // units) * n + ((u + 2) % units) * head_dim if m > 2 else o0
        o3 = ((u + 3) // units) * n + ((u + 3) % units) * head_dim if m > 3 else o0
        t0, t1, t2, t3 = 0.0, 0.0, 0.0, 0.0
        for i in range(head_dim):
            v0, v1, v2, v3 = at(xf, o0 + i), at(xf, o1 + i), at(xf, o2 + i), at(xf, o3 + i)
            t0 += np.float64(v0 * v0)
            t1 += np.float64(v1 * v1)
            t2 += np.float64(v2 * v2)
            t3 += np.float64(v3 * v3)
        s0, s1, s2, s3 = _rms_scale(t0, head_dim, eps), _rms_scale(t1, head_dim, eps), _rms_scale(t2, head_dim, eps), \
            _rms_scale(t3, head_dim, eps)
        _rms_scale_row(xf, o0, s0, weight, head_dim)
        if m > 1:
            _rms_scale_row(xf, o1, s1, weight, head_dim)
        if m > 2:
            _rms_scale_row(xf, o2, s2, weight, head_dim)
        if m > 3:
            _rms_scale_row(xf, o3, s3, weight, head_dim)
        u += m


@exact_kernel
def rmsnorm(out, x, weight, eps):
    """out[b] = x[b] / sqrt(mean(x[b]²) + eps) * weight, for rows of x (B, n); weight (n,); out may be x.
    As ggml: rms_norm rounds x * scale, then a separate mul by the weight rounds again."""
    if not (out.ctypes.data == x.ctypes.data):
        for b in range(x.shape[0]):     # (not `out[:] = x`: its shape-mismatch message costs 1.3 s to compile)
            for i in range(x.shape[1]):
                out[b, i] = x[b, i]
    _rms_normalize(out, weight, 1, x.shape[0], x.shape[1], eps)


@exact_kernel
def rmsnorm_heads(x, weight, n_heads, head_dim, eps):
    """In place, per head: x (B, n_heads*head_dim) viewed as (B, n_heads, head_dim), each head-vector
    RMS-normalised and scaled by weight (head_dim,) — Gemma 3's q/k norms."""
    _rms_normalize(x, weight, n_heads, x.shape[0] * n_heads, head_dim, eps)


@exact_kernel
def rope_table(cs, positions, rope_dim, base):
    """cs[b, :rope_dim/2] = cos, cs[b, rope_dim/2:rope_dim] = sin of the angles of row b (position
    positions[b]), once for every layer and head that rotates by them (llama.cpp's rope cache).

    As ggml_rope_cache_init: theta_scale = powf(base, -2.0f / n_dims); the angle starts at the position and
    is multiplied by theta_scale in f32 from pair to pair; cos and sin are libm's cosf and sinf (Numba lowers
    math.cos of a float32 to llvm.cos.f32, a call to cosf; llvm.pow.f32 is powf)."""
    half = rope_dim // 2
    theta_scale = f32(base) ** (f32(-2.0) / f32(rope_dim))
    for b in range(positions.shape[0]):
        theta = f32(positions[b])
        for i in range(half):
            cs[b, i] = math.cos(theta)
            cs[b, half + i] = math.sin(theta)
            theta = theta * theta_scale


@exact_kernel
def rope_apply(x, cs, n_heads, head_dim, rope_dim, neox):
    """Rotary position embedding in place on x (B, n_heads*head_dim), row b by the angles of cs[b]
    (`rope_table`). Pair i (i < rope_dim/2) rotates by angle pos * base^(-2i/rope_dim). llama.cpp's two
    layouts: normal (llama: GGUF conversion permuted Q/K so pairs are adjacent, (2i, 2i+1)) and NEOX (qwen2,
    gemma3: pairs are (i, i + rope_dim/2), HF's rotate_half). As rotate_pairs, GCC contracting x0*cos - x1*sin
    into fma(x0, cos, -(x1*sin)) and x0*sin + x1*cos into fma(x0, sin, x1*cos)."""
    B = x.shape[0]
    half = rope_dim // 2
    for b in range(B):
        for h in range(n_heads):
            o = h * head_dim
            for i in range(half):
                c = cs[b, i]
                s = cs[b, half + i]
                if neox:
                    i0, i1 = o + i, o + i + half
                else:
                    i0, i1 = o + 2 * i, o + 2 * i + 1
                x0 = x[b, i0]
                x1 = x[b, i1]
                x[b, i0] = fma1(x0, c, -(x1 * s))
                x[b, i1] = fma1(x0, s, x1 * c)


# ---- KV cache cells: F16 (uint16 bits) or Q8_0 blocks (uint8), by the cache array's dtype ----

Q8_0_BLOCK = 34        # bytes per 32 values: fp16 scale, 32 int8


def cell_store(cache, s, layer, p, h, x, o, head_dim):
    """cache[s, layer, p, h] = x[o:o + head_dim] in the cache's type (Numba only, by overload)."""
    raise NotImplementedError


def cell8(cache, base, i):
    """F32x8 of values i..i+7 of the head row at flat index `base` of the flattened cache (Numba only)."""
    raise NotImplementedError


def cell1(cache, base, i):
    """Value i of the head row at flat index `base` of the flattened cache, as float32 (Numba only)."""
    raise NotImplementedError


@overload(cell_store, jit_options=EXACT_OPTIONS)
def _cell_store(cache, s, layer, p, h, x, o, head_dim):
    if cache.dtype == types.uint16:
        def store_f16(cache, s, layer, p, h, x, o, head_dim):
            for i in range(head_dim):     # rounded as llama.cpp's F16 cache stores them
                cache[s, layer, p, h, i] = np.uint16(half_bits(x[o + i]))
        return store_f16

    def store_q8_0(cache, s, layer, p, h, x, o, head_dim):
        # quantize_row_q8_0 (x86): d = max |x| / 127, q = round(x · (127 / max |x|)) (ties to even), d stored
        # as fp16
        for blk in range(head_dim // 32):
            e, c = o + 32 * blk, Q8_0_BLOCK * blk
            amax = f32(0)
            for j in range(32):
                amax = max(amax, abs(x[e + j]))
            inv = f32(127) / amax if amax != f32(0) else f32(0)
            bits = half_bits(amax / f32(127))
            cache[s, layer, p, h, c] = np.uint8(bits & 0xFF)
            cache[s, layer, p, h, c + 1] = np.uint8(bits >> 8)
            for j in range(32):
                cache[s, layer, p, h, c + 2 + j] = np.uint8(np.int64(np.rint(x[e + j] * inv)) & 0xFF)
    return store_q8_0


@overload(cell8, jit_options=EXACT_OPTIONS)
def _cell8(cache, base, i):
    if cache.dtype == types.uint16:
        return lambda cache, base, i: halves8(cache, base + i)

    def q8_0_values(cache, base, i):
        c = base + Q8_0_BLOCK * (i // 32)
        return splat(load_f16(cache, c)) * i8x8_at(cache, c + 2 + i % 32)
    return q8_0_values


@overload(cell1, jit_options=EXACT_OPTIONS)
def _cell1(cache, base, i):
    if cache.dtype == types.uint16:
        return lambda cache, base, i: half_to_float(cache[base + i])

    def q8_0_value(cache, base, i):
        c = base + Q8_0_BLOCK * (i // 32)
        return load_f16(cache, c) * f32(np.int8(cache[c + 2 + i % 32]))
    return q8_0_value


@exact_kernel
def kv_store(k_cache, v_cache, layer, slots, positions, k, v, n_head_kv, head_dim):
    """Write rows of k, v (B, n_head_kv*head_dim) into the caches at (slots[b], layer, positions[b]), each
    in its cache's type."""
    for b in range(k.shape[0]):
        s, p = slots[b], positions[b]
        for h in range(n_head_kv):
            cell_store(k_cache, s, layer, p, h, k[b], h * head_dim, head_dim)
            cell_store(v_cache, s, layer, p, h, v[b], h * head_dim, head_dim)


# ---- attention ----
#
# llama.cpp without flash attention computes kq = K·Q, a softmax, and kqv = V·P as F16 matmuls whose lane
# structure depends on how many query rows the batch has. With 2 or more, llamafile's tinyBLAS<F16>: 8 f32
# lanes, lane l taking k = l, l+8, l+16, ..., summed by hsum_float_8. With one (decode), tinyBLAS declines
# (n < 2) and ggml_vec_dot_f16 runs: 32 lanes in four 8-wide accumulators, lane L taking k = L, L+32, ...,
# reduced by GGML_F32x8_REDUCE. The reduction runs over the head dimension for kq and over the KV cells for
# kqv; cell indices are absolute (cell = position), and masked cells add exact zeros, so they are skipped.


@exact_kernel
def _kq_8(k, kb, q16, head_dim):
    """K[cell]·q16 for the cached key at flat element index kb of k (the cache, flattened), in 8 lanes (a
    batched row)."""
    n8 = head_dim - head_dim % 8
    a = zeros()
    for i in range(0, n8, 8):
        a = fma8(cell8(k, kb, i), load_f32x8(q16, i), a)
    r = hsum8(a)
    for i in range(n8, head_dim):          # (tinyBLAS needs head_dim % 8 == 0; not llama.cpp's order here)
        r = fma1(cell1(k, kb, i), q16[i], r)
    return r


@exact_kernel
def _kq_32(k, kb, q16, head_dim):
    """`_kq_8` in 32 lanes (the row of a single-row batch)."""
    n32 = head_dim - head_dim % 32
    total = np.float64(hsum8_hadd(_kq_lanes32(k, kb, q16, n32)))
    for i in range(n32, head_dim):         # ggml_vec_dot_f16's leftovers: each product added in double
        total += np.float64(cell1(k, kb, i) * q16[i])
    return f32(total)


@exact_kernel
def _kq_lanes32(k, kb, q16, n):
    """ggml_vec_dot_f16's four 8-wide accumulators over values 0 .. n - 1 (n a multiple of 32) of one key,
    combined as GGML_F32x8_REDUCE begins: (S0 + S2) + (S1 + S3)."""
    s0, s1, s2, s3 = zeros(), zeros(), zeros(), zeros()
    for i in range(0, n, 32):
        s0 = fma8(cell8(k, kb, i), load_f32x8(q16, i), s0)
        s1 = fma8(cell8(k, kb, i + 8), load_f32x8(q16, i + 8), s1)
        s2 = fma8(cell8(k, kb, i + 16), load_f32x8(q16, i + 16), s2)
        s3 = fma8(cell8(k, kb, i + 24), load_f32x8(q16, i + 24), s3)
    return (s0 + s2) + (s1 + s3)


@exact_kernel
def _kq8_8(k, kb, cell, q16, head_dim):
    """`_kq_8` for the eight cached keys at kb, kb + cell, ..., kb + 7 cell, as F32x8 (lane t: key t), each
    key's arithmetic unchanged: their chains side by side and their reductions done together (head_dim a
    multiple of 8)."""
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    a4, a5, a6, a7 = zeros(), zeros(), zeros(), zeros()
    for i in range(0, head_dim, 8):
        qv = load_f32x8(q16, i)
        a0 = fma8(cell8(k, kb, i), qv, a0)
        a1 = fma8(cell8(k, kb + cell, i), qv, a1)
        a2 = fma8(cell8(k, kb + 2 * cell, i), qv, a2)
        a3 = fma8(cell8(k, kb + 3 * cell, i), qv, a3)
        a4 = fma8(cell8(k, kb + 4 * cell, i), qv, a4)
        a5 = fma8(cell8(k, kb + 5 * cell, i), qv, a5)
        a6 = fma8(cell8(k, kb + 6 * cell, i), qv, a6)
        a7 = fma8(cell8(k, kb + 7 * cell, i), qv, a7)
    return hsum8x8(a0, a1, a2, a3, a4, a5, a6, a7)


@exact_kernel
def _kq8_32(k, kb, cell, q16, head_dim):
    """`_kq_32` for eight cached keys (head_dim a multiple of 32), as `_kq8_8`."""
    return hadd8x8(_kq_lanes32(k, kb, q16, head_dim), _kq_lanes32(k, kb + cell, q16, head_dim),
                   _kq_lanes32(k, kb + 2 * cell, q16, head_dim), _kq_lanes32(k, kb + 3 * cell, q16, head_dim),
                   _kq_lanes32(k, kb + 4 * cell, q16, head_dim), _kq_lanes32(k, kb + 5 * cell, q16, head_dim),
                   _kq_lanes32(k, kb + 6 * cell, q16, head_dim), _kq_lanes32(k, kb + 7 * cell, q16, head_dim))


@exact_kernel
def _first_cell(p, window):
    """The first cached cell a row at position p attends to: 0, or with a sliding window p - window + 1."""
    return p - window + 1 if window > 0 and p - window + 1 > 0 else 0


@exact_kernel
def _softmax(sc, g0, j0, p, n_sc):
    """sc[0:n_sc] (cells g0 ..) := p16, ggml_vec_soft_max_f32 over the unmasked cells j0 .. p then each
    probability rounded to fp16: exp per cell, Σ in double of each 8-group's hsum_float_8 (masked cells
    are 0)."""
    mx = f32(-np.inf)
    t = j0 - g0
    if t + 8 <= p + 1 - g0:                 # (the maximum is exact in any order)
        mv = load_f32x8(sc, t)
        t += 8
        while t + 8 <= p + 1 - g0:
            mv = max8(mv, load_f32x8(sc, t))
            t += 8
        for i in range(8):
            mx = max(mx, get_lane(mv, i))
    for t in range(t, p + 1 - g0):
        mx = max(mx, sc[t])
    total = 0.0
    for g in range(0, n_sc, 8):
        if j0 <= g0 + g and g0 + g + 7 <= p:
            e = v_expf8(load_f32x8(sc, g) - mx)
            store_f32x8(sc, g, e)
            total += np.float64(hsum8(e))
            continue
        for t in range(8):
            j = g0 + g + t
            sc[g + t] = v_expf(sc[g + t] - mx) if j0 <= j and j <= p else f32(0)
        total += np.float64(_reduce8(sc, g, 1))
    inv = f32(1.0 / total)
    for t in range(0, n_sc, 8):
        store_f32x8(sc, t, round_f16x8(load_f32x8(sc, t) * inv))


@exact_kernel
def _kqv_groups(acc, sc, g0, vf, vbase, vcell, g_first, g_end, step, a, d0, d1):
    """Σ p16[j] V[j] for the output values d0 .. d1 - 1 (d1 - d0 = n, a multiple of 8) into the eight lane
    rows acc[a : a + 8 n] for the keys of the 8-cell groups g_first, g_first + step, ... < g_end (key 8g + t
    in lane row t, in order of g): each lane row's fma chain is the one the per-key loop makes, with the
    eight rows held in registers for 8 values at a time instead of loaded and stored per key. sc[j - g0]:
    p16 of cell j."""
    n = d1 - d0
    for i in range(d0, d1, 8):
        r = a + i - d0
        c0, c1 = load_f32x8(acc, r), load_f32x8(acc, r + n)
        c2, c3 = load_f32x8(acc, r + 2 * n), load_f32x8(acc, r + 3 * n)
        c4, c5 = load_f32x8(acc, r + 4 * n), load_f32x8(acc, r + 5 * n)
        c6, c7 = load_f32x8(acc, r + 6 * n), load_f32x8(acc, r + 7 * n)
        for g in range(g_first, g_end, step):
            j = 8 * g
            vb = vbase + j * vcell
            c0 = fma8(splat(at(sc, j - g0)), cell8(vf, vb, i), c0)
            c1 = fma8(splat(at(sc, j - g0 + 1)), cell8(vf, vb + vcell, i), c1)
            c2 = fma8(splat(at(sc, j - g0 + 2)), cell8(vf, vb + 2 * vcell, i), c2)
            c3 = fma8(splat(at(sc, j - g0 + 3)), cell8(vf, vb + 3 * vcell, i), c3)
            c4 = fma8(splat(at(sc, j - g0 + 4)), cell8(vf, vb + 4 * vcell, i), c4)
            c5 = fma8(splat(at(sc, j - g0 + 5)), cell8(vf, vb + 5 * vcell, i), c5)
            c6 = fma8(splat(at(sc, j - g0 + 6)), cell8(vf, vb + 6 * vcell, i), c6)
            c7 = fma8(splat(at(sc, j - g0 + 7)), cell8(vf, vb + 7 * vcell, i), c7)
        store_f32x8(acc, r, c0)
        store_f32x8(acc, r + n, c1)
        store_f32x8(acc, r + 2 * n, c2)
        store_f32x8(acc, r + 3 * n, c3)
        store_f32x8(acc, r + 4 * n, c4)
        store_f32x8(acc, r + 5 * n, c5)
        store_f32x8(acc, r + 6 * n, c6)
        store_f32x8(acc, r + 7 * n, c7)


@exact_kernel
def _kqv_cell(acc, pj, vf, vb, a, d0, d1):
    """acc[a : a + d1 - d0] += pj · V[d0:d1] (of the cached value row at flat index vb), one fma per element."""
    n8 = d0 + (d1 - d0) // 8 * 8
    for i in range(d0, n8, 8):
        store_f32x8(acc, a + i - d0, fma8(splat(pj), cell8(vf, vb, i), load_f32x8(acc, a + i - d0)))
    for i in range(n8, d1):
        acc[a + i - d0] = fma1(pj, cell1(vf, vb, i), acc[a + i - d0])


@exact_kernel
def _reduce8x8(acc, i, n):
    """hsum_float_8 over the 8 lane rows acc[L * n + i .. + 8], for 8 output elements at once."""
    r0 = load_f32x8(acc, 4 * n + i) + load_f32x8(acc, i)
    r1 = load_f32x8(acc, 5 * n + i) + load_f32x8(acc, n + i)
    r2 = load_f32x8(acc, 6 * n + i) + load_f32x8(acc, 2 * n + i)
    r3 = load_f32x8(acc, 7 * n + i) + load_f32x8(acc, 3 * n + i)
    return (r0 + r2) + (r1 + r3)


@exact_kernel
def _reduce8(acc, i, n):
    """hsum_float_8 of element i over the 8 lane rows acc[L * n + i] (n = 1: of acc[i : i + 8]): ((a4 + a0) +
    (a6 + a2)) + ((a5 + a1) + (a7 + a3))."""
    r0 = acc[4 * n + i] + acc[i]
    r1 = acc[5 * n + i] + acc[n + i]
    r2 = acc[6 * n + i] + acc[2 * n + i]
    r3 = acc[7 * n + i] + acc[3 * n + i]
    return (r0 + r2) + (r1 + r3)


@exact_kernel
def _reduce32x8(acc, i, n):
    """`_reduce32` for the 8 output elements i .. i + 7 at once."""
    a0 = (load_f32x8(acc, i) + load_f32x8(acc, 16 * n + i)) + (load_f32x8(acc, 8 * n + i) + load_f32x8(acc, 24 * n + i))
    a1 = (load_f32x8(acc, n + i) + load_f32x8(acc, 17 * n + i)) + (load_f32x8(acc, 9 * n + i) + load_f32x8(acc, 25 * n + i))
    a2 = (load_f32x8(acc, 2 * n + i) + load_f32x8(acc, 18 * n + i)) + (load_f32x8(acc, 10 * n + i) + load_f32x8(acc, 26 * n + i))
    a3 = (load_f32x8(acc, 3 * n + i) + load_f32x8(acc, 19 * n + i)) + (load_f32x8(acc, 11 * n + i) + load_f32x8(acc, 27 * n + i))
    a4 = (load_f32x8(acc, 4 * n + i) + load_f32x8(acc, 20 * n + i)) + (load_f32x8(acc, 12 * n + i) + load_f32x8(acc, 28 * n + i))
    a5 = (load_f32x8(acc, 5 * n + i) + load_f32x8(acc, 21 * n + i)) + (load_f32x8(acc, 13 * n + i) + load_f32x8(acc, 29 * n + i))
    a6 = (load_f32x8(acc, 6 * n + i) + load_f32x8(acc, 22 * n + i)) + (load_f32x8(acc, 14 * n + i) + load_f32x8(acc, 30 * n + i))
    a7 = (load_f32x8(acc, 7 * n + i) + load_f32x8(acc, 23 * n + i)) + (load_f32x8(acc, 15 * n + i) + load_f32x8(acc, 31 * n + i))
    return ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))


@exact_kernel
def _reduce32(acc, i, n):
    """GGML_F32x8_REDUCE of element i over 32 lanes acc[L * n + i] (four accumulators S0..S3 of 8 lanes):
    A_l = (S0_l + S2_l) + (S1_l + S3_l), t_l = A_l + A_l+4, result (t0 + t1) + (t2 + t3)."""
    a0 = (acc[i] + acc[16 * n + i]) + (acc[8 * n + i] + acc[24 * n + i])
    a1 = (acc[n + i] + acc[17 * n + i]) + (acc[9 * n + i] + acc[25 * n + i])
    a2 = (acc[2 * n + i] + acc[18 * n + i]) + (acc[10 * n + i] + acc[26 * n + i])
    a3 = (acc[3 * n + i] + acc[19 * n + i]) + (acc[11 * n + i] + acc[27 * n + i])
    a4 = (acc[4 * n + i] + acc[20 * n + i]) + (acc[12 * n + i] + acc[28 * n + i])
    a5 = (acc[5 * n + i] + acc[21 * n + i]) + (acc[13 * n + i] + acc[29 * n + i])
    a6 = (acc[6 * n + i] + acc[22 * n + i]) + (acc[14 * n + i] + acc[30 * n + i])
    a7 = (acc[7 * n + i] + acc[23 * n + i]) + (acc[15 * n + i] + acc[31 * n + i])
    return ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))


ATTENTION_GROUPED_ROWS = 4   # from this many rows, one attention task takes all query heads of a K/V head
GROUPED_MIN_CELLS = 1024     # ... and from this many cells attended to, with a task for each thread or more
KQ8_LANES32_MAX_DIM = 64     # longer heads: 8 keys' 32-lane accumulators at once would not fit the registers
CELL_BLOCK_BYTES = 1 << 14   # the cached rows one pass of a task's heads over them reads (they stay in L1)
SPLIT_MIN_CELLS = 2048       # single-row rows over this many cells, where the K/V heads do not fill the threads evenly:
                             # each head's scores and outputs split between tasks (`_attention_split`)
_ROW0 = np.zeros(1, np.int64)


def attention(out, q, k_cache, v_cache, layer, slots, positions, kinds, n_head, n_head_kv, head_dim, scale, window):
    """Causal multi-head attention with grouped K/V heads, for rows q (B, n_head*head_dim) -> out (same).
    Row b (slot s, position p) attends to cached positions j <= p of slot s, and with a sliding window
    (window > 0) only to p - j < window (llama.cpp's standard SWA mask).

    As llama.cpp without flash attention: q rounded to fp16; kq[j] = K[j]·q16 (lanes above), times scale;
    softmax as ggml_compute_forward_soft_max_f32: e = ggml_v_expf(w - max), the denominator a double sum of
    each 8-cell group's hsum_float_8, p = e * (float)(1.0 / sum) rounded to fp16; out = Σ_j p16[j] V[j]
    (lanes above), with 8 lanes for a row of kind ROW_BATCHED (a batch of 2 or more) and 32 for a row of a
    single-row batch. The two lane structures are two kernels (`_attention_kernel`), each compiled when a
    row of its kind first comes (a prompt needs only the batched one, so a cold start compiles less before
    the first token); a batch that mixes both kinds runs each kernel on its rows."""
    args = (out, q, k_cache, v_cache, layer, slots, positions)
    shape = (n_head, n_head_kv, head_dim, scale, window)
    if kinds.shape[0] == 1:
        batched = bool(kinds[0] & ROW_BATCHED)
        parts = 0 if batched else _split_parts(k_cache, v_cache, positions, _ROW0, n_head_kv, head_dim, window)
        if parts:
            _attention_split(*args, _ROW0, *shape, parts)
        else:
            _attention_kernel(batched)(*args, _ROW0, *shape)
        return
    for kind, rows, parts in _attention_plan(k_cache, v_cache, positions, kinds, n_head_kv, head_dim, window):
        if parts:
            _attention_split(*args, rows, *shape, parts)
        else:
            _attention_kernel(kind)(*args, rows, *shape)


_plans: tuple = (None, {})


def _attention_plan(k_cache, v_cache, positions, kinds, n_head_kv, head_dim, window) -> list:
    """[(batched, rows, parts)]: the rows of each lane structure and how `_split_parts` splits them. The same
    for every layer of a forward (per window): kept for the last rows seen, so that a step of several rows
    pays the numpy calls that find them once, not once a layer (they cost as much as the kernel itself on
    a few decode rows)."""
    global _plans
    key = (kinds.tobytes(), positions.tobytes(), numba.get_num_threads(), k_cache.dtype.char, v_cache.dtype.char,
           n_head_kv, head_dim)
    cached = _plans
    if cached[0] != key:
        cached = _plans = (key, {})
    plan = cached[1].get(window)
    if plan is None:
        plan = []
        batched = (kinds & ROW_BATCHED) != 0
        for kind in (True, False):
            rows = np.flatnonzero(batched == kind)
            if rows.size:
                parts = 0 if kind else _split_parts(k_cache, v_cache, positions, rows, n_head_kv, head_dim, window)
                plan.append((kind, rows, parts))
        cached[1][window] = plan
    return plan


def _split_parts(k_cache, v_cache, positions, rows, n_head_kv, head_dim, window) -> int:
    """Into how many parts `_attention_split` splits each K/V head of these single-row rows (0: not at all,
    `_attend_single` takes each K/V head in one task). Only where the rows attend to SPLIT_MIN_CELLS or more
    (below, the two extra parallel regions cost more than they save), the heads do not share the threads out
    evenly (SmolLM2's 3 K/V heads on 2 threads: one thread did two of the three), the cache is f16 and each
    part holds whole 8-value groups of 32-lane rows."""
    if head_dim % 32 or k_cache.dtype != np.uint16 or v_cache.dtype != np.uint16:
        return 0
    span = (int(positions[rows[0]]) if len(rows) == 1 else int(positions[rows].max())) + 1
    if window > 0:
        span = min(span, window)
    if span < SPLIT_MIN_CELLS:
        return 0
    threads = numba.get_num_threads()
    if (len(rows) * n_head_kv) % threads == 0:
        return 0
    return min(threads, head_dim // 8)


def _make_attend(batched: bool):
    """`_attend_batched` / `_attend_single`: the per-task body for one lane structure, 8 lanes (batched
    rows) or 32. BATCHED is a constant in its code, so Numba prunes the other structure's branches and
    compiles only this one's helpers (as in `quant.ggml_exact._typed`; Numba's cache keys each on it)."""
    BATCHED = batched
    N_LANES = 8 if batched else 32

    @exact_kernel
    def attend(out, q, kf, vf, layer, k_shape, v_shape, slots, positions, b, h0, nh, group, head_dim, scale,
               window):
        """`attention` for row b and the query heads h0 .. h0 + nh - 1, which share one K/V head (a function of
        its own: Numba compiles a small parallel loop around it much faster than one around the whole body).
        kf, vf: the caches flattened, of shapes k_shape, v_shape (slots, layers, n_ctx, n_head_kv, row).

        Every head's arithmetic is llama.cpp's per cell and per lane, in its order; what is shared is the
        loads: eight cells at a time where the lanes allow (head_dim a multiple of the lane count), and the
        heads take turns over blocks of cells small enough to stay in L1."""
        grouped = head_dim % N_LANES == 0
        eight_keys = grouped and (BATCHED or head_dim <= KQ8_LANES32_MAX_DIM)
        n8 = head_dim - head_dim % 8
        s, p = slots[b], positions[b]
        j0 = _first_cell(p, window)
        g0 = j0 // 8 * 8                        # scores are kept for whole 8-cell groups, g0 .. p
        n_sc = p // 8 * 8 + 8 - g0
        # per head: q16 | scores (p16 after the softmax) | N_LANES rows of head_dim accumulators
        per_head = head_dim + n_sc + N_LANES * head_dim
        buf = np.empty(nh * per_head, np.float32)
        qb = q[b]
        for t in range(nh):
            o = (h0 + t) * head_dim
            for i in range(0, n8, 8):
                store_f32x8(buf, t * per_head + i, round_f16x8(load_f32x8(qb, o + i)))
            for i in range(n8, head_dim):
                buf[t * per_head + i] = round_f16(qb[o + i])
        # flat index of this K/V head's row at cell 0, and from one cell to the next, in each cache
        kcell, vcell = k_shape[3] * k_shape[4], v_shape[3] * v_shape[4]
        base = ((s * k_shape[1] + layer) * k_shape[2]) * kcell + (h0 // group) * k_shape[4]
        vbase = ((s * v_shape[1] + layer) * v_shape[2]) * vcell + (h0 // group) * v_shape[4]
        quarters = N_LANES // 8
        cells = max(32 * quarters, CELL_BLOCK_BYTES // (2 * head_dim) // (8 * quarters) * (8 * quarters))
        # kq, scaled (ggml_vec_scale_f32): the heads in turn over blocks of cells, eight cells at a time
        for jb in range(j0, p + 1, cells):
            je = min(p + 1, jb + cells)
            for t in range(nh):
                q16 = buf[t * per_head:t * per_head + head_dim]
                sc = buf[t * per_head + head_dim:t * per_head + head_dim + n_sc]
                j = jb
                if eight_keys:
                    while j + 8 <= je:
                        if BATCHED:
                            w = _kq8_8(kf, base + j * kcell, kcell, q16, head_dim)
                        else:
                            w = _kq8_32(kf, base + j * kcell, kcell, q16, head_dim)
                        store_f32x8(sc, j - g0, w * scale)
                        j += 8
                while j < je:
                    if BATCHED:
                        sc[j - g0] = _kq_8(kf, base + j * kcell, q16, head_dim) * scale
                    else:
                        sc[j - g0] = _kq_32(kf, base + j * kcell, q16, head_dim) * scale
                    j += 1
        for t in range(nh):
            _softmax(buf[t * per_head + head_dim:t * per_head + head_dim + n_sc], g0, j0, p, n_sc)
            buf[t * per_head + head_dim + n_sc:(t + 1) * per_head] = 0
        # kqv: lane (j mod N_LANES) of each output element accumulates p16[j] * V[j] over the cells in order;
        # the whole 8-cell groups by `_kqv_groups`, a quarter of the 32 lanes at a time (each quarter's
        # cells are its own), the cells before and after them one at a time
        ga = min(p + 1, (j0 + 7) // 8 * 8)
        gb = (p + 1) // 8 * 8
        if not grouped or gb <= ga:
            ga = gb = p + 1
        for t in range(nh):
            sc = buf[t * per_head + head_dim:t * per_head + head_dim + n_sc]
            acc = buf[t * per_head + head_dim + n_sc:(t + 1) * per_head]
            for j in range(j0, ga):
                _kqv_cell(acc, sc[j - g0], vf, vbase + j * vcell, (j % N_LANES) * head_dim, 0, head_dim)
        for blk in range(ga // 8, gb // 8, cells // 8):
            blk_end = min(gb // 8, blk + cells // 8)
            for t in range(nh):
                sc = buf[t * per_head + head_dim:t * per_head + head_dim + n_sc]
                acc = buf[t * per_head + head_dim + n_sc:(t + 1) * per_head]
                for quarter in range(quarters):
                    g_first = blk + (quarter - blk) % quarters
                    if g_first < blk_end:
                        _kqv_groups(acc, sc, g0, vf, vbase, vcell, g_first, blk_end, quarters,
                                    8 * quarter * head_dim, 0, head_dim)
        ob = out[b]
        for t in range(nh):
            o = (h0 + t) * head_dim
            sc = buf[t * per_head + head_dim:t * per_head + head_dim + n_sc]
            acc = buf[t * per_head + head_dim + n_sc:(t + 1) * per_head]
            for j in range(gb, p + 1):
                _kqv_cell(acc, sc[j - g0], vf, vbase + j * vcell, (j % N_LANES) * head_dim, 0, head_dim)
            # the lane rows reduced as llama.cpp reduces them, 8 output values at a time
            for i in range(0, n8, 8):
                if BATCHED:
                    store_f32x8(ob, o + i, _reduce8x8(acc, i, head_dim))
                else:
                    store_f32x8(ob, o + i, _reduce32x8(acc, i, head_dim))
            for i in range(n8, head_dim):
                if BATCHED:
                    ob[o + i] = _reduce8(acc, i, head_dim)
                else:
                    ob[o + i] = _reduce32(acc, i, head_dim)

    return attend


_attend_batched = _make_attend(True)
_attend_single = _make_attend(False)


@functools.cache
def _attention_kernel(batched: bool):
    """The parallel attention kernel over rows of one lane structure (see `_make_attend`); compiled when a
    row of that kind first comes."""
    BATCHED = batched

    @exact_parallel_kernel
    def attention_rows(out, q, k_cache, v_cache, layer, slots, positions, rows, n_head, n_head_kv, head_dim,
                       scale, window):
        """`attention` for the rows `rows` of q, all of this kernel's kind. One task per row and K/V head (the
        query heads that share it read each cached row once), or per row and query head for fewer rows
        than ATTENTION_GROUPED_ROWS (to leave the threads work) unless the rows attend to a long cache, whose
        reads from memory then cost more than the threads' uneven shares."""
        B = rows.shape[0]
        group = n_head // n_head_kv
        span = 0                 # the most cells a row attends to
        for i in range(B):
            p = positions[rows[i]] + 1
            span = max(span, min(p, window) if window > 0 else p)
        grouped = B >= ATTENTION_GROUPED_ROWS or (B * n_head_kv >= 2 and span >= GROUPED_MIN_CELLS)
        per_task = group if grouped else 1
        tasks_per_row = n_head // per_task
        kf = k_cache.reshape(-1)
        vf = v_cache.reshape(-1)
        scale = f32(scale)
        # Numba hands each thread an equal run of the tasks, and a prompt's later rows attend to more cells:
        # rows are taken from both ends in turn (0, B-1, 1, B-2, ...) so that every run holds an equal share
        for t in prange(B * tasks_per_row):
            i = t // tasks_per_row
            b = rows[i // 2] if i % 2 == 0 else rows[B - 1 - i // 2]
            if BATCHED:
                _attend_batched(out, q, kf, vf, layer, k_cache.shape, v_cache.shape, slots, positions, b,
                                (t % tasks_per_row) * per_task, per_task, group, head_dim, scale, window)
            else:
                _attend_single(out, q, kf, vf, layer, k_cache.shape, v_cache.shape, slots, positions, b,
                               (t % tasks_per_row) * per_task, per_task, group, head_dim, scale, window)

    attention_rows.compiles_slowly = True    # ~6 s cold: `runtime.precompile` hands it to its helper first
    return attention_rows


@exact_parallel_kernel
def _attention_split(out, q, k_cache, v_cache, layer, slots, positions, rows, n_head, n_head_kv, head_dim, scale,
                     window, n_parts):
    """`attention` for single-row-kind rows over long caches (head_dim a multiple of 32), each row's K/V
    heads in n_parts tasks per phase so that a few heads keep every thread busy: the scores by ranges of
    cells, then the softmax per head, then Σ p16[j] V[j] by ranges of output values. Every value is computed
    as `_attend_single` computes it (a key's score is its own; an output value's 32 lane chains run over
    all cells in order), so the results are the same bits."""
    B = rows.shape[0]
    group = n_head // n_head_kv
    kf = k_cache.reshape(-1)
    vf = v_cache.reshape(-1)
    kcell, vcell = k_cache.shape[3] * k_cache.shape[4], v_cache.shape[3] * v_cache.shape[4]
    scale = f32(scale)
    n_sc = 0
    for i in range(B):
        n_sc = max(n_sc, positions[rows[i]] // 8 * 8 + 8)
    sc_all = np.empty((B, n_head, n_sc), np.float32)
    cells = max(128, CELL_BLOCK_BYTES // (2 * head_dim) // 32 * 32)   # as `_attend_single` blocks them
    # scores: task (row, K/V head, part), the part's 8-cell groups from the row's first one
    for t in prange(B * n_head_kv * n_parts):
        i, hk, part = t // (n_head_kv * n_parts), (t // n_parts) % n_head_kv, t % n_parts
        b = rows[i]
        s, p = slots[b], positions[b]
        j0 = _first_cell(p, window)
        g0 = j0 // 8 * 8
        n_groups = (p // 8 * 8 + 8 - g0) // 8
        ja = max(j0, g0 + 8 * (n_groups * part // n_parts))
        jz = min(p + 1, g0 + 8 * (n_groups * (part + 1) // n_parts))
        q16 = np.empty(group * head_dim, np.float32)
        for e in range(0, group * head_dim, 8):
            store_f32x8(q16, e, round_f16x8(load_f32x8(q[b], hk * group * head_dim + e)))
        base = ((s * k_cache.shape[1] + layer) * k_cache.shape[2]) * kcell + hk * k_cache.shape[4]
        for jb in range(ja, jz, cells):
            je = min(jz, jb + cells)
            for t2 in range(group):
                qh = q16[t2 * head_dim:(t2 + 1) * head_dim]
                sc = sc_all[i, hk * group + t2]
                j = jb
                if head_dim <= KQ8_LANES32_MAX_DIM:
                    while j + 8 <= je:
                        store_f32x8(sc, j - g0, _kq8_32(kf, base + j * kcell, kcell, qh, head_dim) * scale)
                        j += 8
                while j < je:
                    sc[j - g0] = _kq_32(kf, base + j * kcell, qh, head_dim) * scale
                    j += 1
    for t in prange(B * n_head):
        i, h = t // n_head, t % n_head
        b = rows[i]
        p = positions[b]
        j0 = _first_cell(p, window)
        g0 = j0 // 8 * 8
        _softmax(sc_all[i, h], g0, j0, p, p // 8 * 8 + 8 - g0)
    # Σ p16[j] V[j]: task (row, K/V head, part), the part's output values of each head in 32 lane rows
    for t in prange(B * n_head_kv * n_parts):
        i, hk, part = t // (n_head_kv * n_parts), (t // n_parts) % n_head_kv, t % n_parts
        b = rows[i]
        s, p = slots[b], positions[b]
        j0 = _first_cell(p, window)
        g0 = j0 // 8 * 8
        d0 = head_dim // 8 * part // n_parts * 8
        d1 = head_dim // 8 * (part + 1) // n_parts * 8
        n = d1 - d0
        vbase = ((s * v_cache.shape[1] + layer) * v_cache.shape[2]) * vcell + hk * v_cache.shape[4]
        acc_all = np.zeros((group, 32 * n), np.float32)
        ga = min(p + 1, (j0 + 7) // 8 * 8)
        gb = (p + 1) // 8 * 8
        if gb <= ga:
            ga = gb = p + 1
        for t2 in range(group):
            sc = sc_all[i, hk * group + t2]
            for j in range(j0, ga):
                _kqv_cell(acc_all[t2], sc[j - g0], vf, vbase + j * vcell, (j % 32) * n, d0, d1)
        for blk in range(ga // 8, gb // 8, cells // 8):
            blk_end = min(gb // 8, blk + cells // 8)
            for t2 in range(group):
                sc = sc_all[i, hk * group + t2]
                for quarter in range(4):
                    g_first = blk + (quarter - blk) % 4
                    if g_first < blk_end:
                        _kqv_groups(acc_all[t2], sc, g0, vf, vbase, vcell, g_first, blk_end, 4, 8 * quarter * n,
                                    d0, d1)
        ob = out[b]
        for t2 in range(group):
            sc = sc_all[i, hk * group + t2]
            acc = acc_all[t2]
            for j in range(gb, p + 1):
                _kqv_cell(acc, sc[j - g0], vf, vbase + j * vcell, (j % 32) * n, d0, d1)
            o = (hk * group + t2) * head_dim + d0
            for e in range(0, n, 8):
                store_f32x8(ob, o + e, _reduce32x8(acc, e, n))


@exact_kernel
def silu_mul(gate, up):
    """gate = silu(gate) * up, in place (SwiGLU: llama, qwen2), as ggml_vec_swiglu_f32 (AVX2):
    x / (1 + ggml_v_expf(-x)) * u per element; a row's tail past a multiple of 8 uses libm's expf."""
    B, n = gate.shape
    n8 = n - n % 8
    for b in range(B):
        gb, ub = gate[b], up[b]
        for i in range(0, n8, 8):
            g = load_f32x8(gb, i)
            store_f32x8(gb, i, (g / (v_expf8(zeros() - g) + f32(1))) * load_f32x8(ub, i))
        for i in range(n8, n):
            g = gate[b, i]
            gate[b, i] = (g / (f32(1) + math.exp(-g))) * up[b, i]


GELU_COEF_A = f32(0.044715)
SQRT_2_OVER_PI = f32(0.79788456080286535587989211986876)


@exact_kernel
def _gelu_f32(x):
    """ggml_gelu_f32: 0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f + GELU_COEF_A*x*x))), f32 throughout (the
    inner 1 + a*x*x contracted to an fma, as GCC compiles it)."""
    return (f32(0.5) * x) * (f32(1) + math.tanh((SQRT_2_OVER_PI * x) * fma1(GELU_COEF_A * x, x, f32(1))))


@exact_kernel
def _fill_gelu_table(table):
    for h in range(65536):
        table[h] = round_f16(_gelu_f32(half_to_float(np.uint16(h))))


_fill_gelu_table.runs_in_dry_run = True     # `gelu_table` keeps what it fills (see runtime.precompile.dry_run)
_gelu_table: list[np.ndarray] = []


def gelu_table() -> np.ndarray:
    """ggml's GGML_GELU_FP16 table: for each fp16 bit pattern, fp16(ggml_gelu_f32(its value)) as float32
    (256 KiB, filled on first use)."""
    if not _gelu_table:
        table = np.empty(65536, np.float32)
        _fill_gelu_table(table)
        _gelu_table.append(table)
    return _gelu_table[0]


@exact_parallel_kernel
def _gelu_mul(gate, up, table):
    B, n = gate.shape
    for b in prange(B):
        for i in range(n):
            g = gate[b, i]
            if g <= f32(-10):
                gate[b, i] = f32(0)
            elif g >= f32(10):
                gate[b, i] = g * up[b, i]
            else:
                gate[b, i] = table[half_bits(g)] * up[b, i]


def gelu_mul(gate, up):
    """gate = gelu_tanh(gate) * up, in place (GeGLU: gemma3), as ggml_vec_geglu_f32 with GGML_GELU_FP16 (the
    default): below -10 zero, from 10 up the identity, between them x is rounded to fp16 and looked up in a
    table of fp16(ggml_gelu_f32(x16)) (`gelu_table`)."""
    _gelu_mul(gate, up, gelu_table())


@kernel
def add_bias(x, bias):
    """x[b] += bias, for rows of x (B, n)."""
    B, n = x.shape
    for b in range(B):
        for i in range(n):
            x[b, i] += bias[i]
