"""Choosing the next token from the logits: llama.cpp's sampler chain, vectorised over the vocabulary.

The chain and its order are llama.cpp's defaults (`common/common.h`, `common/sampling.cpp`,
`src/llama-sampling.cpp`):

    logit bias -> penalties (repeat / frequency / presence over the last N tokens) -> top-k -> top-p
               -> min-p -> temperature -> a seeded draw from the softmax of what is left

Top-p and min-p both measure the logits *before* temperature, as llama.cpp does. Temperature 0 (or below)
is greedy: the argmax of the biased, penalised logits. Each filter is a pure function over numpy arrays;
`Sampler` holds the parameters and the random generator and runs the chain.

`SamplingParams()` holds the defaults; the CLI's options take theirs from it. As in llama.cpp, a seed of -1
draws a fresh one and `max_tokens=-1` means no limit (`token_limit`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Mapping, Sequence

import numpy as np

from ..errors import ConfigError

RANDOM_SEED = -1   # llama.cpp's `--seed -1` (LLAMA_DEFAULT_SEED): a fresh seed from the OS, like None
NO_LIMIT = -1      # llama.cpp's `-n -1`: generate until an end-of-generation token or a full context


@dataclass(frozen=True)
class SamplingParams:
    """What shapes the draw; the defaults are llama.cpp's. 0 turns top_k off, 1.0 turns top_p off, 0.0
    turns min_p off, temperature <= 0 means greedy, seed None or -1 draws a fresh seed from the OS."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = field(default=None)
    seed: int | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    def check(self, n_vocab: int) -> None:
        """Raise ConfigError (a ValueError) naming the parameter that is out of range."""
        if not math.isfinite(self.temperature):
            raise ConfigError(f"temperature must be a finite number, not {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 turns it off), not {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in [0, 1], not {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1], not {self.min_p}")
        if not (self.repeat_penalty > 0 and math.isfinite(self.repeat_penalty)):
            raise ConfigError(f"repeat_penalty must be > 0 (1.0 turns it off), not {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise ConfigError(f"repeat_last_n must be >= 0, or -1 for the whole context, not {self.repeat_last_n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number")
        for token, bias in (self.logit_bias or {}).items():
            if not 0 <= int(token) < n_vocab:
                raise ConfigError(f"logit_bias names token {token}, outside the vocabulary (0..{n_vocab - 1})")
            if math.isnan(bias):
                raise ConfigError(f"logit_bias for token {token} is NaN")
        if self.seed is not None and self.seed < RANDOM_SEED:
            raise ConfigError(f"seed must be >= 0, or -1 for a random seed, not {self.seed}")


def token_limit(max_tokens: int | None) -> int | None:
    """`max_tokens` as the generation loop wants it: None (or -1) for no limit, else a count >= 0."""
    if max_tokens is None or max_tokens == NO_LIMIT:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 0:
        raise ConfigError(f"max_tokens must be >= 0, or -1 for no limit, not {max_tokens!r}")
    return int(max_tokens)


# ---- the filters: pure functions; `logits` is float32 (n_vocab,) unless said otherwise ----

def apply_logit_bias(logits: np.ndarray, bias: Mapping[int, float]) -> None:
    """Add `bias[token]` to each named logit, in place (-inf bans a token)."""
    if bias:
        ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        logits[ids] += np.fromiter(bias.values(), dtype=np.float32, count=len(bias))


def apply_penalties(logits: np.ndarray, recent: Sequence[int], repeat: float, frequency: float,
                    presence: float) -> None:
    """Penalise, in place, every token that occurs in `recent` (llama_sampler_penalties_apply):
    a positive logit is divided by `repeat` and a negative one multiplied (dividing a negative logit would
    make the token *more* likely), then `count * frequency + presence` is subtracted."""
    if len(recent) == 0 or (repeat == 1.0 and frequency == 0.0 and presence == 0.0):
        return
    ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
    picked = logits[ids]
    picked = np.where(picked <= 0, picked * repeat, picked / repeat)
    picked -= counts.astype(np.float32) * np.float32(frequency) + np.float32(presence)
    logits[ids] = picked


_STRIDE = 64  # subsampling step for the top-k threshold


def top_k_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits, largest first; k <= 0 sorts the whole vocabulary.

    argpartition over 262k logits takes ~3 ms, a tenth of a decode step, so a cheap threshold goes first:
    a value from every 64th logit that about 2k logits exceed. If at least k do, the k largest are among
    them (everything else is below the threshold) and argpartition runs on those few; otherwise it runs on
    all. Exact either way."""
    n = logits.shape[0]
    if k <= 0 or k >= n:
        return np.argsort(-logits, kind="stable")
    ids = None
    if n >= 16 * _STRIDE and k * _STRIDE * 4 <= n:
        sub = logits[::_STRIDE]
        rank = min(len(sub) - 1, 2 * (k // _STRIDE) + 4)
        threshold = np.partition(sub, len(sub) - 1 - rank)[len(sub) - 1 - rank]
        above = np.flatnonzero(logits >= threshold)
        if len(above) >= k:
            ids = above
    if ids is None:
        ids = np.arange(n)
    part = ids[np.argpartition(-logits[ids], k - 1)[:k]] if len(ids) > k else ids
    return part[np.argsort(-logits[part], kind="stable")]


def softmax(x: np.ndarray) -> np.ndarray:
    """float64 probabilities of a 1-D array of logits (-inf -> 0)."""
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def top_p_count(sorted_logits: np.ndarray, p: float, normalizer: float | None = None) -> int:
    """How many of the (descending) candidates top-p keeps: the shortest prefix whose probability reaches
    `p` (always at least one). `normalizer` is log Σ exp over the full candidate set when `sorted_logits`
    is only its head."""
    if p >= 1.0:
        return len(sorted_logits)
    x = sorted_logits.astype(np.float64)
    if normalizer is None:
        probs = softmax(x)
    else:
        probs = np.exp(x - normalizer)
    reached = np.flatnonzero(np.cumsum(probs) >= p)
    return int(reached[0]) + 1 if len(reached) else len(sorted_logits)


def min_p_count(sorted_logits: np.ndarray, p: float) -> int:
    """How many of the (descending) candidates min-p keeps: those with probability >= p × the largest one,
    i.e. logit >= max + log p (always at least one)."""
    if p <= 0.0:
        return len(sorted_logits)
    threshold = sorted_logits[0] + math.log(p)
    return max(1, int(np.count_nonzero(sorted_logits >= threshold)))


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + math.log(float(np.exp(x.astype(np.float64) - m).sum()))


class Sampler:
    """The chain with its parameters and random generator. `sample(logits, recent, allowed)` -> token id,
    where `recent` is the context's last tokens (the penalty window: prompt and generated, as llama.cpp
    feeds both to its sampler) and `allowed` an optional bool mask of the tokens a grammar permits, applied
    after bias and penalties so that every filter and every seed works on what is left. The logits array
    is not modified."""

    def __init__(self, params: SamplingParams, n_vocab: int):
        params.check(n_vocab)
        self.params = params
        self.n_vocab = n_vocab
        random = params.seed is None or params.seed == RANDOM_SEED
        self.seed = int(np.random.SeedSequence().entropy % 2**32) if random else params.seed
        self.rng = np.random.default_rng(self.seed)
        self._work = np.empty(n_vocab, dtype=np.float32)

    def penalty_window(self, context: Sequence[int]) -> Sequence[int]:
        n = self.params.repeat_last_n
        return context if n < 0 else context[len(context) - n:] if n > 0 else ()

    def sample(self, logits: np.ndarray, recent: Sequence[int] = (), allowed: np.ndarray | None = None) -> int:
        p = self.params
        x = self._work
        np.copyto(x, logits[: self.n_vocab])
        apply_logit_bias(x, p.logit_bias or {})
        apply_penalties(x, recent, p.repeat_penalty, p.frequency_penalty, p.presence_penalty)
        if allowed is None:
            return self._draw(x)
        if 2 * np.count_nonzero(allowed) > len(allowed):    # a grammar's mask over free text: most allowed
            x[~allowed] = -np.inf
            return self._draw(x)
        # a few allowed (a JSON value): the chain runs on them alone. The others' probability is 0, so the
        # draw is the one over the whole masked vocabulary (up to how top-k orders exactly equal logits).
        ids = np.flatnonzero(allowed)
        return int(ids[self._draw(x[ids])])

    def _draw(self, x: np.ndarray) -> int:
        """The chain after bias and penalties: the index into x of the token drawn (x may be overwritten)."""
        p = self.params
        if p.temperature <= 0.0:
            return int(np.argmax(x))
        ids = self._candidates(x)
        scaled = x[ids].astype(np.float64) / p.temperature
        probs = softmax(scaled)
        # A seeded inverse-CDF draw; llama.cpp's std::discrete_distribution over mt19937 is not reproduced
        # bit for bit, only its distribution.
        i = int(np.searchsorted(np.cumsum(probs), self.rng.random() * probs.sum(), side="right"))
        return int(ids[min(i, len(ids) - 1)])

    def _candidates(self, x: np.ndarray) -> np.ndarray:
        """The ids that survive top-k, top-p and min-p, most likely first.

        Top-p and min-p both cut a prefix of the same descending order, so the survivors are the shorter of
        the two prefixes, each measured on what top-k left (exactly llama.cpp's result when min-p runs after
        top-p). Without top-k, min-p's threshold picks the head without sorting the whole vocabulary and
        top-p measures that head against the full normaliser."""
        p = self.params
        if p.top_k > 0:
            ids = top_k_candidates(x, p.top_k)
            head = x[ids]
            n = min(top_p_count(head, p.top_p), min_p_count(head, p.min_p))
            return ids[:n]
        if p.min_p > 0.0:
            threshold = np.float32(x.max() + math.log(p.min_p))
            k = max(1, int(np.count_nonzero(x >= threshold)))
            ids = top_k_candidates(x, k)
            n = top_p_count(x[ids], p.top_p, normalizer=_logsumexp(x) if p.top_p < 1.0 else None)
            return ids[:n]
        ids = top_k_candidates(x, 0)
        return ids[: top_p_count(x[ids], p.top_p)]
