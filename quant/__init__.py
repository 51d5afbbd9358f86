"""Quantized block formats: numpy reference dequantizers, fused Numba kernels, quantizers.

    dequantize(data, qtype, shape) -> f32[shape]          the tensor's values (bit-exact with the references)
    matmul(x, data, qtype, shape, out=None) -> f32[n, m]  x @ W.T without materialising W
    quantize(x, qtype) -> uint8[rows, row_bytes]          every type above, bit-exact with ggml's quantizers
    quantize_model(src, dst, "Q4_K_M", ...)               a GGUF file as llama-quantize writes it (quantize_gguf.py)
    check_supported(qtype, tensor_name)                   raises UnsupportedQuantError

`data` is a tensor's raw bytes as stored in the GGUF file, `qtype` a `gguf.GGMLQuantizationType` or its int,
`shape` numpy order (..., row_length). Behind `matmul` is `multiply`, the one matmul dispatch (the models'
linear layers and `nibble bench --kernels` call it too): `nibble.quant.ggml_exact` holds the kernels for the
types llama.cpp's arithmetic is reproduced for (Q4_1, Q5_0, Q8_0, Q4_K, Q6_K: `matvec`, `gemm`),
`nibble.quant.kernels` one `gemm` for the other types and the dequantizers of all (`get_rows` and
`dequantize_rows`). Both build their kernels per weight type on first use, so a model compiles only its own.
"""

from __future__ import annotations

import threading

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import UnsupportedQuantError
from . import floats, kquants, legacy  # noqa: F401  (registers the formats)
from . import ggml_exact, kernels
from .blocks import FORMATS
from .jit import KERNEL_LOCK, apply_threads, get_threads, set_threads

__all__ = ["SUPPORTED_TYPES", "check_supported", "dequantize", "dequantize_reference", "matmul", "quantize",
           "quantize_model", "round_activations", "scratch_shape", "row_bytes", "set_threads", "get_threads", "FORMATS"]

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(GGMLQuantizationType(t) for t in FORMATS)
QUANTIZABLE_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    GGMLQuantizationType(t) for t, f in FORMATS.items() if f.can_quantize())


def _type_name(qtype) -> str:
    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"type {int(qtype)}"


def check_supported(qtype, tensor_name: str) -> None:
    """Raise UnsupportedQuantError if nibble has no kernels for this GGML type."""
    if int(qtype) not in FORMATS:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise UnsupportedQuantError(
            f"tensor {tensor_name!r} is stored as {_type_name(qtype)}, which nibble cannot read; "
            f"use a GGUF quantized with one of {supported} (for example Q4_K_M or Q8_0)")


def row_bytes(qtype, k: int) -> int:
    """Bytes in a row of k values of this type."""
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]
    if k % block_size:
        raise ValueError(f"a {_type_name(qtype)} row holds a multiple of {block_size} values, not {k}")
    return k // block_size * type_size


def scratch_shape(k: int, n: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of the (xq int8, xs float32) scratch that `multiply` needs for n rows of length k."""
    return (n, k), (n, k // 16)


def _prepare(data, qtype, shape) -> tuple[np.ndarray, int, int, int]:
    """Normalise arguments so every kernel compiles once: bytes as C-contiguous uint8 1-D, ints as int."""
    qtype = int(qtype)
    check_supported(qtype, "<array>")
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("shape must have at least one dimension")
    k = shape[-1]
    m = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    w = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if w.flags.writeable:  # weights are read-only mmap views in a model: one compiled signature for both
        w = w.view()
        w.flags.writeable = False
    expected = m * row_bytes(qtype, k)
    if w.size != expected:
        raise ValueError(f"{_type_name(qtype)} data of shape {shape} is {expected} bytes, got {w.size}")
    return w, qtype, m, k


def dequantize(data, qtype, shape) -> np.ndarray:
    """The values of a tensor as float32 of `shape`, computed by the Numba kernels (bit-exact with
    `dequantize_reference`)."""
    w, qtype, m, k = _prepare(data, qtype, shape)
    out = np.empty((m, k), np.float32)
    with KERNEL_LOCK:
        apply_threads()
        kernels.dequantize_rows(out, w, qtype, m, k)
    return out.reshape(tuple(int(s) for s in shape))


def dequantize_reference(data, qtype, shape) -> np.ndarray:
    """The same values computed by the numpy reference of the block format (slow, obvious, the definition)."""
    w, qtype, m, k = _prepare(data, qtype, shape)
    fmt = FORMATS[qtype]
    values = fmt.dequantize_blocks(w.reshape(-1, fmt.type_size))
    return values.reshape(tuple(int(s) for s in shape))


def round_activations(x, qtype) -> np.ndarray:
    """x (..., k) as llama.cpp's matmul against a `qtype` matrix takes it: rounded to the type's activation
    format (ggml's vec_dot_type) and back, float64. 8-bit blocks of 32 with an fp16 scale (q8_0) for the
    legacy types, of 256 with an f32 scale (q8_K) for the k-quants, fp16 for F16, bfloat16 for BF16, unchanged
    for F32. The numpy reference forwards multiply through it: this rounding is part of the model as llama.cpp
    evaluates it (on SmolLM2 it moves the attention outputs by NMSE ~5e-3 against unrounded float64)."""
    qtype = GGMLQuantizationType(int(qtype))
    x32 = np.asarray(x, np.float32)
    if qtype == GGMLQuantizationType.F32:
        return x32.astype(np.float64)
    if qtype == GGMLQuantizationType.F16:
        return x32.astype(np.float16).astype(np.float64)
    if qtype == GGMLQuantizationType.BF16:
        bits = x32.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000           # round to nearest even
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    block = GGML_QUANT_SIZES[qtype][0]
    b = x32.reshape(-1, block)
    with np.errstate(divide="ignore", invalid="ignore"):
        if block == 256:                # q8_K: the scale from the value of largest magnitude, with its sign
            big = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)
            iscale = np.where(big != 0, np.float32(-127) / big, np.float32(0))
            q = np.minimum(np.rint(iscale * b), 127)
            d = np.where(big != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float64)
        else:                           # q8_0: d = max |x| / 127, stored as fp16
            d32 = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
            q = np.rint(b * np.where(d32 > 0, np.float32(1) / d32, np.float32(0)))
            d = d32.astype(np.float16).astype(np.float64)
    return (q * d).reshape(x32.shape)


_scratch = threading.local()


def _scratch_for(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    cache = getattr(_scratch, "buffers", None)
    if cache is None:
        cache = _scratch.buffers = {}
    key = (n, k)
    if key not in cache:
        xq_shape, xs_shape = scratch_shape(k, n)
        cache[key] = (np.empty(xq_shape, np.int8), np.empty(xs_shape, np.float32))
    return cache[key]


def matmul(x, data, qtype, shape, out=None) -> np.ndarray:
    """x @ W.T for W the (m, k) tensor in `data`: x float32 (n, k) -> (n, m), or (k,) -> (m,).

    Runs `multiply`, as the models do (for a batch of n rows, the arithmetic llama.cpp gives such a batch);
    results are within float rounding plus 8-bit activation quantization of the exact product. `out` (float32, C-contiguous, the result's shape)
    is written in place, and with it nothing is allocated after the first call for a shape.
    """
    w, qtype, m, k = _prepare(data, qtype, shape)
    if len(shape) != 2:
        raise ValueError(f"matmul needs a 2-D weight shape (m, k), got {tuple(shape)}")
    x = np.asarray(x)
    vector = x.ndim == 1
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    x2 = x.reshape(1, -1) if vector else x
    if x2.ndim != 2 or x2.shape[1] != k:
        raise ValueError(f"x of shape {x.shape} does not match weights of shape {tuple(shape)}")
    n = x2.shape[0]
    result_shape = (m,) if vector else (n, m)
    if out is None:
        out = np.empty(result_shape, np.float32)
    elif out.shape != result_shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {result_shape}")
    xq, xs = _scratch_for(n, k)
    with KERNEL_LOCK:                # one thread in Numba's pool at a time (a model's engine thread included)
        apply_threads()
        multiply(out.reshape(n, m), x2, xq, xs, w, qtype, m, k)
    return out


def multiply(out, x, xq, xs, w, qtype, m, k, kinds=None) -> None:
    """out (n, m) = x (n, k) @ W.T for W the (m, k) tensor in bytes `w`, with caller-provided scratch xq int8
    (n, k) and xs float32 (n, k // 16); allocates nothing. The one dispatch that `matmul`, the models'
    linear layers and `nibble bench --kernels` share: the types of `ggml_exact.EXACT_TYPES` run the kernels
    that compute llama.cpp's arithmetic, the others `kernels`. `kinds` (int8 per row, see
    `ggml_exact.ROW_GROUP4`/`ROW_TILED`; None: the kinds llama.cpp gives a batch of n rows) picks each row's
    arithmetic where llama.cpp's depends on the batch."""
    n = x.shape[0]
    if qtype in ggml_exact.EXACT_TYPES:
        if kinds is None:
            kinds = ggml_exact.batch_kinds(n)
        if n == 1 and kinds[0] == 0:
            ggml_exact.matvec(out[0], x[0], xq[0], xs[0], w, qtype, m, k)
        else:
            ggml_exact.gemm(out, x, xq, xs, w, qtype, m, k, kinds)
    else:
        kernels.gemm(out, x, xq, xs, w, qtype, m, k)


def quantize(x, qtype) -> np.ndarray:
    """float32 (rows, k) -> the bytes of those rows in `qtype`, (rows, k / block_size * type_size) uint8,
    bit-exact with ggml's reference quantizers."""
    qtype = int(qtype)
    check_supported(qtype, "<array>")
    fmt = FORMATS[qtype]
    if not fmt.can_quantize():
        writable = ", ".join(sorted(t.name for t in QUANTIZABLE_TYPES))
        raise UnsupportedQuantError(f"nibble cannot quantize to {_type_name(qtype)}; it can write {writable}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"quantize takes (rows, k) float32, got shape {x.shape}")
    rows, k = x.shape
    row_bytes(qtype, k)
    blocks = fmt.quantize_blocks(x.reshape(-1, fmt.block_size))
    return np.ascontiguousarray(blocks).reshape(rows, -1)


from .quantize_gguf import quantize_model  # noqa: E402  (it uses `dequantize` above)
