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
