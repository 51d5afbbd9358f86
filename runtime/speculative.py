"""Speculative decoding: guess the next tokens cheaply, verify them in one batched step of the target model.

    model.generate(prompt, speculative="ngram")               # prompt lookup
    model.generate(prompt, speculative=draft_model)           # a smaller model (a Model, path or catalogue name)

A drafter proposes up to k tokens after the context. The engine thread then evaluates the last token and the
k proposals as k + 1 rows of one forward, every row of the single-token kind, so each row's logits are bit
for bit those of a plain decoding step at that position (runtime/engine.py). Each verified position is then
sampled exactly as plain decoding samples it (the same sampler, the same seeded stream, in order) and the
proposal is accepted while it equals the draw. For a deterministic drafter this is speculative sampling's
rule min(1, p/q) with q one-hot: accepted with probability p(proposal), else the residual draw — so the
distribution is unchanged, and seeded output equals plain decoding's token for token. Cells of rejected
proposals are dropped: the KV cache ends as plain decoding leaves it.

The draft length adapts (`DraftLength`): it doubles while proposals are all accepted and falls back to what
was accepted when they are not, down to not drafting at all for a while, so text that does not repeat costs
little.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import NibbleError

DRAFT_MAX = 16           # draft tokens verified per sequence and step (the engine sizes its steps for them)


class NgramDrafter:
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the context's last n
    tokens (n from n_max down to n_min) in the prompt and the generated text. A single token (n = 1) recurs
    too often by chance in free text: its guesses cost verification rows and are rarely right."""

    def __init__(self, n_max: int = 3, n_min: int = 2):
        self.n_max, self.n_min = n_max, n_min

    def propose(self, context: list[int], k: int, slot: int) -> list[int]:
        if k <= 0 or len(context) < 2:
            return []
        ctx = np.asarray(context, np.int64)
        for n in range(min(self.n_max, len(ctx) - 1), self.n_min - 1, -1):
            tail = ctx[-n:]
            # windows ending before the tail itself: starts i with i + n <= len - 1
            windows = np.lib.stride_tricks.sliding_window_view(ctx[:-1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n                 # what followed the most recent occurrence
                return ctx[start:start + k].tolist()
        return []


class DraftModelDrafter:
    """A smaller model with a compatible vocabulary, run greedily on KV slots of its own (slot s drafts for
    the target's slot s), kept in step with the target's accepted tokens by prefix reuse."""

    def __init__(self, draft, target):
        check_compatible(draft, target)
        if draft.parallel < target.parallel:
            raise NibbleError(f"the draft model has {draft.parallel} KV slots but the target {target.parallel}; "
                              f"load it with parallel={target.parallel}")
        self.draft = draft

    def propose(self, context: list[int], k: int, slot: int) -> list[int]:
        if k <= 0 or len(context) + k > self.draft.n_ctx:
            return []

        def run(engine):
            # tokens alone decide what is reused: a draft's bits only change how many guesses are right
            n_keep = engine.keep_prefix(slot, context, None)
            logits = engine.eval(context[n_keep:], slot)
            out = []
            for _ in range(k):
                token = int(np.argmax(logits))
                out.append(token)
                if len(out) == k:
                    break
                logits = engine.eval([token], slot)
            return out
        return self.draft._call(run)


def check_compatible(draft, target) -> None:
    """Refuse a draft model whose tokens do not mean the target's: another tokenizer type, other special
    tokens, or another text for a token id both have (naming the first such id)."""
    a, b = draft.tokenizer, target.tokenizer
    if a.model != b.model:
        raise NibbleError(f"the draft model's tokenizer is {a.model!r} but the target's is {b.model!r}: "
                          f"speculative decoding needs the same vocabulary")
    for name in ("bos_id", "eos_id"):
        if getattr(a, name) != getattr(b, name):
            raise NibbleError(f"the draft model's {name[:3].upper()} token is {getattr(a, name)} but the "
                              f"target's is {getattr(b, name)}: the vocabularies differ")
    n = min(a.n_vocab, b.n_vocab)
    if a.tokens[:n] != b.tokens[:n]:
        first = next(i for i in range(n) if a.tokens[i] != b.tokens[i])
        raise NibbleError(f"the draft model's token {first} is {a.tokens[first]!r} but the target's is "
                          f"{b.tokens[first]!r}: speculative decoding needs the same vocabulary")


def drafter_for(model, speculative, draft_parallel: int | None = None):
    """`speculative` as the library takes it -> a drafter: "ngram", a loaded Model, or a path or catalogue
    name of a draft model (loaded once and kept on the target model)."""
    if speculative is None:
        return None
    if isinstance(speculative, str) and speculative == "ngram":
        return NgramDrafter()
    if hasattr(speculative, "tokenizer") and hasattr(speculative, "_call"):
        return DraftModelDrafter(speculative, model)
    if isinstance(speculative, (str, os.PathLike)):
        key = str(speculative)
        drafts = model._drafts
        if key not in drafts:
            from .model import load
            drafts[key] = load(speculative, n_ctx=model.n_ctx, threads=model.scheduler.threads,
                               parallel=model.parallel)
        return DraftModelDrafter(drafts[key], model)
    raise NibbleError(f"speculative must be 'ngram', a Model, or a draft model's path or catalogue name, "
                      f"not {speculative!r}")


class DraftLength:
    """How many tokens to draft next: doubles while every proposal is accepted, falls back to one more than
    what was accepted otherwise; after a run of proposals with nothing accepted it stops drafting for a
    while (`pause` steps), then tries one token again."""

    def __init__(self, draft_max: int, start: int = 4, pause: int = 8):
        self.max = draft_max
        self.k = min(start, draft_max)
        self.pause_steps = pause
        self.paused = 0
        self.misses = 0

    def next(self) -> int:
        if self.paused:
            self.paused -= 1
            if not self.paused:
                self.k = 1
            return 0
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted == proposed:
            self.k = min(self.max, 2 * self.k)
            self.misses = 0
            return
        self.k = max(1, accepted + 1)
        self.misses = self.misses + 1 if accepted == 0 else 0
        if self.misses >= 2:
            self.paused, self.misses = self.pause_steps, 0
