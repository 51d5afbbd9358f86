"""The block-format registry: one small class per GGML tensor type, registered by its type id.

A quantized row of `k` values is `k / block_size` blocks of `type_size` bytes each. Each format class turns
a `(n_blocks, type_size)` uint8 array into `(n_blocks, block_size)` float32 values with plain numpy; these
reference dequantizers are the definition every fast kernel is tested against (and they are themselves
tested bit-exact against `gguf.quants`). Formats that nibble can also write have `quantize_blocks`.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

FORMATS: dict[int, type[BlockFormat]] = {}


class BlockFormat:
    qtype: GGMLQuantizationType
    block_size: int   # values per block
    type_size: int    # bytes per block

    def __init_subclass__(cls, qtype: GGMLQuantizationType, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        FORMATS[int(qtype)] = cls

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """(n_blocks, type_size) uint8 -> (n_blocks, block_size) float32."""
        raise NotImplementedError

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """(n_blocks, block_size) float32 -> (n_blocks, type_size) uint8."""
        raise NotImplementedError(f"nibble cannot write {cls.qtype.name}")

    @classmethod
    def can_quantize(cls) -> bool:
        return cls.quantize_blocks.__func__ is not BlockFormat.quantize_blocks.__func__


# ---- small helpers shared by the formats ----

def f16(field: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 little-endian halves -> (n, 1) float32."""
    return np.ascontiguousarray(field).view(np.float16).astype(np.float32)


def to_f16_bytes(values: np.ndarray) -> np.ndarray:
    """(n, 1) float32 -> (n, 2) uint8 holding the nearest halves."""
    return values.astype(np.float16).view(np.uint8)


def nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, m) bytes -> (n, 2, m) values: [:, 0] the low nibbles, [:, 1] the high nibbles."""
    return np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def bits_of(qh: np.ndarray, n_bits: int) -> np.ndarray:
    """(n, 1) uint32 -> (n, n_bits) uint8: bit j of each word at column j."""
    return ((qh >> np.arange(n_bits, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)


def round_away(x: np.ndarray) -> np.ndarray:
    """Round half away from zero, like C's roundf (numpy's rint rounds half to even)."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))
