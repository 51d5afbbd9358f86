"""Text generation: the one loop the CLI, the library and the server consume.

    stream = generate.stream(model, "The capital of France is", max_tokens=16, temperature=0)
    for piece in stream:          # text pieces as tokens are produced; never half a UTF-8 character
        print(piece, end="")
    stream.finish_reason, stream.usage, stream.timings

The loop is a handful of small steps (gpt-fast's shape): `prefill` evaluates the prompt, reusing whatever
prefix of it the slot's KV cache already holds; then, per token, the sampler picks from the logits, the
incremental decoder turns the id into text, `StopMatcher` holds back anything that may be the start of a
stop string, and the token is evaluated to get the next logits. Generation ends at an end-of-generation
token (`stop`), a user stop string (`stop`, the string itself never emitted), `max_tokens` or a full context
(`length`), or when `cancel` is set or the consumer stops iterating (`cancelled`).

KV cache after each ending: the prompt and every generated token, except that the last one is not
evaluated when generation ends by `max_tokens` or a stop string, and an end-of-generation token never is;
after `cancelled`, exactly the prompt and the tokens shown. The context never holds more than `n_ctx`
tokens: generation stops with `length` when it is full. A later call with `cache_prompt=True` (sessions)
whose prompt starts with these tokens prefills only the rest.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import ContextOverflowError
from .sampling import Sampler, SamplingParams, token_limit

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass
class Usage:
    prompt_tokens: int        # tokens in the prompt
    cached_tokens: int        # of those, reused from the KV cache (not evaluated again)
    completion_tokens: int    # tokens generated (an end-of-generation token is not counted)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "total_tokens": self.total_tokens}


@dataclass
class Timings:
    prompt_ms: float                  # tokenising and prefilling the prompt
    ttft_ms: float | None             # request to first generated token (None if none was)
    tpot_ms: float | None             # mean time per generated token after the first
    total_ms: float
    prompt_tokens_per_second: float | None   # evaluated (not cached) prompt tokens / prefill time
    tokens_per_second: float | None          # generated tokens after the first / their time

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    tokens: list[int]

    def to_dict(self) -> dict:
        return {"text": self.text, "finish_reason": self.finish_reason, "usage": self.usage.to_dict(),
                "timings": self.timings.to_dict(), "tokens": list(self.tokens)}


# ---- the steps ----

def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if len(diff) else n


def prefill(model, ids: Sequence[int], slot: int = 0, reuse: bool = True) -> tuple[np.ndarray, int]:
    """Bring the slot's KV cache to exactly `ids` and return (logits after the last id, tokens reused).

    With `reuse`, the longest common prefix of `ids` and the cached tokens is kept; the cache is rolled back
    to it and only the rest is evaluated. When the cache already holds all of `ids`, the last one is
    evaluated again because its logits are needed. Without `reuse` the cache is emptied first. Raises
    ContextOverflowError, with the cache untouched, if `ids` does not fit in the context."""
    if len(ids) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if len(ids) > model.n_ctx:
        raise ContextOverflowError(len(ids), model.n_ctx)
    n_keep = min(common_prefix(model.cached_tokens(slot), ids), len(ids) - 1) if reuse else 0
    if model.n_past(slot) != n_keep:
        model.truncate(n_keep, slot)
    logits = model.eval(list(ids[n_keep:]), slot)
    return logits, n_keep


class StopMatcher:
    """Streams text through, holding back any tail that could be the start of a stop string, so that no
    part of a stop string is ever emitted even when it arrives split across tokens."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add `text`; return (text safe to emit now, whether a stop string was found). After a match the
        text from the stop string on is dropped."""
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, when generation ends for another reason."""
        held, self.held = self.held, ""
        return held


class Stream:
    """An iterator of text pieces with `.finish_reason`, `.usage`, `.timings`, `.tokens` and `.text`
    (what has been emitted) once iteration ends. Iterate it once; `close()` (or breaking out of a for loop
    and dropping it) ends generation with finish reason `cancelled`."""

    def __init__(self, model, prompt_ids: list[int], sampler: Sampler, *, max_tokens: int | None,
                 stop: Sequence[str], cancel: threading.Event | None, slot: int, cache_prompt: bool,
                 t_start: float, on_finish: Callable[["Stream"], None] | None = None):
        self.model = model
        self.prompt_ids = prompt_ids
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.stop = tuple(stop)
        self.cancel = cancel
        self.slot = slot
        self.cache_prompt = cache_prompt
        self.finish_reason: str | None = None
        self.tokens: list[int] = []
        self.text = ""
        self.usage = Usage(len(prompt_ids), 0, 0)
        self.timings: Timings | None = None
        self._t_start = t_start
        self._on_finish = on_finish
        self._t_prompt = self._t_first = self._t_last = None
        self._gen = self._run()

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def _run(self) -> Iterator[str]:
        from ..formats.tokenizer import IncrementalDecoder

        model, slot = self.model, self.slot
        eog = model.tokenizer.eog_ids
        decoder = IncrementalDecoder(model.tokenizer)
        matcher = StopMatcher(self.stop)
        context = list(self.prompt_ids)  # for the penalty window
        try:
            if self._cancelled():
                self.finish_reason = "cancelled"
                return
            logits, self.usage.cached_tokens = prefill(model, self.prompt_ids, slot, self.cache_prompt)
            self._t_prompt = time.perf_counter()
            while True:
                if self._cancelled():
                    self.finish_reason = "cancelled"
                    break
                if (self.max_tokens is not None and len(self.tokens) >= self.max_tokens) \
                        or model.n_past(slot) >= model.n_ctx:
                    self.finish_reason = "length"
                    break
                token = self.sampler.sample(logits, self.sampler.penalty_window(context))
                self._t_last = time.perf_counter()
                self._t_first = self._t_first or self._t_last
                if token in eog:
                    self.finish_reason = "stop"
                    break
                self.tokens.append(token)
                context.append(token)
                self.usage.completion_tokens = len(self.tokens)
                piece, matched = matcher.push(decoder.add(token))
                if piece:
                    self.text += piece
                    yield piece
                if matched:
                    self.finish_reason = "stop"
                    return
                if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
                    self.finish_reason = "length"  # the last token need not be evaluated
                    break
                logits = model.eval([token], slot)
            # Not a stop string: whatever the decoder and the matcher still hold is part of the text.
            piece, matched = matcher.push(decoder.flush())
            if matched:
                self.finish_reason = "stop"
            else:
                piece += matcher.flush()
            if piece:
                self.text += piece
                yield piece
        finally:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"  # closed by the consumer, or an exception in the loop
            self._finish()
            if self._on_finish is not None:
                self._on_finish(self)

    def _finish(self) -> None:
        now = time.perf_counter()
        t_prompt = self._t_prompt or now
        n = len(self.tokens)
        evaluated = self.usage.prompt_tokens - self.usage.cached_tokens
        prompt_s = t_prompt - self._t_start
        decode_s = (self._t_last - self._t_first) if n > 1 else 0.0
        self.timings = Timings(
            prompt_ms=1e3 * prompt_s,
            ttft_ms=1e3 * (self._t_first - self._t_start) if self._t_first is not None else None,
            tpot_ms=1e3 * decode_s / (n - 1) if n > 1 and decode_s > 0 else None,
            total_ms=1e3 * (now - self._t_start),
            prompt_tokens_per_second=evaluated / prompt_s if self._t_prompt and prompt_s > 0 else None,
            tokens_per_second=(n - 1) / decode_s if n > 1 and decode_s > 0 else None,
        )

    def completion(self) -> Completion:
        """Run to the end (if not already) and return the whole result."""
        for _ in self:
            pass
        return Completion(self.text, self.finish_reason, self.usage, self.timings, list(self.tokens))


# ---- the library API (`Model.stream`, `Model.generate`, `Model.chat` delegate here) ----

def stream(model, prompt: str | Sequence[int], *, max_tokens: int | None = None, temperature: float = 0.8,
           top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
           repeat_last_n: int = 64, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
           logit_bias: dict[int, float] | None = None, seed: int | None = None, stop: Sequence[str] = (),
           cancel: threading.Event | None = None, cache_prompt: bool = False, slot: int = 0) -> Stream:
    """Generate from `prompt` (text, tokenized with the model's BOS rule, or token ids), streaming text.

    Sampling parameters and their defaults are llama.cpp's (see `runtime.sampling`); `temperature=0` is
    greedy; `seed` makes the draw reproducible; `stop` strings end generation and are not emitted;
    `cancel` (a threading.Event) ends it with finish reason `cancelled`. `max_tokens=None` (or -1) generates
    until an end-of-generation token or a full context. Raises ContextOverflowError if the prompt alone does not
    fit in `model.n_ctx`. The prompt is evaluated on the first `next()`: from an empty cache, or, with
    `cache_prompt`, after the longest prefix of it that the slot's KV cache already holds (what sessions do;
    the logits then come from different batch shapes, so a seed reproduces text only from the same cache
    state)."""
    t_start = time.perf_counter()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            logit_bias=logit_bias, seed=seed)
    if isinstance(stop, str):
        stop = (stop,)
    max_tokens = token_limit(max_tokens)   # -1: no limit
    ids = model.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if len(ids) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if len(ids) > model.n_ctx:
        raise ContextOverflowError(len(ids), model.n_ctx)
    sampler = Sampler(params, model.n_vocab)
    return Stream(model, ids, sampler, max_tokens=max_tokens, stop=stop, cancel=cancel, slot=slot,
                  cache_prompt=cache_prompt, t_start=t_start)


def generate(model, prompt: str | Sequence[int], **kw) -> Completion:
    """`stream(...)` run to the end: a Completion (text, finish_reason, usage, timings, tokens)."""
    return stream(model, prompt, **kw).completion()


def chat_prompt(model, messages: list[dict], *, template=None, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template (or `template`, a ChatTemplate)."""
    from ..formats.chat import chat_tokens
    return chat_tokens(model.tokenizer, template or chat_template(model), messages,
                       add_generation_prompt=add_generation_prompt)


def chat_template(model, override: str | None = None):
    """The model's ChatTemplate (its GGUF's, or the built-in format for its family), or one built from
    `override` (template source text). Cached on the model."""
    from ..formats.chat import ChatTemplate
    if override is not None:
        return ChatTemplate.from_gguf(model.gguf, override=override)
    cached = getattr(model, "_nibble_chat_template", None)
    if cached is None:
        cached = ChatTemplate.from_gguf(model.gguf)
        try:
            model._nibble_chat_template = cached
        except AttributeError:
            pass
    return cached


def chat_stream(model, messages: list[dict], *, template=None, **kw) -> Stream:
    """`stream` over the chat-template rendering of `messages` (dicts with `role` and `content`) followed
    by the assistant's generation prompt."""
    return stream(model, chat_prompt(model, messages, template=template), **kw)


def chat(model, messages: list[dict], *, template=None, **kw) -> Completion:
    """The assistant's reply to `messages` as a Completion; same keywords as `stream`."""
    return chat_stream(model, messages, template=template, **kw).completion()
