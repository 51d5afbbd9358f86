"""Structured output (runtime/structured.py) and tool calls (runtime/tools.py) on the three catalogue models:
ten JSON Schemas of increasing difficulty, three seeds each, every complete output valid by the `jsonschema`
package; regex, choices, a Lark and a GBNF grammar; errors before any token; speculative drafts under a
mask; and OpenAI's client running a tool-calling round trip against `nibble serve`."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

import nibble
from nibble.runtime import structured

MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
SEEDS = (0, 1, 2)
PARALLEL = 4

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SCHEMAS = [
    # 1. one string
    {"type": "object", "properties": {"answer": NAME}, "required": ["answer"]},
    # 2. an integer in a range
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99}}, "required": ["age"]},
    # 3. an enum and a boolean
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "bright": {"type": "boolean"}},
     "required": ["colour", "bright"]},
    # 4. a bounded number and a nullable string
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1},
                                      "note": {"type": ["string", "null"], "maxLength": 20}},
     "required": ["score", "note"]},
    # 5. an array with min/max items
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 3}},
     "required": ["tags"]},
    # 6. required and optional keys, no others
    {"type": "object", "properties": {"name": NAME, "nickname": NAME, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 120}},
     "required": ["name"], "additionalProperties": False},
    # 7. strings with patterns
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                      "phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}},
     "required": ["zip", "phone"]},
    # 8. nested objects
    {"type": "object", "properties": {"person": {
        "type": "object", "properties": {"name": NAME, "address": {
            "type": "object", "properties": {"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False}}, "required": ["person"]},
    # 9. an array of objects with enums and ranges
    {"type": "object", "properties": {"items": {
        "type": "array", "minItems": 2, "maxItems": 3, "items": {
            "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 100},
                                             "kind": {"enum": ["book", "pen", "cup"]}},
            "required": ["id", "kind"], "additionalProperties": False}}}, "required": ["items"]},
    # 10. all of it: $defs and $ref, anyOf, an array of bounded integers, optional nested keys
    {"type": "object", "$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -10, "maximum": 10},
        "y": {"type": "integer", "minimum": -10, "maximum": 10}},
        "required": ["x", "y"], "additionalProperties": False}},
     "properties": {"status": {"enum": ["ok", "error"]},
                    "origin": {"$ref": "#/$defs/point"},
                    "path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 2},
                    "label": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                        {"type": "string", "pattern": "^[a-z]{1,8}$"}]},
                    "extra": {"type": "object", "properties": {"weight": {"type": "number"}}}},
     "required": ["status", "origin", "path", "label"]},
]
MAX_TOKENS = 160


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    with nibble.load(request.param, n_ctx=1024, parallel=PARALLEL) as m:
        yield m


def ask(schema: dict) -> list[dict]:
    return [{"role": "user", "content": "Reply with one JSON object that follows this JSON Schema, and nothing "
                                        f"else.\n{json.dumps(schema)}"}]


def test_every_output_validates_against_its_schema(model):
    jobs = [(k, schema, seed) for k, schema in enumerate(SCHEMAS) for seed in SEEDS]

    def run(job):
        k, schema, seed = job
        return job, model.chat(ask(schema), json_schema=schema, seed=seed, max_tokens=MAX_TOKENS)

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(run, jobs))
    complete = 0
    for (k, schema, seed), c in results:
        if c.finish_reason == "length":              # cut by max_tokens: never claimed to be complete
            with pytest.raises(json.JSONDecodeError):
                json.loads(c.text)
            continue
        assert c.finish_reason == "stop", (k, seed, c.text)
        jsonschema.validate(json.loads(c.text), schema)   # raises with the schema and the value
        complete += 1
    assert complete >= 0.8 * len(jobs), [c.text for _, c in results if c.finish_reason == "length"]


@pytest.fixture(scope="module")
def smollm():
    with nibble.load("smollm2-135m", n_ctx=512) as m:
        yield m


def test_regex_and_choices_match(smollm):
    for seed in SEEDS:
        c = smollm.chat([{"role": "user", "content": "Give me a phone number."}], regex=r"\+1 [0-9]{3}-[0-9]{4}",
                        seed=seed, max_tokens=20)
        assert c.finish_reason == "stop" and re.fullmatch(r"\+1 [0-9]{3}-[0-9]{4}", c.text), c.text
        choices = ["yes", "no", "it depends"]
        c = smollm.chat([{"role": "user", "content": "Is water wet?"}], choices=choices, seed=seed, temperature=1.5,
                        max_tokens=10)
        assert c.finish_reason == "stop" and c.text in choices


ARITHMETIC_LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""
ARITHMETIC_GBNF = r"""
root   ::= expr
expr   ::= term (("+" | "-") term)*
term   ::= factor (("*" | "/") factor)*
factor ::= [0-9] [0-9]? [0-9]? | "(" expr ")"
"""


def is_arithmetic(text: str) -> bool:
    """A recursive-descent recogniser of the grammar above, independent of llguidance."""
    pos = 0

    def factor() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        m = re.match(r"[0-9]{1,3}", text[pos:])
        if not m:
            return False
        pos += len(m.group())
        return True

    def chain(item, ops) -> bool:
        nonlocal pos
        if not item():
            return False
        while pos < len(text) and text[pos] in ops:
            pos += 1
            if not item():
                return False
        return True

    def term() -> bool:
        return chain(factor, "*/")

    def expr() -> bool:
        return chain(term, "+-")

    return expr() and pos == len(text)


@pytest.mark.parametrize("grammar", [ARITHMETIC_LARK, ARITHMETIC_GBNF], ids=["lark", "gbnf"])
def test_arithmetic_grammar_yields_only_its_sentences(smollm, grammar):
    prompt = [{"role": "user", "content": "Write an arithmetic expression, like (3+4)*12."}]
    for seed in SEEDS:
        c = smollm.chat(prompt, grammar=grammar, seed=seed, temperature=1.0, max_tokens=24)
        assert c.text and (c.finish_reason == "length" or is_arithmetic(c.text)), c.text
        if c.finish_reason == "stop":
            assert is_arithmetic(c.text)


@pytest.mark.parametrize("bad", [
    {"json_schema": {"type": "objekt"}},
    {"json_schema": "{not json"},
    {"json_schema": {"type": "string", "format": "no-such-format"}},
    {"json_schema": {"$ref": "#/nowhere"}},
    {"grammar": "start: undefined_rule"},
    {"grammar": "root ::= [a-"},
    {"regex": "[a-z"},
    {"choices": []},
    {"format": "yaml"},
    {"regex": "a", "choices": ["a"]},
])
def test_a_bad_constraint_is_a_grammar_error_before_any_token(smollm, bad):
    with pytest.raises(nibble.GrammarError):
        smollm.stream("Hello", max_tokens=4, **bad)
    assert issubclass(nibble.GrammarError, (nibble.NibbleError, ValueError))


def test_max_tokens_in_the_middle_of_a_value_is_length(smollm):
    c = smollm.chat(ask(SCHEMAS[4]), json_schema=SCHEMAS[4], max_tokens=5, seed=0)
    assert c.finish_reason == "length" and len(c.tokens) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


def test_format_json_is_any_object_and_a_closed_object_ends_generation(smollm):
    c = smollm.chat([{"role": "user", "content": "Describe a cat as JSON."}], format="json", seed=1, max_tokens=120)
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.text), dict)
    assert not c.text[:1].isspace()


def test_speculative_drafts_under_a_mask_give_the_plain_tokens(smollm):
    schema = SCHEMAS[8]
    for seed in SEEDS[:2]:
        plain = smollm.chat(ask(schema), json_schema=schema, seed=seed, max_tokens=80)
        fast = smollm.chat(ask(schema), json_schema=schema, seed=seed, max_tokens=80, speculative="ngram")
        assert fast.tokens == plain.tokens and fast.finish_reason == plain.finish_reason
        assert fast.timings.draft_tokens > 0


def test_a_sparse_mask_draws_what_the_masked_vocabulary_draws():
    """The Sampler draws among a few allowed tokens alone; that must be the draw over all the logits with the
    others at -inf, for every sampler setting and seed. (Exact ties at top-k's boundary may be broken
    differently: argpartition's order among equal values depends on the array.)"""
    import numpy as np
    from nibble.runtime.sampling import Sampler, SamplingParams
    rng = np.random.default_rng(0)
    n = 5000
    for trial in range(60):
        logits = rng.normal(size=n).astype(np.float32)
        allowed = rng.random(n) < rng.choice([0.001, 0.01, 0.2])
        allowed[rng.integers(n)] = True
        params = SamplingParams(temperature=float(rng.choice([0, 0.7, 1.5])), top_k=int(rng.choice([0, 1, 40])),
                                top_p=float(rng.choice([1.0, 0.9])), min_p=float(rng.choice([0.0, 0.05])),
                                seed=trial, repeat_penalty=1.3)
        masked = np.where(allowed, logits, -np.inf).astype(np.float32)
        recent = rng.integers(n, size=20).tolist()
        for _ in range(3):
            a = Sampler(params, n).sample(logits, recent, allowed)
            b = Sampler(params, n).sample(masked, recent)
            assert a == b and allowed[a]


def test_a_schema_compiles_once(smollm):
    vocab = structured.vocabulary(smollm.tokenizer)
    grammar = structured.grammar_text(json_schema=SCHEMAS[9])
    first = vocab.compile(grammar)
    assert list(vocab._compiled)[-1] == grammar
    n = len(vocab._compiled)
    second = vocab.compile(grammar)
    assert len(vocab._compiled) == n and first is not second   # a copy of the cached matcher per request


# ---- tool calls ----

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
SYSTEM = ("You are a helpful assistant. When a tool result arrives, answer the user's question in one plain "
          "sentence.")
QUESTION = "Is it sunny in Paris? Answer in one sentence."


def test_stream_parser_gives_the_calls_that_parse_gives_whatever_the_pieces():
    from nibble.runtime.tools import StreamParser, parse
    texts = ['Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "add", "arguments": {"a": {"b": 1}}}\n</tool_call>',
             '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"name": "add", "arguments": {}}',
             '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
             'Hello < world <tool', '``` code', '{"name": "add", "arguments": {"a": {"b": 1}}']
    for text in texts:
        content, calls = parse(text)
        for size in (1, 2, 3, 7, len(text)):
            parser = StreamParser()
            deltas = [d for k in range(0, len(text), size) for d in parser.feed(text[k:k + size])]
            deltas += parser.close(complete=not text.endswith("1}}"))
            assert "".join(d.get("content", "") for d in deltas).strip() == content
            streamed = parser.complete_calls()
            assert [c["function"]["name"] for c in streamed] == [c["function"]["name"] for c in calls]
            assert [json.loads(c["function"]["arguments"]) for c in streamed] == \
                   [json.loads(c["function"]["arguments"]) for c in calls]
            args: dict[int, str] = {}
            for d in deltas:
                for tc in d.get("tool_calls", ()):
                    args[tc["index"]] = args.get(tc["index"], "") + tc["function"].get("arguments", "")
            assert [args[k] for k in range(len(streamed))] == [c["function"]["arguments"] for c in streamed]


@pytest.mark.parametrize("choice, parallel", [("required", True), ("required", False), ("add", True)])
def test_tool_choice_required_and_named_give_valid_calls_on_a_template_without_tools(smollm, choice, parallel):
    for seed in SEEDS[:2]:
        c = smollm.chat([{"role": "user", "content": "What is 2 plus 3?"}], tools=[WEATHER, ADD], tool_choice=choice,
                        parallel_tool_calls=parallel, seed=seed, max_tokens=60)
        assert c.text == "" and c.tool_calls
        assert c.finish_reason == "tool_calls" or (parallel and c.finish_reason == "length")   # calls after calls
        if not parallel:
            assert len(c.tool_calls) == 1
        for call in c.tool_calls:
            tool = {"get_weather": WEATHER, "add": ADD}[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
            assert call["id"].startswith("call_") and call["type"] == "function"
        if choice == "add":
            assert [call["function"]["name"] for call in c.tool_calls] == ["add"]


def test_generic_tool_format_renders_calls_and_results_for_a_template_without_tools(smollm):
    from nibble.runtime import generate
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = smollm.detokenize(generate.chat_prompt(smollm, messages, tools=[WEATHER]), special=True)
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text


# ---- the server: OpenAI's client and Ollama's API against `nibble serve` ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def qwen_server():
    """`nibble serve qwen2.5-coder-0.5b` on a free loopback port (SIGTERM at the end must exit 0)."""
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "nibble.cli.main", "serve", "qwen2.5-coder-0.5b", "--parallel", "2",
                             "--n-ctx", "2048", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "nibble serve exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "nibble serve did not answer /health in time"
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log.seek(0)
        output = log.read().decode()
        log.close()
        assert code == 0, output


@pytest.fixture(scope="module")
def client(qwen_server):
    return openai.OpenAI(base_url=f"{qwen_server}/v1", api_key="none", max_retries=0, timeout=300)


def test_openai_tool_calling_round_trip(client):
    """OpenAI's tool loop: the model calls get_weather, the client runs it and sends the result back, the
    model answers. (Qwen2.5-Coder 0.5B calls the tool again and again under "auto" once it has the result,
    so the last turn says "none": the tools stay in the prompt, a call is impossible.)"""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER, ADD], temperature=0,
                                       max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert "paris" in json.loads(call.function.arguments)["city"].lower()

    # the same answer streamed: deltas joined as the openai package's helpers join them
    chunks = list(client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER, ADD],
                                                 temperature=0, max_tokens=60, stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for tc in chunk.choices[0].delta.tool_calls or ():
            c = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            c["arguments"] += tc.function.arguments or ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
           [(t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    messages.append(choice.message.model_dump(exclude_none=True))
    for tc in choice.message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": tc.id, "content": '{"temperature": 21, "sky": "sunny"}'})
    r = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER, ADD], tool_choice="none",
                                       temperature=0, max_tokens=60)
    final = r.choices[0]
    assert final.finish_reason == "stop" and not final.message.tool_calls
    assert final.message.content and "<tool_call>" not in final.message.content


def test_openai_response_format(client):
    schema = SCHEMAS[6]
    r = client.chat.completions.create(model="qwen", messages=ask(schema), max_tokens=60, seed=3, response_format={
        "type": "json_schema", "json_schema": {"name": "contact", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "A cat, as JSON."}],
                                       max_tokens=60, seed=3, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen", messages=ask(schema), max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objekt"}}})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen", messages=ask(schema), max_tokens=8,
                                       tools=[{"type": "function", "function": {"name": "bad name!"}}])


def test_ollama_format_and_tools(qwen_server):
    schema = SCHEMAS[2]
    r = httpx.post(f"{qwen_server}/api/chat", timeout=300, json={
        "model": "qwen", "messages": ask(schema), "format": schema, "stream": False,
        "options": {"seed": 1, "num_predict": 40}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["message"]["content"]), schema)
    r = httpx.post(f"{qwen_server}/api/generate", timeout=60, json={"model": "qwen", "prompt": "hi", "format": "yaml"})
    assert r.status_code == 400 and "format" in r.json()["error"]
    r = httpx.post(f"{qwen_server}/api/chat", timeout=300, json={
        "model": "qwen", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        "tools": [WEATHER], "stream": False, "options": {"temperature": 0, "num_predict": 60}})
    assert r.status_code == 200, r.text
    calls = r.json()["message"]["tool_calls"]
    assert calls[0]["function"]["name"] == "get_weather" and isinstance(calls[0]["function"]["arguments"], dict)
    with httpx.stream("POST", f"{qwen_server}/api/chat", timeout=300, json={
            "model": "qwen", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
            "tools": [WEATHER], "options": {"temperature": 0, "num_predict": 60}}) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    streamed = [c for line in lines for c in line.get("message", {}).get("tool_calls", ())]
    assert streamed == calls and lines[-1]["done"]


def test_cli_run_flags(tmp_path):
    strict = {**SCHEMAS[2], "additionalProperties": False}
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(strict))
    grammar = tmp_path / "expr.lark"
    grammar.write_text(ARITHMETIC_LARK)
    for flags, check in [(["--json-schema", str(schema)], lambda t: jsonschema.validate(json.loads(t), strict)),
                         (["--json-schema", json.dumps(SCHEMAS[1])],
                          lambda t: jsonschema.validate(json.loads(t), SCHEMAS[1])),
                         (["--format", "json"], None),   # any object: a 135M model may write one for ever
                         (["--grammar", str(grammar)], lambda t: is_arithmetic(t)),
                         (["--regex", "[a-z]{3}"], lambda t: re.fullmatch("[a-z]{3}", t)),
                         (["--choice", "red", "--choice", "blue"], lambda t: t in ("red", "blue"))]:
        r = subprocess.run([sys.executable, "-m", "nibble.cli.main", "run", "smollm2-135m", "Answer.", *flags,
                            "-n", "60", "--seed", "1", "--json"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        if check is None or (out["finish_reason"] == "length" and flags[0] == "--grammar"):   # unbounded
            assert out["text"] and out["finish_reason"] in ("stop", "length")
            continue
        assert out["finish_reason"] == "stop" and check(out["text"]) is not False, (flags, out["text"])
    r = subprocess.run([sys.executable, "-m", "nibble.cli.main", "run", "smollm2-135m", "Answer.", "--regex", "[a-"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "regex" in r.stderr
