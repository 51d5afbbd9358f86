"""Every weight type the catalogue models do not hold (their matmul is `quant.kernels.gemm`, not llama.cpp's
arithmetic) inside a model forward: a tiny llama whose matrices are all of that type, its logits against the
readable reference forward over the same dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import nibble
from nibble.quant import ggml_exact

TYPES = ["Q4_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "F16", "BF16", "F32"]
# rows of 256 values: every matrix's k a whole number of K-quant super-blocks
WIDE = dict(n_embd=256, n_ff=256, n_head=4, n_head_kv=2, head_dim=64)


def nmse(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(((ours - ref) ** 2).sum() / (ref ** 2).sum())


@pytest.mark.parametrize("qtype", TYPES)
def test_model_with_matrices_of_each_type(qtype, tiny_gguf):
    assert int(T[qtype]) not in ggml_exact.EXACT_TYPES
    model = nibble.load(tiny_gguf("llama", qtype, **WIDE), n_ctx=64)
    w = model.engine.weights
    assert {lin.qtype for lin in (w.token_embd, w.output, *(w.layers[0].wq, w.layers[1].ffn_down))} == {T[qtype]}
    tokens = np.random.default_rng(3).integers(0, model.n_vocab, 10).tolist()
    logits = model.logits(tokens)
    assert logits.shape == (10, model.n_vocab) and np.isfinite(logits).all()
    reference = model.arch.forward_reference(model.args, w, tokens)
    # 8-bit activations (float ones for F16, BF16, F32), as the architecture runner of test_forward.py
    assert nmse(logits, reference) < 2e-3
    model.reset()
    assert nmse(model.eval(tokens[:4]), reference[3]) < 2e-3
    assert nmse(model.eval(tokens[4:5]), reference[4]) < 2e-3                         # one-row decode
