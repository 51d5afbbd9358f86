"""Chat templates: the GGUF's `tokenizer.chat_template` (Jinja2) rendered safely, and the chat tokenized so that
text a user typed can never become a control token.

Rendering follows transformers' `apply_chat_template`: an ImmutableSandboxedEnvironment with trim_blocks,
lstrip_blocks and loop controls; `raise_exception`, `strftime_now`, and a `tojson` that does not HTML-escape;
variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools`. Roles are system, user,
assistant and tool unless the caller allows any (`allow_any_role`). On top of the sandbox:

- reaching Python internals (`x.__class__`, `cycler.__init__.__globals__`, `list.append` on the immutable
  sandbox) raises TemplateError at once, where the plain sandbox would hand back a silent Undefined;
- budgets, each enforced *before* the work it bounds, so that a hostile template is refused in milliseconds
  and without allocating more than a few times the budget:
  - nesting and length, before parsing: Jinja's parser and code generator recurse once per level of a
    bracket, a block or an operator chain, so the template's tokens (from Jinja's lexer, a loop) are
    counted for how deeply they nest (`_measure`, in operator levels: MAX_NESTING) and a template that
    would need more than ~400 frames is refused; compiling costs ~3 KB per token, so the tokens are counted
    too (MAX_TOKENS). Counting beats catching RecursionError, which comes at a depth that depends on the
    caller's stack; what the count does not foresee (Python's limit of 20 statically nested loops) still
    ends as a TemplateError when the template is compiled;
  - size, before a value is built: every operator and call that can make a value much larger than its
    inputs is sized first: `*` (repetition), `+`, `%` and `str.format`/`format_map` (widths and precisions
    in the format, fields that repeat an argument), the filters and `str` methods that multiply their input
    (`join`, `replace`, `indent`, `wordwrap`, `urlize`, `tojson` with an indent, `expandtabs`, `translate`),
    and any integer passed as a count (`center(n)`, `range(n)`, `slice(n)`). The size of a value
    (`_Sandbox._size`) counts characters, and each container and element of a list or dict, as often as it
    is referred to, up to `max_output_chars`; list, tuple and dict displays (`[ns.x, ns.x]`), `~`, and the
    buffers of macros and `{% set %}`/`{% filter %}` blocks are sized as they are built, and everything
    written in a render may add up to WRITTEN_PER_OUTPUT times the budget;
  - integers, before the operation: `+`, `*`, `**`, `%` and `//` refuse operands or results of more than
    MAX_INT_BITS bits (a result's size is known from the operands' bit lengths), so no single C-level
    operation can run long: `(7**2000000) % (3**2000000 + 1)` is refused, not computed for 10 s;
  - time: past `time_budget_s`, checked on every line of template code and every Python call;
  - output: the rendered text may not pass `max_output_chars`.

Tokenizing a chat (`chat_tokens`): the template's own text is tokenized with special tokens parsed and the
messages' text with them off. The template is rendered a second time with every message string marked: a
private-use "barrier" character around the text and inside any control-token text it contains. No special
token can match across a barrier, and barriers are removed before the text reaches the tokenizer model, so
a chat without control-token text tokenizes exactly as its rendering with parse_special on (the way
llama.cpp's reference ids are made), and one that has such text gets plain-text ids for it. Roles and content
part types are not marked (templates compare them), so one that contains control-token text is refused.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from functools import wraps

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import ModelFormatError, TemplateError

TIME_BUDGET_S = 2.0
MAX_OUTPUT_CHARS = 4 << 20      # characters of output, and the size of any one value built while rendering
WRITTEN_PER_OUTPUT = 4          # every value written, in macros and blocks too: this many times the output
ITEM_CHARS = 16                 # what one element of a list, tuple or dict counts against the size budget,
CONTAINER_CHARS = 256           # and the list, tuple or dict itself (which bounds the work of sizing a value)
MAX_INT_BITS = 1 << 13          # integers a template computes with (~2,500 digits; Python prints up to 4,300)
MAX_NESTING = 120               # how deeply a template's text may nest, in operators (see _measure)
MAX_VALUE_DEPTH = 40            # how deeply the lists and dicts it builds may nest
MAX_SOURCE_CHARS = 1 << 18      # a template's text (the longest known chat templates are ~20,000 characters),
MAX_TOKENS = 1 << 14            # and its tokens (Qwen2.5's has 337): compiling takes ~3 KB and ~0.2 ms per token

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


# -- nesting, counted on the tokens before the parser runs --

_BLOCK_TAGS = frozenset({"for", "if", "macro", "call", "filter", "with", "autoescape", "block", "generation"})
_TAG_BEGIN = frozenset({"block_begin", "variable_begin"})
_OPEN = frozenset({"lparen", "lbracket", "lbrace"})
_CLOSE = frozenset({"rparen", "rbracket", "rbrace"})
_SEPARATORS = frozenset({"comma", "colon", "assign", "semicolon"})
_OPERATORS = frozenset({"add", "sub", "mul", "div", "floordiv", "mod", "pow", "tilde", "pipe", "dot",
                        "eq", "ne", "gt", "gteq", "lt", "lteq"})
_WORD_OPERATORS = frozenset({"and", "or", "not", "is", "in", "if", "else"})


_BRACKET_WEIGHT, _BLOCK_WEIGHT = 4, 3


def _measure(tokens) -> tuple[int, int]:
    """(how deeply a template nests, how many tokens it has), counting stopped past MAX_NESTING or MAX_TOKENS.
    The nesting is the recursion that parsing and compiling it will need, measured on its tokens. Jinja's parser and code generator recurse per level of a bracket
    (~14 frames), of a block such as `{% if %}` in `{% for %}` (~10) and of an operator of a chain (~3.5:
    `a + b + c`, `x|f|g`, `a.b.c`, `f(x)(y)` and `not not x` build nested nodes). The result is in operator
    levels: a bracket counts 4, a block 3. Operators that separate (`a or b or c`) are counted as if they
    nested, which overestimates; the known templates need under 30."""
    deepest = blocks = chained = count = 0
    levels = [0]          # per open bracket of the current tag: operators chained there since its last comma
    tag = pending_set = None
    for count, token in enumerate(tokens, 1):
        if count > MAX_TOKENS:
            break
        kind = token.type
        if kind in _TAG_BEGIN:
            levels, chained, tag = [0], 0, kind
            continue
        if tag == "block_begin" and kind == "name":   # the tag's name
            tag = token.value
            if tag in _BLOCK_TAGS:
                blocks += 1
            elif tag.startswith("end"):
                blocks = max(blocks - 1, 0)
            pending_set = tag == "set"   # `{% set x %}...{% endset %}` is a block, `{% set x = 1 %}` is not
        elif kind in _OPEN:
            levels[-1] += 1   # a call or subscript applies to what precedes it
            levels.append(0)
            chained += 1
        elif kind in _CLOSE and len(levels) > 1:
            chained -= levels.pop()
        elif kind in _SEPARATORS:
            pending_set = pending_set and kind != "assign"
            chained -= levels[-1]
            levels[-1] = 0
        elif kind in _OPERATORS or (kind == "name" and token.value in _WORD_OPERATORS):
            levels[-1] += 1
            chained += 1
        elif kind == "block_end" and pending_set:
            blocks += 1
            pending_set = False
        deepest = max(deepest, _BLOCK_WEIGHT * blocks + _BRACKET_WEIGHT * len(levels) + chained)
        if deepest > MAX_NESTING:
            break
    return deepest, count


class _CheckedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` and list, tuple and dict displays to calls that check the size of what they build (a
    display is as long as its source; what it refers to is what can make it large: `[ns.x, ns.x]`)."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _checked(visit):
        def visitor(self, node, frame) -> None:
            if getattr(node, "ctx", "load") != "load":   # an assignment target: `{% for a, b in x %}`
                return visit(self, node, frame)
            self.write("environment.checked(")
            visit(self, node, frame)
            self.write(")")
        return visitor

    visit_List = _checked(CodeGenerator.visit_List)
    visit_Tuple = _checked(CodeGenerator.visit_Tuple)
    visit_Dict = _checked(CodeGenerator.visit_Dict)
    del _checked


# -- sizes: what a value counts against the budget --

_CONTAINERS = (list, tuple, dict, set, frozenset)
_SMALL = frozenset({float, bool, type(None)})   # a few characters each: within ITEM_CHARS


def _text(s):
    return s if isinstance(s, (str, bytes)) else str(s)   # what the string filters make of their input


def _count(s, sub) -> int:
    """How often `sub` occurs in `s` (every position, for an empty or non-string `sub`)."""
    return s.count(sub) if isinstance(sub, type(s)) and sub else len(s) + 1


class _Render:
    """One render's state: its deadline, and the characters of every value written so far (inside macros,
    `{% set %}` and `{% filter %}` blocks too, whose buffers would otherwise grow unseen until joined)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.written = 0

    def _check(self):
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"the template ran longer than {self.seconds:g} s")

    # A trace function: line events in template code, call events everywhere (Jinja compiles templates to
    # Python whose file name is `<template>`). No single operation can run long: integers are bounded, and
    # values by the size budget, before they are computed.
    def on_call(self, frame, event, arg):
        self._check()
        return self.on_line if frame.f_code.co_filename == "<template>" else None

    def on_line(self, frame, event, arg):
        self._check()
        return self.on_line


class _CheckedFormat:
    """`str.format`/`format_map` as the sandbox hands it to a template, with the size of the result bounded
    before it is built."""

    def __init__(self, env, fmt: str, format_map: bool, wrapped):
        # private names: the sandbox refuses a template access to attributes that begin with "_"
        self._env, self._fmt, self._format_map, self._wrapped = env, fmt, format_map, wrapped

    def __call__(self, *args, **kwargs):
        values = args[0] if self._format_map and args else (args, kwargs)
        self._env._refuse_over(self._env._format_size(self._fmt, values, percent=False), "formatted a string")
        return self._env._check(self._wrapped(*args, **kwargs))


class _Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _CheckedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%", "//"})

    def __init__(self, max_chars: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                         extensions=["jinja2.ext.loopcontrols", _GenerationTag], finalize=self._finalize)
        self.max_chars = max_chars
        self.max_count = max_chars // ITEM_CHARS
        self._local = threading.local()   # .render: the _Render of the render running in this thread
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guarded(name, f, self._FILTER_SIZES.get(name))
                        for name, f in self.filters.items()}
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)

    # -- sizes --

    def _size(self, value, per_item: int = 0, per_level: int = 0) -> int:
        """What `value` counts against the budget (counting stops past it): a string its length, an integer
        its digits, a container CONTAINER_CHARS and ITEM_CHARS per element (plus `per_item`, and `per_level`
        per level of nesting: tojson's separators and indent) and the size of each element, as often as it is
        referred to (str() and tojson write it out that often). So one count visits at most
        max_chars / CONTAINER_CHARS containers. A value nested deeper than MAX_VALUE_DEPTH is refused: str() of
        it would recurse, and a value that contains itself ends there too."""
        if isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value.bit_length() // 3
        if isinstance(value, range):   # lazy, but written out item by item
            return len(value) * ITEM_CHARS
        if not isinstance(value, _CONTAINERS):
            return 0
        total, stack = 0, [(value, 1)]
        while stack and total <= self.max_chars:
            v, depth = stack.pop()
            if depth > MAX_VALUE_DEPTH:
                raise _OverBudget(f"the template built a value nested more than {MAX_VALUE_DEPTH} levels deep")
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            total += CONTAINER_CHARS + len(v) * (ITEM_CHARS + per_item + per_level * depth)
            kinds = set(map(type, items))   # C-level passes: a Python loop per item would be slow here
            if kinds <= _SMALL:
                continue
            if kinds == {str}:
                total += sum(map(len, items))
                continue
            if kinds == {int}:
                total += sum(map(int.bit_length, items)) // 3
                continue
            for item in items:
                if isinstance(item, _CONTAINERS):
                    stack.append((item, depth + 1))
                else:
                    total += self._size(item)
        return total

    def _refuse_over(self, size: int, what: str):
        if size > self.max_chars:
            raise _OverBudget(f"the template {what} larger than the budget of {self.max_chars} characters")

    def _check(self, value):
        self._refuse_over(self._size(value), "built a value")
        return value

    def _check_int(self, value):
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise _OverBudget(f"the template computed with an integer of {value.bit_length()} bits, more than "
                              f"{MAX_INT_BITS}")

    def _check_counts(self, args, kwargs):
        # A count (`center(10**9)`, `range(10**9)`, `slice(10**9)`) is refused before the call allocates;
        # what the call builds is checked after it. Strings and containers passed were checked when built.
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.max_count:
                raise _OverBudget(f"the template passed {a} as an argument, more than the budget's "
                                  f"{self.max_count} items")

    def _format_size(self, fmt, values, percent: bool) -> int:
        """An upper bound on the length of `fmt % values` (`percent`) or `fmt.format(*values)`: the format's
        own text; every number in it, taken as a width or a precision; and each field as long as all the
        values together (a field can repeat a value: '%(a)s%(a)s', '{0}{0}'). Integer values count as widths
        where the format takes widths from its arguments ('%*s', '{:>{}}')."""
        fields = fmt.count("%" if percent else "{")
        widths = sum(int(n) if len(n) <= 9 else self.max_chars + 1 for n in re.findall(r"\d+", fmt))
        if ("*" in fmt) if percent else re.search(r"\{[^{}]*\{", fmt):
            widths += sum(map(abs, _ints(values)))
        return len(fmt) + widths + fields * self._size(values)

    # Sizes of what the filters (and str methods) that multiply their input would build, before they run.
    # Every other filter or call is limited by `_check_counts` before it runs and by `_check` after.
    def _join_size(self, items, d="", attribute=None):
        n = len(items) if hasattr(items, "__len__") else 0
        return self._size(items) + n * self._size(d)

    def _replace_size(self, s, old, new, count=None):
        s = _text(s)
        n = _count(s, old if isinstance(old, (str, bytes)) else str(old))
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        return len(s) + n * self._size(new)

    def _indent_size(self, s, width=4, first=False, blank=False):
        s = _text(s)
        return len(s) + (_count(s, "\n") + 1) * (width if isinstance(width, int) else self._size(width))

    def _wordwrap_size(self, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
        s = _text(s)
        return len(s) + (len(s) + 1) * self._size(wrapstring or "\n")   # at worst a line per character

    def _urlize_size(self, value, trim_url_limit=None, nofollow=False, target=None, rel=None, extra_schemes=None):
        value = _text(value)
        return 3 * len(value) + (len(value) + 1) * (40 + self._size(target or "") + self._size(rel or ""))

    def _tojson_size(self, x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        per_level = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
        per_item = sum(len(t) for t in separators if isinstance(t, str)) \
            if isinstance(separators, (list, tuple)) else 0
        return self._size(x, per_item=per_item, per_level=per_level)

    def _format_filter_size(self, value, *args, **kwargs):
        return self._format_size(str(value), kwargs or args, percent=True)

    _FILTER_SIZES = {"join": _join_size, "replace": _replace_size, "indent": _indent_size,
                     "wordwrap": _wordwrap_size, "urlize": _urlize_size, "tojson": _tojson_size,
                     "format": _format_filter_size}

    def _expandtabs_size(self, s, tabsize=8):
        return len(s) + _count(s, "\t" if isinstance(s, str) else b"\t") * max(tabsize, 0)

    def _translate_size(self, s, table, *deletechars):
        return len(s) * max(self._size(table), 1)

    _METHOD_SIZES = {"join": lambda self, s, items: self._join_size(items, s), "replace": _replace_size,
                     "expandtabs": _expandtabs_size, "translate": _translate_size}

    def _guarded(self, name: str, f, size=None):
        """The filter `f` with its result bounded: by `size(*args)` before the call where it has a size
        function, else by `_check_counts`; and by `_check` after. It takes the render's context, which keeps
        Jinja's optimizer from calling it on constant arguments at compile time, where no deadline runs (and
        where it would call it again at every level of a chain: `(''|slice(100000))|sort|sort...`)."""
        takes = getattr(f, "jinja_pass_arg", None)   # what `f` wants first: a context, eval context or environment
        first = {None: None, "context": lambda c: c, "eval_context": lambda c: c.eval_ctx,
                 "environment": lambda c: c.environment}[getattr(takes, "name", None)]

        @jinja2.pass_context
        @wraps(f)
        def guarded(context, *args, **kwargs):
            if first is not None:
                args = (first(context), *args)
            if size is None:
                self._check_counts(args, kwargs)
            else:
                own = list(args[1 if takes else 0:])
                if own and isinstance(own[0], Iterator):   # a generator (`map`, `select`): see what it holds
                    own[0] = list(own[0])
                    args = (*args[:len(args) - len(own)], *own)
                self._refuse_over(size(self, *own, **kwargs), f"would build a value with |{name}")
            return self._check(f(*args, **kwargs))
        return guarded

    def _finalize(self, value):
        render = getattr(self._local, "render", None)
        size = self._size(value)
        if render is not None:
            render.written += size
            if render.written > WRITTEN_PER_OUTPUT * self.max_chars:
                raise _OverBudget(f"the template wrote more than {WRITTEN_PER_OUTPUT} × {self.max_chars} "
                                  f"characters (in macros, blocks and output)")
        self._refuse_over(size, "built a value")
        return value

    def checked(self, value):
        return self._check(value)

    def checked_concat(self, parts):
        texts = [str(p) for p in parts]   # each part was checked when it was built
        self._refuse_over(sum(map(len, texts)), "joined a string")
        return "".join(texts)

    def concat(self, pieces):
        """Joins the buffer of a macro, a `{% set %}` or a `{% filter %}` block."""
        pieces = list(pieces)
        self._refuse_over(sum(map(len, pieces)), "wrote a block")
        return "".join(pieces)

    # -- the sandbox's hooks --

    def call_binop(self, context, operator, left, right):
        self._check_int(left)
        self._check_int(right)
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _OverBudget(f"the template multiplied integers past {MAX_INT_BITS} bits")
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    self._refuse_over(self._size(seq) * n, "repeated a value")
        elif operator == "**":
            if ints and right > 0 and abs(left) > 1 and right * (abs(left).bit_length() - 1) > MAX_INT_BITS:
                raise _OverBudget(f"the template computed a power past {MAX_INT_BITS} bits")
        elif operator == "+":
            if type(left) is type(right) and isinstance(left, (str, bytes, list, tuple)):
                self._refuse_over(self._size(left) + self._size(right), "concatenated a value")
        elif operator == "%" and isinstance(left, str):
            self._refuse_over(self._format_size(left, right, percent=True), "formatted a string")
        return self._check(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):
        method = getattr(__obj, "__self__", None)
        size = __self._METHOD_SIZES.get(getattr(__obj, "__name__", None)) \
            if isinstance(method, (str, bytes)) and isinstance(__obj, types.BuiltinMethodType) else None
        if size is not None:
            if __obj.__name__ == "join" and args and isinstance(args[0], Iterator):
                args = (list(args[0]), *args[1:])
            __self._refuse_over(size(__self, method, *args, **kwargs), f"would build a value with "
                                                                       f".{__obj.__name__}()")
        elif not isinstance(__obj, _CheckedFormat):   # a format's numbers are not counts
            __self._check_counts(args, kwargs)
        return __self._check(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        return _CheckedFormat(self, value.__self__, value.__name__ == "format_map", wrapped)

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")


def _ints(value, depth: int = 2):
    """The integers in format arguments: `value`, or in the lists, tuples and dicts `depth` levels down."""
    if isinstance(value, int) and not isinstance(value, bool):
        yield value
    elif depth and isinstance(value, (Mapping, list, tuple)):
        for v in value.values() if isinstance(value, Mapping) else value:
            yield from _ints(v, depth - 1)


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
        # Budgets before work: the length of the text, then its tokens and their nesting (the lexer is a loop
        # over regular expressions; the parser and the compilers recurse per level), then the parse. What
        # the count does not foresee (Python's 20 statically nested loops, a caller already deep in its
        # stack) still ends here as a TemplateError.
        try:
            if len(source) > MAX_SOURCE_CHARS:
                raise _OverBudget(f"its text is longer than {MAX_SOURCE_CHARS} characters")
            depth, count = _measure(self._env.lexer.tokenize(source))
            if count > MAX_TOKENS:
                raise _OverBudget(f"it has more than {MAX_TOKENS} tokens")
            if depth > MAX_NESTING:
                raise _OverBudget(f"it nests blocks, brackets and operators too deeply ({depth} levels counted "
                                  f"as operators; the limit is {MAX_NESTING})")
            self._template = self._env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template ({name}) line {e.lineno}: {e.message}") from None
        except (_OverBudget, jinja2.TemplateError) as e:
            raise TemplateError(f"chat template ({name}): {e}") from None
        except (RecursionError, SyntaxError) as e:
            raise TemplateError(f"chat template ({name}) is nested too deeply to compile ({e})") from None
        except Exception as e:   # e.g. ValueError for a number literal of more than 4,300 digits
            raise TemplateError(f"chat template ({name}) failed to compile: {type(e).__name__}: {e}") from None

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

    def render(self, messages, add_generation_prompt: bool = True, tools=None, *, allow_any_role: bool = False,
               **extra) -> str:
        """The prompt text for `messages` (a list of {"role", "content"} mappings). Roles are system, user,
        assistant and tool unless `allow_any_role`."""
        _check_messages(messages, allow_any_role)
        context = dict(extra, messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                       bos_token=self.bos_token, eos_token=self.eos_token)
        render = self._env._local.render = _Render(self.time_budget_s)
        pieces, size = [], 0
        previous = sys.gettrace()
        sys.settrace(render.on_call)
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
            self._env._local.render = None
        return "".join(pieces)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, {len(self.source)} chars)"


ROLES = ("system", "user", "assistant", "tool")


def _check_messages(messages, allow_any_role: bool) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError(f"messages must be a list of {{'role', 'content'}} mappings, got "
                            f"{type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TemplateError(f"message #{i} must be a mapping with a 'role' string, got {m!r:.80}")
        if not allow_any_role and m["role"] not in ROLES:
            raise TemplateError(f"message #{i} has the role {m['role']!r:.80}; roles are {', '.join(ROLES)} "
                                f"(allow_any_role=True lets others through)")


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


def _labels(value):
    """The strings under _UNMARKED_KEYS: roles and content part types."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if k in _UNMARKED_KEYS and isinstance(v, str):
                yield v
            else:
                yield from _labels(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _labels(v)


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


def chat_tokens(tokenizer, template: ChatTemplate, messages, add_generation_prompt: bool = True, tools=None, *,
                allow_any_role: bool = False, **extra) -> list[int]:
    """The token ids of a chat: the template's text with special tokens parsed, the messages' text (and the
    tools') with them off; a BOS in front when the model adds one and the template did not write it. Roles
    are system, user, assistant and tool unless `allow_any_role`; a role (or a content part's `type`) that
    contains control-token text is refused either way, since the template compares it and it is not marked."""
    _check_messages(messages, allow_any_role)
    labels = [s for s in _labels([list(messages), tools]) if s]
    if labels and (control := tokenizer.control_texts_in("\x00".join(labels))):
        raise TemplateError(f"a message role or type contains control-token text ({', '.join(control[:3])}); "
                            f"it would become control tokens")
    text = template.render(messages, add_generation_prompt, tools, allow_any_role=allow_any_role, **extra)
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
                                        _marked(tools, mark), allow_any_role=allow_any_role, **extra)
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
