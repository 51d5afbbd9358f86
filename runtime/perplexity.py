"""Perplexity, by llama-perplexity's method, so our figure is comparable with llama.cpp's.

The whole text is tokenized (BOS only where the model adds one) and cut into consecutive chunks of n_ctx
tokens (a partial last chunk is dropped). Each chunk is evaluated from an empty cache, its first token
replaced by BOS where the model adds BOS. Only the second half of each chunk is scored (positions
n_ctx/2 .. n_ctx-2 predicting the next token), so every scored token has at least n_ctx/2 tokens of context.
PPL = exp(mean NLL); the ± is llama.cpp's standard error of the mean NLL, scaled by PPL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ContextOverflowError, NibbleError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    stderr: float
    n_chunks: int
    n_ctx: int
    n_scored: int


def chunks(model, tokens, n_ctx: int, what: str = "perplexity") -> list[tuple[int, np.ndarray]]:
    """llama-perplexity's chunks: consecutive n_ctx tokens (a partial last one dropped), the first replaced by
    BOS where the model adds one; (index, chunk) pairs."""
    engine = model._engine()
    if n_ctx < 4:
        raise NibbleError(f"{what} needs n_ctx of at least 4, got {n_ctx}")
    if n_ctx > engine.n_ctx:
        raise ContextOverflowError(n_ctx, engine.n_ctx, f"{what} chunks of {n_ctx} tokens do not fit the model's "
                                                        f"context of {engine.n_ctx}; load with a larger n_ctx")
    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    out = []
    for c in range(len(tokens) // n_ctx):
        chunk = np.array(tokens[c * n_ctx:(c + 1) * n_ctx], np.int64)
        if bos is not None:
            chunk[0] = bos
        out.append((c, chunk))
    return out


def scored_logits(model, chunk: np.ndarray, consume: Callable[[int, np.ndarray], None]) -> None:
    """Evaluate one chunk from an empty cache (on the model's engine thread); hand consume(index, logits) the
    logits of the scored positions n_ctx/2 .. n_ctx-2, a block of rows at a time."""
    first = len(chunk) // 2
    n_scored = len(chunk) - 1 - first

    def clipped(index, logits):
        rows = logits[:max(0, min(len(logits), n_scored - index))]
        if len(rows):
            consume(index, rows)

    def run(e):
        e.reset(0)
        e.eval_all(chunk, 0, first=first, consume=clipped)
    model._call(run)


def perplexity(model, text: str, n_ctx: int = 512,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    tokens = model.tokenize(text, add_special=True)
    work = chunks(model, tokens, n_ctx)
    n_chunks = len(work)
    if n_chunks < 2:
        raise NibbleError(f"the text has {len(tokens)} tokens; perplexity with n_ctx={n_ctx} needs at least "
                          f"{2 * n_ctx} (two chunks)")
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for c, chunk in work:
        targets = chunk[first + 1:]                       # position first + i predicts chunk[first + i + 1]

        def score(index: int, logits: np.ndarray) -> None:
            nonlocal nll, nll2, count
            rows = logits.astype(np.float64)
            m = rows.max(axis=1)
            lse = m + np.log(np.exp(rows - m[:, None]).sum(axis=1))
            v = lse - rows[np.arange(len(rows)), targets[index:index + len(rows)]]
            nll += v.sum()
            nll2 += (v * v).sum()
            count += len(v)

        scored_logits(model, chunk, score)
        if progress:
            progress(c + 1, n_chunks)
    model.reset(0)
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    stderr = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return Perplexity(ppl, stderr, n_chunks, n_ctx, count)
