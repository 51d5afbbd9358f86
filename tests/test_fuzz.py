"""Whatever the bytes, `nibble.load(path)` returns a model or raises a NibbleError; whatever the bytes,
`Session.load` returns a session or raises a NibbleError and leaves the model's cache alone; whatever the
template, `ChatTemplate` renders it or raises a TemplateError within its budgets.

The seed is a tiny but complete llama model written with gguf.GGUFWriter (2 blocks, embedding 64, 4 heads,
2 KV heads, a 300-token GPT-2 byte-level vocabulary with merges); hypothesis mutates and truncates it, aiming
most mutations at the integer fields of the header (lengths, counts, types, dims, offsets), which a walker
here finds independently of the reader. Every mutated file is loaded in full and with vocab_only=True.

Session files: a real session saved from the tiny model, mutated at the integer fields of its zip structure
(local headers, central directory, end record) and of its .npy headers, or rebuilt with a member replaced by
an array of another dtype or shape, by a header that declares anything, or by metadata JSON whose fields
hypothesis fills with other values. Templates: built from a grammar of Jinja expressions and statements
that leans on what exhausts a renderer: huge counts and widths, repetition, formatting, nesting, loops,
macros and block buffers; each must end within 10 times its time budget (of CPU time), and with Python's
allocations under 200 MB.

NIBBLE_FUZZ_EXAMPLES sets the number of examples of each fuzz test (defaults: 1000 GGUF files, about 6 s;
300 session files and 50 templates, a few seconds each); for a long run:
    NIBBLE_FUZZ_EXAMPLES=100000 nice -n 19 python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import quantize
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import nibble
from nibble.errors import NibbleError, TemplateError
from nibble.formats.chat import ChatTemplate
from nibble.formats.metadata import check_tokenizer_metadata
from nibble.runtime.session import Session


def examples(default: int) -> int:
    return int(os.environ.get("NIBBLE_FUZZ_EXAMPLES", default))


EXAMPLES = examples(1000)

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_CTX = 2, 64, 4, 2, 128, 128
HEAD_DIM = N_EMBD // N_HEAD
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a n", "Ġa n", "e r", "o n", "r e", "Ġ s", "e d", "Ġ w", "o r",
          "Ġ o", "i s", "Ġ c", "i t", "a t", "e n", "Ġ b", "Ġ f", "Ġ m", "Ġ p", "Ġ d", "Ġ h", "Ġ l", "l e",
          "a r", "a l", "o u", "s t", "Ġ i", "Ġi n", "t h", "Ġw h", "in g", "Ġ g", "Ġo n", "Ġ T"]


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = SPECIALS + byte_symbols()
    merges = []
    for merge in MERGES:
        left, right = merge.split(" ")
        assert left in tokens and right in tokens, merge
        if left + right not in tokens:
            tokens.append(left + right)
            merges.append(merge)
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # CONTROL, NORMAL
    return tokens, types, merges


def write_tiny_llama(path) -> None:
    tokens, types, merges = tiny_vocab()
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def weight(name, rows, cols, qtype):
        x = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)

    def norm(name):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))

    weight("token_embd.weight", len(tokens), N_EMBD, Q.Q8_0)
    for i in range(N_LAYER):
        norm(f"blk.{i}.attn_norm.weight")
        weight(f"blk.{i}.attn_q.weight", N_HEAD * HEAD_DIM, N_EMBD, Q.Q8_0)
        weight(f"blk.{i}.attn_k.weight", N_HEAD_KV * HEAD_DIM, N_EMBD, Q.Q8_0)
        weight(f"blk.{i}.attn_v.weight", N_HEAD_KV * HEAD_DIM, N_EMBD, Q.Q8_0)
        weight(f"blk.{i}.attn_output.weight", N_EMBD, N_HEAD * HEAD_DIM, Q.Q4_0)
        norm(f"blk.{i}.ffn_norm.weight")
        weight(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD, Q.Q4_0)
        weight(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD, Q.Q8_0)
        weight(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF, Q.Q4_0)
    norm("output_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def integer_fields(content: bytes) -> tuple[dict[str, list[tuple[int, int]]], int]:
    """(position, width) of every integer in a valid GGUF's header, by kind: "structure" (counts, key lengths,
    value types, array types and lengths), "value" (scalar metadata values), "element" (numeric array
    elements), "string" (lengths of strings inside arrays), "tensor" (tensor info fields); and where the
    tensor infos end. A walker of its own, so that the fuzzer does not depend on the reader."""
    u32 = lambda p: struct.unpack_from("<I", content, p)[0]  # noqa: E731
    u64 = lambda p: struct.unpack_from("<Q", content, p)[0]  # noqa: E731
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    fields: dict[str, list[tuple[int, int]]] = {k: [] for k in ("structure", "value", "element", "string",
                                                                  "tensor")}
    fields["structure"] += [(4, 4), (8, 8), (16, 8)]

    def value(p: int, vtype: int, in_array: bool) -> int:
        if vtype in sizes:
            fields["element" if in_array else "value"].append((p, sizes[vtype]))
            return p + sizes[vtype]
        if vtype == 8:  # STRING
            fields["string" if in_array else "structure"].append((p, 8))
            return p + 8 + u64(p)
        fields["structure"].extend([(p, 4), (p + 4, 8)])  # ARRAY
        itype, count, p = u32(p), u64(p + 4), p + 12
        for _ in range(count):
            p = value(p, itype, True)
        return p

    p = 24
    for _ in range(u64(16)):
        fields["structure"].append((p, 8))
        p += 8 + u64(p)
        fields["structure"].append((p, 4))
        p = value(p + 4, u32(p), False)
    for _ in range(u64(8)):
        fields["tensor"].append((p, 8))
        p += 8 + u64(p)
        n_dims = u32(p)
        fields["tensor"].extend([(p, 4)] + [(p + 4 + 8 * j, 8) for j in range(n_dims)])
        p += 4 + 8 * n_dims
        fields["tensor"].extend([(p, 4), (p + 4, 8)])
        p += 12
    return fields, p


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "tiny-llama.gguf"
    write_tiny_llama(path)
    content = path.read_bytes()
    fields, header_end = integer_fields(content)
    return path, content, fields, header_end


def load_everything(path) -> None:
    """Load in full and vocab-only; anything but a NibbleError escapes and fails the test."""
    for vocab_only in (False, True):
        try:
            model = nibble.load(str(path), vocab_only=vocab_only)
        except NibbleError:
            continue
        model.gguf.close()


def replace(path, content: bytes) -> None:
    # A new inode each time: a model from the previous example may still map the old one.
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def test_tiny_model_is_a_valid_seed(seed):
    path, content, fields, header_end = seed
    model = nibble.load(str(path))
    g = model.gguf
    assert model.architecture == "llama"
    tokens, types, merges = tiny_vocab()
    assert 280 <= len(tokens) <= 320 and len(set(tokens)) == len(tokens) and len(merges) >= 30
    assert check_tokenizer_metadata(g) == len(tokens)
    assert g.metadata["tokenizer.ggml.tokens"] == tokens and g.metadata["tokenizer.ggml.merges"] == merges
    assert g.tensors["token_embd.weight"].shape == (len(tokens), N_EMBD)
    assert g.tensors["blk.1.attn_k.weight"].shape == (N_HEAD_KV * HEAD_DIM, N_EMBD)
    assert g.tensors["blk.0.ffn_down.weight"].type_name == "Q4_0"
    assert len(g.tensors) == 2 + 9 * N_LAYER
    assert nibble.load(str(path), vocab_only=True).architecture == "llama"
    # the walker agrees with the reader on where the header ends
    assert g.data_start == -(-header_end // g.alignment) * g.alignment
    assert len(fields["string"]) == len(tokens) + len(merges) and len(fields["tensor"]) > 4 * len(g.tensors)


INTERESTING = [0, 1, 2, 3, 4, 7, 8, 12, 13, 31, 32, 33, 63, 64, 255, 256, 2**16 - 1, 2**16, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@st.composite
def mutations(draw, seed) -> list[tuple]:
    """A few edits of the seed, as a short list that hypothesis can print and shrink:
    ("field", pos, width, value) overwrites an integer of the header (each kind of field equally likely),
    ("byte", pos, value) one byte, ("truncate", pos), ("delete", pos, n) and ("insert", pos, bytes) change
    the length. Positions are drawn uniformly (hypothesis would favour the first bytes)."""
    _, content, fields, header_end = seed
    anywhere = st.sampled_from(range(len(content)))
    in_header = st.sampled_from(range(header_end))
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "field", "field", "byte", "truncate", "delete", "insert"]))
        if kind == "field":
            pos, width = draw(st.sampled_from(fields[draw(st.sampled_from(sorted(fields)))]))
            old = int.from_bytes(content[pos:pos + width], "little")
            value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(old - 8, old + 8),
                                   st.sampled_from([len(content), len(content) - 1, header_end])))
            ops.append(("field", pos, width, value % (1 << (8 * width))))
        elif kind == "byte":
            ops.append(("byte", draw(st.one_of(in_header, anywhere)), draw(st.integers(0, 255))))
        elif kind == "truncate":
            ops.append(("truncate", draw(st.one_of(in_header, anywhere))))
        elif kind == "delete":
            ops.append(("delete", draw(in_header), draw(st.integers(1, 16))))
        else:
            ops.append(("insert", draw(in_header), draw(st.binary(min_size=1, max_size=16))))
    return ops


def apply(content: bytes, ops: list[tuple]) -> bytes:
    data = bytearray(content)
    for kind, pos, *args in ops:
        if kind == "field":
            width, value = args
            data[pos:pos + width] = value.to_bytes(width, "little")[:max(len(data) - pos, 0)]
        elif kind == "byte" and pos < len(data):
            data[pos] = args[0]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "delete":
            del data[pos:pos + args[0]]
        elif kind == "insert":
            data[pos:pos] = args[0]
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory):
    return tmp_path_factory.mktemp("mutants") / "mutant.gguf"


def test_mutated_files_raise_only_nibble_errors(seed, fuzz_path):
    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(ops=mutations(seed))
    def check(ops):
        replace(fuzz_path, apply(seed[1], ops))
        load_everything(fuzz_path)

    check()


def test_truncated_files_raise_only_nibble_errors(seed, fuzz_path):
    path, content, fields, header_end = seed
    cuts = sorted({*range(0, 64), *range(64, header_end + 64, 7), *range(header_end, len(content), 997),
                   len(content) - 1})
    for cut in cuts:
        replace(fuzz_path, content[:cut])
        load_everything(fuzz_path)


# ---- session files ----

@pytest.fixture(scope="module")
def tiny_session(seed, tmp_path_factory):
    """The tiny model (n_ctx 64), and a session saved from it: (model, file content, its members)."""
    model = nibble.load(str(seed[0]), n_ctx=64)
    session = Session(model, "Be brief.", temperature=0, max_tokens=3)
    session.send("Hi there").completion()
    path = session.save(tmp_path_factory.mktemp("session") / "seed.npz")
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    return model, path.read_bytes(), members


def zip_fields(content: bytes) -> list[tuple[int, int]]:
    """(position, width) of the integers of a zip's structure and of each .npy member's header length:
    found by walking the records from the end record, independently of zipfile."""
    eocd = content.rindex(b"PK\x05\x06")
    fields = [(eocd + 8, 2), (eocd + 10, 2), (eocd + 12, 4), (eocd + 16, 4), (eocd + 20, 2)]
    count, cd = struct.unpack_from("<H", content, eocd + 10)[0], struct.unpack_from("<I", content, eocd + 16)[0]
    for _ in range(count):
        fields += [(cd + off, w) for off, w in ((8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2),
                                                 (32, 2), (42, 4))]
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", content, cd + 28)
        local = struct.unpack_from("<I", content, cd + 42)[0]
        fields += [(local + off, w) for off, w in ((6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2))]
        local_name, local_extra = struct.unpack_from("<HH", content, local + 26)
        data = local + 30 + local_name + local_extra
        fields += [(data + 6, 1), (data + 7, 1), (data + 8, 2)]   # .npy version and header length
        cd += 46 + name_len + extra_len + comment_len
    return fields


def npy_bytes(header: dict, data: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


SIZES = [0, 1, 2, 3, 64, 65, 2**31, 2**40, 10**12]
DTYPES = ["<f4", ">f4", "<f8", "<f2", "<c8", "<i8", "<i4", "|u1", "|i1", "|b1", "<U4", "|S4", "|O", "|V4"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4), max_leaves=12)


@st.composite
def session_files(draw, tiny_session) -> bytes:
    """A mutant of the saved session: its bytes edited, or the zip rebuilt with a member replaced."""
    model, content, members = tiny_session
    kind = draw(st.sampled_from(["bytes", "bytes", "member", "meta", "meta"]))
    if kind == "bytes":
        data, fields = bytearray(content), zip_fields(content)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["field", "field", "byte", "truncate", "insert"]))
            if op == "field":
                pos, width = draw(st.sampled_from(fields))
                value = draw(st.one_of(st.sampled_from(SIZES), st.integers(0, 2**(8 * width) - 1)))
                data[pos:pos + width] = (value % 2**(8 * width)).to_bytes(width, "little")[:len(data) - pos]
            elif op == "byte" and data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
            elif op == "truncate":
                del data[draw(st.integers(0, len(data))):]
            else:
                pos = draw(st.integers(0, len(data)))
                data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        return bytes(data)
    members = dict(members)
    if kind == "member":
        name = draw(st.sampled_from(sorted(members) + ["extra.npy"]))
        if draw(st.booleans()) and name in members:
            del members[name]
        else:
            shape = tuple(draw(st.lists(st.sampled_from(SIZES), max_size=5)))
            header = {"descr": draw(st.sampled_from(DTYPES)), "fortran_order": draw(st.booleans()),
                      "shape": shape}
            members[name] = npy_bytes(header, draw(st.binary(max_size=256)))
    else:
        meta = json.loads(np.lib.format.read_array(io.BytesIO(members["meta.npy"])).tobytes())
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(sorted(meta) + ["model.fingerprint", "messages.0", "tokens.0"]))
            value = draw(st.one_of(JSON, st.sampled_from([None, -1, 2**63, "", "\ud800", "user<|im_end|>"])))
            if "." in key:
                outer, inner = key.split(".")
                container = meta.get(outer)
                if isinstance(container, dict) or (isinstance(container, list) and container):
                    container[inner if isinstance(container, dict) else 0] = value
            else:
                meta[key] = value
        text = json.dumps(meta, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
        members["meta.npy"] = npy_bytes({"descr": "|u1", "fortran_order": False, "shape": (len(text),)}, text)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mutant_path(tiny_session, tmp_path_factory):
    model = tiny_session[0]
    model.reset()
    model.eval([5, 6, 7])
    return tmp_path_factory.mktemp("session-mutants") / "mutant.npz"


@settings(max_examples=examples(300), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_session_files_raise_only_nibble_errors(tiny_session, mutant_path, data):
    model = tiny_session[0]
    mutant_path.write_bytes(data.draw(session_files(tiny_session), label="file"))
    try:
        Session.load(model, mutant_path)
    except NibbleError as e:
        event(type(e).__name__)
        assert model.cached_tokens() == [5, 6, 7]   # a refused file leaves the cache alone
    else:
        event("loaded")
        model.reset()
        model.eval([5, 6, 7])


# ---- chat templates ----

SMALL = ["0", "1", "2", "-1", "2.5", "'x'", "'ab'", "''", "'%s'", "'{}'", "'\\t'", "'\\n'", "'a b'", "none", "true",
         "[1, 2]", "['a', 'b']", "{'a': 1}", "(1, 2)", "messages", "messages[0]", "messages[0].content", "ns.x",
         "range(3)", "loop", "i"]
LARGE = ["100000", "262143", "4000000", "10**9", "2**8000", "'x' * 1000000", "'%99999999s'", "'{:>99999999}'",
         "range(100000)", "'\\n' * 1000000", "'9' * 4000"]
FILTERS = ["upper", "lower", "trim", "list", "string", "length", "join", "join('x' * 100000)", "replace('a', 'bb')",
           "replace('', 'xyz')", "indent(100000)", "center(262143)", "tojson", "tojson(indent=100000)",
           "format('x' * 100000)", "wordwrap(1)", "batch(3, 'x')", "slice(100000)", "sum", "unique", "sort",
           "reverse", "first", "last", "default('d')", "urlize", "pprint", "title", "e", "map('string')",
           "selectattr('role')", "items", "dictsort", "int", "float", "abs", "round(2)", "truncate(5)",
           "wordcount", "striptags", "urlencode", "xmlattr", "filesizeformat", "random", "min", "max", "count"]
METHODS = ["upper()", "replace('a', 'x' * 1000)", "join(['a', 'b'] * 1000)", "format('x' * 100000)",
           "format_map({'a': 1})", "center(262143)", "ljust(262143)", "zfill(99)", "expandtabs(100000)",
           "split()", "splitlines()", "strip()", "startswith('a')", "count('a')", "encode()",
           "translate({97: 'bb'})", "items()", "keys()", "get('a')", "index(1)"]
OPERATORS = ["+", "-", "*", "/", "//", "%", "**", "~", "==", "<", "and", "or", "in"]


def expressions():
    atoms = st.sampled_from(SMALL) | st.sampled_from(LARGE)

    def extend(inner):
        return st.one_of(
            st.tuples(inner, st.sampled_from(OPERATORS), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(inner, st.sampled_from(FILTERS)).map(lambda t: f"({t[0]}|{t[1]})"),
            st.tuples(inner, st.sampled_from(METHODS)).map(lambda t: f"({t[0]}).{t[1]}"),
            st.lists(inner, min_size=1, max_size=3).map(lambda xs: f"[{', '.join(xs)}]"),
            st.tuples(inner, inner).map(lambda t: f"{{'k': {t[0]}, 'l': {t[1]}}}"),
            st.tuples(inner, inner).map(lambda t: f"{t[0]}[{t[1]}]"),
            st.tuples(inner, inner, inner).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
            st.tuples(st.sampled_from([1, 1, 1, 2, 30, 200]), inner).map(lambda t: "(" * t[0] + t[1] + ")" * t[0]),
        )
    return st.recursive(atoms, extend, max_leaves=8)


def statements():
    expr = expressions()

    def extend(body):
        body = st.lists(body, min_size=1, max_size=3).map("".join)
        return st.one_of(
            st.tuples(expr, body).map(lambda t: f"{{% for i in range({t[0]}) %}}{t[1]}{{% endfor %}}"),
            st.tuples(expr, body).map(lambda t: f"{{% for i in {t[0]} %}}{t[1]}{{% endfor %}}"),
            st.tuples(expr, body).map(lambda t: f"{{% if {t[0]} %}}{t[1]}{{% else %}}x{{% endif %}}"),
            body.map(lambda b: f"{{% macro m(a) %}}{b}{{{{ m(a) }}}}{{% endmacro %}}{{{{ m(1) }}}}"),
            body.map(lambda b: f"{{% set v %}}{b}{{% endset %}}{{{{ v }}}}"),
            body.map(lambda b: f"{{% filter upper %}}{b}{{% endfilter %}}"),
            st.tuples(st.sampled_from([1, 2, 10, 60]), body).map(lambda t: "{% if true %}" * t[0] + t[1]
                                                                 + "{% endif %}" * t[0]),
        )
    leaf = st.one_of(expr.map(lambda e: f"{{{{ {e} }}}}"), expr.map(lambda e: f"{{% set ns.x = {e} %}}"),
                     st.sampled_from(["text", "{{ ns.x }}", "{% break %}", "{{ raise_exception('no') }}"]))
    return st.recursive(leaf, extend, max_leaves=6)


TEMPLATE_BUDGET_S = 0.5
BUDGETS = ["nests", "tokens", "longer than", "larger than the budget", "more than the budget's", "bits",
           "wrote more than", "nested more than", "recursed", "output passed"]   # for the statistics


@settings(max_examples=examples(50), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=st.lists(statements(), min_size=1, max_size=4).map("".join))
def test_hostile_templates_end_within_their_budgets(body):
    source = "{% set ns = namespace(x=[1]) %}" + body
    tracemalloc.start()
    start = time.process_time()   # CPU time: a fuzzer run under `nice` may wait for the CPU for seconds
    try:
        ChatTemplate(source, time_budget_s=TEMPLATE_BUDGET_S).render(
            [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}])
        event("rendered")
    except TemplateError as e:
        event(next((f"refused: {b}" for b in BUDGETS if b in str(e)), "TemplateError"))
    finally:
        spent = time.process_time() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 200 << 20, f"{peak / 2**20:.0f} MiB"
    assert spent < 10 * TEMPLATE_BUDGET_S, f"{spent:.1f} s of CPU"
