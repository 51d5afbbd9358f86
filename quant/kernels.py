"""Numba kernels for the block formats whose llama.cpp arithmetic nibble does not reproduce, and the
dequantizers of every format.

    gemm(out, x, xq, xs, w, qtype, m, k)       out[n, m] = x @ W.T              (any n >= 1)
    get_rows(out, ids, w, qtype, k)            out[i] = W[ids[i]] dequantized   (rows of W)
    dequantize_rows(out, w, qtype, m, k)       out[m, k] = W                    (`quant.dequantize`)

`w` is the raw bytes of an (m, k) tensor of GGML type `qtype` (uint8, 1-D, as stored in the file). `gemm`
takes Q4_0, Q5_1, Q2_K, Q3_K, Q5_K, F32, F16 and BF16: the types of `ggml_exact.EXACT_TYPES` (Q4_1, Q5_0,
Q8_0, Q4_K, Q6_K, the ones the catalogue models hold) have their one matmul there, and `quant.multiply`
picks between the two modules. The dequantizers serve every type.

How `gemm` works (ggml's scheme): each row of x is quantized once per call to int8 in 32-value blocks,
`xq[32b:32b+32]` with scale `xs[2b]` and `xs[2b+1] = xs[2b] * Σ xq` (the block's sum, for formats with an
offset or a minimum). Each weight block is then unpacked to bytes in registers and multiplied with `xq` by
an int8 dot product (`simd.dot_u8`/`dot_i8`: 32 products in two instructions on AVX2), scaled by
d_weight * d_x and accumulated in 8 float lanes that are summed once per row. Offsets and minimums never
touch the int8 products: Σ (d q + m) x = d Σ q x + m Σ x, so they cost one scalar FMA per block.
F32/F16/BF16 weights take x as float32 directly. A batch runs every activation row through the same row
kernel (parallel over weight rows, each task's rows staying in cache while every activation row passes), so
an output row's value does not depend on the batch it was computed in.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import prange

from .jit import inlined, kernel, parallel_kernel
from .simd import (bf16x8_at, bits32, bytes32, deinterleave, dot_i8, dot_u8, f16x8_at, f32x8_at, fma, hsum,
                   i8_to_f32, k2_scales, k3_scales, k4_scales, lane, lanes, load_bf16, load_f16, load_f32,
                   load_f32x8, load_i8, load_u8, load_u32, nibbles16, quantize32, repeat2, store_f32x8, to_f32,
                   u8_to_f32, zeros)

f32 = np.float32

# GGML type ids (gguf.GGMLQuantizationType), as plain ints so Numba folds the dispatch chains.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30
QK_K = 256

# A matmul below this many multiply-adds runs on the calling thread: waking the pool costs more than it saves.
SERIAL_WORK = 1 << 16
TASK_ROWS = 16           # weight rows per parallel task


@kernel
def row_bytes(qtype, k):
    """Bytes in one row of k values of type `qtype`."""
    if qtype == F32:
        return 4 * k
    if qtype == F16 or qtype == BF16:
        return 2 * k
    if qtype == Q4_0:
        return k // 32 * 18
    if qtype == Q4_1:
        return k // 32 * 20
    if qtype == Q5_0:
        return k // 32 * 22
    if qtype == Q5_1:
        return k // 32 * 24
    if qtype == Q8_0:
        return k // 32 * 34
    if qtype == Q2_K:
        return k // QK_K * 84
    if qtype == Q3_K:
        return k // QK_K * 110
    if qtype == Q4_K:
        return k // QK_K * 144
    if qtype == Q5_K:
        return k // QK_K * 176
    if qtype == Q6_K:
        return k // QK_K * 210
    return -1


@kernel
def uses_int8_activations(qtype):
    return not (qtype == F32 or qtype == F16 or qtype == BF16)


@kernel
def quantize_activations(x, xq, xs):
    """x f32[k] -> xq int8[k] (round to nearest, |q| <= 127 per 32-block), xs[2b] = scale, xs[2b+1] =
    scale * Σ q (ggml's Q8_1 block, kept in two plain arrays). k must be a multiple of 32."""
    for b in range(x.size // 32):
        xs[2 * b], xs[2 * b + 1] = quantize32(x, 32 * b, xq)


# ---- fused row kernels: out[r] = W[r] · x for rows r0 .. r1 - 1 ----
#
# Q4_0 and Q5_1 have a block function `acc, off = _block_x(acc, off, w, p, xq, xs, b)` adding one weight block
# (bytes from w[p]) times x block b, and a row loop that alternates two accumulator chains: an FMA has a
# 4-cycle latency, so a single chain would cap a thread at one block per 4 cycles.

@kernel
def _block_q4_0(acc, off, w, p, xq, xs, b):
    # value = d * (q - 8): d Σ q x here, the -8 d Σ x in `off`
    d = load_f16(w, p)
    return fma(to_f32(dot_u8(nibbles16(w, p + 2), xq, 32 * b)), d * xs[2 * b], acc), off + d * xs[2 * b + 1]


@kernel
def _block_q5_1(acc, off, w, p, xq, xs, b):
    # value = d * q + m, q = nibble | fifth bit << 4
    q = nibbles16(w, p + 8) | (bits32(load_u32(w, p + 4)) << 4)
    acc = fma(to_f32(dot_u8(q, xq, 32 * b)), load_f16(w, p) * xs[2 * b], acc)
    return acc, off + load_f16(w, p + 2) * xs[2 * b + 1]


@kernel
def _block_32(acc, off, w, p, xq, xs, b, qtype):
    if qtype == Q4_0:
        return _block_q4_0(acc, off, w, p, xq, xs, b)
    return _block_q5_1(acc, off, w, p, xq, xs, b)


@kernel
def _rows_32(out, xq, xs, w, qtype, r0, r1, k):
    """Q4_0 and Q5_1: 32-value blocks. `off` collects Σ_b scale_b * Σ x_b for the offset of Q4_0 (subtracted)
    or the minimum of Q5_1 (added)."""
    nb = k // 32
    size = row_bytes(qtype, 32)
    for r in range(r0, r1):
        p = r * nb * size
        acc0, acc1 = zeros(), zeros()
        off0, off1 = f32(0), f32(0)
        for b in range(0, nb - 1, 2):
            acc0, off0 = _block_32(acc0, off0, w, p, xq, xs, b, qtype)
            acc1, off1 = _block_32(acc1, off1, w, p + size, xq, xs, b + 1, qtype)
            p += 2 * size
        if nb % 2:
            acc0, off0 = _block_32(acc0, off0, w, p, xq, xs, nb - 1, qtype)
        total, off = hsum(acc0 + acc1), off0 + off1
        out[r] = total - f32(8) * off if qtype == Q4_0 else total + off


@kernel
def _group_q2_k(acc0, acc1, q, ones, xq, i, scale, minimum):
    # value = d * sc * q - dmin * m per 16-value half; Σ x over each half from dot(1, xq)
    acc0 = fma(to_f32(dot_u8(q, xq, 32 * i)), scale, acc0)
    return acc0, fma(to_f32(dot_u8(ones, xq, 32 * i)), minimum, acc1)


@kernel
def _half_q2_k(acc0, acc1, qs, ones, xq, i, t, tm):
    """One 128-value half: 32 bytes holding x blocks i .. i + 3 at bits 0-1, 2-3, 4-5, 6-7."""
    acc0, acc1 = _group_q2_k(acc0, acc1, qs & 3, ones, xq, i, lanes(t, 0, 1), lanes(tm, 0, 1))
    acc0, acc1 = _group_q2_k(acc0, acc1, (qs >> 2) & 3, ones, xq, i + 1, lanes(t, 2, 3), lanes(tm, 2, 3))
    acc0, acc1 = _group_q2_k(acc0, acc1, (qs >> 4) & 3, ones, xq, i + 2, lanes(t, 4, 5), lanes(tm, 4, 5))
    return _group_q2_k(acc0, acc1, qs >> 6, ones, xq, i + 3, lanes(t, 6, 7), lanes(tm, 6, 7))


@kernel
def _rows_q2_k(out, xq, xs, w, r0, r1, k):
    nsb = k // QK_K
    ones = bits32(np.uint32(0xFFFFFFFF))
    for r in range(r0, r1):
        p = r * nsb * 84
        acc0, acc1 = zeros(), zeros()
        for sb in range(nsb):
            i = 8 * sb
            dx, _ = deinterleave(xs, 2 * i)
            sc0, sc1, m0, m1 = k2_scales(w, p)
            d, dmin = dx * load_f16(w, p + 80), dx * -load_f16(w, p + 82)
            acc0, acc1 = _half_q2_k(acc0, acc1, bytes32(w, p + 16), ones, xq, i,
                                    sc0 * repeat2(d, 0), m0 * repeat2(dmin, 0))
            acc0, acc1 = _half_q2_k(acc0, acc1, bytes32(w, p + 48), ones, xq, i + 4,
                                    sc1 * repeat2(d, 1), m1 * repeat2(dmin, 1))
            p += 84
        out[r] = hsum(acc0 + acc1)


@kernel
def _half_q3_k(acc0, acc1, qs, hmask, bit, xq, i, t):
    """One 128-value half: low 2 bits at bits 2g of qs, high bit at bit `bit` + g of hmask, for x blocks
    i + g; value = d * (scale - 32) * ((q | hbit << 2) - 4) (a clear high bit means "minus 4")."""
    q = ((qs & 3) | ((hmask >> bit) & 1) << 2) - 4
    acc0 = fma(to_f32(dot_i8(q, xq, 32 * i)), lanes(t, 0, 1), acc0)
    q = (((qs >> 2) & 3) | ((hmask >> (bit + 1)) & 1) << 2) - 4
    acc1 = fma(to_f32(dot_i8(q, xq, 32 * i + 32)), lanes(t, 2, 3), acc1)
    q = (((qs >> 4) & 3) | ((hmask >> (bit + 2)) & 1) << 2) - 4
    acc0 = fma(to_f32(dot_i8(q, xq, 32 * i + 64)), lanes(t, 4, 5), acc0)
    q = ((qs >> 6) | ((hmask >> (bit + 3)) & 1) << 2) - 4
    acc1 = fma(to_f32(dot_i8(q, xq, 32 * i + 96)), lanes(t, 6, 7), acc1)
    return acc0, acc1


@kernel
def _rows_q3_k(out, xq, xs, w, r0, r1, k):
    nsb = k // QK_K
    for r in range(r0, r1):
        p = r * nsb * 110
        acc0, acc1 = zeros(), zeros()
        for sb in range(nsb):
            i = 8 * sb
            dx, _ = deinterleave(xs, 2 * i)
            dx = dx * load_f16(w, p + 108)
            s0, s1 = k3_scales(w, p + 96)
            hmask = bytes32(w, p)
            acc0, acc1 = _half_q3_k(acc0, acc1, bytes32(w, p + 32), hmask, 0, xq, i, s0 * repeat2(dx, 0))
            acc0, acc1 = _half_q3_k(acc0, acc1, bytes32(w, p + 64), hmask, 4, xq, i + 4, s1 * repeat2(dx, 1))
            p += 110
        out[r] = hsum(acc0 + acc1)


@kernel
def _pair_q5_k(acc0, acc1, lo, hi, xq, i, s0, s1):
    """x blocks i and i + 1 against sub-blocks stored as the low and high nibbles of the same 32 bytes."""
    acc0 = fma(to_f32(dot_u8(lo, xq, 32 * i)), s0, acc0)
    return acc0, fma(to_f32(dot_u8(hi, xq, 32 * i + 32)), s1, acc1)


@kernel
def _rows_q5_k(out, xq, xs, w, r0, r1, k):
    # value = d * sc[j] * q - dmin * m[j] for 32-value sub-blocks j (one x block each), q's bit 4 for
    # sub-block j at bit j of the 32 qh bytes
    nsb = k // QK_K
    for r in range(r0, r1):
        p = r * nsb * 176
        acc0, acc1, mins = zeros(), zeros(), zeros()
        for sb in range(nsb):
            i = 8 * sb
            dx, sx = deinterleave(xs, 2 * i)
            sc, mn = k4_scales(w, p + 4)
            t = sc * (dx * load_f16(w, p))
            mins = fma(mn * load_f16(w, p + 2), sx, mins)
            qh = bytes32(w, p + 16)
            for c in range(4):
                q = bytes32(w, p + 48 + 32 * c)
                lo = (q & 15) | (((qh >> (2 * c)) & 1) << 4)
                hi = (q >> 4) | (((qh >> (2 * c + 1)) & 1) << 4)
                if c == 0:
                    acc0, acc1 = _pair_q5_k(acc0, acc1, lo, hi, xq, i, lane(t, 0), lane(t, 1))
                elif c == 1:
                    acc0, acc1 = _pair_q5_k(acc0, acc1, lo, hi, xq, i + 2, lane(t, 2), lane(t, 3))
                elif c == 2:
                    acc0, acc1 = _pair_q5_k(acc0, acc1, lo, hi, xq, i + 4, lane(t, 4), lane(t, 5))
                else:
                    acc0, acc1 = _pair_q5_k(acc0, acc1, lo, hi, xq, i + 6, lane(t, 6), lane(t, 7))
            p += 176
        out[r] = hsum(acc0 + acc1) - hsum(mins)


@kernel
def _rows_float(out, x, w, qtype, r0, r1, k):
    """F32 / F16 / BF16 weights against float32 x; four accumulators hide the FMA latency."""
    size = 4 if qtype == F32 else 2
    k8 = k - k % 8
    k32 = k - k % 32
    for r in range(r0, r1):
        p = r * k * size
        a0 = zeros()
        a1 = zeros()
        a2 = zeros()
        a3 = zeros()
        for i in range(0, k32, 32):
            q = p + i * size
            if qtype == F16:
                a0 = fma(f16x8_at(w, q), load_f32x8(x, i), a0)
                a1 = fma(f16x8_at(w, q + 16), load_f32x8(x, i + 8), a1)
                a2 = fma(f16x8_at(w, q + 32), load_f32x8(x, i + 16), a2)
                a3 = fma(f16x8_at(w, q + 48), load_f32x8(x, i + 24), a3)
            elif qtype == BF16:
                a0 = fma(bf16x8_at(w, q), load_f32x8(x, i), a0)
                a1 = fma(bf16x8_at(w, q + 16), load_f32x8(x, i + 8), a1)
                a2 = fma(bf16x8_at(w, q + 32), load_f32x8(x, i + 16), a2)
                a3 = fma(bf16x8_at(w, q + 48), load_f32x8(x, i + 24), a3)
            else:
                a0 = fma(f32x8_at(w, q), load_f32x8(x, i), a0)
                a1 = fma(f32x8_at(w, q + 32), load_f32x8(x, i + 8), a1)
                a2 = fma(f32x8_at(w, q + 64), load_f32x8(x, i + 16), a2)
                a3 = fma(f32x8_at(w, q + 96), load_f32x8(x, i + 24), a3)
        for i in range(k32, k8, 8):
            if qtype == F16:
                a0 = fma(f16x8_at(w, p + 2 * i), load_f32x8(x, i), a0)
            elif qtype == BF16:
                a0 = fma(bf16x8_at(w, p + 2 * i), load_f32x8(x, i), a0)
            else:
                a0 = fma(f32x8_at(w, p + 4 * i), load_f32x8(x, i), a0)
        total = hsum((a0 + a1) + (a2 + a3))
        for i in range(k8, k):
            total += _float_at(w, qtype, p + i * size) * x[i]
        out[r] = total


@kernel
def _float_at(w, qtype, p):
    if qtype == F16:
        return load_f16(w, p)
    if qtype == BF16:
        return load_bf16(w, p)
    return load_f32(w, p)


@kernel
def _rows(out, x, xq, xs, w, qtype, r0, r1, k):
    """out[r] = W[r] · x for r0 <= r < r1, x already quantized into xq, xs for the int8 types."""
    if qtype == Q4_0 or qtype == Q5_1:
        _rows_32(out, xq, xs, w, qtype, r0, r1, k)
    elif qtype == Q5_K:
        _rows_q5_k(out, xq, xs, w, r0, r1, k)
    elif qtype == Q3_K:
        _rows_q3_k(out, xq, xs, w, r0, r1, k)
    elif qtype == Q2_K:
        _rows_q2_k(out, xq, xs, w, r0, r1, k)
    else:
        _rows_float(out, x, w, qtype, r0, r1, k)


@parallel_kernel
def gemm(out, x, xq, xs, w, qtype, m, k):
    """out f32[n, m] = x @ W.T for x f32[n, k] and W the (m, k) tensor of type `qtype` in bytes `w`, one of
    Q4_0, Q5_1, Q2_K, Q3_K, Q5_K, F32, F16, BF16. xq int8[n, k] and xs f32[n, k // 16] are scratch the kernel
    fills (x quantized to 8 bits) so nothing is allocated per call. Parallel over weight rows; small products
    run on the calling thread."""
    n = x.shape[0]
    if uses_int8_activations(qtype):
        if n == 1:                                  # decode: one parallel region per call, not two
            quantize_activations(x[0], xq[0], xs[0])
        else:
            for i in prange(n):
                quantize_activations(x[i], xq[i], xs[i])
    if n * m * k <= SERIAL_WORK:
        for i in range(n):
            _rows(out[i], x[i], xq[i], xs[i], w, qtype, 0, m, k)
        return
    # Numba hands each thread one contiguous run of tasks, so each streams its own part of W; a task's
    # TASK_ROWS weight rows stay in cache while every activation row passes over them.
    for t in prange((m + TASK_ROWS - 1) // TASK_ROWS):
        r0, r1 = t * TASK_ROWS, min(m, (t + 1) * TASK_ROWS)
        for i in range(n):
            _rows(out[i], x[i], xq[i], xs[i], w, qtype, r0, r1, k)


# ---- dequantization: one row into float32 ----

@kernel
def _scale_min_k4(w, p, j):
    """Scale and min j (0..7) of a Q4_K/Q5_K super-block whose 12 scale bytes start at w[p]."""
    if j < 4:
        sc = load_u8(w, p + j) & 63
        mn = load_u8(w, p + j + 4) & 63
    else:
        sc = (load_u8(w, p + j + 4) & 15) | ((load_u8(w, p + j - 4) >> 6) << 4)
        mn = (load_u8(w, p + j + 4) >> 4) | ((load_u8(w, p + j) >> 6) << 4)
    return f32(sc), f32(mn)


@kernel
def _scale_q3_k(w, p, j):
    """Signed scale j (0..15) of a Q3_K super-block whose 12 scale bytes start at w[p]."""
    low = (load_u8(w, p + j % 8) >> (4 * (j // 8))) & 15
    high = (load_u8(w, p + 8 + j % 4) >> (2 * (j // 4))) & 3
    return f32(low | (high << 4)) - f32(32)



@kernel
def _dequant_q4_0(o, w, p, nb):
    for b in range(nb):
        d = load_f16(w, p)
        q = nibbles16(w, p + 2)
        store_f32x8(o, 32 * b, d * (u8_to_f32(q, 0) - f32(8)))
        store_f32x8(o, 32 * b + 8, d * (u8_to_f32(q, 1) - f32(8)))
        store_f32x8(o, 32 * b + 16, d * (u8_to_f32(q, 2) - f32(8)))
        store_f32x8(o, 32 * b + 24, d * (u8_to_f32(q, 3) - f32(8)))
        p += 18


@kernel
def _store_affine32(o, i, q, d, m):
    """o[i:i + 32] = d * q + m for the 32 unsigned bytes of q (rounded as numpy rounds, not fused)."""
    store_f32x8(o, i, d * u8_to_f32(q, 0) + m)
    store_f32x8(o, i + 8, d * u8_to_f32(q, 1) + m)
    store_f32x8(o, i + 16, d * u8_to_f32(q, 2) + m)
    store_f32x8(o, i + 24, d * u8_to_f32(q, 3) + m)


@kernel
def _store_signed32(o, i, q, d0, d1):
    """o[i:i + 16] = d0 * q, o[i + 16:i + 32] = d1 * q for the 32 signed bytes of q."""
    store_f32x8(o, i, d0 * i8_to_f32(q, 0))
    store_f32x8(o, i + 8, d0 * i8_to_f32(q, 1))
    store_f32x8(o, i + 16, d1 * i8_to_f32(q, 2))
    store_f32x8(o, i + 24, d1 * i8_to_f32(q, 3))


@kernel
def _dequant_q4_1(o, w, p, nb):
    for b in range(nb):
        _store_affine32(o, 32 * b, nibbles16(w, p + 4), load_f16(w, p), load_f16(w, p + 2))
        p += 20


@kernel
def _dequant_q5_0(o, w, p, nb):
    for b in range(nb):
        d = load_f16(w, p)
        q = (nibbles16(w, p + 6) | (bits32(load_u32(w, p + 2)) << 4)) - 16
        _store_signed32(o, 32 * b, q, d, d)
        p += 22


@kernel
def _dequant_q5_1(o, w, p, nb):
    for b in range(nb):
        q = nibbles16(w, p + 8) | (bits32(load_u32(w, p + 4)) << 4)
        _store_affine32(o, 32 * b, q, load_f16(w, p), load_f16(w, p + 2))
        p += 24


@kernel
def _dequant_q8_0(o, w, p, nb):
    for b in range(nb):
        d = load_f16(w, p)
        _store_signed32(o, 32 * b, bytes32(w, p + 2), d, d)
        p += 34


@kernel
def _dequant_q2_k(o, w, p, nsb):
    for sb in range(nsb):
        d = load_f16(w, p + 80)
        dmin = load_f16(w, p + 82)
        for h in range(2):
            qs = bytes32(w, p + 16 + 32 * h)
            for g in range(4):
                q = (qs >> (2 * g)) & 3
                i = QK_K * sb + 128 * h + 32 * g
                s0 = load_u8(w, p + 8 * h + 2 * g)
                s1 = load_u8(w, p + 8 * h + 2 * g + 1)
                dl0, ml0 = d * f32(s0 & 15), dmin * f32(s0 >> 4)
                dl1, ml1 = d * f32(s1 & 15), dmin * f32(s1 >> 4)
                store_f32x8(o, i, dl0 * u8_to_f32(q, 0) - ml0)
                store_f32x8(o, i + 8, dl0 * u8_to_f32(q, 1) - ml0)
                store_f32x8(o, i + 16, dl1 * u8_to_f32(q, 2) - ml1)
                store_f32x8(o, i + 24, dl1 * u8_to_f32(q, 3) - ml1)
        p += 84


@kernel
def _dequant_q3_k(o, w, p, nsb):
    for sb in range(nsb):
        d = load_f16(w, p + 108)
        hmask = bytes32(w, p)
        for h in range(2):
            qs = bytes32(w, p + 32 + 32 * h)
            for g in range(4):
                q = (((qs >> (2 * g)) & 3) | (((hmask >> (4 * h + g)) & 1) << 2)) - 4
                j = 8 * h + 2 * g
                _store_signed32(o, QK_K * sb + 128 * h + 32 * g, q,
                                d * _scale_q3_k(w, p + 96, j), d * _scale_q3_k(w, p + 96, j + 1))
        p += 110


@kernel
def _dequant_q4_k_q5_k(o, w, p, nsb, qtype):
    """Q4_K (144-byte blocks) and Q5_K (176: 32 bytes of fifth bits, bit j of byte l for value 32j + l of the
    super-block, between the scales and the nibbles): value = d * sc[j] * q - dmin * m[j]."""
    size, nibbles_at = (176, 48) if qtype == Q5_K else (144, 16)
    for sb in range(nsb):
        d = load_f16(w, p)
        dmin = load_f16(w, p + 2)
        for c in range(4):
            q = bytes32(w, p + nibbles_at + 32 * c)
            lo, hi = q & 15, q >> 4
            if qtype == Q5_K:
                qh = bytes32(w, p + 16)
                lo = lo | (((qh >> (2 * c)) & 1) << 4)
                hi = hi | (((qh >> (2 * c + 1)) & 1) << 4)
            sc0, m0 = _scale_min_k4(w, p + 4, 2 * c)
            sc1, m1 = _scale_min_k4(w, p + 4, 2 * c + 1)
            i = QK_K * sb + 64 * c
            _store_affine32(o, i, lo, d * sc0, -(dmin * m0))
            _store_affine32(o, i + 32, hi, d * sc1, -(dmin * m1))
        p += size


@kernel
def _dequant_q6_k(o, w, p, nsb):
    for sb in range(nsb):
        d = load_f16(w, p + 208)
        for h in range(2):
            ql0 = bytes32(w, p + 64 * h)
            ql1 = bytes32(w, p + 64 * h + 32)
            qh = bytes32(w, p + 128 + 32 * h)
            for g in range(4):
                if g == 0:
                    q = (ql0 & 15) | ((qh & 3) << 4)
                elif g == 1:
                    q = (ql1 & 15) | (((qh >> 2) & 3) << 4)
                elif g == 2:
                    q = (ql0 >> 4) | (((qh >> 4) & 3) << 4)
                else:
                    q = (ql1 >> 4) | ((qh >> 6) << 4)
                s = p + 192 + 8 * h + 2 * g
                _store_signed32(o, QK_K * sb + 128 * h + 32 * g, q - 32,
                                d * f32(load_i8(w, s)), d * f32(load_i8(w, s + 1)))
        p += 210


@kernel
def _dequant_float(o, w, qtype, p, k):
    size = 4 if qtype == F32 else 2
    k8 = k - k % 8
    for i in range(0, k8, 8):
        if qtype == F16:
            store_f32x8(o, i, f16x8_at(w, p + 2 * i))
        elif qtype == BF16:
            store_f32x8(o, i, bf16x8_at(w, p + 2 * i))
        else:
            store_f32x8(o, i, f32x8_at(w, p + 4 * i))
    for i in range(k8, k):
        o[i] = _float_at(w, qtype, p + i * size)


@inlined
def _dequantize_row(o, w, qtype, row, k):
    """o f32[k] = row `row` of the (m, k) tensor of type `qtype` in bytes w, bit-exact with the numpy
    references (inlined into `_row_readers`' kernels, where qtype is a constant)."""
    p = row * row_bytes(qtype, k)
    if qtype == Q4_0:
        _dequant_q4_0(o, w, p, k // 32)
    elif qtype == Q4_1:
        _dequant_q4_1(o, w, p, k // 32)
    elif qtype == Q5_0:
        _dequant_q5_0(o, w, p, k // 32)
    elif qtype == Q5_1:
        _dequant_q5_1(o, w, p, k // 32)
    elif qtype == Q8_0:
        _dequant_q8_0(o, w, p, k // 32)
    elif qtype == Q2_K:
        _dequant_q2_k(o, w, p, k // QK_K)
    elif qtype == Q3_K:
        _dequant_q3_k(o, w, p, k // QK_K)
    elif qtype == Q4_K or qtype == Q5_K:
        _dequant_q4_k_q5_k(o, w, p, k // QK_K, qtype)
    elif qtype == Q6_K:
        _dequant_q6_k(o, w, p, k // QK_K)
    else:
        _dequant_float(o, w, qtype, p, k)


@functools.cache
def _row_readers(qtype: int):
    """(get_rows, dequantize_rows) for one type, the type a constant in their code so that Numba compiles
    only its dequantizer (see `ggml_exact._typed`)."""
    QT = qtype

    @parallel_kernel
    def get_rows_t(out, ids, w, k):
        n = ids.size
        if n < 16:
            for i in range(n):
                _dequantize_row(out[i], w, QT, ids[i], k)
            return
        for i in prange(n):
            _dequantize_row(out[i], w, QT, ids[i], k)

    @parallel_kernel
    def dequantize_rows_t(out, w, m, k):
        for r in prange(m):
            _dequantize_row(out[r], w, QT, r, k)

    return get_rows_t, dequantize_rows_t


def get_rows(out, ids, w, qtype, k) -> None:
    """out f32[len(ids), k]: rows `ids` of W, the (., k) tensor of type `qtype` in bytes `w`, dequantized
    bit-exactly with the numpy references. From compiled code, call `get_rows_kernel(qtype)` instead."""
    _row_readers(int(qtype))[0](out, ids, w, k)


def get_rows_kernel(qtype):
    """The compiled `get_rows` for one type, (out, ids, w, k), callable from other compiled code."""
    return _row_readers(int(qtype))[0]


def dequantize_rows(out, w, qtype, m, k) -> None:
    """out f32[m, k] = the whole tensor, parallel over rows."""
    _row_readers(int(qtype))[1](out, w, m, k)
