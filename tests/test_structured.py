"""Structured output (runtime/structured.py) and tool calls (runtime/tools.py) on the three catalogue models:
ten JSON Schemas of increasing difficulty, three seeds each, every complete output valid by the `jsonschema`
package; regex, choices, a Lark and a GBNF grammar; errors before any token; speculative drafts under a
mask; and OpenAI's client running a tool-calling round trip against `nibble serve`."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
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
        "x": {"type": "integer", "minimum": -10, "maximum": 10}, "y": {"type": "integer", "minimum": -10, "maximum": 10}},
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


def test_a_schema_compiles_once(smollm):
    vocab = structured.vocabulary(smollm.tokenizer)
    grammar = structured.grammar_text(json_schema=SCHEMAS[9])
    first = vocab.compile(grammar)
    assert list(vocab._compiled)[-1] == grammar
    n = len(vocab._compiled)
    second = vocab.compile(grammar)
    assert len(vocab._compiled) == n and first is not second   # a copy of the cached matcher per request
