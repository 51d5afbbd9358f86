"""The 32-value block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

All five store element j of a block in the low nibble (or byte) of byte j for j < 16 and in the high nibble
of byte j - 16 for j >= 16, so a block's quants are "first half low nibbles, second half high nibbles".
Quantizers reproduce ggml's reference C (quantize_row_*_ref) and gguf-py bit for bit.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .blocks import BlockFormat, bits_of, f16, nibbles, round_away, to_f16_bytes


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..15 (or the low 4 bits of 0..31) -> (n, 16) bytes, element j low, j + 16 high."""
    return (q[:, :16] & np.uint8(0x0F)) | (q[:, 16:] << np.uint8(4))


def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """(n, 1): the element of each block with the largest magnitude, sign kept (first one on ties); +0.0 for a
    block of zeros, as C's `max = 0; if (amax < fabsf(v)) ...` leaves it even when the zeros are -0.0."""
    v = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1, keepdims=True), axis=-1)
    return np.where(v == 0, np.float32(0), v)


def _min_max(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1) each: C's `if (v < min) min = v` and `if (v > max) max = v`: the first element reaching the
    extreme, which decides the sign of a zero (numpy's min/max may return either -0.0 or 0.0)."""
    lo = np.take_along_axis(blocks, blocks.argmin(axis=-1, keepdims=True), axis=-1)
    hi = np.take_along_axis(blocks, blocks.argmax(axis=-1, keepdims=True), axis=-1)
    return lo, hi


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


class Q4_0(BlockFormat, qtype=T.Q4_0):
    # 18 bytes:  | d: f16 | qs: 16 bytes |        qs[j] = q[j] | q[j + 16] << 4
    # value = d * (q - 8),  q in 0..15
    @classmethod
    def dequantize_blocks(cls, blocks):
        d = f16(blocks[:, 0:2])
        q = nibbles(blocks[:, 2:18]).reshape(-1, 32).astype(np.int8) - np.int8(8)
        return d * q.astype(np.float32)

    @classmethod
    def quantize_blocks(cls, blocks):
        d = _signed_absmax(blocks) / np.float32(-8)
        q = np.trunc(blocks * _inverse(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
        return np.concatenate([to_f16_bytes(d), _pack_nibbles(q)], axis=1)


class Q4_1(BlockFormat, qtype=T.Q4_1):
    # 20 bytes:  | d: f16 | m: f16 | qs: 16 bytes |
    # value = d * q + m,  q in 0..15
    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
        q = nibbles(blocks[:, 4:20]).reshape(-1, 32).astype(np.float32)
        return d * q + m

    @classmethod
    def quantize_blocks(cls, blocks):
        lo, hi = _min_max(blocks)
        d = (hi - lo) / np.float32(15)
        q = np.trunc((blocks - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
        return np.concatenate([to_f16_bytes(d), to_f16_bytes(lo), _pack_nibbles(q)], axis=1)


class Q5_0(BlockFormat, qtype=T.Q5_0):
    # 22 bytes:  | d: f16 | qh: u32 | qs: 16 bytes |    bit j of qh is bit 4 of q[j]
    # value = d * (q - 16),  q in 0..31
    @classmethod
    def dequantize_blocks(cls, blocks):
        d = f16(blocks[:, 0:2])
        qh = np.ascontiguousarray(blocks[:, 2:6]).view(np.uint32)
        q = nibbles(blocks[:, 6:22]).reshape(-1, 32) | (bits_of(qh, 32) << np.uint8(4))
        return d * (q.astype(np.int8) - np.int8(16)).astype(np.float32)

    @classmethod
    def quantize_blocks(cls, blocks):
        d = _signed_absmax(blocks) / np.float32(-16)
        q = np.trunc(blocks * _inverse(d) + np.float32(16.5)).astype(np.uint8).clip(0, 31)
        qh = np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")
        return np.concatenate([to_f16_bytes(d), qh, _pack_nibbles(q)], axis=1)


class Q5_1(BlockFormat, qtype=T.Q5_1):
    # 24 bytes:  | d: f16 | m: f16 | qh: u32 | qs: 16 bytes |
    # value = d * q + m,  q in 0..31
    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
        qh = np.ascontiguousarray(blocks[:, 4:8]).view(np.uint32)
        q = nibbles(blocks[:, 8:24]).reshape(-1, 32) | (bits_of(qh, 32) << np.uint8(4))
        return d * q.astype(np.float32) + m

    @classmethod
    def quantize_blocks(cls, blocks):
        lo, hi = _min_max(blocks)
        d = (hi - lo) / np.float32(31)
        q = np.trunc((blocks - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8).clip(0, 31)
        qh = np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")
        return np.concatenate([to_f16_bytes(d), to_f16_bytes(lo), qh, _pack_nibbles(q)], axis=1)


class Q8_0(BlockFormat, qtype=T.Q8_0):
    # 34 bytes:  | d: f16 | qs: 32 × int8 |
    # value = d * q
    @classmethod
    def dequantize_blocks(cls, blocks):
        d = f16(blocks[:, 0:2])
        return d * np.ascontiguousarray(blocks[:, 2:34]).view(np.int8).astype(np.float32)

    @classmethod
    def quantize_blocks(cls, blocks):
        d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
        q = round_away(blocks * _inverse(d)).astype(np.int8).view(np.uint8)
        return np.concatenate([to_f16_bytes(d), q], axis=1)
