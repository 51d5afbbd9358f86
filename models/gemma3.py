"""Gemma 3 (text): llama's block with Q/K RMS norms, norms after attention and after the FFN as well as before,
GeGLU (tanh GELU), embeddings scaled by √n_embd, and interleaved local/global attention.

Reference: llama.cpp `src/models/gemma3.cpp` and `src/llama-model.cpp` (LLM_ARCH_GEMMA3). Five of every six
layers attend within a sliding window (`gemma3.attention.sliding_window`) with RoPE base 10000; every sixth
(0-based 5, 11, 17, ...) attends globally with the file's RoPE base. Queries are scaled by 1/√key_length
before attention. Gemma's RMSNorm is x̂·(1 + w) in the reference model; GGUF conversion stores 1 + w, so
here it is a plain RMSNorm. NEOX-style RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats.gguf import GGUFFile
from ..formats.metadata import get_float, get_int
from ..errors import ModelFormatError
from . import ops
from .linear import Linear, ReferenceWeights, Scratch, WeightSource, embed, linear, linear_many

ARCH = "gemma3"
NEOX_ROPE = True
SWA_PATTERN = 6               # layer i is global when i % 6 == 5
ROPE_BASE_LOCAL = 10000.0     # the sliding-window layers' RoPE base (llama.cpp: rope_freq_base_train_swa)


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
    sliding_window: int

    def is_global(self, layer: int) -> bool:
        return layer % SWA_PATTERN == SWA_PATTERN - 1

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
        if n_head <= 0 or n_embd <= 0:
            raise ModelFormatError(f"{g.name}: head_count {n_head} and embedding_length {n_embd} must be positive")
        if n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelFormatError(f"{g.name}: head_count_kv {n_head_kv} does not divide head_count {n_head}")
        head_dim = get_int(g, f"{a}.attention.key_length", n_embd // n_head)
        if get_int(g, f"{a}.attention.value_length", head_dim) != head_dim:
            raise ModelFormatError(f"{g.name}: key_length and value_length differ; nibble needs them equal")
        tokens = g.get("tokenizer.ggml.tokens")
        n_vocab = get_int(g, f"{a}.vocab_size", len(tokens) if isinstance(tokens, list) else 0)
        args = cls(
            n_vocab=n_vocab, n_embd=n_embd, n_layers=get_int(g, f"{a}.block_count"), n_head=n_head,
            n_head_kv=n_head_kv, head_dim=head_dim, n_ff=get_int(g, f"{a}.feed_forward_length"),
            context_length=get_int(g, f"{a}.context_length"),
            rms_eps=get_float(g, f"{a}.attention.layer_norm_rms_epsilon"),
            rope_base=get_float(g, f"{a}.rope.freq_base", 10000.0),
            rope_dim=get_int(g, f"{a}.rope.dimension_count", head_dim),
            sliding_window=get_int(g, f"{a}.attention.sliding_window", 0),
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
    q_norm: np.ndarray
    k_norm: np.ndarray
    wo: Linear
    post_attn_norm: np.ndarray
    ffn_norm: np.ndarray
    ffn_gate: Linear
    ffn_up: Linear
    ffn_down: Linear
    post_ffn_norm: np.ndarray


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
        q_norm=src.vector("q_norm", i, args.head_dim), k_norm=src.vector("k_norm", i, args.head_dim),
        wo=src.matrix("wo", i, d, args.q_dim), post_attn_norm=src.vector("post_attn_norm", i, d),
        ffn_norm=src.vector("ffn_norm", i, d),
        ffn_gate=src.matrix("ffn_gate", i, ff, d), ffn_up=src.matrix("ffn_up", i, ff, d),
        ffn_down=src.matrix("ffn_down", i, d, ff), post_ffn_norm=src.vector("post_ffn_norm", i, d),
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
        self.rope_cs = np.zeros((2, B, args.rope_dim), np.float32)  # cos | sin: global, local base


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
    scale = np.float32(1.0 / np.sqrt(args.head_dim))    # f_attention_scale = 1/sqrt(key_length)
    embed(x, tokens, w.token_embd)
    rope_global, rope_local = st.rope_cs[0, :B], st.rope_cs[1, :B]
    ops.rope_table(rope_global, positions, args.rope_dim, args.rope_base)
    ops.rope_table(rope_local, positions, args.rope_dim, ROPE_BASE_LOCAL)
    x *= np.float32(np.sqrt(args.n_embd))
    if trace is not None:
        trace.record(None, inp_scaled=x)
    for i, L in enumerate(w.layers):
        rope_cs = rope_global if args.is_global(i) else rope_local
        window = 0 if args.is_global(i) else args.sliding_window
        # x = x + post_attention_norm(attention(attention_norm(x)))
        ops.rmsnorm(xb, x, L.attn_norm, args.rms_eps)
        linear_many((q, k, v), xb, (L.wq, L.wk, L.wv), st.scratch, kinds)
        ops.rmsnorm_heads(q, L.q_norm, args.n_head, args.head_dim, args.rms_eps)
        ops.rmsnorm_heads(k, L.k_norm, args.n_head_kv, args.head_dim, args.rms_eps)
        ops.rope_apply(q, rope_cs, args.n_head, args.head_dim, args.rope_dim, NEOX_ROPE)
        ops.rope_apply(k, rope_cs, args.n_head_kv, args.head_dim, args.rope_dim, NEOX_ROPE)
        if trace is not None:
            trace.record(i, attn_norm=xb, Qcur=q, Kcur=k, Vcur=v)
        ops.kv_store(k_cache, v_cache, i, slots, positions, k, v, args.n_head_kv, args.head_dim)
        ops.attention(att, q, k_cache, v_cache, i, slots, positions, kinds, args.n_head, args.n_head_kv,
                      args.head_dim, scale, window)
        linear(xb2, att, L.wo, st.scratch, kinds)
        ops.rmsnorm(xb2, xb2, L.post_attn_norm, args.rms_eps)
        x += xb2
        if trace is not None:
            trace.record(i, kqv_out=att, attn_post_norm=xb2, sa_out=x)
        # x = x + post_ffw_norm(down(gelu(gate(ffn_norm(x))) * up(ffn_norm(x))))
        ops.rmsnorm(xb, x, L.ffn_norm, args.rms_eps)
        linear_many((hb, hb2), xb, (L.ffn_gate, L.ffn_up), st.scratch, kinds)
        ops.gelu_mul(hb, hb2)
        linear(xb2, hb, L.ffn_down, st.scratch, kinds)
        ops.rmsnorm(xb2, xb2, L.post_ffn_norm, args.rms_eps)
        x += xb2
        if trace is not None:
            trace.record(i, ffn_norm=xb, ffn_post_norm=xb2, l_out=x)
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

    def rope(x, base):                                                                # (T, H, hd)
        inv_freq = base ** (-np.arange(0, args.rope_dim, 2) / args.rope_dim)          # (rope_dim/2,)
        ang = pos[:, None] * inv_freq[None, :]                                        # (T, rope_dim/2)
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x, half = x.copy(), args.rope_dim // 2
        x0, x1 = x[..., :half].copy(), x[..., half:args.rope_dim].copy()              # NEOX: split halves
        x[..., :half] = x0 * cos - x1 * sin
        x[..., half:args.rope_dim] = x0 * sin + x1 * cos
        return x

    causal = np.triu(np.full((T, T), -np.inf), 1)
    dist = pos[:, None] - pos[None, :]
    local = np.where(dist >= args.sliding_window, -np.inf, causal) if args.sliding_window else causal
    x = W(w.token_embd)[tokens].astype(np.float64) * np.sqrt(args.n_embd)            # (T, d)
    if trace is not None:
        trace.record(None, inp_scaled=x)
    for i, L in enumerate(w.layers):
        if inputs is not None and i > 0:
            x = inputs[i].astype(np.float64)
        base = args.rope_base if args.is_global(i) else ROPE_BASE_LOCAL
        mask = causal if args.is_global(i) else local
        h = rmsnorm(x, L.attn_norm)
        q = rmsnorm(W.mm(h, L.wq).reshape(T, args.n_head, hd), L.q_norm)            # (T, H, hd)
        k = rmsnorm(W.mm(h, L.wk).reshape(T, args.n_head_kv, hd), L.k_norm)         # (T, Hkv, hd)
        q, k = rope(q, base), rope(k, base)
        v = W.mm(h, L.wv).reshape(T, args.n_head_kv, hd)
        if trace is not None:
            trace.record(i, attn_norm=h, Qcur=q, Kcur=k, Vcur=v)
        group = args.n_head // args.n_head_kv
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)               # (T, H, hd)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask                # (H, T, T)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", p, v).reshape(T, args.q_dim)
        attn_post_norm = rmsnorm(W.mm(a, L.wo), L.post_attn_norm)
        x = x + attn_post_norm
        if trace is not None:
            trace.record(i, kqv_out=a, attn_post_norm=attn_post_norm, sa_out=x)
        h = rmsnorm(x, L.ffn_norm)
        g, u = W.mm(h, L.ffn_gate), W.mm(h, L.ffn_up)
        gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
        ffn_post_norm = rmsnorm(W.mm(gelu * u, L.ffn_down), L.post_ffn_norm)
        x = x + ffn_post_norm
        if trace is not None:
            trace.record(i, ffn_norm=h, ffn_post_norm=ffn_post_norm, l_out=x)
    if inputs is not None:
        x = inputs[len(w.layers)].astype(np.float64)
    x = rmsnorm(x, w.output_norm)
    logits = W.mm(x, w.output).astype(np.float32)
    if trace is not None:
        trace.record(None, result_norm=x, result_output=logits)
    return logits
