"""The transformer's non-matmul kernels: RMSNorm, RoPE, KV-cache writes, attention, gated activations.

Every kernel works on a batch of B rows, and each row carries its own (slot, position): a prefill chunk is B
consecutive positions of one slot; a batched decode step (the server, later) is B sequences in B slots, one
position each. Output first, arrays and scalars only, nothing allocated.

KV cache layout: k_cache, v_cache float32 (slots, layers, n_ctx, n_head_kv, head_dim).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ..quant.jit import kernel, parallel_kernel


@kernel
def rmsnorm(out, x, weight, eps):
    """out[b] = x[b] / sqrt(mean(x[b]²) + eps) * weight, for rows of x (B, n); weight (n,).
    The sum of squares is accumulated in float64, as ggml does (ggml_float)."""
    B, n = x.shape
    for b in range(B):
        ss = 0.0
        for i in range(n):
            ss += np.float64(x[b, i]) * x[b, i]
        scale = np.float32(1.0 / math.sqrt(ss / n + eps))
        for i in range(n):
            out[b, i] = x[b, i] * scale * weight[i]


@kernel
def rmsnorm_heads(x, weight, n_heads, head_dim, eps):
    """In place, per head: x (B, n_heads*head_dim) viewed as (B, n_heads, head_dim), each head-vector
    RMS-normalised and scaled by weight (head_dim,) — Gemma 3's q/k norms."""
    B = x.shape[0]
    for b in range(B):
        for h in range(n_heads):
            o = h * head_dim
            ss = 0.0
            for i in range(head_dim):
                ss += np.float64(x[b, o + i]) * x[b, o + i]
            scale = np.float32(1.0 / math.sqrt(ss / head_dim + eps))
            for i in range(head_dim):
                x[b, o + i] = x[b, o + i] * scale * weight[i]


@kernel
def rope(x, positions, n_heads, head_dim, rope_dim, base, neox):
    """Rotary position embedding in place on x (B, n_heads*head_dim), row b at position positions[b].
    Pair i (i < rope_dim/2) rotates by angle pos * base^(-2i/rope_dim). llama.cpp's two layouts:
    normal (llama: GGUF conversion permuted Q/K so pairs are adjacent, (2i, 2i+1)) and NEOX (qwen2, gemma3:
    pairs are (i, i + rope_dim/2), HF's rotate_half)."""
    B = x.shape[0]
    half = rope_dim // 2
    for b in range(B):
        pos = np.float64(positions[b])
        for i in range(half):
            theta = pos * base ** (-2.0 * i / rope_dim)
            c = np.float32(math.cos(theta))
            s = np.float32(math.sin(theta))
            for h in range(n_heads):
                o = h * head_dim
                if neox:
                    i0, i1 = o + i, o + i + half
                else:
                    i0, i1 = o + 2 * i, o + 2 * i + 1
                x0 = x[b, i0]
                x1 = x[b, i1]
                x[b, i0] = x0 * c - x1 * s
                x[b, i1] = x0 * s + x1 * c


@kernel
def kv_store(k_cache, v_cache, layer, slots, positions, k, v, n_head_kv, head_dim):
    """Write rows of k, v (B, n_head_kv*head_dim) into the cache at (slots[b], layer, positions[b])."""
    for b in range(k.shape[0]):
        s, p = slots[b], positions[b]
        for h in range(n_head_kv):
            for i in range(head_dim):
                k_cache[s, layer, p, h, i] = k[b, h * head_dim + i]
                v_cache[s, layer, p, h, i] = v[b, h * head_dim + i]


@parallel_kernel
def attention(out, q, k_cache, v_cache, layer, slots, positions, n_head, n_head_kv, head_dim, scale, window):
    """Causal multi-head attention with grouped K/V heads, for rows q (B, n_head*head_dim) -> out (same).
    Row b (slot s, position p) attends to cached positions j <= p of slot s, and with a sliding window
    (window > 0) only to p - j < window (llama.cpp's standard SWA mask). Softmax is computed online
    (running max and sum, flash-attention style), so no score buffer is needed and nothing is allocated;
    the output row itself is the accumulator."""
    B = q.shape[0]
    group = n_head // n_head_kv
    for bh in prange(B * n_head):
        b = bh // n_head
        h = bh % n_head
        hk = h // group
        s, p = slots[b], positions[b]
        o = h * head_dim
        j0 = 0
        if window > 0 and p - window + 1 > 0:
            j0 = p - window + 1
        for i in range(head_dim):
            out[b, o + i] = 0.0
        m = -np.inf
        total = np.float32(0.0)
        for j in range(j0, p + 1):
            dot = np.float32(0.0)
            for i in range(head_dim):
                dot += q[b, o + i] * k_cache[s, layer, j, hk, i]
            score = dot * scale
            if score > m:
                # rescale what was accumulated under the old maximum
                corr = np.float32(math.exp(m - score)) if m != -np.inf else np.float32(0.0)
                total *= corr
                for i in range(head_dim):
                    out[b, o + i] *= corr
                m = score
            w = np.float32(math.exp(score - m))
            total += w
            for i in range(head_dim):
                out[b, o + i] += w * v_cache[s, layer, j, hk, i]
        inv = np.float32(1.0) / total
        for i in range(head_dim):
            out[b, o + i] *= inv


@kernel
def silu_mul(gate, up):
    """gate = silu(gate) * up, in place (SwiGLU: llama, qwen2)."""
    B, n = gate.shape
    for b in range(B):
        for i in range(n):
            g = gate[b, i]
            gate[b, i] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * up[b, i]


GELU_COEF_A = 0.044715
SQRT_2_OVER_PI = 0.7978845608028654


@kernel
def gelu_mul(gate, up):
    """gate = gelu_tanh(gate) * up, in place (GeGLU: gemma3). The tanh approximation, as ggml_gelu."""
    B, n = gate.shape
    for b in range(B):
        for i in range(n):
            g = gate[b, i]
            t = math.tanh(SQRT_2_OVER_PI * g * (1.0 + GELU_COEF_A * g * g))
            gate[b, i] = np.float32(0.5 * g * (1.0 + t)) * up[b, i]


@kernel
def add_bias(x, bias):
    """x[b] += bias, for rows of x (B, n)."""
    B, n = x.shape
    for b in range(B):
        for i in range(n):
            x[b, i] += bias[i]
