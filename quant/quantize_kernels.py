"""Numba kernels that quantize float32 rows to the K formats, bit for bit as llama.cpp's reference quantizers.

    quantize_k(y, x, qtype, n_blocks)     y[b] = the bytes of super-block b of x (256 values), parallel over blocks

The numpy references in `kquants.py` are the definition (`make_qkx2_quants` and the others, with the C
source's float32 order explained there); these kernels run the same arithmetic one super-block at a time,
compiled without fast-math (`exact_parallel_kernel`) so that LLVM neither contracts a product and a sum
into one FMA nor reorders a sum. Every constant is a float32 and every integer is converted with `f32()`
before it meets a float: a Python int or float would silently promote the expression to float64.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .jit import exact_kernel, exact_parallel_kernel
from .simd import half_to_float

f32 = np.float32

Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
QK_K = 256
BLOCK_BYTES = {Q2_K: 84, Q3_K: 110, Q4_K: 144, Q5_K: 176, Q6_K: 210}
BLOCKS_PER_TASK = 64

MAGIC = f32(12582912.0)          # 1.5 * 2**23: nearest_int's rounding constant
GROUP_MAX_EPS = f32(1e-15)


@intrinsic
def _bits(typingctx, x):
    """The 32 bits of a float32, as a non-negative int64."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))
    return types.int64(types.float32), codegen


@intrinsic
def _from_bits(typingctx, b):
    """The float32 whose bits are the low 32 bits of an int64."""
    if b != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())
    return types.float32(types.int64), codegen


@exact_kernel
def nearest_int(v):
    """ggml's nearest_int: add 1.5·2^23 in float32 and read the mantissa bits."""
    return (_bits(v + MAGIC) & 0x007FFFFF) - 0x00400000


@exact_kernel
def fp16_bits(v):
    """GGML_FP32_TO_FP16 (round to nearest even, subnormals and NaN as ggml's portable conversion)."""
    base = (abs(v) * f32(2.0 ** 112)) * f32(2.0 ** -110)
    w = _bits(v)
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = _from_bits((bias >> 1) + 0x07800000) + base
    bits = _bits(base)
    nonsign = ((bits >> 13) & 0x00007C00) + (bits & 0x00000FFF)
    return (sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)


@exact_kernel
def _fp16_store(y, at, v):
    """Write v as an f16 at byte `at` of y; return its float32 value."""
    h = fp16_bits(v)
    y[at] = h & 0xFF
    y[at + 1] = h >> 8
    return half_to_float(np.uint16(h))


@exact_kernel
def _make_qkx2_quants(x, x0, n, weights, nmax, rmin, rdelta, nstep, use_mad, L, l0, laux):
    """x[x0:x0+n] -> levels L[l0:l0+n] in 0..nmax; returns (scale, -min). See kquants.make_qkx2_quants."""
    lo = x[x0]
    hi = x[x0]
    sum_w = weights[0]
    sum_x = sum_w * x[x0]
    for i in range(1, n):
        v = x[x0 + i]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
        w = weights[i]
        sum_w += w
        sum_x += w * v
    if lo > f32(0):
        lo = f32(0)
    if hi == lo:
        for i in range(n):
            L[l0 + i] = 0
        return f32(0), -lo
    iscale = f32(nmax) / (hi - lo)
    scale = f32(1) / iscale
    best_error = f32(0)
    for i in range(n):
        l = max(0, min(nmax, nearest_int(iscale * (x[x0 + i] - lo))))
        L[l0 + i] = l
        diff = scale * f32(l) + lo - x[x0 + i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * f32(step) + f32(nmax)) / (hi - lo)
        sum_l = f32(0)
        sum_l2 = f32(0)
        sum_xl = f32(0)
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * (x[x0 + i] - lo))))
            laux[i] = l
            w = weights[i]
            sum_l += w * f32(l)
            sum_l2 += w * f32(l) * f32(l)
            sum_xl += w * f32(l) * x[x0 + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > f32(0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > f32(0):
                this_min = f32(0)
                this_scale = sum_xl / sum_l2
            cur_error = f32(0)
            for i in range(n):
                diff = this_scale * f32(laux[i]) + this_min - x[x0 + i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[l0 + i] = laux[i]
                best_error = cur_error
                scale = this_scale
                lo = this_min
    return scale, -lo


@exact_kernel
def _largest(x, x0, n):
    """(max |x[x0:x0+n]|, the first value with that magnitude, sign kept)."""
    vmax = f32(0)
    amax = f32(0)
    for i in range(n):
        ax = abs(x[x0 + i])
        if ax > amax:
            amax = ax
            vmax = x[x0 + i]
    return amax, vmax


@exact_kernel
def _make_qx_quants(x, x0, n, nmax, L, l0):
    """x[x0:x0+n] -> levels L[l0:l0+n] in 0..2 nmax - 1; returns the scale. See kquants.make_qx_quants."""
    amax, vmax = _largest(x, x0, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[l0 + i] = 0
        return f32(0)
    iscale = f32(-nmax) / vmax
    sumlx = f32(0)
    suml2 = f32(0)
    for i in range(n):
        v = x[x0 + i]
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * v)))
        L[l0 + i] = l + nmax
        w = v * v
        sumlx += w * v * f32(l)
        suml2 += w * f32(l) * f32(l)
    scale = sumlx / suml2 if suml2 != f32(0) else f32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / vmax
        sumlx = f32(0)
        suml2 = f32(0)
        for i in range(n):
            v = x[x0 + i]
            l = max(-nmax, min(nmax - 1, nearest_int(iscale * v)))
            w = v * v
            sumlx += w * v * f32(l)
            suml2 += w * f32(l) * f32(l)
        if suml2 > f32(0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[l0 + i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[x0 + i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@exact_kernel
def _make_q3_quants(x, x0, n, nmax, L, l0):
    """x[x0:x0+n] -> levels L[l0:l0+n] in 0..2 nmax - 1; returns the scale. See kquants.make_q3_quants."""
    amax, vmax = _largest(x, x0, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[l0 + i] = 0
        return f32(0)
    iscale = f32(-nmax) / vmax
    sumlx = f32(0)
    suml2 = f32(0)
    for i in range(n):
        v = x[x0 + i]
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * v)))
        L[l0 + i] = l
        w = v * v
        sumlx += w * v * f32(l)
        suml2 += w * f32(l) * f32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            v = x[x0 + i]
            w = v * v
            li = f32(L[l0 + i])
            slx = sumlx - w * v * li
            if slx > f32(0):
                sl2 = suml2 - w * li * li
                new_l = max(-nmax, min(nmax - 1, nearest_int(v * sl2 / slx)))
                if new_l != L[l0 + i]:
                    slx += w * v * f32(new_l)
                    sl2 += w * f32(new_l) * f32(new_l)
                    if sl2 > f32(0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[l0 + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[l0 + i] += nmax
    return sumlx / suml2 if suml2 > f32(0) else f32(0)


@exact_kernel
def _pack_2bit(y, at, L):
    """256 levels 0..3 -> 64 bytes: level h*128 + g*32 + l at bits 2g of byte h*32 + l."""
    for h in range(2):
        for l in range(32):
            e = h * 128 + l
            y[at + h * 32 + l] = L[e] | (L[e + 32] << 2) | (L[e + 64] << 4) | (L[e + 96] << 6)


@exact_kernel
def _q2_K_block(x, x0, y, y0, L, laux, weights, scales, mins):
    # | scales: 16 bytes | qs: 64 bytes | d: f16 | dmin: f16 |
    max_scale = f32(0)
    max_min = f32(0)
    for j in range(16):
        for l in range(16):
            weights[l] = abs(x[x0 + 16 * j + l])
        s, m = _make_qkx2_quants(x, x0 + 16 * j, 16, weights, 3, f32(-0.5), f32(0.1), 15, True, L, 16 * j, laux)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    for j in range(16):
        y[y0 + j] = 0
    if max_scale > f32(0):
        iscale = f32(15) / max_scale
        for j in range(16):
            y[y0 + j] = nearest_int(iscale * scales[j]) & 0xFF
        d = _fp16_store(y, y0 + 80, max_scale / f32(15))
    else:
        d = _fp16_store(y, y0 + 80, f32(0))
    if max_min > f32(0):
        iscale = f32(15) / max_min
        for j in range(16):
            y[y0 + j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
        dmin = _fp16_store(y, y0 + 82, max_min / f32(15))
    else:
        dmin = _fp16_store(y, y0 + 82, f32(0))
    for j in range(16):
        packed = np.int64(y[y0 + j])
        dl = d * f32(packed & 0xF)
        if dl == f32(0):
            continue
        ml = dmin * f32(packed >> 4)
        for i in range(16):
            L[16 * j + i] = max(0, min(3, nearest_int((x[x0 + 16 * j + i] + ml) / dl)))
    _pack_2bit(y, y0 + 16, L)


@exact_kernel
def _q3_K_block(x, x0, y, y0, L, scales):
    # | hmask: 32 bytes | qs: 64 bytes | scales: 12 bytes | d: f16 |
    max_scale = f32(0)
    amax = f32(0)
    for j in range(16):
        s = _make_q3_quants(x, x0 + 16 * j, 16, 4, L, 16 * j)
        scales[j] = s
        if abs(s) > amax:
            amax = abs(s)
            max_scale = s
    for j in range(12):
        y[y0 + 96 + j] = 0
    if max_scale != f32(0):
        iscale = f32(-32) / max_scale
        for j in range(16):
            l = max(-32, min(31, nearest_int(iscale * scales[j]))) + 32
            if j < 8:
                y[y0 + 96 + j] = l & 0xF
            else:
                y[y0 + 96 + j - 8] |= (l & 0xF) << 4
            y[y0 + 104 + j % 4] |= (l >> 4) << (2 * (j // 4))
        d = _fp16_store(y, y0 + 108, f32(1) / iscale)
    else:
        d = _fp16_store(y, y0 + 108, f32(0))
    for j in range(16):
        packed = np.int64(y[y0 + 96 + j % 8])
        high = np.int64(y[y0 + 104 + j % 4])
        low = packed & 0xF if j < 8 else packed >> 4
        sc = (low | (((high >> (2 * (j // 4))) & 3) << 4)) - 32
        dl = d * f32(sc)
        if dl == f32(0):
            continue
        for i in range(16):
            L[16 * j + i] = max(-4, min(3, nearest_int(x[x0 + 16 * j + i] / dl))) + 4
    for m in range(32):
        y[y0 + m] = 0
    for j in range(QK_K):               # high bit of value j at bit j // 32 of hmask[j % 32]
        if L[j] > 3:
            y[y0 + j % 32] |= 1 << (j // 32)
            L[j] -= 4
    _pack_2bit(y, y0 + 32, L)


@exact_kernel
def _k4_block(x, x0, y, y0, nmax, rmin, nstep, L, laux, weights, scales, mins, ls, lm):
    """Q4_K/Q5_K: d, dmin and the 12 scale bytes at y[y0:y0+16]; the levels of the 256 values in L."""
    max_scale = f32(0)
    max_min = f32(0)
    for j in range(8):
        sum_x2 = f32(0)
        for l in range(32):
            sum_x2 += x[x0 + 32 * j + l] * x[x0 + 32 * j + l]
        av_x = f32(np.sqrt(sum_x2 / f32(32)))
        for l in range(32):
            weights[l] = av_x + abs(x[x0 + 32 * j + l])
        s, m = _make_qkx2_quants(x, x0 + 32 * j, 32, weights, nmax, rmin, f32(0.1), nstep, False, L, 32 * j, laux)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = f32(63) / max_scale if max_scale > f32(0) else f32(0)
    inv_min = f32(63) / max_min if max_min > f32(0) else f32(0)
    for j in range(8):
        ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    for j in range(4):   # the layout `unpack_scale_min_k4` reads
        y[y0 + 4 + j] = ls[j] | ((ls[j + 4] >> 4) << 6)
        y[y0 + 8 + j] = lm[j] | ((lm[j + 4] >> 4) << 6)
        y[y0 + 12 + j] = (ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4)
    d = _fp16_store(y, y0, max_scale / f32(63))
    dmin = _fp16_store(y, y0 + 2, max_min / f32(63))
    for j in range(8):
        dl = d * f32(ls[j])
        if dl == f32(0):
            continue
        ml = dmin * f32(lm[j])
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, nearest_int((x[x0 + 32 * j + i] + ml) / dl)))


@exact_kernel
def _q4_K_block(x, x0, y, y0, L, laux, weights, scales, mins, ls, lm):
    # | d: f16 | dmin: f16 | scales: 12 bytes | qs: 128 bytes |
    _k4_block(x, x0, y, y0, 15, f32(-1.0), 20, L, laux, weights, scales, mins, ls, lm)
    for c in range(4):
        for l in range(32):
            y[y0 + 16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)


@exact_kernel
def _q5_K_block(x, x0, y, y0, L, laux, weights, scales, mins, ls, lm):
    # | d: f16 | dmin: f16 | scales: 12 bytes | qh: 32 bytes | qs: 128 bytes |
    _k4_block(x, x0, y, y0, 31, f32(-0.5), 15, L, laux, weights, scales, mins, ls, lm)
    for l in range(32):
        h = 0
        for j in range(8):
            h |= (L[32 * j + l] >> 4) << j
        y[y0 + 16 + l] = h
    for c in range(4):
        for l in range(32):
            y[y0 + 48 + 32 * c + l] = (L[64 * c + l] & 0xF) | ((L[64 * c + 32 + l] & 0xF) << 4)


@exact_kernel
def _q6_K_block(x, x0, y, y0, L, scales, isc):
    # | ql: 128 bytes | qh: 64 bytes | scales: 16 × int8 | d: f16 |
    max_scale = f32(0)
    max_abs = f32(0)
    for j in range(16):
        s = _make_qx_quants(x, x0 + 16 * j, 16, 32, L, 16 * j)
        scales[j] = s
        if abs(s) > max_abs:
            max_abs = abs(s)
            max_scale = s
    if max_abs < GROUP_MAX_EPS:
        for i in range(210):
            y[y0 + i] = 0
        return
    iscale = f32(-128) / max_scale
    d = _fp16_store(y, y0 + 208, f32(1) / iscale)
    for j in range(16):
        isc[j] = min(127, nearest_int(iscale * scales[j]))
        y[y0 + 192 + j] = isc[j] & 0xFF
    for j in range(16):
        dl = d * f32(isc[j])
        if dl == f32(0):
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, nearest_int(x[x0 + 16 * j + i] / dl))) + 32
    for h in range(2):
        e = 128 * h
        for l in range(32):
            q1, q2, q3, q4 = L[e + l], L[e + l + 32], L[e + l + 64], L[e + l + 96]
            y[y0 + 64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            y[y0 + 64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            y[y0 + 128 + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


@exact_parallel_kernel
def _quantize_k(y, x, qtype, n_blocks, block_bytes):
    n_tasks = (n_blocks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK
    for task in prange(n_tasks):
        L = np.empty(QK_K, np.int64)
        laux = np.empty(32, np.int64)
        weights = np.empty(32, np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        ls = np.empty(8, np.int64)
        lm = np.empty(8, np.int64)
        q6_scales = np.empty(16, np.int64)
        for b in range(task * BLOCKS_PER_TASK, min(n_blocks, (task + 1) * BLOCKS_PER_TASK)):
            x0 = b * QK_K
            y0 = b * block_bytes
            if qtype == Q2_K:
                _q2_K_block(x, x0, y, y0, L, laux, weights, scales, mins)
            elif qtype == Q3_K:
                _q3_K_block(x, x0, y, y0, L, scales)
            elif qtype == Q4_K:
                _q4_K_block(x, x0, y, y0, L, laux, weights, scales, mins, ls, lm)
            elif qtype == Q5_K:
                _q5_K_block(x, x0, y, y0, L, laux, weights, scales, mins, ls, lm)
            else:
                _q6_K_block(x, x0, y, y0, L, scales, q6_scales)


def quantize_k(x: np.ndarray, qtype: int) -> np.ndarray:
    """float32 values (any shape, a multiple of 256 in all) -> (n_blocks, block_bytes) uint8 of the K type
    `qtype`, on Numba's threads; bit-exact with `FORMATS[qtype].quantize_blocks`."""
    qtype = int(qtype)
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"quantize_k takes a K type (Q2_K..Q6_K), not type {qtype}")
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    if x.size % QK_K:
        raise ValueError(f"{x.size} values are not a whole number of {QK_K}-value super-blocks")
    n_blocks = x.size // QK_K
    y = np.empty(n_blocks * BLOCK_BYTES[qtype], np.uint8)
    _quantize_k(y, x, qtype, n_blocks, BLOCK_BYTES[qtype])
    return y.reshape(n_blocks, BLOCK_BYTES[qtype])
