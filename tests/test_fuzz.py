"""Whatever the bytes, `nibble.load(path)` returns a model or raises a NibbleError.

The seed is a tiny but complete llama model written with gguf.GGUFWriter (2 blocks, embedding 64, 4 heads,
2 KV heads, a 300-token GPT-2 byte-level vocabulary with merges); hypothesis mutates and truncates it, aiming
most mutations at the integer fields of the header (lengths, counts, types, dims, offsets), which a walker
here finds independently of the reader. Every mutated file is loaded in full and with vocab_only=True.

NIBBLE_FUZZ_EXAMPLES sets the number of examples (default 1000, about 6 s); for a long run:
    NIBBLE_FUZZ_EXAMPLES=100000 nice -n 19 python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nibble
from nibble.errors import NibbleError
from nibble.formats.metadata import check_tokenizer_metadata

EXAMPLES = int(os.environ.get("NIBBLE_FUZZ_EXAMPLES", "1000"))

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
