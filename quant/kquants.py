"""The 256-value "K" super-block formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

A super-block holds 256 values in sub-blocks of 16 or 32 values, each with its own small integer scale
(and, for Q2_K/Q4_K/Q5_K, its own minimum) multiplied by one or two f16 super-block scales. The quants of a
super-block are laid out in 128-value halves; within a half, 32 consecutive bytes hold several 32-value
groups in different bit positions (group g of a 2-bit half sits at bits 2g..2g+1 of those 32 bytes).
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .blocks import BlockFormat, f16

QK_K = 256


def _bit_planes(data: np.ndarray, width: int, planes: int) -> np.ndarray:
    """(n, m) bytes -> (n, planes, m): plane p is bits [width*p, width*(p+1)) of every byte."""
    shifts = (np.arange(planes, dtype=np.uint8) * np.uint8(width)).reshape(1, planes, 1)
    return (data[:, None, :] >> shifts) & np.uint8((1 << width) - 1)


def unpack_scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (n, 8) uint8.

        byte 0..3   sc0..sc3 in bits 0..5;  bits 6..7: high bits of sc4..sc7
        byte 4..7   m0..m3   in bits 0..5;  bits 6..7: high bits of m4..m7
        byte 8..11  low 4 bits of sc4..sc7 | low 4 bits of m4..m7 << 4
    """
    s = scales.reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


class Q2_K(BlockFormat, qtype=T.Q2_K):
    # 84 bytes:  | scales: 16 bytes | qs: 64 bytes | d: f16 | dmin: f16 |
    #   scales[i] = sc | m << 4 for sub-block i (16 values);  q = 2 bits
    #   value e = h*128 + g*32 + l  (half h, group g 0..3, l 0..31) sits at bits 2g of qs[h*32 + l]
    # value = d * sc * q - dmin * m
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        scales, qs = blocks[:, 0:16], blocks[:, 16:80]
        d, dmin = f16(blocks[:, 80:82]), f16(blocks[:, 82:84])
        dl = (d * (scales & 0x0F).astype(np.float32)).reshape(n, 16, 1)
        ml = (dmin * (scales >> 4).astype(np.float32)).reshape(n, 16, 1)
        q = _bit_planes(qs.reshape(n * 2, 32), 2, 4).reshape(n, 16, 16).astype(np.float32)
        return (dl * q - ml).reshape(n, QK_K)


class Q3_K(BlockFormat, qtype=T.Q3_K):
    # 110 bytes: | hmask: 32 bytes | qs: 64 bytes | scales: 12 bytes | d: f16 |
    #   value e = h*128 + g*32 + l:  low 2 bits at bits 2g of qs[h*32 + l],
    #   high bit at bit (4h + g) of hmask[l]; a CLEAR high bit means "subtract 4"
    #   16 six-bit scales (minus 32): low 4 bits in nibbles of bytes 0..7 (scale i: byte i % 8,
    #   high nibble when i >= 8), high 2 bits at bits 2*(i // 4) of byte 8 + i % 4
    # value = d * (scale - 32) * (q - 4 * (1 - hbit))
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        hmask, qs, scales = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
        d = f16(blocks[:, 108:110])
        low = np.concatenate([scales[:, 0:8] & 0x0F, scales[:, 0:8] >> 4], axis=1)
        high = _bit_planes(scales[:, 8:12], 2, 4).reshape(n, 16)
        sc = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
        dl = (d * sc).reshape(n, 16, 1)
        q2 = _bit_planes(qs.reshape(n * 2, 32), 2, 4).reshape(n, 16, 16)
        hbit = _bit_planes(hmask, 1, 8).reshape(n, 16, 16)
        q = q2.astype(np.int8) - ((hbit ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)
        return (dl * q.astype(np.float32)).reshape(n, QK_K)


def _scales_and_mins_k4(blocks):
    """Q4_K/Q5_K: d * sc[j] and dmin * m[j] of each 32-value sub-block j, (n, 8, 1) float32 each, from the
    f16 d, dmin and the 12 bytes of 6-bit scales and mins that open the block."""
    n = blocks.shape[0]
    d, dmin = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
    sc, mn = unpack_scale_min_k4(blocks[:, 4:16])
    return (d * sc.astype(np.float32)).reshape(n, 8, 1), (dmin * mn.astype(np.float32)).reshape(n, 8, 1)


class Q4_K(BlockFormat, qtype=T.Q4_K):
    # 144 bytes: | d: f16 | dmin: f16 | scales: 12 bytes (8 scales, 8 mins, 6 bits) | qs: 128 bytes |
    #   value e = c*64 + l (chunk c 0..3): low nibble of qs[c*32 + l] for l < 32, high nibble for l >= 32
    #   sub-block j = e // 32
    # value = d * sc[j] * q - dmin * m[j]
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        dl, ml = _scales_and_mins_k4(blocks)
        q = _bit_planes(blocks[:, 16:144].reshape(n * 4, 32), 4, 2).reshape(n, 8, 32).astype(np.float32)
        return (dl * q - ml).reshape(n, QK_K)


class Q5_K(BlockFormat, qtype=T.Q5_K):
    # 176 bytes: | d: f16 | dmin: f16 | scales: 12 bytes | qh: 32 bytes | qs: 128 bytes |
    #   as Q4_K, plus bit 4 of value e (sub-block j = e // 32, l = e % 32) at bit j of qh[l]
    # value = d * sc[j] * q - dmin * m[j],  q in 0..31
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        dl, ml = _scales_and_mins_k4(blocks)
        low = _bit_planes(blocks[:, 48:176].reshape(n * 4, 32), 4, 2).reshape(n, 8, 32)
        high = _bit_planes(blocks[:, 16:48], 1, 8)
        q = (low | (high << np.uint8(4))).astype(np.float32)
        return (dl * q - ml).reshape(n, QK_K)


class Q6_K(BlockFormat, qtype=T.Q6_K):
    # 210 bytes: | ql: 128 bytes | qh: 64 bytes | scales: 16 × int8 | d: f16 |
    #   value e = h*128 + g*32 + l:  low 4 bits: nibble (g // 2) of ql[h*64 + (g % 2)*32 + l],
    #   high 2 bits: bits 2g of qh[h*32 + l];  sub-block (16 values) i = e // 16
    # value = d * scales[i] * (q - 32),  q in 0..63
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        ql, qh = blocks[:, 0:128], blocks[:, 128:192]
        scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
        d = f16(blocks[:, 208:210])
        dl = (d * scales).reshape(n, 16, 1)
        low = _bit_planes(ql.reshape(n * 2, 64), 4, 2).reshape(n * 2, 4, 32)   # (half, g, l)
        high = _bit_planes(qh.reshape(n * 2, 32), 2, 4)                         # (half, g, l)
        q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
        return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


# ---- quantizers: llama.cpp's quantize_row_q2_K_ref ... quantize_row_q6_K_ref, bit for bit ----
#
# What llama-quantize runs without an importance matrix. ggml-quants.c is compiled into ggml-base with plain
# -O3 (no -march, so no FMA on x86-64 and nothing to contract into one; no -ffast-math, so no sum is
# reordered): every operation below is one float32 operation, in the order the C source writes it. The
# helpers work on many sub-blocks at once (the rows of a 2-D array) but walk the values of a sub-block one
# by one, so that each float32 sum accumulates in the C loop's order. `quantize_kernels.py` holds the Numba
# kernels that `quantize_model` runs; these are the definition they are tested against.

_F = np.float32
_MAGIC = _F(12582912.0)    # 1.5 * 2**23
_GROUP_MAX_EPS = _F(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5·2^23 in float32 and read the low mantissa bits (round half to even for
    |v| < 2^22; outside that range the same bits as C, whatever they mean)."""
    bits = (np.asarray(v, _F) + _MAGIC).astype(_F).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 then back: (the f16 bytes as uint16, their float32 value)."""
    h = np.asarray(v, _F).astype(np.float16)
    return h.view(np.uint16), h.astype(_F)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """(m, n) -> (m,): the first value of largest magnitude, sign kept (C: `if (ax > amax) {amax = ax; max = x}`)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def make_qkx2_quants(x, weights, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """Scale and minimum of each row of x (m, n) for levels 0..nmax, searched as ggml's make_qkx2_quants:
    a least-squares fit (weighted) from each of nstep + 1 trial scales. Returns (scale (m,), -min (m,),
    L (m, n) int32)."""
    m, n = x.shape
    F = _F
    lo, hi = x.min(axis=1), x.max(axis=1)
    sum_w = weights[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        sum_w += weights[:, i]
        sum_x += weights[:, i] * x[:, i]
    lo = np.minimum(lo, F(0))
    flat = hi == lo
    with np.errstate(all="ignore"):
        iscale = F(nmax) / (hi - lo)
        scale = F(1) / iscale
        L = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        best_error = np.zeros(m, F)
        for i in range(n):
            diff = scale * L[:, i].astype(F) + lo - x[:, i]
            diff = np.abs(diff) if use_mad else diff * diff
            best_error += weights[:, i] * diff
        for step in range(nstep + 1):
            iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (hi - lo)
            laux = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
            sum_l = np.zeros(m, F)
            sum_l2 = np.zeros(m, F)
            sum_xl = np.zeros(m, F)
            for i in range(n):
                wl = weights[:, i] * laux[:, i].astype(F)
                sum_l += wl
                sum_l2 += wl * laux[:, i].astype(F)
                sum_xl += wl * x[:, i]
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            this_min = np.where(positive, F(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            cur_error = np.zeros(m, F)
            for i in range(n):
                diff = this_scale * laux[:, i].astype(F) + this_min - x[:, i]
                diff = np.abs(diff) if use_mad else diff * diff
                cur_error += weights[:, i] * diff
            better = (D > 0) & (cur_error < best_error) & ~flat
            L = np.where(better[:, None], laux, L)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    L[flat] = 0
    scale = np.where(flat, F(0), scale)
    return scale, -lo, L


def make_qx_quants(x, nmax: int):
    """Symmetric scale of each row of x (m, n) for levels -nmax..nmax-1, as ggml's make_qx_quants with
    rmse_type 1 and no importance weights (weights x²; 18 trial scales around nmax / max). Returns
    (scale (m,), L (m, n) int32 in 0..2 nmax - 1)."""
    m, n = x.shape
    F = _F
    vmax = _signed_absmax(x)
    zero = np.abs(vmax) < _GROUP_MAX_EPS
    w = x * x

    def fit(iscale):
        l = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        sumlx = np.zeros(m, F)
        suml2 = np.zeros(m, F)
        for i in range(n):
            li = l[:, i].astype(F)
            sumlx += w[:, i] * x[:, i] * li
            suml2 += w[:, i] * li * li
        return l, sumlx, suml2

    with np.errstate(all="ignore"):
        l, sumlx, suml2 = fit(F(-nmax) / vmax)
        L = l + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, F(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = fit(-(F(nmax) + F(0.1) * F(step)) / vmax)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], l + nmax, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L[zero] = 0
    return np.where(zero, F(0), scale), L


def make_q3_quants(x, nmax: int):
    """Symmetric scale of each row of x (m, n) for levels -nmax..nmax-1, as ggml's make_q3_quants with
    do_rmse: start from nmax / max, then up to 5 passes that move single values to the level that improves
    the weighted (x²) fit. Returns (scale (m,), L (m, n) int32 in 0..2 nmax - 1)."""
    m, n = x.shape
    F = _F
    vmax = _signed_absmax(x)
    zero = np.abs(vmax) < _GROUP_MAX_EPS
    w = x * x
    with np.errstate(all="ignore"):
        L = np.clip(nearest_int((F(-nmax) / vmax)[:, None] * x), -nmax, nmax - 1)
        sumlx = np.zeros(m, F)
        suml2 = np.zeros(m, F)
        for i in range(n):
            li = L[:, i].astype(F)
            sumlx += w[:, i] * x[:, i] * li
            suml2 += w[:, i] * li * li
        running = ~zero
        for _ in range(5):
            n_changed = np.zeros(m, np.int32)
            for i in range(n):
                li = L[:, i].astype(F)
                slx = sumlx - w[:, i] * x[:, i] * li
                sl2 = suml2 - w[:, i] * li * li
                new_l = np.clip(nearest_int(x[:, i] * sl2 / slx), -nmax, nmax - 1)
                nl = new_l.astype(F)
                slx = slx + w[:, i] * x[:, i] * nl
                sl2 = sl2 + w[:, i] * nl * nl
                accept = (running & (sumlx - w[:, i] * x[:, i] * li > 0) & (new_l != L[:, i]) & (sl2 > 0)
                          & (slx * slx * suml2 > sumlx * sumlx * sl2))
                L[:, i] = np.where(accept, new_l, L[:, i])
                sumlx = np.where(accept, slx, sumlx)
                suml2 = np.where(accept, sl2, suml2)
                n_changed += accept
            running &= n_changed > 0
        scale = np.where(suml2 > 0, sumlx / suml2, F(0))
    L = L + nmax
    L[zero] = 0
    return np.where(zero, F(0), scale), L


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(nb, 256) values 0..3 -> (nb, 64) bytes: value h*128 + g*32 + l at bits 2g of byte h*32 + l."""
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _max_positive(v: np.ndarray) -> np.ndarray:
    """(nb, j) -> (nb,): C's `max = 0; if (v > max) max = v` (0 when no value is positive)."""
    return np.maximum(v.max(axis=1), _F(0))


def _quantize_q2_K(blocks):
    F = _F
    nb = blocks.shape[0]
    sub = blocks.reshape(nb * 16, 16)
    scales, mins, L = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 16, 16)
    max_scale, max_min = _max_positive(scales), _max_positive(mins)
    with np.errstate(all="ignore"):
        ls = np.where((max_scale > 0)[:, None], nearest_int((F(15) / max_scale)[:, None] * scales), 0)
        lm = np.where((max_min > 0)[:, None], nearest_int((F(15) / max_min)[:, None] * mins), 0)
    packed = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
    d16, d = _fp16_round(np.where(max_scale > 0, max_scale / F(15), F(0)))
    m16, dmin = _fp16_round(np.where(max_min > 0, max_min / F(15), F(0)))
    dl = d[:, None] * (packed & 0xF).astype(F)                      # (nb, 16)
    ml = dmin[:, None] * (packed >> 4).astype(F)
    with np.errstate(all="ignore"):
        l = np.clip(nearest_int((blocks.reshape(nb, 16, 16) + ml[:, :, None]) / dl[:, :, None]), 0, 3)
    L = np.where((dl != 0)[:, :, None], l, L).reshape(nb, 256)
    return np.concatenate([packed, _pack_2bit(L), d16.view(np.uint8).reshape(nb, 2),
                           m16.view(np.uint8).reshape(nb, 2)], axis=1)


def _quantize_q3_K(blocks):
    F = _F
    nb = blocks.shape[0]
    scales, L = make_q3_quants(blocks.reshape(nb * 16, 16), 4)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    max_scale = _signed_absmax(scales)
    has = max_scale != 0
    with np.errstate(all="ignore"):
        iscale = F(-32) / max_scale
        l = np.clip(nearest_int(iscale[:, None] * scales), -32, 31) + 32
    l = np.where(has[:, None], l, 32).astype(np.uint8)              # no scales: all bytes zero, i.e. -32
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:8] = (l[:, 0:8] & 0xF) | ((l[:, 8:16] & 0xF) << 4)
    high = (l >> 4).reshape(nb, 4, 4)                                # [j // 4, j % 4]
    packed[:, 8:12] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    packed[~has] = 0
    with np.errstate(all="ignore"):
        d16, d = _fp16_round(np.where(has, F(1) / iscale, F(0)))
        dl = d[:, None] * (l.astype(np.int32) - 32).astype(F)
        q = np.clip(nearest_int(blocks.reshape(nb, 16, 16) / dl[:, :, None]), -4, 3) + 4
    L = np.where((dl != 0)[:, :, None], q, L).reshape(nb, 256)
    # hmask: the high bit of value j at bit j // 32 of byte j % 32; a set bit means "q >= 4"
    high_bit = (L > 3).reshape(nb, 8, 32).astype(np.uint8)
    hmask = np.bitwise_or.reduce(high_bit << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    L = np.where(L > 3, L - 4, L)
    return np.concatenate([hmask, _pack_2bit(L), packed, d16.view(np.uint8).reshape(nb, 2)], axis=1)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """(nb, 8) six-bit scales and mins -> the 12 bytes `unpack_scale_min_k4` reads."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _k4_scales(blocks, nmax: int, rmin: float, nstep: int):
    """Q4_K/Q5_K: (L (nb, 8, 32), the 12 scale bytes, d16, dmin16) for 32-value sub-blocks with levels 0..nmax."""
    F = _F
    nb = blocks.shape[0]
    sub = blocks.reshape(nb * 8, 32)
    sum_x2 = np.zeros(nb * 8, F)
    for i in range(32):
        sum_x2 += sub[:, i] * sub[:, i]
    av_x = np.sqrt(sum_x2 / F(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, False)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale, max_min = _max_positive(scales), _max_positive(mins)
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
        inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d16, d = _fp16_round(max_scale / F(63))
    m16, dmin = _fp16_round(max_min / F(63))
    dl = d[:, None] * ls.astype(F)
    ml = dmin[:, None] * lm.astype(F)
    with np.errstate(all="ignore"):
        q = np.clip(nearest_int((blocks.reshape(nb, 8, 32) + ml[:, :, None]) / dl[:, :, None]), 0, nmax)
    L = np.where((dl != 0)[:, :, None], q, L)
    return L, _pack_scale_min_k4(ls, lm), d16.view(np.uint8).reshape(nb, 2), m16.view(np.uint8).reshape(nb, 2)


def _quantize_q4_K(blocks):
    L, scales, d, dmin = _k4_scales(blocks, 15, -1.0, 20)
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)                      # (chunk, low/high, l)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d, dmin, scales, qs], axis=1)


def _quantize_q5_K(blocks):
    L, scales, d, dmin = _k4_scales(blocks, 31, -0.5, 15)
    q = L.astype(np.uint8)                                             # (nb, 8 sub-blocks, 32)
    qh = np.bitwise_or.reduce((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    low = (q & 0xF).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d, dmin, scales, qh, qs], axis=1)


def _quantize_q6_K(blocks):
    F = _F
    nb = blocks.shape[0]
    scales, L = make_qx_quants(blocks.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    max_scale = _signed_absmax(scales)
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F(-128) / max_scale
        d16, d = _fp16_round(F(1) / iscale)
        sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
        dl = d[:, None] * sc.astype(F)
        q = np.clip(nearest_int(blocks.reshape(nb, 16, 16) / dl[:, :, None]), -32, 31) + 32
    L = np.where((dl != 0)[:, :, None], q, L).reshape(nb, 2, 4, 32).astype(np.uint8)   # (half, g, l)
    ql = ((np.concatenate([L[:, :, 0] & 0xF, L[:, :, 1] & 0xF], axis=2))
          | (np.concatenate([L[:, :, 2] & 0xF, L[:, :, 3] & 0xF], axis=2) << 4)).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)], axis=1)
    out[zero] = 0
    return out


Q2_K.quantize_blocks = classmethod(lambda cls, blocks: _quantize_q2_K(np.ascontiguousarray(blocks, _F)))
Q3_K.quantize_blocks = classmethod(lambda cls, blocks: _quantize_q3_K(np.ascontiguousarray(blocks, _F)))
Q4_K.quantize_blocks = classmethod(lambda cls, blocks: _quantize_q4_K(np.ascontiguousarray(blocks, _F)))
Q5_K.quantize_blocks = classmethod(lambda cls, blocks: _quantize_q5_K(np.ascontiguousarray(blocks, _F)))
Q6_K.quantize_blocks = classmethod(lambda cls, blocks: _quantize_q6_K(np.ascontiguousarray(blocks, _F)))
