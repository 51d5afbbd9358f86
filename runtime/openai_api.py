"""OpenAI-shaped completions over `generate.stream`: what `Model.create_chat_completion`,
`Model.create_completion` and the server's /v1 endpoints return (llama-cpp-python's shapes).

    model.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=32)
    # {"id": "chatcmpl-...", "object": "chat.completion", "created", "model",
    #  "choices": [{"index": 0, "message": {"role": "assistant", "content": ...}, "logprobs", "finish_reason"}],
    #  "usage": {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details": {"cached_tokens"}}}
    for chunk in model.create_chat_completion(messages, stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")

`sampling_kwargs` checks a request's sampling fields (any JSON: wrong types raise InvalidRequestError
naming the field) and turns them into `generate.stream`'s keywords; the server's Ollama endpoints use it
too. `CompletionRequest` is one request: its `stream` (a `generate.Stream`), `result()` for the whole response and
`chunks()` for the streamed one. `aiterate` drives a blocking iterator from async code (`Model.astream`, the
server). Prompts are evaluated with `cache_prompt=True`: reusing a KV slot never changes the tokens here.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

from ..errors import InvalidRequestError
from . import generate
from .tools import StreamParser, parse as parse_tool_calls
from .speculative import DRAFT_MAX
from .sampling import SamplingParams

# request field -> type, for the fields passed to generate.stream under the same name
NUMBERS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
           "presence_penalty": float, "frequency_penalty": float, "repeat_penalty": float,
           "repeat_last_n": int, "max_tokens": int}
MAX_TOP_LOGPROBS = 20
CONSTRAINTS = ("json_schema", "grammar", "regex", "choices")   # generate.stream's, also as request fields


# ---- checking a request ----

def number(value: Any, name: str, kind: type) -> int | float:
    """A JSON number as `kind` (int accepts 3.0, never true/false); InvalidRequestError otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int:
        ok = math.isfinite(value) and float(value).is_integer()
    if not ok:
        raise InvalidRequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, "
                                  f"not {value!r}", name)
    return kind(value)


def stop_strings(value: Any, name: str = "stop") -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise InvalidRequestError(f"'{name}' must be a string or a list of strings", name)


def sampling_kwargs(fields: Mapping[str, Any], n_vocab: int) -> dict:
    """Sampling fields named like `generate.stream`'s keywords (temperature, top_k, top_p, min_p, seed,
    presence_penalty, frequency_penalty, repeat_penalty, repeat_last_n, max_tokens, stop, logit_bias with
    integer or numeric-string keys) -> its keywords. None means the default; unknown fields are ignored.
    Raises InvalidRequestError naming the field that is mistyped or out of range."""
    kw: dict[str, Any] = {}
    for name, kind in NUMBERS.items():
        if fields.get(name) is not None:
            kw[name] = number(fields[name], name, kind)
    kw["stop"] = stop_strings(fields.get("stop"))
    if fields.get("speculative") is not None:    # "ngram" or a draft Model (a server resolves its names)
        kw["speculative"] = fields["speculative"]
    if fields.get("draft_max") is not None:
        kw["draft_max"] = number(fields["draft_max"], "draft_max", int)
        if not 1 <= kw["draft_max"] <= DRAFT_MAX:
            raise InvalidRequestError(f"'draft_max' must be between 1 and {DRAFT_MAX}", "draft_max")
    bias = fields.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, Mapping):
            raise InvalidRequestError("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
        kw["logit_bias"] = {}
        for token, value in bias.items():
            try:
                token_id = int(token)
            except (TypeError, ValueError):
                raise InvalidRequestError(f"'logit_bias' key {token!r} is not a token id", "logit_bias") from None
            kw["logit_bias"][token_id] = number(value, "logit_bias", float)
    if kw.get("max_tokens", 0) < 0:
        raise InvalidRequestError(f"'max_tokens' must be >= 0, not {kw['max_tokens']}", "max_tokens")
    try:
        SamplingParams(**{k: v for k, v in kw.items() if k in SamplingParams.names()}).check(n_vocab)
    except ValueError as e:      # the message starts with the parameter's name
        raise InvalidRequestError(str(e), str(e).split()[0]) from None
    return kw


def constraint_kwargs(body: Mapping[str, Any]) -> dict:
    """OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"schema"}};
    llama-server's {"type": "json_object", "schema"} too) and the fields json_schema, grammar, regex and
    choices -> generate.stream's constraint keywords (checked there: a bad one is a GrammarError)."""
    kw = {name: body[name] for name in CONSTRAINTS if body.get(name) is not None}
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, Mapping) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise InvalidRequestError("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} "
                                      "or {\"type\": \"json_schema\", \"json_schema\": {\"schema\": {...}}}",
                                      "response_format")
        if kind == "json_object":
            kw.update({"json_schema": fmt["schema"]} if fmt.get("schema") is not None else {"format": "json"})
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
            if not isinstance(schema, (Mapping, bool)):
                raise InvalidRequestError("'response_format.json_schema.schema' must be a JSON Schema object",
                                          "response_format")
            kw["json_schema"] = schema
    if len(kw) > 1:
        raise InvalidRequestError(f"give one of response_format, {', '.join(CONSTRAINTS)}, not several",
                                  "response_format")
    return kw


def openai_kwargs(body: Mapping[str, Any], n_vocab: int, chat: bool) -> tuple[dict, int | None]:
    """An OpenAI request's options -> (generate.stream keywords, how many top logprobs to return or None)."""
    if body.get("n") not in (None, 1):
        raise InvalidRequestError("only n=1 is supported", "n")
    fields = dict(body)
    if body.get("max_completion_tokens") is not None:
        fields["max_tokens"] = body["max_completion_tokens"]
    kw = sampling_kwargs(fields, n_vocab)
    kw.update(constraint_kwargs(body))
    logprobs = body.get("logprobs")
    if chat:            # logprobs: bool, top_logprobs: 0..20
        if logprobs not in (None, True, False):
            raise InvalidRequestError("'logprobs' must be a boolean", "logprobs")
        top = body.get("top_logprobs")
        top = 0 if top is None else number(top, "top_logprobs", int)
        n_logprobs = top if logprobs else None
        name = "top_logprobs"
    else:               # logprobs: the number of top logprobs
        n_logprobs = None if logprobs is None else number(logprobs, "logprobs", int)
        name = "logprobs"
    if n_logprobs is not None and not 0 <= n_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"'{name}' must be between 0 and {MAX_TOP_LOGPROBS}", name)
    return kw, n_logprobs


def chat_messages(messages: Any) -> list[dict]:
    """OpenAI messages -> {"role", "content"} dicts for the chat template (with an assistant's `tool_calls`
    and a tool result's `tool_call_id` and `name`); a content given as parts keeps its text parts."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a string 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise InvalidRequestError(f"messages[{i}]: only text content parts are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string or a list of text parts",
                                      "messages")
        message = {"role": m["role"], "content": content}
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list) or not all(isinstance(c, Mapping) and isinstance(c.get("function"), Mapping)
                                                      and isinstance(c["function"].get("name"), str) for c in calls):
                raise InvalidRequestError(f"messages[{i}].tool_calls must be a list of {{\"function\": {{\"name\", "
                                          f"\"arguments\"}}}}", "messages")
            message["tool_calls"] = [dict(c) for c in calls]
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
        out.append(message)
    return out


def prompt_ids(model, prompt: Any) -> list[int]:
    """A completion prompt: text, token ids, or a list holding one of them."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = model.tokenize(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < model.n_vocab for t in prompt):
            raise InvalidRequestError(f"'prompt' holds a token id outside the vocabulary (0..{model.n_vocab - 1})",
                                      "prompt")
        ids = list(prompt)
    else:
        raise InvalidRequestError("'prompt' must be a string or a list of token ids (one prompt per request)",
                                  "prompt")
    if not ids:
        raise InvalidRequestError("'prompt' is empty", "prompt")
    return ids


# ---- one request ----

class CompletionRequest:
    """One OpenAI-shaped generation. `body` holds the request's fields (`messages` for a chat completion,
    `prompt` otherwise, and the options); everything is checked here, and the prompt's length against the
    context (ContextOverflowError), before anything is evaluated. `result()` runs it to the end and returns
    the response; `chunks()` yields the streamed response's chunks. `stream` is the underlying
    `generate.Stream` (usage, timings, `cancel()`)."""

    def __init__(self, model, body: Mapping[str, Any], *, chat: bool, model_name: str | None = None,
                 cancel: threading.Event | None = None):
        self.model = model
        self.chat = chat
        self.model_name = model_name or model.name
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        kw, self.n_logprobs = openai_kwargs(body, model.n_vocab, chat)
        options = body.get("stream_options")
        if options is not None and not isinstance(options, Mapping):
            raise InvalidRequestError("'stream_options' must be an object", "stream_options")
        self.include_usage = bool((options or {}).get("include_usage"))
        if chat:     # tools, tool_choice, parallel_tool_calls: runtime/tools.py
            self.stream = generate.chat_stream(
                model, chat_messages(body.get("messages")), tools=body.get("tools"),
                tool_choice=body.get("tool_choice"), parallel_tool_calls=body.get("parallel_tool_calls"),
                cache_prompt=True, cancel=cancel, logprobs=self.n_logprobs, **kw)
        else:
            self.stream = generate.stream(model, prompt_ids(model, body.get("prompt")), cache_prompt=True,
                                          cancel=cancel, logprobs=self.n_logprobs, **kw)
        self.tools = self.stream.tools

    # ---- the shapes ----

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def usage(self) -> dict:
        u = self.stream.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}

    def logprobs(self, start: int, end: int) -> dict | None:
        """The logprobs of generated tokens start..end in OpenAI's shape (None when not requested)."""
        if self.n_logprobs is None:
            return None
        tok = self.model.tokenizer
        ids, entries = self.stream.generation.tokens[start:end], self.stream.generation.logprobs[start:end]
        def piece(t: int) -> bytes:
            return tok.token_bytes(t, special=True)
        if self.chat:
            def entry(t, lp):
                b = piece(t)
                return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, l) for i, l in top]}
                                for t, (lp, top) in zip(ids, entries)], "refusal": None}
        texts = [piece(t).decode("utf-8", "replace") for t in ids]
        offsets = [sum(len(s) for s in texts[:k]) for k in range(len(texts))]
        return {"tokens": texts, "token_logprobs": [lp for lp, _ in entries],
                "top_logprobs": [{piece(i).decode("utf-8", "replace"): l for i, l in top} for _, top in entries],
                "text_offset": offsets}

    def result(self) -> dict:
        """Run to the end: the whole response."""
        s = self.stream
        for _ in s:
            pass
        choice: dict[str, Any] = {"index": 0}
        finish_reason = s.finish_reason
        if self.chat and self.tools is not None:
            content, calls = parse_tool_calls(s.text)
            choice["message"] = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                choice["message"]["tool_calls"] = calls
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        elif self.chat:
            choice["message"] = {"role": "assistant", "content": s.text}
        else:
            choice["text"] = s.text
        choice["logprobs"] = self.logprobs(0, len(s.tokens))
        choice["finish_reason"] = finish_reason
        return {**self._envelope(False), "choices": [choice], "usage": self.usage(),
                "timings": s.timings.to_dict()}

    def chunks(self) -> Iterator[dict]:
        """The streamed response: a chunk per text piece (the chat's first says the role), one with the finish
        reason, then with `stream_options.include_usage` one with the usage and no choices. With tools, text
        outside the calls streams as content and each call as OpenAI streams one: a delta with its index, id
        and name, then deltas of its arguments (runtime/tools.py's StreamParser). Closing the generator
        early cancels generation."""
        s = self.stream
        usage = {"usage": None} if self.include_usage else {}

        def chunk(delta: str | dict, finish_reason=None, logprobs=None) -> dict:
            choice: dict[str, Any] = {"index": 0}
            if self.chat:
                choice["delta"] = delta
            else:
                choice["text"] = delta
            choice["logprobs"] = logprobs
            choice["finish_reason"] = finish_reason
            return {**self._envelope(True), "choices": [choice], **usage}

        parser = StreamParser() if self.chat and self.tools is not None else None
        try:
            if self.chat:
                yield chunk({"role": "assistant", "content": ""})
            reported = 0
            for piece in s:
                n = len(s.tokens)
                if parser is None:
                    yield chunk({"content": piece} if self.chat else piece, logprobs=self.logprobs(reported, n))
                    reported = n
                    continue
                for delta in parser.feed(piece):
                    yield chunk(delta, logprobs=self.logprobs(reported, n))
                    reported = n
            finish_reason = s.finish_reason
            if parser is not None:
                for delta in parser.close(complete=finish_reason == "stop"):
                    yield chunk(delta)
                if parser.complete_calls() and finish_reason == "stop":
                    finish_reason = "tool_calls"
            yield chunk({} if self.chat else "", finish_reason, self.logprobs(reported, len(s.tokens)))
            if self.include_usage:
                yield {**self._envelope(True), "choices": [], "usage": self.usage()}
        finally:
            s.close()


def chat_completion(model, messages: list[dict], *, stream: bool = False, **opts):
    """`Model.create_chat_completion`: OpenAI's chat completion response (a dict), or with stream=True an
    iterator of its chunks. `opts`: OpenAI's request fields (temperature, top_p, seed, stop, max_tokens or
    max_completion_tokens, presence_penalty, frequency_penalty, logit_bias, logprobs, top_logprobs, n=1,
    stream_options, response_format, tools, tool_choice, parallel_tool_calls) and nibble's top_k, min_p,
    repeat_penalty, repeat_last_n, json_schema, grammar, regex, choices."""
    run = CompletionRequest(model, {**opts, "messages": messages}, chat=True)
    return run.chunks() if stream else run.result()


def completion(model, prompt, *, stream: bool = False, **opts):
    """`Model.create_completion`: OpenAI's (legacy) completion response for a text prompt (or token ids),
    or with stream=True an iterator of its chunks; `logprobs` is the number of top logprobs to return."""
    run = CompletionRequest(model, {**opts, "prompt": prompt}, chat=False)
    return run.chunks() if stream else run.result()


# ---- from async code ----

async def aiterate(items: Iterator, stop: Callable[[], None]) -> AsyncIterator:
    """Iterate a blocking iterator (a `Stream`, `CompletionRequest.chunks()`) from async code: a thread of its own
    drives it and hands each item to the event loop, so neither waits on the other's pace. When the
    consumer stops early (break, cancellation, a client that went away) `stop()` is called, from the event
    loop; it should make the iterator end soon (`Stream.cancel`)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    def put(item, error=None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:     # the event loop is closed: nobody is listening any more
            pass

    def drive() -> None:
        try:
            for item in items:
                put(item)
            put(end)
        except BaseException as e:
            put(end, e)

    threading.Thread(target=drive, name="nibble-aiterate", daemon=True).start()
    finished = False
    try:
        while True:
            item, error = await queue.get()
            if item is end:
                finished = True
                if error is not None:
                    raise error
                return
            yield item
    finally:
        if not finished:
            stop()


def astream(model, prompt, **kw) -> AsyncIterator[str]:
    """`Model.astream`: `generate.stream`'s pieces as an async iterator, for event loops (GUIs, servers).
    `prompt` is text, token ids, or a list of chat messages (the chat template is applied)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], Mapping):
        s = generate.chat_stream(model, prompt, **kw)
    else:
        s = generate.stream(model, prompt, **kw)
    return aiterate(s, s.cancel)
