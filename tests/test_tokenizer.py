"""Tokenizers from GGUF metadata against llama.cpp: the reference ids of the three real models, slow obvious ports
of llama.cpp's merge loops on random text, decoding, the SentencePiece cache, malformed metadata, the CLI."""

from __future__ import annotations

import heapq
import json
import random
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st

from nibble.errors import ModelFormatError, TokenizerError
from nibble.formats import spm
from nibble.runtime import store
from nibble.formats.gguf import GGUFFile
from nibble.formats.tokenizer import IncrementalDecoder, Tokenizer

# What llama.cpp marks as end-of-generation in each vocabulary, and why.
EXPECTED_EOG = {
    # <|endoftext|>, <|im_end|> (eos) by name; <reponame> is a fill-in-middle "repo" token
    "smollm2-135m": {0, 2, 4},
    # <eos>; <end_of_turn>; </s> (a user-defined token that llama.cpp's list makes a control token)
    "gemma3-270m": {1, 106, 212},
    # </s>, <|endoftext|>, <|im_end|>, and the fill-in-middle pad, repo-name and file-separator tokens
    "qwen2.5-coder-0.5b": {128247, 151643, 151645, 151662, 151663, 151664},
}


@pytest.fixture(scope="module")
def tokenizer_of(pulled):
    cache = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            cache[name] = Tokenizer.from_gguf(GGUFFile(pulled(name)), cache_dir=store.cache_dir())
        return cache[name]
    return get


@pytest.fixture
def tok(tokenizer_of, model_name) -> Tokenizer:
    return tokenizer_of(model_name)


# ---- the reference ids ----

def test_visible_cases_match_llama_cpp(tok, ref, model_name):
    for case in ref(model_name, "tokens_visible.json"):
        assert tok.encode(case["text"], add_special=False) == case["ids"], case["text"]


def test_special_cases_match_llama_cpp_in_both_modes(tok, ref, model_name):
    for case in ref(model_name, "tokens_special.json"):
        text = case["text"]
        assert tok.encode(text, add_special=False, parse_special=True) == case["ids_parse_special"], text
        assert tok.encode(text, add_special=False, parse_special=False) == case["ids_plain"], text


def test_chat_text_matches_llama_cpp_with_special_parsing(tok, ref, model_name):
    chat = ref(model_name, "chat.json")
    assert tok.encode(chat["rendered"], add_special=False, parse_special=True) == chat["ids_special_parsed"]


def test_add_special_adds_bos_where_the_model_asks(tok, ref, model_name):
    assert tok.add_bos == (model_name == "gemma3-270m") and not tok.add_eos
    for prompt in ref(model_name, "prompts.json"):
        assert tok.encode(prompt["prompt"]) == prompt["ids"]
    assert tok.encode("", add_special=True) == ([tok.bos_id] if tok.add_bos else [])
    assert tok.encode("", add_special=False) == []


def test_decode_round_trips_every_visible_case(tok, ref, model_name):
    for case in ref(model_name, "tokens_visible.json") + ref(model_name, "tokens_special.json"):
        ids = tok.encode(case["text"], add_special=False)
        assert tok.decode(ids) == case["text"]


def test_control_tokens_are_left_out_unless_special(tok, ref, model_name):
    text = ref(model_name, "chat.json")["rendered"]
    ids = tok.encode(text, add_special=True, parse_special=True)
    assert tok.decode(ids, special=True) == (tok.token_text(tok.bos_id) if tok.add_bos else "") + text
    plain = tok.decode(ids)
    for control in ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<bos>"):
        assert control not in plain
    assert plain.encode() == b"".join(tok.token_bytes(i) for i in ids if not tok.is_control(i))


def test_end_of_generation_tokens(tok, model_name):
    assert tok.eog_ids == EXPECTED_EOG[model_name]
    assert tok.eos_id in tok.eog_ids
    assert all(tok.is_control(i) for i in tok.eog_ids)


APACHE = Path(__file__).parent / "data" / "reference" / "apache-2.0.txt"


def test_apache_license_tokenizes_natively_and_round_trips(tok):
    """The merging runs in the native backend (HF tokenizers, sentencepiece; ~4 ms for this text on 2 cores):
    Python code runs per special-token fragment, never per token. Counted, not timed (a time would depend on
    the machine's load)."""
    text = APACHE.read_text()
    python_calls = 0

    def count(frame, event, arg):
        nonlocal python_calls
        python_calls += event == "call"
    sys.setprofile(count)
    try:
        ids = tok.encode(text, add_special=False)
    finally:
        sys.setprofile(None)
    assert tok.decode(ids) == text
    assert python_calls < len(ids), f"{python_calls} Python calls for {len(ids)} tokens"


# ---- decoding ----

def _byte_token(tok: Tokenizer, b: int) -> int | None:
    """The token that stands for the single byte b (SmolLM's vocabulary lacks a few of them)."""
    if tok.model == "llama":
        return tok.vocab.token_to_id.get(f"<0x{b:02X}>")
    from nibble.formats.tokenizer import _bytes_to_unicode
    return tok.vocab.token_to_id.get(_bytes_to_unicode()[b])


def test_invalid_utf8_becomes_replacement_character(tok):
    nihon = [_byte_token(tok, b) for b in "日".encode()]   # three single-byte tokens
    assert tok.decode(nihon) == "日"
    assert tok.decode(nihon[:2]) == "\ufffd"
    assert tok.decode(nihon[:1] + tok.encode("A", add_special=False)) == "\ufffdA"
    assert tok.token_bytes(nihon[0]) == "日".encode()[:1]


def test_incremental_decoder_never_splits_a_character(tok):
    ids = [_byte_token(tok, b) for b in "日😀".encode()]
    dec = IncrementalDecoder(tok)
    outs = [dec.add(i) for i in ids]
    assert outs == ["", "", "日", "", "", "", "😀"]
    assert dec.flush() == ""


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_incremental_decoding_equals_decode(tokenizer_of, data):
    name = data.draw(st.sampled_from(["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]))
    tok = tokenizer_of(name)
    special = data.draw(st.booleans())
    byte_ids = st.sampled_from([i for i in (_byte_token(tok, b) for b in range(256)) if i is not None])
    ids = data.draw(st.lists(st.one_of(st.integers(0, tok.n_vocab - 1), byte_ids), max_size=40))
    dec = IncrementalDecoder(tok, special=special)
    assert "".join(dec.add(i) for i in ids) + dec.flush() == tok.decode(ids, special=special)


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.n_vocab])
    with pytest.raises(TokenizerError):
        tok.decode([-1])


def test_lone_surrogates_become_replacement_characters(tok):
    assert tok.encode("a\udcffb", add_special=False) == tok.encode("a\ufffdb", add_special=False)


# ---- the fast backends against slow ports of llama.cpp's merge loops ----

def spm_reference(tok: Tokenizer, text: str) -> list[int]:
    """llm_tokenizer_spm_session::tokenize: merge the adjacent pair whose text is a token of highest score
    (leftmost on ties), then resegment symbols that are not tokens through the merges, or into bytes."""
    t2i, scores = tok.vocab.token_to_id, tok.vocab.scores
    sym = list(text.replace(" ", "\u2581"))
    if not sym:
        return []
    prev, nxt = list(range(-1, len(sym) - 1)), list(range(1, len(sym) + 1))
    nxt[-1] = -1
    queue, rev_merge = [], {}

    def try_add(left, right):
        if left == -1 or right == -1:
            return
        merged = sym[left] + sym[right]
        if merged in t2i:
            heapq.heappush(queue, (-float(scores[t2i[merged]]), left, right, len(merged)))
            rev_merge[merged] = (sym[left], sym[right])

    for i in range(1, len(sym)):
        try_add(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
            continue
        sym[left], sym[right] = sym[left] + sym[right], ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        try_add(prev[left], left)
        try_add(left, nxt[left])
    out = []

    def resegment(s):
        if s in t2i:
            out.append(t2i[s])
        elif s in rev_merge:
            resegment(rev_merge[s][0])
            resegment(rev_merge[s][1])
        else:
            out.extend(t2i[f"<0x{b:02X}>"] for b in s.encode())

    i = 0
    while i != -1:
        resegment(sym[i])
        i = nxt[i]
    return out


def bpe_reference(tok: Tokenizer, rank: dict, words: list[str]) -> list[int]:
    """llm_tokenizer_bpe_session::tokenize over already pre-tokenized, byte-mapped words: merge the adjacent
    pair of lowest rank (`rank`: merge pair -> its index), leftmost on ties."""
    t2i = tok.vocab.token_to_id
    out = []
    for word in words:
        sym = list(word)
        while True:
            pairs = [(rank[(a, b)], k) for k, (a, b) in enumerate(zip(sym, sym[1:])) if (a, b) in rank]
            if not pairs:
                break
            _, k = min(pairs)
            sym[k:k + 2] = [sym[k] + sym[k + 1]]
        out.extend(t2i[s] for s in sym)
    return out


ALPHABET = (list("aeiou tnrsl  \t\n\r\x00\x01\x7f.,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`0123456789")
            + list("éüßñçøåœ日本語中文한국어Привет мирΓειάשלוםمرحبا😀🎉👍🏽🇫🇷\u200d\u3000\u00a0\u2581\ufeff\U0010ffff"))
SPECIAL_TEXT = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "</s>", "<s>", "<unk>", "<mask>", "<table>",
                "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "<|fim_pad|>", "  ", "   ", "\n\n",
                "\t\t", "<reponame>", "<unused7>", "[multimodal]"]


def random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.2:
                parts.append(rng.choice(SPECIAL_TEXT))
            else:
                parts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12))))
        texts.append("".join(parts))
    return texts


def test_sentencepiece_backend_matches_llama_cpp_spm_loop(tokenizer_of):
    tok = tokenizer_of("gemma3-270m")
    for text in random_texts(seed=1, n=400):
        for parse_special in (False, True):
            expected = []
            for frag in tok._partition(text, parse_special):
                expected += [frag] if type(frag) is int else spm_reference(tok, frag)
            assert tok.encode(text, add_special=False, parse_special=parse_special) == expected, repr(text)


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_bpe_backend_matches_llama_cpp_bpe_loop(tokenizer_of, name):
    tok = tokenizer_of(name)
    pre = tok._backend._hf.pre_tokenizer
    rank = {pair: r for r, pair in enumerate(tok.vocab.merges)}
    for text in random_texts(seed=2, n=1000):
        expected = []
        for frag in tok._partition(text, parse_special=True):
            if type(frag) is int:
                expected.append(frag)
            else:
                expected += bpe_reference(tok, rank, [w for w, _ in pre.pre_tokenize_str(frag)])
        assert tok.encode(text, add_special=False, parse_special=True) == expected, repr(text)


def test_user_defined_tokens_split_even_without_parse_special(tokenizer_of):
    qwen = tokenizer_of("qwen2.5-coder-0.5b")
    assert qwen.encode("<tool_call>", add_special=False) == [151657]
    assert qwen.encode("<|im_start|>", add_special=False) != [151644]
    assert qwen.encode("<|im_start|>", add_special=False, parse_special=True) == [151644]


# ---- the SentencePiece cache ----

def _cache_files(home):
    return sorted((home / "cache").glob("spm-*.model"))


def test_spm_cache_is_written_then_used(tmp_store, pulled, monkeypatch):
    path = pulled("gemma3-270m")
    cold = Tokenizer.from_gguf(GGUFFile(path), cache_dir=tmp_store.parent / "cache")
    files = _cache_files(tmp_store.parent)
    assert len(files) == 1

    def no_build(*args, **kwargs):
        raise AssertionError("the cached model should have been used")
    monkeypatch.setattr(spm, "model_proto", no_build)
    warm = Tokenizer.from_gguf(GGUFFile(path), cache_dir=tmp_store.parent / "cache")
    text = "Hello world <start_of_turn> 日本語"
    assert warm.encode(text, parse_special=True) == cold.encode(text, parse_special=True)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_spm_cache_is_rebuilt(tmp_store, pulled, ref, damage):
    path = pulled("gemma3-270m")
    Tokenizer.from_gguf(GGUFFile(path), cache_dir=tmp_store.parent / "cache")
    [entry] = _cache_files(tmp_store.parent)
    blob = entry.read_bytes()
    entry.write_bytes({"truncate": blob[:len(blob) // 2],
                       "flip": blob[:-100] + bytes([blob[-100] ^ 0x40]) + blob[-99:],
                       "garbage": b"not a model" * 100,
                       "empty": b""}[damage])
    tok = Tokenizer.from_gguf(GGUFFile(path), cache_dir=tmp_store.parent / "cache")
    for case in ref("gemma3-270m", "tokens_visible.json"):
        assert tok.encode(case["text"], add_special=False) == case["ids"]
    assert entry.read_bytes() == blob   # rewritten whole


def test_unwritable_cache_dir_is_not_an_error(tmp_path, monkeypatch, pulled):
    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache folder would go")
    tok = Tokenizer.from_gguf(GGUFFile(pulled("gemma3-270m")), cache_dir=blocker / "cache")
    assert tok.encode("Hello", add_special=False) == [9259]


# ---- tiny synthetic vocabularies ----

BYTES = [f"<0x{b:02X}>" for b in range(256)]


def write_gguf(path, kv: dict, typed: dict | None = None):
    """A GGUF with only metadata: `kv` values typed as gguf-py infers them, `typed` as (value, type, subtype)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    for key, (value, vtype, sub) in (typed or {}).items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


def spm_kv(**extra):
    tokens = ["<unk>", "<s>", "</s>"] + BYTES + ["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -0.5]
    types = [2, 3, 3] + [6] * 256 + [1] * 6
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0}
    kv.update(extra)
    return kv


def test_spm_space_prefix_follows_llama_cpp(tmp_path):
    tok = Tokenizer.from_gguf(write_gguf(tmp_path / "spm.gguf", spm_kv()))
    ab, a = tok.vocab.token_to_id["\u2581ab"], tok.vocab.token_to_id["\u2581a"]
    assert tok.add_bos and tok.add_space_prefix   # llama.cpp's defaults for an SPM file that says nothing
    assert tok.encode("ab") == [1, ab]
    assert tok.encode("ab</s>ab", parse_special=True) == [1, ab, 2, ab]   # a space again after a special token
    assert tok.encode("ab a", add_special=False) == [ab, a]
    assert tok.decode([ab, a]) == "ab a"                 # the added space is dropped from the first token
    assert tok.decode([1, ab]) == " ab"                  # ... only from the first, as llama_detokenize does
    space = tok.vocab.token_to_id["\u2581"]
    assert tok.encode("\u00e9", add_special=False) == [space, 3 + 0xC3, 3 + 0xA9]   # byte fallback
    off = Tokenizer.from_gguf(write_gguf(tmp_path / "off.gguf",
                                         spm_kv(**{"tokenizer.ggml.add_space_prefix": False,
                                                   "tokenizer.ggml.add_bos_token": False})))
    assert off.encode("ab") == [tok.vocab.token_to_id["ab"]]


def bpe_kv(**extra):
    tokens = ["!", "a", "b", "ab", "Ġ", "Ġab", "<|end|>"]
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [1, 1, 1, 1, 1, 1, 3], "tokenizer.ggml.merges": ["a b", "Ġ ab"],
          "tokenizer.ggml.bos_token_id": 6, "tokenizer.ggml.eos_token_id": 6}
    kv.update(extra)
    return kv


def test_bpe_synthetic_vocabulary(tmp_path):
    tok = Tokenizer.from_gguf(write_gguf(tmp_path / "bpe.gguf", bpe_kv()))
    assert tok.encode("ab ab!") == [3, 5, 0]
    assert tok.encode("ab<|end|>", parse_special=True) == [3, 6]
    assert tok.eog_ids == {6} and not tok.add_bos


@pytest.mark.parametrize("kv, message", [
    (bpe_kv(**{"tokenizer.ggml.pre": "no-such-pre"}), "pre-tokenizer 'no-such-pre'"),
    (bpe_kv(**{"tokenizer.ggml.model": "bert"}), "tokenizer model 'bert'"),
])
def test_unknown_tokenizer_names_raise_tokenizer_error(tmp_path, kv, message):
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_gguf(write_gguf(tmp_path / "x.gguf", kv))


I32, F32, STR, ARR = (gguf.GGUFValueType.INT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING,
                      gguf.GGUFValueType.ARRAY)


def _without(kv, key):
    return {k: v for k, v in kv.items() if k != key}


@pytest.mark.parametrize("kv, typed, message", [
    (_without(spm_kv(), "tokenizer.ggml.tokens"), {"tokenizer.ggml.tokens": ([1, 2, 3], ARR, I32)},
     "'tokenizer.ggml.tokens' must be an ARRAY of STRING"),
    (_without(spm_kv(), "tokenizer.ggml.tokens"), {}, "'tokenizer.ggml.tokens' is missing"),
    (spm_kv(**{"tokenizer.ggml.token_type": [1, 2, 3]}), {}, "'tokenizer.ggml.token_type' has 3 entries"),
    (_without(spm_kv(), "tokenizer.ggml.token_type"), {"tokenizer.ggml.token_type": ([1.0] * 265, ARR, F32)},
     "'tokenizer.ggml.token_type' must be an ARRAY of INT32"),
    (spm_kv(**{"tokenizer.ggml.scores": [0.5] * 10}), {}, "'tokenizer.ggml.scores' has 10 entries"),
    (_without(spm_kv(), "tokenizer.ggml.scores"), {"tokenizer.ggml.scores": (["x"] * 265, ARR, STR)},
     "'tokenizer.ggml.scores' must be an ARRAY of"),
    (spm_kv(**{"tokenizer.ggml.bos_token_id": 265}), {}, "'tokenizer.ggml.bos_token_id' = 265 is outside"),
    (spm_kv(**{"tokenizer.ggml.padding_token_id": 100000}), {}, "padding_token_id' = 100000 is outside"),
    (_without(spm_kv(), "tokenizer.ggml.eos_token_id"), {"tokenizer.ggml.eos_token_id": ("2", STR, None)},
     "'tokenizer.ggml.eos_token_id' must be an integer"),
    (spm_kv(**{"tokenizer.ggml.add_bos_token": "yes"}), {}, "'tokenizer.ggml.add_bos_token' must be a BOOL"),
    (spm_kv(**{"tokenizer.ggml.tokens": ["<unk>", "<s>", "<s>"] + BYTES + list("abcdef")}), {},
     "appears twice"),
    (bpe_kv(**{"tokenizer.ggml.merges": ["a b", "ab"]}), {}, "merge #1 'ab'"),
    (_without(bpe_kv(), "tokenizer.ggml.merges"), {}, "'tokenizer.ggml.merges' is missing"),
    (_without(bpe_kv(), "tokenizer.ggml.bos_token_id") | {"tokenizer.ggml.add_bos_token": True}, {},
     "add_bos_token' is true but the file sets no"),
    (_without(spm_kv(), "tokenizer.ggml.model"), {}, "'tokenizer.ggml.model' is missing"),
])
def test_malformed_tokenizer_metadata_raises_model_format_error(tmp_path, kv, typed, message):
    with pytest.raises(ModelFormatError, match=message):
        Tokenizer.from_gguf(write_gguf(tmp_path / "bad.gguf", kv, typed))


# ---- the CLI ----

def test_cli_tokenize_prints_llama_cpp_ids(cli, ref):
    case = ref("qwen2.5-coder-0.5b", "tokens_visible.json")[12]
    r = cli("tokenize", "qwen2.5-coder-0.5b", case["text"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(i) for i in case["ids"]]


def test_cli_tokenize_modes(cli, ref):
    case = next(c for c in ref("gemma3-270m", "tokens_special.json") if c["text"] == "x<end_of_turn>y<start_of_turn>z")
    r = cli("tokenize", "gemma3-270m", case["text"], "--parse-special", "--no-add-special", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ids"] == case["ids_parse_special"] and out["n_tokens"] == len(out["ids"])
    assert "".join(out["pieces"]) == case["text"]
    r = cli("tokenize", "gemma3-270m", case["text"], "--pieces")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].split() == ["2", "'<bos>'"]   # BOS added: add_bos_token is true
    assert [int(line.split()[0]) for line in lines[1:]] == case["ids_plain"]


def test_cli_tokenize_reads_stdin_and_reports_errors(cli, ref, pulled, tmp_path):
    case = ref("smollm2-135m", "tokens_visible.json")[0]
    r = cli("tokenize", "smollm2-135m", "-", input=case["text"])
    assert r.returncode == 0 and r.stdout.split() == [str(i) for i in case["ids"]]
    # the real SmolLM file with its pre-tokenizer renamed (same length, patched in place)
    data = pulled("smollm2-135m").read_bytes()
    key = b"tokenizer.ggml.pre" + (8).to_bytes(4, "little") + (6).to_bytes(8, "little") + b"smollm"
    assert data.count(key) == 1
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data.replace(key, key[:-6] + b"nosuch"))
    r = cli("tokenize", str(bad), "hi")
    assert r.returncode == 1 and "pre-tokenizer 'nosuch'" in r.stderr and "Traceback" not in r.stderr


# ---- whatever the metadata, only NibbleError ----

PIECES = list("ab Ġ▁<>|0x") + ["<0x41>", "<s>", "</s>", "<|end|>"]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_arbitrary_tokenizer_metadata_raises_only_nibble_errors(data, tmp_path_factory):
    """A valid vocabulary with a few random changes: the tokenizer builds and works, or says why it cannot."""
    from nibble.errors import NibbleError

    kv = data.draw(st.sampled_from([bpe_kv, spm_kv]))()
    words = st.lists(st.sampled_from(PIECES), max_size=4).map("".join)
    for _ in range(data.draw(st.integers(0, 3))):
        key = data.draw(st.sampled_from(sorted(kv) + ["tokenizer.ggml.add_bos_token", "tokenizer.ggml.pre",
                                                      "tokenizer.ggml.add_space_prefix"]))
        tokens = kv.get("tokenizer.ggml.tokens")
        n = len(tokens) if isinstance(tokens, list) else 3
        kv[key] = data.draw(st.one_of(
            st.just(None),                                                    # drop the key
            st.booleans(), st.integers(0, n + 3), st.sampled_from(["gpt2", "llama", "qwen2", "x"]),
            st.lists(words, max_size=n + 2),                                  # strings (tokens, merges)
            st.lists(st.integers(-1, 8), min_size=max(n - 1, 0), max_size=n + 1),   # types
            st.lists(st.floats(-9, 9, width=32), min_size=max(n - 1, 0), max_size=n + 1),   # scores
        ))
        if kv[key] is None or kv[key] == []:
            del kv[key]
    path = tmp_path_factory.mktemp("fuzz") / "t.gguf"
    try:
        tok = Tokenizer.from_gguf(write_gguf(path, kv))
    except NibbleError as e:
        event(type(e).__name__)
        return
    event("built")
    text = data.draw(st.lists(st.sampled_from(list("ab <>|é日\n") + ["<s>", "</s>", "<|end|>"]), max_size=12)
                     .map("".join))
    for parse_special in (False, True):
        ids = tok.encode(text, parse_special=parse_special)
        assert all(0 <= i < tok.n_vocab for i in ids)
        dec = IncrementalDecoder(tok, special=parse_special)
        assert "".join(map(dec.add, ids)) + dec.flush() == tok.decode(ids, special=parse_special)
