"""Quantize a GGUF model as llama-quantize does: the same type for every tensor, bit for bit.

    plan(gguf, file_type, ...) -> list[TensorPlan]        which type each tensor gets (llama_tensor_get_type)
    quantize_model(src, dst, file_type, ...) -> Summary   write the quantized model

The file types are llama-quantize's (`FILE_TYPES`, ids of llama_ftype). A file type names a default tensor
type; the `_S/_M/_L` mixes and every k-quant type then give some tensors other types, as
llama.cpp's `llama_tensor_get_type` does (src/llama-quant.cpp), reproduced in `_mix_type` for the dense
models nibble runs:

- `output.weight` (and `token_embd.weight` when the model ties it to the output) gets Q6_K, or Q8_0 when the
  file type is Q8_0 or the row length is not a multiple of the default type's block;
- attn_v: Q2_K -> Q3_K (Q4_K when n_head / n_head_kv >= 4); Q3_K_M -> Q5_K for the first two, Q4_K after;
  Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M -> Q6_K on `use_more_bits` layers; Q4_K_S -> Q5_K for the first four;
- ffn_down: Q2_K -> Q3_K; Q3_K_M -> Q5_K in the first 1/16 of layers, Q4_K after; Q3_K_L -> Q5_K;
  Q4_K_M/Q5_K_M -> Q6_K on `use_more_bits` layers; Q4_K_S -> Q5_K in the first 1/8;
- attn_output: Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K;
- then a row length that is not a multiple of 256 falls back: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0 (F16 if even that does not divide it).

Only tensors of two or more dimensions whose names end in "weight" are quantized (norms, biases and a few
special tables keep their type). A tensor whose chosen type is its current type is copied byte for byte;
any other quantized tensor is dequantized and quantized again, which needs `allow_requantize` (as
`--allow-requantize` does for llama-quantize). Tensors are written in llama.cpp's order (by layer number,
then by name), metadata is copied with general.file_type and general.quantization_version set, and the file
is written to a temporary name beside `dst` and renamed only once complete.
"""

from __future__ import annotations

import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..errors import NibbleError
from ..formats import gguf as G
from . import dequantize
from .blocks import FORMATS
from .jit import KERNEL_LOCK, get_threads, set_threads
from .quantize_kernels import BLOCK_BYTES, quantize_k

QUANTIZATION_VERSION = 2          # GGML_QNT_VERSION

# llama-quantize's names -> (llama_ftype id, default tensor type)
FILE_TYPES: dict[str, tuple[int, T]] = {
    "F16": (1, T.F16), "BF16": (32, T.BF16),
    "Q4_0": (2, T.Q4_0), "Q4_1": (3, T.Q4_1), "Q5_0": (8, T.Q5_0), "Q5_1": (9, T.Q5_1), "Q8_0": (7, T.Q8_0),
    "Q2_K": (10, T.Q2_K),
    "Q3_K_S": (11, T.Q3_K), "Q3_K_M": (12, T.Q3_K), "Q3_K_L": (13, T.Q3_K),
    "Q4_K_S": (14, T.Q4_K), "Q4_K_M": (15, T.Q4_K),
    "Q5_K_S": (16, T.Q5_K), "Q5_K_M": (17, T.Q5_K),
    "Q6_K": (18, T.Q6_K),
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
UNQUANTIZED = frozenset({T.F32, T.F16, T.BF16})
# tensor types --output-tensor-type / --token-embedding-type may name: those nibble can write
TENSOR_TYPES = {t.name: t for t in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                                    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)}
# row length not a multiple of 256: llama.cpp's tensor_type_fallback
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

SLAB_VALUES = 1 << 24             # values dequantized at a time (64 MiB of float32)


def file_type(name: str) -> tuple[str, int, T]:
    """A llama-quantize type name (any case; Q4_K means Q4_K_M) -> (canonical name, ftype id, default type)."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in FILE_TYPES:
        raise NibbleError(f"unknown quantization type {name!r}; choose one of {', '.join(FILE_TYPES)}")
    return (key, *FILE_TYPES[key])


def tensor_type(name: str) -> T:
    """A ggml type name (any case) for --output-tensor-type / --token-embedding-type."""
    t = TENSOR_TYPES.get(name.upper())
    if t is None:
        raise NibbleError(f"unknown tensor type {name!r}; choose one of {', '.join(TENSOR_TYPES)}")
    return t


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    src_type: int
    dst_type: int
    fallback: bool = False      # the row length did not fit the chosen type: a 32-value type instead

    @property
    def copied(self) -> bool:
        return self.src_type == self.dst_type


@dataclass
class Summary:
    path: Path
    file_type: str
    tensors: list[TensorPlan]
    bytes_in: int
    bytes_out: int
    requantized: int = 0


# ---- which tensors, which types (llama-quant.cpp) ----

def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _write_order(names) -> list[str]:
    """llama_model_loader's weights_map order: by layer number (non-layer tensors first), then by name."""
    return sorted(names, key=lambda n: (_layer(n), n.encode()))


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                      ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                      ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                      ("ffn_down", "ffn_down")):
        if part in name:
            return cat
    return "other"


_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
                    "ssm_conv1d", "shortconv.conv.weight", "time_mix_first.weight", "attn_rel_b.weight",
                    ".position_embd", ".rel_pos", ".patch_embd")


def _allows_quantization(name: str, shape) -> bool:
    """llama.cpp's tensor_allows_quantization: 2-D or more, named *weight, not a norm or a small special table."""
    if len(shape) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(part in name for part in _NEVER_QUANTIZED)


@dataclass
class _MixState:
    """quantize_state_impl: the model's facts and the running counters of the tensors typed so far."""
    arch: str
    n_layer: int
    n_gqa: float
    n_expert: int
    is_70b: bool
    tied_embeddings: bool
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mix_type(s: _MixState, t: T, name: str, ncols: int, ftype: str, category: str, output_type: T | None) -> T:
    """llama_tensor_get_type_impl for the dense file types of FILE_TYPES (no importance matrix)."""
    falcon = s.arch == "falcon"
    if category == "output" or (s.tied_embeddings and category == "token_embd"):
        if output_type is not None:
            return output_type
        block = GGML_QUANT_SIZES[t][0]
        if falcon or ncols % block:
            return T.Q8_0
        return t if t == T.Q8_0 else T.Q6_K
    if category == "attn_v":
        if ftype == "Q2_K":
            t = T.Q4_K if s.n_gqa >= 4 else T.Q3_K
        elif ftype == "Q3_K_M":
            t = T.Q5_K if s.i_attention_wv < 2 else T.Q4_K
        elif ftype == "Q3_K_L":
            t = T.Q5_K
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(s.i_attention_wv, s.n_attention_wv):
            t = T.Q6_K
        elif ftype == "Q4_K_S" and s.i_attention_wv < 4:
            t = T.Q5_K
        if s.is_70b and t in (T.Q3_K, T.Q4_K):
            t = T.Q5_K
        if s.n_expert == 8:
            t = T.Q8_0
        s.i_attention_wv += 1
    elif category == "attn_k":
        if s.n_expert == 8:
            t = T.Q8_0
    elif category == "ffn_down":
        i, n = s.i_ffn_down, s.n_layer
        if s.n_expert > 1:
            i = _layer(name)
        if ftype == "Q2_K":
            t = T.Q3_K
        elif ftype == "Q3_K_M":
            t = T.Q5_K if i < n // 16 else T.Q4_K if not falcon or _use_more_bits(i, n) else T.Q3_K
        elif ftype == "Q3_K_L":
            t = T.Q4_K if falcon else T.Q5_K
        elif ftype == "Q4_K_M":
            if falcon:
                t = T.Q6_K if i < n // 16 else T.Q5_K if _use_more_bits(i, n) else T.Q4_K
            elif _use_more_bits(i, n):
                t = T.Q6_K
        elif ftype == "Q5_K_M" and _use_more_bits(i, n):
            t = T.Q6_K
        elif ftype == "Q4_K_S" and not falcon and i < n // 8:
            t = T.Q5_K
        s.i_ffn_down += 1
    elif category == "attn_output":
        if not falcon:
            if s.n_expert == 8:
                if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                    t = T.Q5_K
            elif ftype == "Q2_K":
                t = T.Q3_K
            elif ftype == "Q3_K_M":
                t = T.Q4_K
            elif ftype == "Q3_K_L":
                t = T.Q5_K
        elif ftype == "Q3_K_L":
            t = T.Q4_K
    return t


def plan(gguf: G.GGUFFile, ftype: str, *, pure: bool = False, output_tensor_type: T | None = None,
         token_embedding_type: T | None = None) -> list[TensorPlan]:
    """The type each tensor of `gguf` gets under llama-quantize file type `ftype`, in the order written."""
    ftype, _, default = file_type(ftype)
    arch = gguf.architecture or ""
    names = _write_order(gguf.tensors)

    def meta(key, fallback=0):
        v = gguf.get(f"{arch}.{key}", fallback)
        return int(np.asarray(v).reshape(-1)[0]) if v is not None else fallback

    n_layer = meta("block_count")
    n_head, n_head_kv = meta("attention.head_count", 1), meta("attention.head_count_kv", 0)
    n_head_kv = n_head_kv or n_head
    state = _MixState(arch=arch, n_layer=n_layer, n_gqa=n_head / n_head_kv if n_head_kv else 0,
                      n_expert=meta("expert_count"), is_70b=arch == "llama" and n_layer == 80 and n_head != n_head_kv,
                      tied_embeddings="output.weight" not in gguf.tensors,
                      n_attention_wv=sum(_category(n) == "attn_v" for n in names))
    plans = []
    for name in names:
        info = gguf.tensors[name]
        t, fallback = T(info.qtype), False
        if _allows_quantization(name, info.shape):
            category, ncols = _category(name), info.shape[-1]
            if token_embedding_type is not None and category == "token_embd":
                t = token_embedding_type
            elif output_tensor_type is not None and category == "output":
                t = output_tensor_type
            else:
                t = default
                if t not in UNQUANTIZED:
                    if not pure:
                        t = _mix_type(state, t, name, ncols, ftype, category, output_tensor_type)
                    if ncols % GGML_QUANT_SIZES[t][0]:           # tensor_type_fallback
                        t, fallback = FALLBACK.get(t, t), True
                        if ncols % GGML_QUANT_SIZES[t][0]:
                            t = T.F16
        plans.append(TensorPlan(name, tuple(info.shape), int(info.qtype), int(t), fallback))
    return plans


# ---- quantizing one tensor ----

def _quantize_rows(x: np.ndarray, qtype: int, threads: int) -> np.ndarray:
    """float32 (rows, k) -> bytes (rows, row_bytes) of qtype: the K types on Numba's threads, the others with
    the numpy quantizers of `FORMATS` over row chunks on a thread pool."""
    rows, k = x.shape
    if qtype in BLOCK_BYTES:
        return quantize_k(x, qtype).reshape(rows, -1)
    fmt = FORMATS[qtype]
    chunks = np.array_split(np.arange(rows), max(1, min(rows, threads * 4)))

    def run(idx):
        return fmt.quantize_blocks(x[idx[0]:idx[-1] + 1].reshape(-1, fmt.block_size)).reshape(len(idx), -1)
    with ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(run, [c for c in chunks if len(c)])), axis=0)


def quantize_tensor(info: G.TensorInfo, qtype: int, threads: int) -> np.ndarray:
    """The bytes of tensor `info` converted to `qtype` (dequantized slab by slab, then quantized)."""
    k = info.shape[-1]
    rows = info.n_elements // k
    src = info.data.reshape(rows, -1)
    slab = max(1, SLAB_VALUES // k)
    out = []
    for r in range(0, rows, slab):
        part = src[r:r + slab]
        x = dequantize(part, info.qtype, (part.shape[0], k))
        out.append(_quantize_rows(x, qtype, threads))
    return np.concatenate(out, axis=0)


# ---- writing GGUF ----

def _pack_value(value, vtype: int, item_type: int | None, out: list[bytes]) -> None:
    if vtype == G.STRING:
        b = value.encode("utf-8")
        out.append(len(b).to_bytes(8, "little") + b)
    elif vtype == G.ARRAY:
        out.append(int(item_type).to_bytes(4, "little") + len(value).to_bytes(8, "little"))
        if item_type == G.STRING:
            for s in value:
                _pack_value(s, G.STRING, None, out)
        elif item_type == G.ARRAY:
            for v in value:
                _pack_value(v.value, v.type, v.item_type, out)
        else:
            out.append(np.asarray(value).astype(G._SCALAR_DTYPES[item_type]).tobytes())
    else:
        out.append(G._SCALAR_STRUCTS[vtype].pack(value))


def _header(fields: dict[str, G.MetadataValue], plans: list[TensorPlan], alignment: int) -> bytes:
    parts = [G.GGUF_MAGIC, (3).to_bytes(4, "little"), len(plans).to_bytes(8, "little"),
             len(fields).to_bytes(8, "little")]
    for key, f in fields.items():
        _pack_value(key, G.STRING, None, parts)
        parts.append(int(f.type).to_bytes(4, "little"))
        _pack_value(f.value, f.type, f.item_type, parts)
    offset = 0
    for p in plans:
        _pack_value(p.name, G.STRING, None, parts)
        parts.append(len(p.shape).to_bytes(4, "little"))
        for n in reversed(p.shape):
            parts.append(int(n).to_bytes(8, "little"))
        parts.append(p.dst_type.to_bytes(4, "little") + offset.to_bytes(8, "little"))
        offset += _padded(_nbytes(p), alignment)
    header = b"".join(parts)
    return header + bytes(_padded(len(header), alignment) - len(header))


def _nbytes(p: TensorPlan) -> int:
    block, size = GGML_QUANT_SIZES[T(p.dst_type)]
    return int(np.prod(p.shape)) // block * size


def _padded(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _metadata(gguf: G.GGUFFile, ftype_id: int) -> dict[str, G.MetadataValue]:
    """The input's metadata, without split keys, with general.quantization_version and general.file_type
    set (moved to the end, as gguf_set_val does)."""
    fields = {k: v for k, v in gguf.fields.items()
              if k not in ("split.no", "split.count", "split.tensors.count",
                           "general.quantization_version", "general.file_type")}
    fields["general.quantization_version"] = G.MetadataValue(QUANTIZATION_VERSION, G.UINT32)
    fields["general.file_type"] = G.MetadataValue(ftype_id, G.UINT32)
    return fields


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, ftype: str, *,
                   allow_requantize: bool = False, pure: bool = False, output_tensor_type: str | None = None,
                   token_embedding_type: str | None = None, threads: int | None = None,
                   progress: Callable[[int, int, TensorPlan], None] | None = None) -> Summary:
    """Write `src` (a GGUF file) quantized to llama-quantize type `ftype` to `dst`; see the module docstring.
    `progress(i, n, plan)` is called before each tensor. Nothing is left at `dst` unless it completes."""
    name, ftype_id, _ = file_type(ftype)
    out_type = tensor_type(output_tensor_type) if output_tensor_type else None
    embd_type = tensor_type(token_embedding_type) if token_embedding_type else None
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise NibbleError(f"the output {dst} is the input file; write the quantized model elsewhere")
    gguf = G.GGUFFile(src)
    plans = plan(gguf, name, pure=pure, output_tensor_type=out_type, token_embedding_type=embd_type)
    for p in plans:
        if p.dst_type not in FORMATS:
            raise NibbleError(f"tensor {p.name!r}: nibble cannot write {T(p.dst_type).name}")
        if not p.copied and int(p.src_type) not in FORMATS:
            raise NibbleError(f"tensor {p.name!r} is stored as {T(p.src_type).name}, which nibble cannot read")
        if not p.copied and T(p.src_type) not in UNQUANTIZED and not allow_requantize:
            raise NibbleError(f"tensor {p.name!r} is already quantized ({T(p.src_type).name}); requantizing is "
                              f"disabled: pass --allow-requantize (allow_requantize=True) to dequantize and "
                              f"quantize it again, at some cost in quality")
    alignment = gguf.alignment
    header = _header(_metadata(gguf, ftype_id), plans, alignment)
    threads = threads or get_threads()
    summary = Summary(dst, name, plans, bytes_in=gguf.file_size, bytes_out=0,
                      requantized=sum(1 for p in plans if not p.copied and T(p.src_type) not in UNQUANTIZED))
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, KERNEL_LOCK:
            previous = get_threads()
            set_threads(threads)
            try:
                f.write(header)
                for i, p in enumerate(plans):
                    if progress:
                        progress(i, len(plans), p)
                    info = gguf.tensors[p.name]
                    data = info.data if p.copied else quantize_tensor(info, p.dst_type, threads)
                    f.write(memoryview(np.ascontiguousarray(data).reshape(-1)))
                    f.write(bytes(_padded(data.nbytes, alignment) - data.nbytes))
                if progress:
                    progress(len(plans), len(plans), None)
            finally:
                set_threads(previous)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)           # mkstemp's 0600 would otherwise stick to the output
        os.replace(tmp, dst)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise NibbleError(f"cannot write {dst}: {e.strerror or e}") from None
        raise
    finally:
        gguf.close()
    summary.bytes_out = dst.stat().st_size
    return summary
