"""Text generation: the one loop the CLI, the library and the server consume.

    stream = generate.stream(model, "The capital of France is", max_tokens=16, temperature=0)
    for piece in stream:          # text pieces as tokens are produced; never half a UTF-8 character
        print(piece, end="")
    stream.finish_reason, stream.usage, stream.timings

The loop is a handful of small steps (gpt-fast's shape), split between the model's engine thread
(`runtime/scheduler.py`, which evaluates the prompt, reusing what a KV slot already holds of it, and then
each token, in batches with other requests) and `Generation.advance`: per token, the sampler picks from the
logits, the incremental decoder turns the id into text, `StopMatcher` holds back anything that may be the start of a
stop string, and the token is evaluated to get the next logits. Generation ends at an end-of-generation
token (`stop`), a user stop string (`stop`, the string itself never emitted), `max_tokens` or a full context
(`length`), or when `cancel` is set or the consumer stops iterating (`cancelled`). With a constraint
(`json_schema`, `format`, `grammar`, `regex`, `choices`: runtime/structured.py) the sampler draws only
tokens the grammar allows, end-of-generation only where the text is complete, and generation also ends
(`stop`) as soon as nothing else may follow.

KV cache after each ending: the prompt and every generated token, except that the last one is not
evaluated when generation ends by `max_tokens` or a stop string, and an end-of-generation token never is;
after `cancelled`, exactly the prompt and the tokens shown. The context never holds more than `n_ctx`
tokens: generation stops with `length` when it is full. A later call with `cache_prompt=True` (sessions)
whose prompt starts with these tokens prefills only the rest.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import ContextOverflowError, GrammarError, NibbleError
from .sampling import Sampler, SamplingParams, token_limit
from .speculative import DRAFT_MAX, drafter_for
from .structured import ConstrainedDrafter, constraint_for

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
    draft_tokens: int = 0                    # speculative decoding: tokens proposed by the drafter
    accepted_tokens: int = 0                 # of those, accepted (each saved a decoding step)
    verify_steps: int = 0                    # steps that verified proposals

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate}


@dataclass
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    tokens: list[int]
    tool_calls: list[dict] | None = None   # `chat(..., tools=...)`: OpenAI's message.tool_calls; text is the rest

    def to_dict(self) -> dict:
        out = {"text": self.text, "finish_reason": self.finish_reason, "usage": self.usage.to_dict(),
               "timings": self.timings.to_dict(), "tokens": list(self.tokens)}
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        return out


# ---- the steps ----

def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if len(diff) else n


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` (log-softmax of the raw logits, before any sampler) and the
    `top` most likely (id, log-probability) pairs."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    best = np.argpartition(-x, top)[:top] if 0 < top < len(x) else np.arange(len(x) if top else 0)
    best = best[np.argsort(-x[best], kind="stable")]
    return float(x[token] - lse), [(int(i), float(x[i] - lse)) for i in best]


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


class Generation:
    """One request's side of the decode loop, driven by the engine thread (`runtime/scheduler.py`): given
    the logits after its last token, `advance` samples the next one, turns it into text, holds back what may
    be a stop string and decides whether generation goes on. Pieces of text go to `out` for the consumer
    (`Stream`), each with the number of tokens generated so far; None ends the stream."""

    LOOKAHEAD = 2    # tokens generated ahead of the consumer: a Ctrl-C stops within a token of the screen

    def __init__(self, model, prompt_ids: list[int], sampler: Sampler, *, max_tokens: int | None,
                 stop: Sequence[str], cache_prompt: bool, t_start: float, logprobs: int | None = None,
                 drafter=None, draft_max: int = 16, constraint=None):
        from .speculative import DraftLength
        from ..formats.tokenizer import IncrementalDecoder
        self.prompt_ids = prompt_ids
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.cache_prompt = cache_prompt
        self.eog = model.tokenizer.eog_ids
        self.decoder = IncrementalDecoder(model.tokenizer)
        self.matcher = StopMatcher(stop)
        self.context = list(prompt_ids)          # the penalty window's source
        self.tokens: list[int] = []
        self.top_logprobs = logprobs             # None: none recorded; n: the token's and the n most likely
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.usage = Usage(len(prompt_ids), 0, 0)
        self.timings: Timings | None = None
        self.slot = -1
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.consumed = 0                        # pieces the consumer has taken (the scheduler's backpressure)
        self.emitted = 0
        self.constraint = constraint             # the grammar's state (runtime/structured.py), or None
        if constraint is not None and drafter is not None:
            drafter = ConstrainedDrafter(drafter, constraint)
        self.drafter = drafter                   # speculative decoding (runtime/speculative.py), or None
        self.draft_length = DraftLength(draft_max)
        self.draft_tokens = self.accepted_tokens = self.verify_steps = 0
        self._matched = False                    # ended by a stop string: nothing held back is emitted
        self._t_start = t_start
        self._t_prompt = self._t_first = self._t_last = None

    # ---- called on the engine thread ----

    def started(self, slot: int, cached: int) -> None:
        self.slot = slot
        self.usage.cached_tokens = cached

    def prompt_done(self) -> None:
        self._t_prompt = time.perf_counter()

    def ready(self) -> bool:
        """Whether the consumer has kept up enough for another token to be generated."""
        return self.emitted - self.consumed < self.LOOKAHEAD

    def advance(self, logits: np.ndarray, n_past: int, n_ctx: int) -> int | None:
        """The logits after the last evaluated token -> the next token to evaluate, or None when finished
        (finish_reason set). The context holds n_past of n_ctx tokens."""
        if (self.max_tokens is not None and len(self.tokens) >= self.max_tokens) or n_past >= n_ctx:
            self.finish_reason = "length"
            return None
        try:
            allowed = self.constraint.allowed() if self.constraint is not None else None
        except GrammarError as e:                # the matcher hit a limit: nothing may follow
            self.fail(e)
            return None
        token = self.sampler.sample(logits, self.sampler.penalty_window(self.context), allowed)
        self._t_last = time.perf_counter()
        self._t_first = self._t_first or self._t_last
        if token in self.eog:
            self.finish_reason = "stop"
            return None
        if self.constraint is not None:
            try:
                self.constraint.accept(token)
            except GrammarError as e:            # only if the mask and the matcher disagree: a bug
                self.fail(e)
                return None
        self.tokens.append(token)
        self.context.append(token)
        if self.top_logprobs is not None:
            self.logprobs.append(token_logprobs(logits, token, self.top_logprobs))
        self.usage.completion_tokens = len(self.tokens)
        piece, matched = self.matcher.push(self.decoder.add(token))
        self._emit(piece)
        if matched:
            self.finish_reason = "stop"
            self._matched = True
            return None
        if self.constraint is not None and self.constraint.done:
            self.finish_reason = "stop"    # only the end may follow: the last token need not be evaluated
            return None
        if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"  # the last token need not be evaluated
            return None
        return token

    def drafted(self, proposed: int, accepted: int) -> None:
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.verify_steps += 1
        self.draft_length.update(proposed, accepted)

    def fail(self, error: BaseException) -> None:
        self.error = error

    def finished(self) -> None:
        """The request left the engine: emit what the decoder and the stop matcher still hold (unless a stop
        string matched), set the timings and end the stream."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        if self.error is None and not self._matched:
            piece, matched = self.matcher.push(self.decoder.flush())
            if matched:
                self.finish_reason = "stop"
            else:
                piece += self.matcher.flush()
            self._emit(piece)
        self._set_timings()
        self.out.put(None)

    def _emit(self, piece: str) -> None:
        if piece:
            self.emitted += 1
            self.out.put((piece, len(self.tokens)))

    def _set_timings(self) -> None:
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
            draft_tokens=self.draft_tokens, accepted_tokens=self.accepted_tokens, verify_steps=self.verify_steps,
        )


class Stream:
    """An iterator of text pieces with `.finish_reason`, `.usage`, `.timings`, `.tokens` and `.text`
    (what has been emitted) once iteration ends. The request is queued on the model's engine thread at
    the first `next()`. Iterate it once; `close()` (or breaking out of a for loop and dropping it) ends
    generation with finish reason `cancelled`, keeping in the KV cache the prompt and the tokens shown."""

    def __init__(self, model, generation: Generation, cancel: threading.Event | None,
                 on_finish: Callable[["Stream"], None] | None = None):
        from .scheduler import Request
        self.model = model
        self.generation = generation
        self.request = Request(generation.prompt_ids, generation, cancel)
        self.text = ""
        self.tokens: list[int] = []
        self.tools: list[dict] | None = None     # chat_stream with tools: those in the prompt
        self._on_finish = on_finish
        self._submitted = self._ended = False
        self._thread = self._reader = threading.get_ident()   # created in, last read in

    @property
    def prompt_ids(self) -> list[int]:
        return self.generation.prompt_ids

    @property
    def finish_reason(self) -> str | None:
        return self.generation.finish_reason if self._ended else None

    @property
    def usage(self) -> Usage:
        return self.generation.usage

    @property
    def timings(self) -> Timings | None:
        return self.generation.timings if self._ended else None

    @property
    def slot(self) -> int:
        return self.generation.slot

    @property
    def logprobs(self) -> list[tuple[float, list[tuple[int, float]]]]:
        """Per token of `tokens` (with `logprobs=n`): (log p of the token, [(id, log p)] of the n likeliest)."""
        return self.generation.logprobs[:len(self.tokens)]

    @property
    def sampler(self) -> Sampler:
        return self.generation.sampler

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        if self._ended:
            raise StopIteration
        self._reader = threading.get_ident()
        if not self._submitted:
            self._check_not_blocked_by_this_thread()
            self._submitted = True
            self.model._submit(self)
        item = self.generation.out.get()
        if item is None:
            self._end()
            if self.generation.error is not None:
                raise self.generation.error
            raise StopIteration
        piece, n_tokens = item
        self.generation.consumed += 1
        self.model._wake()
        self.text += piece
        self.tokens = self.generation.tokens[:n_tokens]
        return piece

    def _check_not_blocked_by_this_thread(self) -> None:
        """This thread's other open streams only move on when it reads them; if they hold every slot, this
        one would wait for ever. (Streams created in one thread and read in others, as an async server does,
        are not this thread's to block.)"""
        me = threading.get_ident()
        if me != self._thread:
            return
        mine = [s for s in list(self.model._open_streams)
                if s is not self and s._thread == me and s._reader == me]
        if len(mine) >= self.model.parallel:
            raise NibbleError(f"another stream of this model is open in this thread and holds its "
                              f"{'only slot' if self.model.parallel == 1 else 'slots'}: iterate it to the end or "
                              f"close() it first (or load the model with parallel > {len(mine)})")

    def _end(self) -> None:
        self._ended = True
        self.model._open_streams.discard(self)
        # what was shown is the stream's result: tokens sampled after the last piece taken are not
        if self.generation.finish_reason == "cancelled":
            self.generation.tokens[len(self.tokens):] = []
            self.generation.usage.completion_tokens = len(self.tokens)
        self.tokens = list(self.generation.tokens)
        if self._on_finish is not None:
            self._on_finish(self)

    def cancel(self) -> None:
        """Ask generation to stop (finish reason `cancelled`), from any thread, without waiting: the consumer
        sees the stream end within a step."""
        self.request.cancel.set()
        if self._submitted:
            self.model._wake()

    def close(self) -> None:
        """Stop generating (finish reason `cancelled` unless it had already ended) and wait for the engine
        to let go of the request."""
        if self._ended:
            return
        if not self._submitted:
            self._submitted = True
            self.generation.finish_reason = "cancelled"
            self.generation.finished()
        self.request.cancel.set()
        self.model._wake()
        while self.generation.out.get() is not None:
            pass
        self._end()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if self._submitted and not self._ended:
            self.request.cancel.set()

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
           cancel: threading.Event | None = None, cache_prompt: bool = False,
           logprobs: int | None = None, speculative=None, draft_max: int = 16, json_schema=None,
           format: str | dict | None = None, grammar: str | None = None, regex: str | None = None,
           choices: Sequence[str] | None = None) -> Stream:
    """Generate from `prompt` (text, tokenized with the model's BOS rule, or token ids), streaming text.

    Sampling parameters and their defaults are llama.cpp's (see `runtime.sampling`); `temperature=0` is
    greedy; `seed` makes the draw reproducible; `stop` strings end generation and are not emitted;
    `cancel` (a threading.Event) ends it with finish reason `cancelled`. `logprobs=n` records, per generated
    token, its log-probability and the n most likely alternatives (`stream.logprobs`). `speculative`
    ("ngram", a draft Model, or a draft model's path or catalogue name) verifies up to `draft_max` guessed
    tokens per step: the same tokens as without it, faster where the text is guessable
    (runtime/speculative.py). At most one constraint (runtime/structured.py): `json_schema` (a dict or its
    JSON text), `format="json"` (any JSON object), `grammar` (Lark or GBNF text), `regex` or `choices` (a list
    of strings); the output then always parses, and GrammarError is raised here, before anything is
    evaluated, if the constraint is malformed. `max_tokens=None` (or -1) generates until
    an end-of-generation token or a full context. Raises ContextOverflowError if the prompt alone does not
    fit in `model.n_ctx`. The prompt is evaluated on the first `next()`, on the model's engine thread, in a
    batch with whatever else the model is generating: from an empty cache, or, with `cache_prompt`, after
    the longest prefix of it that a KV slot already holds with the bits a fresh evaluation would give it.
    Either way the tokens are those of a lone evaluation from an empty cache: a seed gives the same text
    whatever else runs and whatever the cache held."""
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
    if not 1 <= draft_max <= DRAFT_MAX:
        raise ValueError(f"draft_max must be in 1..{DRAFT_MAX}, not {draft_max}")
    constraint = constraint_for(model, json_schema=json_schema, format=format, grammar=grammar, regex=regex,
                                choices=choices)
    generation = Generation(model, ids, sampler, max_tokens=max_tokens, stop=stop, cache_prompt=cache_prompt,
                            t_start=t_start, logprobs=logprobs, drafter=drafter_for(model, speculative),
                            draft_max=draft_max, constraint=constraint)
    return Stream(model, generation, cancel)


def generate(model, prompt: str | Sequence[int], **kw) -> Completion:
    """`stream(...)` run to the end: a Completion (text, finish_reason, usage, timings, tokens)."""
    return stream(model, prompt, **kw).completion()


def chat_prompt(model, messages: list[dict], *, template=None, add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template (or `template`, a ChatTemplate), with
    `tools` (checked OpenAI tools) and any tool calls and results in the messages as runtime/tools.py
    renders them."""
    from ..formats.chat import chat_tokens
    from .tools import template_inputs
    template = template or chat_template(model)
    messages, tools = template_inputs(template, messages, tools)
    return chat_tokens(model.tokenizer, template, messages, add_generation_prompt=add_generation_prompt,
                       tools=tools)


def chat_template(model, override: str | None = None):
    """The model's ChatTemplate (its GGUF's, or the built-in format for its family), or one built from
    `override` (template source text). Cached on the model."""
    from ..formats.chat import ChatTemplate
    if override is not None:
        return ChatTemplate.from_gguf(model.gguf, override=override)
    return model.chat_template_object


def chat_stream(model, messages: list[dict], *, template=None, tools=None, tool_choice=None,
                parallel_tool_calls: bool = True, **kw) -> Stream:
    """`stream` over the chat-template rendering of `messages` (dicts with `role` and `content`) followed
    by the assistant's generation prompt. `tools` (OpenAI's function tools), `tool_choice` ("auto" by default
    with tools, "none", "required" or a function's name or OpenAI's {"type": "function", ...}) and
    `parallel_tool_calls`: see runtime/tools.py; the stream's text holds the calls in their markup."""
    from .tools import prepare
    tools, grammar = prepare(tools, tool_choice, parallel_tool_calls)
    if grammar is not None:
        if any(kw.get(k) is not None for k in ("json_schema", "format", "grammar", "regex", "choices")):
            raise GrammarError("tool calls and another constraint (json_schema, format, grammar, regex, "
                               "choices) cannot be combined")
        kw["grammar"] = grammar
    s = stream(model, chat_prompt(model, messages, template=template, tools=tools), **kw)
    s.tools = tools
    return s


def chat(model, messages: list[dict], *, template=None, **kw) -> Completion:
    """The assistant's reply to `messages` as a Completion; same keywords as `stream`, and chat_stream's
    tools. With tools the Completion's `tool_calls` holds the calls (OpenAI's message.tool_calls), `text`
    the rest, and `finish_reason` is "tool_calls" when there are calls."""
    from .tools import parse
    s = chat_stream(model, messages, template=template, **kw)
    c = s.completion()
    if s.tools is not None:
        c.text, c.tool_calls = parse(c.text)
        if c.tool_calls and c.finish_reason == "stop":
            c.finish_reason = "tool_calls"
    return c
