"""Unquantized types: F32, F16 and BF16, each a "block" of one value."""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .blocks import BlockFormat


class F32(BlockFormat, qtype=T.F32):
    # | f32 little-endian |
    @classmethod
    def dequantize_blocks(cls, blocks):
        return np.ascontiguousarray(blocks).view(np.float32).copy()

    @classmethod
    def quantize_blocks(cls, blocks):
        return np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint8).copy()


class F16(BlockFormat, qtype=T.F16):
    # | IEEE half: sign 1 | exponent 5 | mantissa 10 |
    @classmethod
    def dequantize_blocks(cls, blocks):
        return np.ascontiguousarray(blocks).view(np.float16).astype(np.float32)

    @classmethod
    def quantize_blocks(cls, blocks):
        return np.ascontiguousarray(blocks, dtype=np.float32).astype(np.float16).view(np.uint8)


class BF16(BlockFormat, qtype=T.BF16):
    # | bfloat16: the top 16 bits of an f32: sign 1 | exponent 8 | mantissa 7 |
    @classmethod
    def dequantize_blocks(cls, blocks):
        bits = np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)

    @classmethod
    def quantize_blocks(cls, blocks):
        # ggml_compute_fp32_to_bf16: NaNs become quiet NaNs, everything else rounds to nearest even.
        n = np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint32).astype(np.uint64)
        is_nan = (n & 0x7FFFFFFF) > 0x7F800000
        rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
        quiet = ((n & 0xFFFF0000) | (64 << 16)) >> 16
        return np.where(is_nan, quiet, rounded).astype(np.uint16).view(np.uint8)
