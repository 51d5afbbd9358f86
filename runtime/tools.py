"""Tool calls (OpenAI's function calling): the tools into the prompt, a grammar over the answer, the calls out.

    r = model.create_chat_completion(messages, tools=[{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
    r["choices"][0]["message"]["tool_calls"]   # [{"id", "type": "function", "function": {"name", "arguments"}}]

One format, Hermes/Qwen 2.5's, for every model: a call is

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A template that renders `tools` itself (Qwen 2.5's describes them in its system turn, and renders earlier
calls and `role: "tool"` results in this format) gets them as they are. Any other template gets a system
prompt that lists the tools' schemas and asks for this format (GENERIC_PROMPT), earlier calls written into
the assistant's text and results as a user turn of `<tool_response>` blocks, so that templates which only
know user and assistant turns (Gemma's) render them.

The answer is held to a grammar (runtime/structured.py): with tool_choice "auto" the text is free until the
marker `<tool_call>` (a lazy lexeme: the first occurrence ends the text), then the call is JSON valid against
one of the tools' schemas (its name a constant, its arguments the tool's `parameters`), then the end marker;
free text may follow and, with `parallel_tool_calls`, more calls. An answer that starts with `{` (or a
```json fence and `{`) is a bare call, as small Qwen models write them without the marker, held to the same
schemas. "required" allows only calls, a named function only one call to it, and "none" no call (the tools
stay in the prompt; the answer may not start like a call nor hold the marker). The calls therefore always
parse; `parse` splits the text into content and calls, and `StreamParser` does it piece by piece for
streamed responses, as OpenAI streams them: the call's id and name first, then its arguments in pieces.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Mapping, Sequence

from ..errors import InvalidRequestError
from .structured import JSON_OPTIONS

MARKER, END = "<tool_call>", "</tool_call>"
FENCE = "```json\n"
_CALL = re.compile(re.escape(MARKER) + r"\n(.*?)\n" + re.escape(END), re.S)
_HEAD = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')
_PROBE = "nibble_probe_tool"

GENERIC_PROMPT = """\
# Tools

You may call one or more functions to assist with the user query. Their signatures, as JSON Schemas:
<tools>
{tools}
</tools>

To call a function, answer with a JSON object holding its name and arguments within <tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


# ---- checking a request ----

def check_tools(tools: Any) -> list[dict] | None:
    """OpenAI's `tools` -> [{"type": "function", "function": {"name", "description"?, "parameters"}}] (None for
    none). InvalidRequestError names what is wrong."""
    if tools is None:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise InvalidRequestError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        f = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(f, Mapping):
            raise InvalidRequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
        name = f.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name):
            raise InvalidRequestError(f"tools[{i}].function.name must be 1-64 letters, digits, _ . : or -", "tools")
        if name in names:
            raise InvalidRequestError(f"two tools are named {name!r}", "tools")
        names.add(name)
        parameters = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON Schema object", "tools")
        function = {"name": name}
        if isinstance(f.get("description"), str):
            function["description"] = f["description"]
        function["parameters"] = dict(parameters)
        out.append({"type": "function", "function": function})
    return out or None


def check_tool_choice(choice: Any, tools: list[dict] | None) -> str:
    """OpenAI's `tool_choice` ("auto", "none", "required" or {"type": "function", "function": {"name"}}; the
    library also takes the name alone) -> "auto", "none", "required" or the name of the one function to call."""
    if choice is None:
        return "auto" if tools else "none"
    names = [t["function"]["name"] for t in tools or ()]
    if isinstance(choice, Mapping):
        f = choice.get("function")
        name = f.get("name") if isinstance(f, Mapping) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise InvalidRequestError("'tool_choice' must be \"auto\", \"none\", \"required\" or "
                                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        choice = name
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        if choice not in names:
            raise InvalidRequestError(f"'tool_choice' names {choice!r}, which is not in 'tools'", "tool_choice")
        return choice
    if choice not in ("auto", "none", "required"):
        raise InvalidRequestError("'tool_choice' must be \"auto\", \"none\", \"required\" or a function", "tool_choice")
    if choice == "required" and not tools:
        raise InvalidRequestError("'tool_choice' is \"required\" but there are no 'tools'", "tool_choice")
    return choice


# ---- the prompt ----

def renders_tools(template) -> bool:
    """Whether the chat template writes the tools into the prompt itself (it mentions a probe tool's name)."""
    from ..errors import TemplateError
    probe = [{"type": "function", "function": {"name": _PROBE, "parameters": {"type": "object"}}}]
    try:
        return _PROBE in template.render([{"role": "user", "content": "x"}], tools=probe)
    except TemplateError:
        return False


def _arguments(value: Any) -> Any:
    """A call's arguments as templates render them: an object (OpenAI sends its JSON text)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _call_text(call: Mapping) -> str:
    f = call.get("function", call)
    body = json.dumps({"name": f.get("name"), "arguments": _arguments(f.get("arguments", {}))}, ensure_ascii=False)
    return f"{MARKER}\n{body}\n{END}"


def template_inputs(template, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) as the chat template takes them: unchanged for a conversation without tools; for a
    template that renders tools, calls' arguments as objects; for any other, the generic format (see the
    module docstring) with no `tools` left."""
    has_tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if not tools and not has_tool_turns:
        return messages, None
    if renders_tools(template):
        out = []
        for m in messages:
            if m.get("tool_calls"):
                m = {**m, "content": m.get("content") or "",
                     "tool_calls": [{**c, "function": {**c.get("function", {}),
                                                       "arguments": _arguments(c.get("function", {}).get("arguments"))}}
                                    for c in m["tool_calls"]]}
            out.append(m)
        return out, tools
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            text = "\n".join(([m["content"]] if m.get("content") else []) + [_call_text(c) for c in m["tool_calls"]])
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            result = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + result}
            else:
                out.append({"role": "user", "content": result, "_tool_results": True})
        else:
            out.append(m)
    out = [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]
    if tools:
        listing = GENERIC_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out, None


# ---- the grammar ----

def call_schema(tools: list[dict]) -> dict:
    """The JSON Schema of one call: {"name": a tool's name, "arguments": that tool's parameters}, in that order."""
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                 "arguments": t["function"]["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return {"x-guidance": JSON_OPTIONS, **(options[0] if len(options) == 1 else {"anyOf": options})}


def grammar(tools: list[dict], choice: str, parallel: bool = True) -> str:
    """The Lark grammar (llguidance's dialect) of an answer under `choice` ("auto", "required" or a name)."""
    if choice not in ("auto", "required"):
        tools = [t for t in tools if t["function"]["name"] == choice]
    call_json = f"call_json: %json {json.dumps(call_schema(tools), ensure_ascii=False)}"
    if choice == "none":
        lark = ["start: TEXT", "FREE: /(?s:.*)/ & ~/(\\{|```json\\n\\{)(?s:.*)/",
                "TEXT: FREE & ~/(?s:.*)<tool_call>(?s:.*)/"]
        return "%llguidance {}\n" + "\n".join(lark) + "\n"
    if choice == "auto":
        # FREE text never starts like a bare call, TEXT never holds the marker: the first marker starts a
        # call (call_head is lazy: it ends there)
        lark = ["start: call* TEXT | bare | fenced" if parallel else
                "start: TEXT | call | call_json | FENCE call_json \"\\n```\"",
                "FREE: /(?s:.*)/ & ~/(\\{|```json\\n\\{)(?s:.*)/",
                "TEXT: FREE & ~/(?s:.*)<tool_call>(?s:.*)/",
                'call_head[lazy]: FREE "<tool_call>"',
                r'call: call_head "\n" call_json "\n</tool_call>"',
                r'bare: call_json ("\n" call_json)*',
                r'fenced: FENCE bare "\n```"',
                r'FENCE: "```json\n"']
    else:
        lark = ['start: call ("\\n" call)*' if parallel and choice == "required" else "start: call",
                r'call: "<tool_call>\n" call_json "\n</tool_call>"']
    return "%llguidance {}\n" + "\n".join(lark + [call_json]) + "\n"


def prepare(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = True
            ) -> tuple[list[dict] | None, str | None]:
    """A request's tools fields -> (the tools to render into the prompt, the grammar of the answer); both
    None without tools."""
    tools = check_tools(tools)
    choice = check_tool_choice(tool_choice, tools)
    if parallel_tool_calls is None:
        parallel_tool_calls = True
    if not isinstance(parallel_tool_calls, bool):
        raise InvalidRequestError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if not tools:
        return None, None
    return tools, grammar(tools, choice, parallel_tool_calls)


# ---- the answer ----

def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _bare(text: str) -> str | None:
    """The calls of an answer written as bare JSON (optionally in a ```json fence), or None."""
    body = text[len(FENCE):] if text.startswith(FENCE) else text
    return body if body.startswith("{") else None


def _call(body: str) -> dict:
    call = json.loads(body)
    return {"id": new_call_id(), "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def parse(text: str) -> tuple[str, list[dict]]:
    """An answer -> (its text without the calls, stripped; the complete calls in OpenAI's shape). A call cut
    short (max_tokens) is left out of both. Besides the marked form, a call may be the whole answer as bare
    JSON, one per line, or such lines in a ```json fence (small Qwen models write them so); the grammar
    holds a leading `{` to a call."""
    bare = _bare(text)
    if bare is not None:
        calls = []
        for line in bare.split("\n"):
            try:
                calls.append(_call(line))
            except ValueError:          # the last, cut short, or the closing fence
                break
        return "", calls
    calls = [_call(m.group(1)) for m in _CALL.finditer(text)]
    content = _CALL.sub("", text)
    cut = content.find(MARKER)
    return (content if cut < 0 else content[:cut]).strip(), calls


def _held(text: str, stop: str) -> int:
    """How many characters at the end of `text` may be the start of `stop`."""
    for n in range(min(len(stop), len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class StreamParser:
    """Streamed text pieces -> OpenAI chat deltas: {"content"} for text outside calls (nothing of a marker
    is shown), {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]} when a
    call's name is known, then {"tool_calls": [{"index", "function": {"arguments": piece}}]}."""

    def __init__(self):
        self.buffer = ""
        self.state = "start"         # start -> text | bare; text -> head -> arguments -> text; bare: head ...
        self.bare = False
        self.calls: list[dict] = []  # the calls seen, in OpenAI's shape, arguments complete once closed
        self.closed = 0              # how many of them are complete

    def feed(self, piece: str) -> list[dict]:
        self.buffer += piece
        deltas: list[dict] = []
        while True:
            if self.state == "start":
                bare = _bare(self.buffer)
                if bare is not None:
                    self.buffer, self.state, self.bare = bare, "head", True
                elif (FENCE + "{").startswith(self.buffer):
                    return deltas                # may still become a fenced call
                else:
                    self.state = "text"
            elif self.state == "text":
                at = self.buffer.find(MARKER)
                keep = _held(self.buffer, MARKER) if at < 0 else 0
                text = self.buffer[:at] if at >= 0 else self.buffer[:len(self.buffer) - keep]
                if self.calls:
                    text = text.lstrip("\n")     # the newline between calls is not content
                if text.strip() or (text and not self.calls):
                    deltas.append({"content": text})
                if at < 0:
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return deltas
                self.buffer, self.state = self.buffer[at + len(MARKER):], "head"
            elif self.state == "head":
                m = _HEAD.match(self.buffer.lstrip("\n"))
                if m is None:
                    return deltas
                call = {"index": len(self.calls), "id": new_call_id(), "type": "function",
                        "function": {"name": json.loads(f'"{m.group(1)}"'), "arguments": ""}}
                self.calls.append(call)
                deltas.append({"tool_calls": [json.loads(json.dumps(call))]})
                self.buffer, self.state = self.buffer.lstrip("\n")[m.end():], "arguments"
            elif self.state == "arguments":
                close = "}\n" if self.bare else "}\n" + END
                at = self.buffer.find(close)
                end = at if at >= 0 else len(self.buffer) - _held(self.buffer, close)
                self._arguments(self.buffer[:end], deltas)
                if at < 0:
                    self.buffer = self.buffer[end:]
                    return deltas
                self.closed += 1
                self.buffer = self.buffer[at + len(close):]
                self.state = "head" if self.bare else "text"
                if self.bare and self.buffer.startswith("```"):
                    self.state = "done"
            else:                                   # done: the closing fence
                self.buffer = ""
                return deltas

    def _arguments(self, text: str, deltas: list[dict]) -> None:
        if text:
            call = self.calls[-1]
            call["function"]["arguments"] += text
            deltas.append({"tool_calls": [{"index": call["index"], "function": {"arguments": text}}]})

    def close(self, complete: bool) -> list[dict]:
        """What is still held back when the stream ends; `complete`: it ended where the grammar accepts (a
        bare call's last "}" is its own then, not the arguments')."""
        deltas: list[dict] = []
        if self.state in ("start", "text") and self.buffer:
            deltas.append({"content": self.buffer})
        elif self.state == "arguments" and self.bare and complete:
            self._arguments(self.buffer[:-1], deltas)     # all but the call's closing brace
            self.closed += 1
        self.buffer = ""
        return deltas

    def complete_calls(self) -> list[dict]:
        """The calls that were closed, without their index (a message's tool_calls)."""
        return [{k: v for k, v in c.items() if k != "index"} for c in self.calls[:self.closed]]
