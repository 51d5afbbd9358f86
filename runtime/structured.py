"""Structured output: generation held to a JSON Schema, a grammar, a regular expression or a list of choices.

    model.generate(prompt, json_schema={"type": "object", ...})   # or format="json", grammar=LARK_OR_GBNF,
                                                                  #    regex=r"\\d{3}-\\d{4}", choices=["yes", "no"]

llguidance (Microsoft's Earley parser over a lexer of regex derivatives) walks the vocabulary's token trie
against the grammar's state and returns, per step, the set of tokens that keep the text a prefix of a
sentence of the grammar. `Generation.advance` hands that set to the Sampler, which sets every other logit
to -inf after bias and penalties: top-k, top-p, min-p, temperature and the seeded draw then run on what is
left, so every sampler and seed works and the text always parses. An end-of-generation token is allowed
only where the grammar accepts, so generation that ends by `stop` is a complete sentence; a `max_tokens`
cut ends with `length`. Where nothing but the end can follow (a closed JSON object), generation ends at once.

The vocabulary is nibble's own (`formats/tokenizer.py`): each token's bytes as the model produces them
(byte-level BPE with GPT-2's alphabet undone; SentencePiece with `▁` as a space and `<0xNN>` as one byte),
control tokens marked special (the grammar's text never contains them; Lark may name them as `<|im_end|>`),
user-defined tokens as their text (Qwen's `<tool_call>` is one token and the text "<tool_call>"), the
end-of-generation ids as llguidance's EOS, and nibble's own tokenizer to tokenize forced text. Building it
walks the whole vocabulary (0.5-4 s), once per tokenizer.

JSON has no free whitespace: the separators are exactly ", " and ": " (the spacing of `json.dumps` that
chat models were trained on) and nothing else, so a valid object cannot be padded for ever. Properties come
in the schema's order. A grammar compiles once per vocabulary and grammar text (an LRU of CACHE_SIZE
matchers); each request takes a copy.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from ..errors import GrammarError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}
CACHE_SIZE = 64


# ---- what a request asks for -> llguidance's grammar text ----

def json_schema_grammar(schema: Any) -> str:
    """A JSON Schema (a dict, a bool or its JSON text) -> llguidance grammar text, with JSON_OPTIONS."""
    import llguidance
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"the JSON Schema is not valid JSON: {e}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON Schema must be an object, not {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON Schema: {e}") from None


def grammar_text(*, json_schema: Any = None, format: str | dict | None = None, grammar: str | None = None,
                 regex: str | None = None, choices: Sequence[str] | None = None) -> str | None:
    """The one constraint a request names -> llguidance grammar text (None when it names none).

    `json_schema`: a JSON Schema (dict or JSON text); `format`: "json" (any JSON object, as Ollama names it)
    or a schema (Ollama's other form); `grammar`: Lark as llguidance takes it, or llama.cpp's GBNF (converted
    by llguidance's gbnf_to_lark); `regex`: a Rust-syntax regular expression the whole output matches;
    `choices`: the output is exactly one of these strings."""
    import llguidance
    given = {k: v for k, v in (("json_schema", json_schema), ("format", format), ("grammar", grammar),
                               ("regex", regex), ("choices", choices)) if v is not None}
    if not given:
        return None
    if len(given) > 1:
        raise GrammarError(f"give one constraint, not {' and '.join(given)}")
    if format is not None:
        if format == "json":
            return json_schema_grammar(ANY_JSON_OBJECT)
        if isinstance(format, dict):
            return json_schema_grammar(format)
        raise GrammarError(f"format must be \"json\" or a JSON Schema, not {format!r}")
    if json_schema is not None:
        return json_schema_grammar(json_schema)
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("grammar must be non-empty Lark or GBNF text")
        try:
            return llguidance.grammar_from("grammar", grammar)
        except ValueError as e:       # GBNF that gbnf_to_lark cannot convert
            raise GrammarError(str(e)) from None
    if regex is not None:
        if not isinstance(regex, str):
            raise GrammarError(f"regex must be a string, not {type(regex).__name__}")
        return llguidance.LLMatcher.grammar_from_regex(regex)
    if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty list of non-empty strings")
    return llguidance.LLMatcher.grammar_from_lark(
        "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


# ---- the vocabulary, once per tokenizer ----

class _TokenizerView:
    """What llguidance.TokenizerWrapper reads: token bytes, special ids, EOS/BOS and a tokenize call."""

    def __init__(self, tokenizer):
        from ..formats.tokenizer import _ATTR_SPECIAL
        self.tokenizer = tokenizer
        self.tokens = [tokenizer.token_bytes(i, special=True) for i in range(tokenizer.n_vocab)]
        # control and unknown tokens: those llama.cpp's detokenizer leaves out of text (user-defined ones are text)
        self.special_token_ids = np.flatnonzero(tokenizer._attrs & _ATTR_SPECIAL).tolist()
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text: str | bytes) -> list[int]:
        # forced text is tokenized as plain text: control-token names stay text, as in a message
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self.tokenizer.encode(text, add_special=False)


class Vocabulary:
    """A tokenizer as llguidance sees it, and the grammars compiled against it."""

    def __init__(self, tokenizer):
        import llguidance
        self.n_vocab = tokenizer.n_vocab
        self.eog_ids = sorted(tokenizer.eog_ids)
        self.ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tokenizer)),
                                                   n_vocab=tokenizer.n_vocab, eos_token=self.eog_ids)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, grammar: str):
        """llguidance grammar text -> a fresh matcher at the grammar's start; GrammarError if it does not
        compile. Compiled once (LRU by the text); each call returns a copy."""
        import llguidance
        with self._lock:
            matcher = self._compiled.get(grammar)
            if matcher is not None:
                self._compiled.move_to_end(grammar)
                return matcher.deep_copy()
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {matcher.get_error()}")
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
            return matcher.deep_copy()


_vocabularies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def vocabulary(tokenizer) -> Vocabulary:
    """The Vocabulary of a tokenizer, built on first use and kept as long as the tokenizer."""
    with _vocabularies_lock:
        vocab = _vocabularies.get(tokenizer)
        if vocab is None:
            vocab = _vocabularies[tokenizer] = Vocabulary(tokenizer)
        return vocab


# ---- one request's constraint ----

class Constraint:
    """The grammar's state for one generation: `allowed()` the tokens that may come next, `accept(token)`
    after each sampled one. `done` once only the end of generation may follow."""

    def __init__(self, vocab: Vocabulary, grammar: str):
        self.matcher = vocab.compile(grammar)
        self.n_vocab = vocab.n_vocab
        self._bits = np.zeros((self.n_vocab + 31) // 32, np.int32)   # llguidance's bitmask: bit t of word t//32

    def allowed(self) -> np.ndarray:
        """bool (n_vocab,): the tokens the grammar allows next (end-of-generation ids only where it accepts)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if not self._bits.any():       # the matcher gave up (an error, or a parser or lexer limit)
            reason = self.matcher.get_error() or self.matcher.stop_reason()
            raise GrammarError(f"no token can continue the grammar: {reason}")
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=self.n_vocab).view(bool)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} does not continue the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` the grammar would accept in a row from here (the state is unchanged)."""
        return self.matcher.validate_tokens(list(tokens)) if tokens else 0


class ConstrainedDrafter:
    """A speculative drafter whose proposals are cut at the first token the grammar forbids: verification
    would reject it anyway (the mask is applied at every verified position), so it is not worth a row."""

    def __init__(self, drafter, constraint: Constraint):
        self.drafter = drafter
        self.constraint = constraint

    def propose(self, context: list[int], k: int, slot: int) -> list[int]:
        tokens = self.drafter.propose(context, k, slot)
        return tokens[:self.constraint.valid_prefix(tokens)]


def constraint_for(model, **inputs) -> Constraint | None:
    """The Constraint for `generate.stream`'s json_schema / format / grammar / regex / choices keywords (None
    without one). Raises GrammarError, before anything is evaluated, if it is malformed or does not compile."""
    grammar = grammar_text(**inputs)
    if grammar is None:
        return None
    return Constraint(vocabulary(model.tokenizer), grammar)
