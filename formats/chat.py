"""Chat templates: the GGUF's `tokenizer.chat_template` (Jinja2) rendered safely, and the chat tokenized so that
text a user typed can never become a control token.

Rendering follows transformers' `apply_chat_template`: an ImmutableSandboxedEnvironment with trim_blocks,
lstrip_blocks and loop controls; `raise_exception`, `strftime_now`, and a `tojson` that does not HTML-escape;
variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools`. On top of the sandbox:

- reaching Python internals (`x.__class__`, `cycler.__init__.__globals__`, `list.append` on the immutable
  sandbox) raises TemplateError at once, where the plain sandbox would hand back a silent Undefined;
- a budget: the render stops with TemplateError past `time_budget_s` (checked on every line of template code)
  or when the output, or any string or list built by `+`, `*`, `~`, a filter or a call, passes
  `max_output_chars`.

Tokenizing a chat (`chat_tokens`): the template's own text is tokenized with special tokens parsed and the
messages' text with them off. The template is rendered a second time with every message string marked: a
private-use "barrier" character around the text and inside any control-token text it contains. No special
token can match across a barrier, and barriers are removed before the text reaches the tokenizer model, so
a chat without control-token text tokenizes exactly as its rendering with parse_special on (the way
llama.cpp's reference ids are made), and one that has such text gets plain-text ids for it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import wraps

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import ModelFormatError, TemplateError

TIME_BUDGET_S = 2.0
MAX_OUTPUT_CHARS = 4 << 20      # characters of output, and of any one string or list built while rendering

# ---- built-in formats for GGUFs without a template, chosen by the special tokens the vocabulary has ----

# Gemma's standard turns (as in Google's template): <bos>, the system text folded into the first user turn
# followed by a blank line, `assistant` called `model`, each message trimmed.
GEMMA_TEMPLATE = """\
{{- bos_token -}}
{%- macro text(content) -%}
  {%- if content is string -%}{{- content -}}
  {%- elif content -%}{%- for part in content if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set first_user_prefix = text(messages[0]['content']) ~ '\n\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('Gemma chats alternate user and assistant turns, starting with the user') -}}
  {%- endif -%}
  {{- '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else message['role']) ~ '\n' -}}
  {{- (first_user_prefix if loop.first else '') ~ (text(message['content']) | trim) ~ '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
"""

CHATML_TEMPLATE = """\
{%- for message in messages -%}
  {{- '<|im_start|>' ~ message['role'] ~ '\n' ~ message['content'] ~ '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

LLAMA3_TEMPLATE = """\
{{- bos_token -}}
{%- for message in messages -%}
  {{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\n\n' ~ (message['content'] | trim) ~ '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

BUILTIN_TEMPLATES = {  # name: (template, tokens the vocabulary must have)
    "gemma": (GEMMA_TEMPLATE, ("<start_of_turn>", "<end_of_turn>")),
    "chatml": (CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>")),
    "llama3": (LLAMA3_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}


# ---- the sandbox ----

class _OverBudget(Exception):
    pass


class _Raised(Exception):
    """raise_exception() called by the template."""


def _raise_exception(message):
    raise _Raised(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(str(fmt))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' version: unlike Jinja's own tojson it does not escape <, >, & and '
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _CheckedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to a call that checks the size of what it builds."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


_CONTAINERS = (list, tuple, dict, set, frozenset)
_SCALARS = frozenset({int, float, bool, type(None)})


class _Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _CheckedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, max_chars: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                         extensions=["jinja2.ext.loopcontrols", _GenerationTag], finalize=self._finalize)
        self.max_chars = max_chars
        self.filters = {name: self._guarded(f) for name, f in self.filters.items()}
        self.filters["tojson"] = self._guarded(_tojson)
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)

    # -- sizes --

    def _size(self, value, limit: int) -> int:
        """len(value), with containers counted through (bounded: stops past `limit`)."""
        if isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, _CONTAINERS):
            total, stack = 0, [value]
            while stack and total <= limit:
                v = stack.pop()
                items = v.values() if isinstance(v, dict) else v
                total += len(v)
                kinds = set(map(type, items))   # C-level passes: a Python loop per item would be slow here
                if kinds <= _SCALARS:
                    continue
                if kinds == {str}:
                    total += sum(map(len, items))
                    continue
                for item in items:
                    if total > limit:
                        break
                    if isinstance(item, _CONTAINERS):
                        stack.append(item)
                    elif isinstance(item, str):
                        total += len(item)
            return total
        if isinstance(value, int) and not isinstance(value, bool):
            return value.bit_length() // 3   # a huge integer costs as much as a long string
        return 0

    def _check(self, value):
        if self._size(value, self.max_chars) > self.max_chars:
            raise _OverBudget(f"the template built a value larger than {self.max_chars} characters")
        return value

    def _check_args(self, args, kwargs):
        # a huge count (`center(10**9)`) is refused before the call allocates; what the call builds is checked
        # after it. Containers passed in were checked when they were built.
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.max_chars:
                raise _OverBudget(f"the template passed {a} as an argument, larger than the "
                                  f"{self.max_chars}-character budget")

    def _guarded(self, f):
        @wraps(f)   # keeps jinja's pass_context/pass_environment markers
        def guarded(*args, **kwargs):
            self._check_args(args, kwargs)
            return self._check(f(*args, **kwargs))
        return guarded

    def _finalize(self, value):
        return self._check(value)

    def checked_concat(self, parts):
        for p in parts:
            self._check(p)
        return self._check("".join(map(str, parts)))

    # -- the sandbox's hooks --

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.max_chars:
                    raise _OverBudget(f"the template repeated a value past {self.max_chars} characters")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and right * abs(left).bit_length() > 3 * self.max_chars:
                raise _OverBudget("the template computed a power too large for the budget")
        return self._check(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):
        __self._check_args(args, kwargs)
        return __self._check(super().call(__context, __obj, *args, **kwargs))

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")


class _Deadline:
    """A trace function that stops the render past its deadline: line events in template code, call events
    everywhere (Jinja compiles templates to Python whose file name is `<template>`)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def _check(self):
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"the template ran longer than {self.seconds:g} s")

    def on_call(self, frame, event, arg):
        self._check()
        return self.on_line if frame.f_code.co_filename == "<template>" else None

    def on_line(self, frame, event, arg):
        self._check()
        return self.on_line


# ---- templates ----

class ChatTemplate:
    """A chat template and the text it is rendered with. `source` is the Jinja2 text; `name` says where it
    came from (`default`, a GGUF template name, `override`, or `builtin:<format>`)."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "override",
                 time_budget_s: float = TIME_BUDGET_S, max_output_chars: int = MAX_OUTPUT_CHARS):
        if not isinstance(source, str):
            raise TemplateError(f"a chat template must be text, got {type(source).__name__}")
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.time_budget_s = time_budget_s
        self.max_output_chars = max_output_chars
        self._env = _Sandbox(max_output_chars)
        try:
            self._template = self._env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template ({name}) line {e.lineno}: {e.message}") from None
        except (_OverBudget, jinja2.TemplateError) as e:
            raise TemplateError(f"chat template ({name}): {e}") from None

    @classmethod
    def from_gguf(cls, gguf, name: str | None = None, override: str | None = None, **budget) -> "ChatTemplate":
        """The template to use for a GGUF: `override` (template text, e.g. from --chat-template FILE), else
        `tokenizer.chat_template.NAME` when `name` is given, else `tokenizer.chat_template`, else the built-in
        format that the vocabulary's special tokens call for."""
        from .tokenizer import special_token_texts

        bos, eos = special_token_texts(gguf)
        if override is not None:
            return cls(override, bos_token=bos, eos_token=eos, name="override", **budget)
        meta = gguf.metadata
        key = "tokenizer.chat_template" if name in (None, "default") else f"tokenizer.chat_template.{name}"
        if key in meta:
            if not isinstance(meta[key], str):
                raise ModelFormatError(f"{gguf.name}: metadata {key!r} must be a STRING")
            return cls(meta[key], bos_token=bos, eos_token=eos, name=name or "default", **budget)
        if name not in (None, "default"):
            known = sorted(k.removeprefix("tokenizer.chat_template.") for k in meta
                           if k.startswith("tokenizer.chat_template."))
            have = f"it has: {', '.join(known)}" if known else "it has no named templates"
            raise TemplateError(f"{gguf.name}: no chat template named {name!r}; {have}")
        tokens = set(meta.get("tokenizer.ggml.tokens") or ())
        for builtin, (source, needs) in BUILTIN_TEMPLATES.items():
            if all(t in tokens for t in needs):
                return cls(source, bos_token=bos, eos_token=eos, name=f"builtin:{builtin}", **budget)
        raise TemplateError(f"{gguf.name} has no chat template and nibble has no built-in format for its special "
                            f"tokens; pass one with --chat-template FILE")

    def render(self, messages, add_generation_prompt: bool = True, tools=None, **extra) -> str:
        """The prompt text for `messages` (a list of {"role", "content"} mappings)."""
        _check_messages(messages)
        context = dict(extra, messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                       bos_token=self.bos_token, eos_token=self.eos_token)
        deadline = _Deadline(self.time_budget_s)
        pieces, size = [], 0
        previous = sys.gettrace()
        sys.settrace(deadline.on_call)
        try:
            for piece in self._template.generate(**context):
                size += len(piece)
                if size > self.max_output_chars:
                    raise _OverBudget(f"the template's output passed {self.max_output_chars} characters")
                pieces.append(piece)
        except TemplateError:
            raise
        except _Raised as e:
            raise TemplateError(f"chat template ({self.name}): {e}") from None
        except _OverBudget as e:
            raise TemplateError(f"chat template ({self.name}) stopped: {e}") from None
        except SecurityError as e:
            raise TemplateError(f"chat template ({self.name}) tried something it may not: {e}") from None
        except RecursionError:
            raise TemplateError(f"chat template ({self.name}) recursed too deeply") from None
        except MemoryError:
            raise TemplateError(f"chat template ({self.name}) ran out of memory") from None
        except Exception as e:   # jinja2.TemplateError, and the TypeError/KeyError/... of a broken template
            raise TemplateError(f"chat template ({self.name}) failed: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(previous)
        return "".join(pieces)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, {len(self.source)} chars)"


def _check_messages(messages) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError(f"messages must be a list of {{'role', 'content'}} mappings, got "
                            f"{type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TemplateError(f"message #{i} must be a mapping with a 'role' string, got {m!r:.80}")


# ---- tokenizing a chat ----

_UNMARKED_KEYS = frozenset({"role", "type"})   # template logic compares these; they are not free text


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _pick_barrier(texts) -> str:
    for cp in range(0xE000, 0xF900):   # the private-use area: a character no text here contains
        c = chr(cp)
        if not any(c in t for t in texts):
            return c
    raise TemplateError("cannot tokenize this chat: its text uses every private-use character")


def _marked(value, mark):
    """A copy of `value` with `mark` applied to every string in it, except under the keys in _UNMARKED_KEYS."""
    if isinstance(value, str):
        return mark(value)
    if isinstance(value, Mapping):
        return {k: (v if k in _UNMARKED_KEYS else _marked(v, mark)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_marked(v, mark) for v in value]
    return value


def chat_tokens(tokenizer, template: ChatTemplate, messages, add_generation_prompt: bool = True, tools=None,
                **extra) -> list[int]:
    """The token ids of a chat: the template's text with special tokens parsed, the messages' text (and the
    tools') with them off; a BOS in front when the model adds one and the template did not write it."""
    text = template.render(messages, add_generation_prompt, tools, **extra)
    user_texts = [s for s in _strings([list(messages), tools]) if s]
    control = tokenizer.control_texts_in("\x00".join(user_texts)) if user_texts else []
    barrier = _pick_barrier([template.source, text, *user_texts, *_strings(extra)])

    def break_control(s: str) -> str:
        for t in control:
            if len(t) > 1:
                s = s.replace(t, t[0] + barrier + t[1:])
        return s

    def wrap(s: str) -> str:
        core = s.strip()
        if not core:
            return s
        start = len(s) - len(s.lstrip())
        return s[:start] + barrier + break_control(core) + barrier + s[start + len(core):]

    marked = None
    for mark in (wrap, break_control):   # barriers around each text too; if the template reacts, only inside
        try:
            candidate = template.render(_marked(list(messages), mark), add_generation_prompt,
                                        _marked(tools, mark), **extra)
        except TemplateError:
            continue
        if candidate.replace(barrier, "") == text:
            marked = candidate
            break
    if marked is None:
        if control:
            raise TemplateError(f"chat template ({template.name}) changes message text in a way that hides where "
                                f"it is, and the messages contain control-token text ({', '.join(control[:3])}); "
                                f"cannot keep that text from becoming control tokens")
        marked = text   # no control-token text in any message: nothing to protect
    ids = tokenizer.encode_marked(marked, barrier)
    if tokenizer.add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids.insert(0, tokenizer.bos_id)
    return ids
