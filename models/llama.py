"""Llama (SmolLM2, Llama 2/3, ...): pre-norm RMSNorm blocks, rotary embeddings, grouped-query attention, SwiGLU.

Reference: llama.cpp `src/models/llama.cpp`. GGUF conversion permutes the Q/K rows so that RoPE rotates
adjacent pairs (llama.cpp's "normal" rope type). The output projection is tied to the token embedding when
`output.weight` is absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats.gguf import GGUFFile
from ..formats.metadata import get_float, get_int
from ..errors import ModelFormatError
from . import ops
from .linear import Linear, ReferenceWeights, Scratch, WeightSource, embed, linear, linear_many

ARCH = "llama"
NEOX_ROPE = False


@dataclass(frozen=True)
class ModelArgs:
    n_vocab: int
    n_embd: int
    n_layers: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_dim: int

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "ModelArgs":
        a = ARCH
        n_embd = get_int(g, f"{a}.embedding_length")
        n_head = get_int(g, f"{a}.attention.head_count")
        n_head_kv = get_int(g, f"{a}.attention.head_count_kv", n_head)
        if n_head <= 0 or n_embd <= 0 or n_embd % n_head:
            raise ModelFormatError(f"{g.name}: head_count {n_head} does not divide embedding_length {n_embd}")
        if n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelFormatError(f"{g.name}: head_count_kv {n_head_kv} does not divide head_count {n_head}")
        head_dim = n_embd // n_head
        tokens = g.get("tokenizer.ggml.tokens")
        n_vocab = get_int(g, f"{a}.vocab_size", len(tokens) if isinstance(tokens, list) else 0)
        args = cls(
            n_vocab=n_vocab, n_embd=n_embd, n_layers=get_int(g, f"{a}.block_count"), n_head=n_head,
            n_head_kv=n_head_kv, head_dim=head_dim, n_ff=get_int(g, f"{a}.feed_forward_length"),
            context_length=get_int(g, f"{a}.context_length"),
            rms_eps=get_float(g, f"{a}.attention.layer_norm_rms_epsilon"),
            rope_base=get_float(g, f"{a}.rope.freq_base", 10000.0),
            rope_dim=get_int(g, f"{a}.rope.dimension_count", head_dim),
        )
        for name, v in [("block_count", args.n_layers), ("feed_forward_length", args.n_ff),
                        ("context_length", args.context_length), ("vocab_size", args.n_vocab)]:
            if v <= 0:
                raise ModelFormatError(f"{g.name}: metadata '{a}.{name}' must be positive, got {v}")
        if args.rope_dim > head_dim or args.rope_dim % 2:
            raise ModelFormatError(f"{g.name}: rope.dimension_count {args.rope_dim} does not fit head size {head_dim}")
        return args


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    ffn_norm: np.ndarray
    ffn_gate: Linear
    ffn_up: Linear
    ffn_down: Linear


@dataclass
class Weights:
    token_embd: Linear
    layers: list[Layer]
    output_norm: np.ndarray
    output: Linear          # token_embd when the file ties them


def load_weights(g: GGUFFile, args: ModelArgs) -> Weights:
    src = WeightSource(g)
    d, kv, ff = args.n_embd, args.kv_dim, args.n_ff
    n_blocks = sum(1 for name in g.tensors if name.endswith(".attn_norm.weight") and name.startswith("blk."))
    if n_blocks != args.n_layers:
        raise ModelFormatError(f"{g.name}: block_count is {args.n_layers} but the file has {n_blocks} blocks")
    layers = [Layer(
        attn_norm=src.vector("attn_norm", i, d),
        wq=src.matrix("wq", i, args.q_dim, d), wk=src.matrix("wk", i, kv, d), wv=src.matrix("wv", i, kv, d),
        wo=src.matrix("wo", i, d, args.q_dim),
        ffn_norm=src.vector("ffn_norm", i, d),
        ffn_gate=src.matrix("ffn_gate", i, ff, d), ffn_up=src.matrix("ffn_up", i, ff, d),
        ffn_down=src.matrix("ffn_down", i, d, ff),
    ) for i in range(args.n_layers)]
    token_embd = src.matrix("token_embd", None, args.n_vocab, d)
    output = src.matrix("output", None, args.n_vocab, d) if src.has("output") else token_embd
    return Weights(token_embd, layers, src.vector("output_norm", None, d), output)


class RunState:
    """Every activation buffer, allocated once for batches of up to `max_batch` rows."""

    def __init__(self, args: ModelArgs, max_batch: int):
        B, d = max_batch, args.n_embd
        self.x = np.zeros((B, d), np.float32)                 # the residual stream
        self.xb = np.zeros((B, d), np.float32)                # normed input of a sub-block
        self.xb2 = np.zeros((B, d), np.float32)               # output of a sub-block
        self.q = np.zeros((B, args.q_dim), np.float32)
        self.k = np.zeros((B, args.kv_dim), np.float32)
        self.v = np.zeros((B, args.kv_dim), np.float32)
        self.att = np.zeros((B, args.q_dim), np.float32)
        self.hb = np.zeros((B, args.n_ff), np.float32)
        self.hb2 = np.zeros((B, args.n_ff), np.float32)
        self.scratch = Scratch(B, max(d, args.q_dim, args.n_ff))
        self.rope_cs = np.zeros((B, args.rope_dim), np.float32)    # cos | sin of each row's angles


def forward(args: ModelArgs, w: Weights, st: RunState, k_cache: np.ndarray, v_cache: np.ndarray,
            tokens: np.ndarray, slots: np.ndarray, positions: np.ndarray, kinds: np.ndarray,
            outputs: np.ndarray, trace=None) -> np.ndarray:
    """The fast path. Rows b = 0..B-1: token tokens[b] at positions[b] of KV slot slots[b], computed with
    the arithmetic llama.cpp gives a row of kind kinds[b] (`quant.ggml_exact.batch_kinds`). Returns the final
    normed hidden states of the rows `outputs`, (len(outputs), n_embd), a view into the run state that the
    caller projects to logits with `w.output`. Every buffer is preallocated (the attention and a few matmul
    kernels take small scratch arrays of their own). `trace` (`runtime.trace.Trace`, or None) receives copies
    of the intermediate tensors under llama.cpp's graph names."""
    B = tokens.shape[0]
    x, xb, xb2 = st.x[:B], st.xb[:B], st.xb2[:B]
    q, k, v, att, hb, hb2 = st.q[:B], st.k[:B], st.v[:B], st.att[:B], st.hb[:B], st.hb2[:B]
    scale = np.float32(1.0 / np.sqrt(args.head_dim))
    embed(x, tokens, w.token_embd)
    rope_cs = st.rope_cs[:B]
    ops.rope_table(rope_cs, positions, args.rope_dim, args.rope_base)
    if trace is not None:
        trace.record(None, inp_embd=x)
    for i, L in enumerate(w.layers):
        # x = x + attention(attention_norm(x))
        ops.rmsnorm(xb, x, L.attn_norm, args.rms_eps)
        linear_many((q, k, v), xb, (L.wq, L.wk, L.wv), st.scratch, kinds)
        ops.rope_apply(q, rope_cs, args.n_head, args.head_dim, args.rope_dim, NEOX_ROPE)
        ops.rope_apply(k, rope_cs, args.n_head_kv, args.head_dim, args.rope_dim, NEOX_ROPE)
        if trace is not None:
            trace.record(i, attn_norm=xb, Qcur=q, Kcur=k, Vcur=v)
        ops.kv_store(k_cache, v_cache, i, slots, positions, k, v, args.n_head_kv, args.head_dim)
        ops.attention(att, q, k_cache, v_cache, i, slots, positions, kinds, args.n_head, args.n_head_kv,
                      args.head_dim, scale, 0)
        linear(xb2, att, L.wo, st.scratch, kinds)
        x += xb2
        if trace is not None:
            trace.record(i, kqv_out=att, attn_out=xb2, ffn_inp=x)
        # x = x + feed_forward(ffn_norm(x)), feed_forward = w2(silu(w1(x)) * w3(x))
        ops.rmsnorm(xb, x, L.ffn_norm, args.rms_eps)
        linear_many((hb, hb2), xb, (L.ffn_gate, L.ffn_up), st.scratch, kinds)
        ops.silu_mul(hb, hb2)
        linear(xb2, hb, L.ffn_down, st.scratch, kinds)
        x += xb2
        if trace is not None:
            trace.record(i, ffn_norm=xb, ffn_out=xb2, l_out=x)
    n_out = len(outputs)
    np.take(x, outputs, axis=0, out=xb2[:n_out])
    ops.rmsnorm(xb[:n_out], xb2[:n_out], w.output_norm, args.rms_eps)
    if trace is not None:
        trace.record(None, result_norm=xb[:n_out])
    return xb[:n_out]


def forward_reference(args: ModelArgs, w: Weights, tokens: list[int], trace=None,
                      inputs=None) -> np.ndarray:
    """The readable forward the fast path is tested against: plain numpy over dequantized weights, one
    sequence from position 0, no cache. Returns logits (T, n_vocab). `trace` as in `forward`.
    `inputs` (optional): for each layer i > 0 the residual stream entering it, and at len(layers) the one
    entering the output norm, to start each layer from instead of the previous layer's result (the per-layer
    comparison of `runtime.trace`)."""
    T, hd = len(tokens), args.head_dim
    W = ReferenceWeights()

    def rmsnorm(x, weight):
        return x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + args.rms_eps) * weight

    pos = np.arange(T)
    inv_freq = args.rope_base ** (-np.arange(0, args.rope_dim, 2) / args.rope_dim)   # (rope_dim/2,)
    ang = pos[:, None] * inv_freq[None, :]                                           # (T, rope_dim/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):                                                                      # (T, H, hd)
        x = x.copy()
        x0, x1 = x[..., 0:args.rope_dim:2].copy(), x[..., 1:args.rope_dim:2].copy()  # adjacent pairs
        x[..., 0:args.rope_dim:2] = x0 * cos - x1 * sin
        x[..., 1:args.rope_dim:2] = x0 * sin + x1 * cos
        return x

    mask = np.triu(np.full((T, T), -np.inf), 1)
    x = W(w.token_embd)[tokens].astype(np.float64)                                   # (T, d)
    if trace is not None:
        trace.record(None, inp_embd=x)
    for i, L in enumerate(w.layers):
        if inputs is not None and i > 0:
            x = inputs[i].astype(np.float64)
        h = rmsnorm(x, L.attn_norm)
        q = rope(W.mm(h, L.wq).reshape(T, args.n_head, hd))                         # (T, H, hd)
        k = rope(W.mm(h, L.wk).reshape(T, args.n_head_kv, hd))                      # (T, Hkv, hd)
        v = W.mm(h, L.wv).reshape(T, args.n_head_kv, hd)
        if trace is not None:
            trace.record(i, attn_norm=h, Qcur=q, Kcur=k, Vcur=v)
        group = args.n_head // args.n_head_kv
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)               # (T, H, hd)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask                # (H, T, T)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", p, v).reshape(T, args.q_dim)
        attn_out = W.mm(a, L.wo)
        x = x + attn_out
        if trace is not None:
            trace.record(i, kqv_out=a, attn_out=attn_out, ffn_inp=x)
        h = rmsnorm(x, L.ffn_norm)
        g, u = W.mm(h, L.ffn_gate), W.mm(h, L.ffn_up)
        ffn_out = W.mm(g / (1 + np.exp(-g)) * u, L.ffn_down)
        x = x + ffn_out
        if trace is not None:
            trace.record(i, ffn_norm=h, ffn_out=ffn_out, l_out=x)
    if inputs is not None:
        x = inputs[len(w.layers)].astype(np.float64)
    x = rmsnorm(x, w.output_norm)
    logits = W.mm(x, w.output).astype(np.float32)
    if trace is not None:
        trace.record(None, result_norm=x, result_output=logits)
    return logits
