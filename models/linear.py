"""Weights as the architectures see them, taken from a GGUF file by name, and the one call that multiplies.

GGUF tensor names live here and nowhere else (`TENSOR_NAMES`); an architecture asks for its weights by
its own short names (`wq`, `ffn_down`, ...) and says which it needs and with which shape.

Matrices stay as stored (quantized bytes, zero-copy over the mmap); vectors (norms, biases) are small and are
dequantized to float32 once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import ModelFormatError
from ..formats.gguf import GGUFFile, TensorInfo
from .. import quant

# our name -> GGUF name ("{}" is the block index)
TENSOR_NAMES = {
    "token_embd": "token_embd.weight",
    "output_norm": "output_norm.weight",
    "output": "output.weight",
    "attn_norm": "blk.{}.attn_norm.weight",
    "wq": "blk.{}.attn_q.weight",
    "wk": "blk.{}.attn_k.weight",
    "wv": "blk.{}.attn_v.weight",
    "wo": "blk.{}.attn_output.weight",
    "bq": "blk.{}.attn_q.bias",
    "bk": "blk.{}.attn_k.bias",
    "bv": "blk.{}.attn_v.bias",
    "q_norm": "blk.{}.attn_q_norm.weight",
    "k_norm": "blk.{}.attn_k_norm.weight",
    "post_attn_norm": "blk.{}.post_attention_norm.weight",
    "ffn_norm": "blk.{}.ffn_norm.weight",
    "ffn_gate": "blk.{}.ffn_gate.weight",
    "ffn_up": "blk.{}.ffn_up.weight",
    "ffn_down": "blk.{}.ffn_down.weight",
    "post_ffn_norm": "blk.{}.post_ffw_norm.weight",
}


@dataclass(frozen=True)
class Linear:
    """An (m, k) weight matrix as stored in the file: y = x @ W.T."""
    name: str
    data: np.ndarray      # uint8, read-only, the raw blocks
    qtype: int
    m: int
    k: int

    def dequantize(self) -> np.ndarray:
        return quant.dequantize(self.data, self.qtype, (self.m, self.k))

    @cached_property
    def matvec(self):
        """The compiled one-row kernel of this weight type (`quant.ggml_exact.matvec`'s), or None where the
        type has none: the decode step calls it without `quant.multiply`'s dispatch (~2 µs a call)."""
        return quant.ggml_exact.matvec_kernel(self.qtype)

    @cached_property
    def gemm(self):
        """The compiled batch kernel of this weight type (`quant.ggml_exact.gemm`'s), or None: as `matvec`,
        called without the dispatch (a SmolLM2 step of a few rows makes 121 such calls)."""
        return quant.ggml_exact.gemm_kernel(self.qtype)


class WeightSource:
    """Looks weights up in a GGUF file by our names, checking presence, shape and type."""

    def __init__(self, gguf: GGUFFile):
        self.gguf = gguf

    def _info(self, name: str, layer: int | None) -> TensorInfo | None:
        return self.gguf.tensors.get(TENSOR_NAMES[name].format(layer))

    def gguf_name(self, name: str, layer: int | None = None) -> str:
        return TENSOR_NAMES[name].format(layer)

    def has(self, name: str, layer: int | None = None) -> bool:
        return self._info(name, layer) is not None

    def _get(self, name: str, layer: int | None, shape: tuple[int, ...]) -> TensorInfo:
        t = self._info(name, layer)
        gname = self.gguf_name(name, layer)
        if t is None:
            raise ModelFormatError(f"{self.gguf.name}: tensor '{gname}' is missing")
        if tuple(t.shape) != tuple(shape):
            raise ModelFormatError(f"{self.gguf.name}: tensor '{gname}' has shape {list(t.shape)}, "
                                   f"expected {list(shape)} from the hyperparameters")
        quant.check_supported(t.qtype, gname)
        return t

    def matrix(self, name: str, layer: int | None, m: int, k: int) -> Linear:
        t = self._get(name, layer, (m, k))
        return Linear(t.name, t.data, int(t.qtype), m, k)

    def vector(self, name: str, layer: int | None, n: int) -> np.ndarray:
        t = self._get(name, layer, (n,))
        # the numpy reference (bit-exact with the kernels): vectors are small, and a parallel kernel run from
        # the loading thread would leave an OpenMP thread team beside the engine thread's, slowing every step
        return np.ascontiguousarray(quant.dequantize_reference(t.data, t.qtype, (n,)), dtype=np.float32)

    def vector_or_none(self, name: str, layer: int | None, n: int) -> np.ndarray | None:
        return self.vector(name, layer, n) if self.has(name, layer) else None


class Scratch:
    """Activation-quantization scratch for the matmul kernels, sized once for the largest batch and width."""

    def __init__(self, max_batch: int, max_k: int):
        # flat, so that every (B, k) view of them is C-contiguous (one compiled kernel signature)
        self.xq = np.zeros(max_batch * max_k, dtype=np.int8)
        self.xs = np.zeros(max_batch * max_k // 16, dtype=np.float32)
        self._row: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(xq, xs) for one activation row of width k, views made once."""
        views = self._row.get(k)
        if views is None:
            views = self._row[k] = (self.xq[:k], self.xs[:k // 16])
        return views

    def rows(self, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(xq, xs) for n activation rows of width k, (n, k) and (n, k // 16), views made once."""
        views = self._rows.get((n, k))
        if views is None:
            views = self._rows[n, k] = (self.xq[:n * k].reshape(n, k), self.xs[:n * k // 16].reshape(n, k // 16))
        return views


class ReferenceWeights:
    """The numpy reference forwards' view of the weights: `W(lin)` the matrix dequantized (once, float32), and
    `W.mm(x, lin)` = x @ W.T with x first rounded as llama.cpp's matmul rounds its input for that weight type
    (`quant.round_activations`), in float64."""

    def __init__(self):
        self._dequantized: dict[str, np.ndarray] = {}

    def __call__(self, lin: Linear) -> np.ndarray:
        if lin.name not in self._dequantized:
            self._dequantized[lin.name] = lin.dequantize()
        return self._dequantized[lin.name]

    def mm(self, x: np.ndarray, lin: Linear) -> np.ndarray:
        return quant.round_activations(x, lin.qtype) @ self(lin).T


def linear(out: np.ndarray, x: np.ndarray, w: Linear, scratch: Scratch, kinds: np.ndarray | None = None) -> None:
    """out (B, m) = x (B, k) @ W.T: the weight type's compiled kernel called directly (`Linear.matvec` for a
    decode row, `Linear.gemm` for rows of given kinds), else through `quant.multiply`, the dispatch that
    `nibble.quant.matmul` and the kernel benchmark use too (the same kernels); allocates nothing. `kinds`
    (int8 per row): the arithmetic each row gets where llama.cpp's depends on the batch
    (`quant.ggml_exact.batch_kinds`); None: one batch of B rows."""
    B, k = x.shape
    if B == 1 and (kinds is None or kinds[0] == 0) and w.matvec is not None:    # a decode row
        xq, xs = scratch.row(k)
        o = out[0]
        w.matvec(o, o, o, x[0], xq, xs, w.data, w.data, w.data, w.m, 0, 0, k)
        return
    xq, xs = scratch.rows(B, k)
    if kinds is not None and w.gemm is not None:
        w.gemm(out, out, out, x, xq, xs, w.data, w.data, w.data, w.m, 0, 0, k, kinds)
        return
    quant.multiply(out, x, xq, xs, w.data, w.qtype, w.m, k, kinds)


_PLANS: dict[tuple[int, ...], list[tuple[int, ...]]] = {}


def linear_many(outs: tuple[np.ndarray, ...], x: np.ndarray, ws: tuple[Linear, ...], scratch: Scratch,
                kinds: np.ndarray | None = None) -> None:
    """`linear(outs[i], x, ws[i])` for two or three matrices of one input (q, k, v; gate, up). The matrices of
    one weight type go through one kernel call (`matvec` for a decode row, `gemm` for rows of given kinds:
    the rows quantized once, one parallel region; each call costs a few µs before any arithmetic, and a
    SmolLM2 step of a few rows makes 121); each output has the bits `linear` gives it."""
    B, k = x.shape
    single = B == 1 and (kinds is None or kinds[0] == 0)
    if not single and kinds is None:
        for out, w in zip(outs, ws):
            linear(out, x, w, scratch, kinds)
        return
    key = tuple(w.qtype for w in ws)
    plan = _PLANS.get(key)
    if plan is None:        # the matrices' indexes grouped by weight type, in order
        by_type: dict[int, list[int]] = {}
        for i, w in enumerate(ws):
            by_type.setdefault(w.qtype, []).append(i)
        plan = _PLANS[key] = [tuple(group) for group in by_type.values()]
    xq, xs = scratch.row(k) if single else scratch.rows(B, k)
    for group in plan:
        w = ws[group[0]]
        kernel = w.matvec if single else w.gemm
        if kernel is None or len(group) == 1:
            for i in group:
                linear(outs[i], x, ws[i], scratch, kinds)
            continue
        o = [outs[i][0] if single else outs[i] for i in group]
        m = [ws[i] for i in group]
        if len(group) == 2:
            o.append(o[0])
            m.append(m[0])
        rows = (m[0].m, m[1].m, m[2].m if len(group) == 3 else 0)
        if single:
            kernel(*o, x[0], xq, xs, m[0].data, m[1].data, m[2].data, *rows, k)
        else:
            kernel(*o, x, xq, xs, m[0].data, m[1].data, m[2].data, *rows, k, kinds)


def embed(out: np.ndarray, tokens: np.ndarray, w: Linear) -> None:
    """out (B, k) = rows `tokens` of the embedding matrix, dequantized by the type's numpy reference (the
    values `quant.kernels.get_rows` gives, bit for bit; a few rows, and one kernel less to compile on a
    first run)."""
    fmt = quant.FORMATS[w.qtype]
    rows = w.data.reshape(w.m, -1)[tokens]
    out[:] = fmt.dequantize_blocks(rows.reshape(-1, fmt.type_size)).reshape(len(tokens), w.k)
