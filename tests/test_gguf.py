"""The GGUF reader and the typed metadata accessors.

Malformed files are built byte by byte with a small writer of our own (struct.pack), one test per class of
defect, after llama.cpp's tests/test-gguf.cpp (HANDCRAFTED_*); each must raise GGUFError naming the file and
the field. Well-formed files come from gguf.GGUFWriter and from the three real models, and must read back
exactly.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import tracemalloc

import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

import nibble
from nibble.errors import GGUFError, ModelFormatError, ModelNotFoundError
from nibble.formats import metadata as md
from nibble.formats.gguf import ARRAY, BOOL, FLOAT32, STRING, UINT8, UINT32, GGUFFile

Q = GGMLQuantizationType
V = GGUFValueType
MODEL_NAMES = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]


# ---- a byte-level writer that can corrupt any field ----

def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def string(s: str | bytes, length: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b) if length is None else length) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return string(key) + u32(vtype) + payload


def array(itype: int, count: int, payload: bytes = b"") -> bytes:
    return u32(itype) + u64(count) + payload


def tensor_info(name: str | bytes, dims, qtype: int, offset: int, n_dims: int | None = None) -> bytes:
    """`dims` in ggml order (row length first)."""
    return (string(name) + u32(len(dims) if n_dims is None else n_dims) + b"".join(u64(d) for d in dims)
            + u32(qtype) + u64(offset))


def gguf_bytes(kvs=(), infos=(), data=b"", *, magic=b"GGUF", version=3, n_tensors=None, n_kv=None,
               alignment=32) -> bytes:
    out = (magic + u32(version) + u64(len(infos) if n_tensors is None else n_tensors)
           + u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos))
    return out + b"\0" * (-len(out) % alignment) + data


def nbytes_of(dims, qtype) -> int:
    block, size = GGML_QUANT_SIZES[Q(qtype)]
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def packed(tensors, alignment=32):
    """[(name, dims, qtype)] -> (tensor infos at consecutive padded offsets, their data section)."""
    infos, data = [], b""
    for name, dims, qtype in tensors:
        infos.append(tensor_info(name, dims, qtype, len(data)))
        data += bytes(i % 251 for i in range(nbytes_of(dims, qtype)))
        data += b"\0" * (-len(data) % alignment)
    return infos, data


@pytest.fixture
def write(tmp_path):
    def write(content: bytes, name: str = "model.gguf"):
        path = tmp_path / name
        path.write_bytes(content)
        return path
    return write


def fails(path, *fragments, error=GGUFError) -> str:
    with pytest.raises(error) as info:
        GGUFFile(path)
    msg = str(info.value)
    assert msg.startswith(f"{path.name}: ") or msg.startswith(f"{path}: "), msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ---- header ----

def test_empty_file(write):
    fails(write(b""), "empty")


def test_bad_magic(write):
    fails(write(gguf_bytes(magic=b"FUGG")), "not a GGUF file", "FUGG")


@pytest.mark.parametrize("version, fragment", [(0, "unsupported GGUF version 0"),
                                               (1, "version 1 is obsolete"),
                                               (4, "unsupported GGUF version 4"),
                                               (0xFFFFFFFF, "unsupported GGUF version 4294967295")])
def test_bad_version(write, version, fragment):
    fails(write(gguf_bytes(version=version)), fragment)


def test_byte_swapped_file(write):
    # What a big-endian v3 writer produces: every integer big-endian.
    big_endian = b"GGUF" + struct.pack(">I", 3) + struct.pack(">Q", 0) + struct.pack(">Q", 1)
    fails(write(big_endian + b"\0" * 32), "byte-swapped", "big-endian")


def test_truncated_header(write):
    fails(write(b"GGUF" + u32(3) + b"\0" * 5), "tensor count", "(at byte offset 8)")
    fails(write(b"GGUF" + u32(3) + u64(0) + b"\0" * 7), "metadata count", "(at byte offset 16)")


def test_bad_tensor_count(write):
    fails(write(gguf_bytes(n_tensors=2**64 - 1)), "tensor count", "18446744073709551615 tensors cannot fit")


def test_bad_kv_count(write):
    fails(write(gguf_bytes(n_kv=2**64 - 1)), "metadata count", "cannot fit")


def test_kv_count_beyond_the_pairs_present(write):
    fails(write(gguf_bytes([kv("a", STRING, string("x" * 40))], n_kv=2, alignment=1)), "metadata key #1",
          "needs 8 bytes")


def test_minimal_files_are_valid(write):
    for version in (2, 3):
        g = GGUFFile(write(gguf_bytes(version=version)))
        assert (g.version, g.fields, g.tensors, g.alignment) == (version, {}, {}, 32)


# ---- key-value pairs ----

def test_bad_key_size(write):
    fails(write(gguf_bytes([string("k", length=2**64 - 1) + u32(UINT32) + u32(1)])),
          "metadata key #0", "string length 18446744073709551615 exceeds")


def test_empty_key(write):
    fails(write(gguf_bytes([kv("", UINT32, u32(1))])), "metadata key #0: empty key", "(at byte offset 24)")


def test_key_not_utf8(write):
    fails(write(gguf_bytes([kv(b"general.\xff", UINT32, u32(1))])), "metadata key #0", "not valid UTF-8")


def test_bad_value_type(write):
    fails(write(gguf_bytes([kv("a", UINT32, u32(1)), kv("b", 13, u32(1))])), "metadata 'b'",
          "unknown value type 13")


def test_bad_array_element_type(write):
    fails(write(gguf_bytes([kv("arr", ARRAY, array(13, 1, b"\0" * 8))])), "metadata 'arr'",
          "unknown array element type 13")


def test_duplicate_key(write):
    fails(write(gguf_bytes([kv("a", UINT32, u32(1)), kv("b", UINT32, u32(2)), kv("a", UINT32, u32(3))])),
          "metadata 'a'", "duplicate key")


def test_value_truncated(write):
    fails(write(b"GGUF" + u32(3) + u64(0) + u64(1) + kv("a", 10, b"\0" * 3)), "metadata 'a'", "needs 8 bytes")


def test_string_value_not_utf8(write):
    fails(write(gguf_bytes([kv("name", STRING, string(b"caf\xc3"))])), "metadata 'name'", "not valid UTF-8")


def test_string_value_longer_than_the_file(write):
    fails(write(gguf_bytes([kv("name", STRING, string(b"abc", length=1000))])), "metadata 'name'",
          "string length 1000 exceeds")


def test_string_array_element_not_utf8(write):
    fails(write(gguf_bytes([kv("toks", ARRAY, array(STRING, 2, string("ok") + string(b"\xfe")))])),
          "metadata 'toks'[1]", "not valid UTF-8")


def test_string_array_element_longer_than_the_file(write):
    fails(write(gguf_bytes([kv("toks", ARRAY, array(STRING, 2, string("ok") + string(b"x", length=2**40)))])),
          "metadata 'toks'[1]", "string length 1099511627776 exceeds")


def test_string_array_ends_with_the_file(write):
    fails(write(gguf_bytes([kv("toks", ARRAY, array(STRING, 3, string("ab") + string("cd") + b"\xff" * 7))],
                           alignment=1)), "metadata 'toks'[2]", "needs 8 bytes but the file ends")


def test_array_count_times_size_beyond_the_file(write):
    fails(write(gguf_bytes([kv("arr", ARRAY, array(UINT32, 2**62 + 1, u32(7)))])), "metadata 'arr'",
          f"array of {2**62 + 1} UINT32 needs {(2**62 + 1) * 4} bytes")


def test_string_array_count_beyond_the_file(write):
    fails(write(gguf_bytes([kv("toks", ARRAY, array(STRING, 10**6, string("a")))])), "metadata 'toks'",
          "array of 1000000 strings cannot fit")


def test_nested_array_count_beyond_the_file(write):
    fails(write(gguf_bytes([kv("nest", ARRAY, array(ARRAY, 2**63, array(UINT8, 0)))])), "metadata 'nest'",
          "arrays cannot fit")


def test_arrays_nested_too_deep(write):
    deep = array(UINT8, 1, b"\x05")
    for _ in range(4):
        deep = array(ARRAY, 1, deep)  # 5 levels
    fails(write(gguf_bytes([kv("deep", ARRAY, deep)])), "metadata 'deep'[0][0][0][0]", "nested deeper than 4")
    ok = array(UINT8, 1, b"\x05")
    for _ in range(3):
        ok = array(ARRAY, 1, ok)
    assert GGUFFile(write(gguf_bytes([kv("deep", ARRAY, ok)]))).metadata["deep"][0][0][0].tolist() == [5]


def test_bool_not_0_or_1(write):
    fails(write(gguf_bytes([kv("flag", BOOL, b"\x02")])), "metadata 'flag'", "BOOL value 2")
    fails(write(gguf_bytes([kv("flags", ARRAY, array(BOOL, 3, b"\x01\x00\x07"))])), "metadata 'flags'[2]",
          "BOOL value 7")


@pytest.mark.parametrize("vtype, value, fragment", [
    (UINT32, u32(13), "13 is not a power of two"),
    (UINT32, u32(0), "0 is not a power of two"),
    (5, u32(32), "has type INT32, must be UINT32"),  # llama.cpp's KV_WRONG_TYPE_ALIGN
    (10, u64(32), "has type UINT64, must be UINT32"),
])
def test_bad_alignment(write, vtype, value, fragment):
    fails(write(gguf_bytes([kv("general.alignment", vtype, value)])), "metadata 'general.alignment'", fragment)


# ---- tensor infos ----

def test_tensor_name_too_long(write):
    name = "t" * 64
    infos, data = packed([(name, [32], Q.F32)])
    fails(write(gguf_bytes(infos=infos, data=data)), "name is 64 bytes long")
    infos, data = packed([("t" * 63, [32], Q.F32)])
    assert list(GGUFFile(write(gguf_bytes(infos=infos, data=data))).tensors) == ["t" * 63]


def test_tensor_name_not_utf8(write):
    fails(write(gguf_bytes(infos=[tensor_info(b"\xc0\x80", [4], Q.F32, 0)], data=b"\0" * 32)), "tensor #0 name",
          "not valid UTF-8")


def test_duplicate_tensor_name(write):
    infos, data = packed([("a", [32], Q.F32), ("b", [32], Q.F32), ("a", [32], Q.F32)])
    fails(write(gguf_bytes(infos=infos, data=data)), "tensor 'a'", "duplicate tensor name")


def test_too_many_dims(write):
    fails(write(gguf_bytes(infos=[tensor_info("w", [1, 1, 1, 1, 1], Q.F32, 0)], data=b"\0" * 32)),
          "tensor 'w'", "n_dims 5 exceeds the maximum of 4")


def test_negative_dimension(write):
    fails(write(gguf_bytes(infos=[tensor_info("w", [32, -1], Q.F32, 0)], data=b"\0" * 32)), "tensor 'w'",
          "negative dimension in [32, -1]")


def test_element_count_overflows(write):
    big = 4 * (2**31 - 1)  # llama.cpp's TENSORS_NE_TOO_BIG
    fails(write(gguf_bytes(infos=[tensor_info("w", [big, big], Q.F32, 0)], data=b"\0" * 32)), "tensor 'w'",
          "overflow a 64-bit element count")
    # a zero dimension does not hide an overflowing product of the others
    fails(write(gguf_bytes(infos=[tensor_info("w", [big, big, 0], Q.F32, 0)], data=b"\0" * 32)), "overflow")


def test_byte_count_larger_than_the_file(write):
    # llama.cpp's TENSORS_NBYTES_TOO_BIG: the element count fits an int64, the bytes (8 per I64) do not.
    fails(write(gguf_bytes(infos=[tensor_info("w", [2**31, 2**31], Q.I64, 0)], data=b"\0" * 32)),
          "tensor 'w'", "offset 0 holds 36893488147419103232 bytes from file offset", "past the end of the file")


@pytest.mark.parametrize("qtype", [4, 5, 31, 36, 42, 2**31, 2**32 - 1])
def test_type_id_ggml_does_not_define(write, qtype):
    # 4, 5 (Q4_2, Q4_3), 31 (Q4_0_4_4) and 36 (IQ4_NL_4_4) were removed from ggml; 42 is past the last.
    fails(write(gguf_bytes(infos=[tensor_info("w", [32], qtype, 0)], data=b"\0" * 256)), "tensor 'w'",
          f"type id {qtype} is not a GGML type")


@pytest.mark.parametrize("dims, qtype, fragment", [([33, 2], Q.Q4_0, "row length 33 is not a multiple of the Q4_0 "
                                                                     "block size 32"),
                                                   ([128], Q.Q4_K, "row length 128"),
                                                   ([], Q.Q8_0, "row length 1")])
def test_row_length_not_a_multiple_of_the_block(write, dims, qtype, fragment):
    fails(write(gguf_bytes(infos=[tensor_info("w", dims, qtype, 0)], data=b"\0" * 512)), "tensor 'w'", fragment)


@pytest.mark.parametrize("offset", [16, 1, 2**64 - 1])  # 2**64 - 1: llama.cpp's TENSORS_BAD_OFFSET
def test_offset_not_aligned(write, offset):
    fails(write(gguf_bytes(infos=[tensor_info("w", [8], Q.F32, offset)], data=b"\0" * 64)), "tensor 'w'",
          f"offset {offset} is not a multiple of the alignment 32")


def test_offset_not_aligned_to_a_custom_alignment(write):
    infos = [tensor_info("a", [8], Q.F32, 0), tensor_info("b", [8], Q.F32, 32)]
    fails(write(gguf_bytes([kv("general.alignment", UINT32, u32(64))], infos, b"\0" * 128, alignment=64)),
          "tensor 'b'", "offset 32 is not a multiple of the alignment 64")


def test_offset_leaves_a_gap(write):
    infos = [tensor_info("a", [8], Q.F32, 0), tensor_info("b", [8], Q.F32, 64)]
    fails(write(gguf_bytes(infos=infos, data=b"\0" * 128)), "tensor 'b'",
          "data at offset 64 is not where the previous tensor ends (32, padded)")


def test_offset_overlaps_the_previous_tensor(write):
    infos = [tensor_info("a", [16], Q.F32, 0), tensor_info("b", [8], Q.F32, 32)]
    fails(write(gguf_bytes(infos=infos, data=b"\0" * 128)), "tensor 'b'",
          "data at offset 32 overlaps the previous tensor, which ends at 64")


def test_offset_past_the_end_of_the_file(write):
    infos, data = packed([("blk.0.attn_q.weight", [32, 4], Q.Q8_0), ("blk.3.attn_q.weight", [32, 4], Q.Q8_0)])
    path = write(gguf_bytes(infos=infos, data=data[:160]))
    msg = fails(path, "tensor 'blk.3.attn_q.weight': offset 160 is past the end of the file")
    assert f"({path.stat().st_size} bytes)" in msg


def test_data_section_one_byte_short(write):
    # llama.cpp's DATA_NOT_ENOUGH_DATA
    infos, data = packed([("a", [32, 3], Q.Q8_0), ("b", [64], Q.F32)])
    fails(write(gguf_bytes(infos=infos, data=data[:-1 - (len(data) - 128 - 256)])), "tensor 'b'",
          "offset 128 holds 256 bytes", "past the end of the file")


def test_huge_tensors_with_little_data(write):
    # llama.cpp's DATA_MEM_SIZE_OVERFLOW: two tensors whose sizes overflow a 64-bit sum.
    n = 0x7FFFFFFFFFFFFFC0
    infos = [tensor_info("a", [n], Q.I8, 0), tensor_info("b", [n], Q.I8, n)]
    fails(write(gguf_bytes(infos=infos, data=bytes(range(32)))), "tensor 'a'", "past the end of the file")


def test_tensor_infos_truncated(write):
    content = gguf_bytes(infos=[tensor_info("w", [32, 32], Q.F32, 0)])
    content = content[:24] + tensor_info("w", [32, 32], Q.F32, 0)[:-5]
    fails(write(content), "tensor 'w' offset", "needs 8 bytes")


def test_tensor_count_beyond_the_infos_present(write):
    infos, data = packed([("a", [32], Q.F32)])
    fails(write(gguf_bytes([kv("x", STRING, string("y" * 100))], infos, n_tensors=5)), "tensor count")


# ---- what is legal ----

def test_zero_element_tensor_is_legal(write):
    # llama.cpp's TENSORS_ZERO_DIM: a zero-element tensor takes no bytes; the next one starts at the same offset.
    infos, data = packed([("empty", [32, 0], Q.Q8_0), ("after", [8], Q.F32), ("also_empty", [0, 4], Q.F32)])
    g = GGUFFile(write(gguf_bytes(infos=infos, data=data)))
    e = g.tensors["empty"]
    assert (e.shape, e.nbytes, e.n_elements, e.data.size) == ((0, 32), 0, 0, 0)
    assert g.tensors["after"].offset == g.data_start and g.tensors["after"].nbytes == 32
    assert g.tensors["also_empty"].shape == (4, 0)


def test_scalar_tensor(write):
    infos, data = packed([("scale", [], Q.F32)])
    t = GGUFFile(write(gguf_bytes(infos=infos, data=struct.pack("<f", 2.5) + data[4:]))).tensors["scale"]
    assert (t.shape, t.n_elements, t.nbytes) == ((), 1, 4)
    assert t.data.view(np.float32)[0] == 2.5


@pytest.mark.parametrize("alignment", [1, 8, 64, 4096])
def test_custom_alignment(write, alignment):
    # llama.cpp's TENSORS_CUSTOM_ALIGN / DATA_CUSTOM_ALIGN
    specs = [("a", [32], Q.Q8_0), ("b", [3], Q.F32), ("c", [256, 2], Q.Q4_K)]
    infos, data = packed(specs, alignment)
    g = GGUFFile(write(gguf_bytes([kv("general.alignment", UINT32, u32(alignment))], infos, data,
                                  alignment=alignment)))
    assert g.alignment == alignment and g.data_start % alignment == 0
    for name, dims, qtype in specs:
        t = g.tensors[name]
        assert t.offset % alignment == 0 and t.nbytes == nbytes_of(dims, qtype)
        assert t.data.tobytes() == bytes(i % 251 for i in range(t.nbytes))


def test_types_ggml_defines_but_nibble_does_not_run_are_read(write):
    specs = [(q.name, [GGML_QUANT_SIZES[q][0] * 2], q) for q in (Q.IQ2_XXS, Q.TQ1_0, Q.MXFP4, Q.IQ4_NL, Q.BF16)]
    infos, data = packed(specs)
    g = GGUFFile(write(gguf_bytes(infos=infos, data=data)))
    assert [(t.type_name, t.qtype) for t in g.tensors.values()] == [(q.name, int(q)) for _, _, q in specs]


def test_tensor_data_is_a_read_only_view_of_the_file(write):
    infos, data = packed([("w", [64, 2], Q.F32)])
    g = GGUFFile(write(gguf_bytes(infos=infos, data=data)))
    t = g.tensors["w"]
    assert not t.data.flags.writeable and not t.data.flags.owndata
    assert t.data.base is not None and t.offset == g.data_start


# ---- files that are not files ----

def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelNotFoundError):
        GGUFFile(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError, match="directory"):
        GGUFFile(tmp_path)


def test_fifo_is_rejected_without_blocking(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    errors = []

    def load():
        try:
            nibble.load(fifo)
        except GGUFError as e:
            errors.append(e)
    # a blocking open of a FIFO with no writer never returns: the thread is a guard against a hung test run,
    # its generous timeout is no speed requirement
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "opening a FIFO blocked"
    assert len(errors) == 1 and "not a regular file" in str(errors[0])


# ---- memory: claims of 2^60 elements fail before anything is allocated ----

@pytest.mark.parametrize("claim, fragment", [
    (kv("s", STRING, string(b"abc", length=2**60)), "string length 1152921504606846976"),
    (kv("a", ARRAY, array(FLOAT32, 2**60, b"\0" * 64)), "array of 1152921504606846976 FLOAT32"),
    (kv("a", ARRAY, array(STRING, 2**60, string("x"))), "array of 1152921504606846976 strings"),
    (kv("a", ARRAY, array(ARRAY, 2**60, array(UINT32, 0))), "array of 1152921504606846976 arrays"),
    (kv("a", ARRAY, array(ARRAY, 1, array(UINT32, 2**60))), "array of 1152921504606846976 UINT32"),
])
def test_huge_claims_fail_fast_without_allocating(write, claim, fragment):
    path = write(gguf_bytes([claim]) + b"\0" * 4096)
    tracemalloc.start()
    try:
        msg = fails(path, fragment)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated for: {msg}"


def test_opening_reads_no_tensor_data(tmp_path):
    # A 2 GiB tensor in a sparse file: if the reader touched the data, the resident memory shows it.
    infos = [tensor_info("big", [2**16, 2**13], Q.F32, 0)]
    header = gguf_bytes(infos=infos)
    path = tmp_path / "big.gguf"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + 2**31)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = rss()
    g = GGUFFile(path)
    assert g.tensors["big"].nbytes == 2**31 and g.tensors["big"].shape == (2**13, 2**16)
    assert rss() - before < 32 << 20


# ---- round trip through gguf.GGUFWriter ----

SCALARS = [
    (V.UINT8, 255), (V.INT8, -128), (V.UINT16, 65535), (V.INT16, -32768), (V.UINT32, 2**32 - 1),
    (V.INT32, -2**31), (V.FLOAT32, 0.1), (V.BOOL, True), (V.BOOL, False), (V.STRING, "héllo ▁wörld 🦙"),
    (V.STRING, ""), (V.UINT64, 2**64 - 1), (V.INT64, -2**63), (V.FLOAT64, 1e-300), (V.FLOAT32, float("inf")),
]
ARRAYS = [
    (V.UINT8, [0, 255]), (V.INT8, [-1, 1]), (V.UINT16, [1, 2, 3]), (V.INT16, [-5]), (V.UINT32, [2**32 - 1]),
    (V.INT32, [-7, 7]), (V.FLOAT32, [0.5, -2.0]), (V.BOOL, [True, False, True]), (V.STRING, ["a", "", "ü ü"]),
    (V.UINT64, [2**64 - 1, 0]), (V.INT64, [-2**63]), (V.FLOAT64, [1.5, float("nan")]),
]
NUMPY = {V.UINT8: np.uint8, V.INT8: np.int8, V.UINT16: np.uint16, V.INT16: np.int16, V.UINT32: np.uint32,
         V.INT32: np.int32, V.FLOAT32: np.float32, V.BOOL: np.bool_, V.UINT64: np.uint64, V.INT64: np.int64,
         V.FLOAT64: np.float64}


def test_round_trip_of_everything_gguf_writer_writes(tmp_path):
    path = tmp_path / "rt.gguf"
    w = GGUFWriter(path, "llama")
    for i, (vtype, value) in enumerate(SCALARS):
        w.add_key_value(f"scalar.{i}", value, vtype)
    for i, (itype, values) in enumerate(ARRAYS):
        w.add_key_value(f"array.{i}", values, V.ARRAY, sub_type=itype)
    w.add_array("nested.ints", [[1, 2], [3], [4, 5, 6]])
    w.add_array("nested.strings", [["a", "b"], ["c"]])
    w.add_array("nested.deep", [[[1.5], [2.5, 3.5]], [[4.5]]])
    w.add_array("nested.mixed", [["x"], [1, 2]])
    rng = np.random.default_rng(0)
    tensors = {}
    for q in sorted(GGML_QUANT_SIZES, key=int):  # every type size the file format knows
        block, size = GGML_QUANT_SIZES[q]
        raw = rng.integers(0, 256, size=(3, 2 * size), dtype=np.uint8)  # 3 rows of 2 blocks
        tensors[f"t.{q.name}"] = (raw, q, (3, 2 * block))
        w.add_tensor(f"t.{q.name}", raw, raw_dtype=q)
    f32 = rng.standard_normal((2, 3, 5)).astype(np.float32)
    w.add_tensor("t.f32_3d", f32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    g = GGUFFile(path)
    assert g.version == 3 and g.metadata["general.architecture"] == "llama"
    for i, (vtype, value) in enumerate(SCALARS):
        f = g.fields[f"scalar.{i}"]
        assert f.type == vtype and f.item_type is None
        expected = float(np.float32(value)) if vtype == V.FLOAT32 else value
        assert f.value == expected and type(f.value) is type(expected)
    for i, (itype, values) in enumerate(ARRAYS):
        f = g.fields[f"array.{i}"]
        assert (f.type, f.item_type) == (V.ARRAY, itype)
        if itype == V.STRING:
            assert f.value == values
        else:
            assert f.value.dtype == NUMPY[itype]
            np.testing.assert_array_equal(f.value, np.array(values, dtype=NUMPY[itype]))
    assert [a.tolist() for a in g.metadata["nested.ints"]] == [[1, 2], [3], [4, 5, 6]]
    assert g.metadata["nested.strings"] == [["a", "b"], ["c"]]
    assert [[a.tolist() for a in inner] for inner in g.metadata["nested.deep"]] == [[[1.5], [2.5, 3.5]], [[4.5]]]
    nested = g.fields["nested.mixed"]
    assert (nested.type, nested.item_type) == (V.ARRAY, V.ARRAY)
    assert [(x.item_type, x.plain() if x.item_type == V.STRING else x.plain().tolist()) for x in nested.value] \
        == [(V.STRING, ["x"]), (V.INT32, [1, 2])]
    assert g.fields["nested.deep"].value[0].value[1].item_type == V.FLOAT32

    assert list(g.tensors) == [*tensors, "t.f32_3d"]
    for name, (raw, q, shape) in tensors.items():
        t = g.tensors[name]
        assert (t.qtype, t.shape, t.nbytes, t.type_name) == (int(q), shape, raw.nbytes, q.name)
        assert t.offset % 32 == 0
        np.testing.assert_array_equal(t.data, raw.reshape(-1))
    t = g.tensors["t.f32_3d"]
    assert t.shape == (2, 3, 5) and t.n_elements == 30
    np.testing.assert_array_equal(t.data.view(np.float32).reshape(t.shape), f32)


def test_round_trip_with_custom_alignment(tmp_path):
    path = tmp_path / "aligned.gguf"
    w = GGUFWriter(path, "llama")
    w.add_custom_alignment(128)
    a = np.arange(5, dtype=np.float32)
    w.add_tensor("a", a)
    w.add_tensor("b", np.arange(7, dtype=np.int16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = GGUFFile(path)
    assert g.alignment == 128 and g.fields["general.alignment"].type == UINT32
    assert g.tensors["b"].offset - g.tensors["a"].offset == 128
    np.testing.assert_array_equal(g.tensors["b"].data.view(np.int16), np.arange(7))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_real_model_header_rewritten_by_gguf_writer_is_identical(pulled, tmp_path, name):
    """Read a real model, write its metadata and tensor infos back with GGUFWriter from what we read, and
    compare with the original header byte for byte: every type, value, shape and offset read exactly."""
    src = pulled(name)
    g = GGUFFile(src)
    out = tmp_path / "header.gguf"
    w = GGUFWriter(out, g.architecture)
    for key, f in g.fields.items():
        if key != "general.architecture":
            value = f.value.tolist() if isinstance(f.value, np.ndarray) else f.value
            w.add_key_value(key, value, GGUFValueType(f.type),
                            sub_type=None if f.item_type is None else GGUFValueType(f.item_type))
    for t in g.tensors.values():
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=Q(t.qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    written = out.read_bytes()
    with open(src, "rb") as f:
        original = f.read(len(written))
    assert list(g.fields)[0] == "general.architecture"
    assert written == original
    assert g.data_start == -(-len(written) // g.alignment) * g.alignment
    last = list(g.tensors.values())[-1]
    assert last.offset + last.nbytes <= g.file_size <= last.offset + last.nbytes + g.alignment


def test_opening_the_largest_real_model_is_fast(pulled):
    """Its header holds ~300k strings (tokens and merges); opening it must cost a few builtin calls per
    string and no Python function call per string (~0.2 s on 2 cores). Counted, not timed: a time would
    depend on the machine's load."""
    path = pulled("qwen2.5-coder-0.5b")
    calls = {"call": 0, "c_call": 0}

    def count(frame, event, arg):
        if event in calls:
            calls[event] += 1
    sys.setprofile(count)
    try:
        g = GGUFFile(path)
    finally:
        sys.setprofile(None)
    assert len(g.tensors) == 291 and len(g.metadata["tokenizer.ggml.tokens"]) == 151936
    strings = len(g.metadata["tokenizer.ggml.tokens"]) + len(g.metadata["tokenizer.ggml.merges"])
    assert calls["call"] < 10_000, calls                    # per tensor and per field, not per string
    assert calls["c_call"] < 4 * strings, calls             # length, decode, append: three per string


# ---- typed metadata accessors ----

@pytest.fixture
def typed(tmp_path):
    path = tmp_path / "model.gguf"
    w = GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_uint64("u64", 2**64 - 1)
    w.add_int8("i8", -3)
    w.add_float32("f32", 1e-5)
    w.add_float64("f64", 0.25)
    w.add_float32("nan", float("nan"))
    w.add_bool("flag", True)
    w.add_string("name", "tiny")
    w.add_key_value("ints", [1, 2, 3], V.ARRAY, sub_type=V.UINT16)
    w.add_key_value("big_u64s", [2**64 - 1], V.ARRAY, sub_type=V.UINT64)
    w.add_key_value("floats", [0.5, 1.5], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("words", ["a", "b"], V.ARRAY, sub_type=V.STRING)
    w.add_key_value("nested", [[1], [2]], V.ARRAY)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


def model_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ModelFormatError) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith("model.gguf: metadata '")
    return str(info.value)


def test_get_int(typed):
    assert md.get_int(typed, "llama.block_count") == 2 and md.get_int(typed, "i8") == -3
    assert md.get_int(typed, "u64") == 2**64 - 1
    assert md.get_int(typed, "absent", default=7) == 7 and md.get_int(typed, "absent", None) is None
    assert model_error(md.get_int, typed, "llama.feed_forward_length") == \
        "model.gguf: metadata 'llama.feed_forward_length' is missing"
    assert model_error(md.get_int, typed, "name") == "model.gguf: metadata 'name' has type STRING, expected an integer"
    assert "has type BOOL" in model_error(md.get_int, typed, "flag")
    assert "has type FLOAT32" in model_error(md.get_int, typed, "f32")
    assert "has type ARRAY of UINT16" in model_error(md.get_int, typed, "ints", default=1)  # present: no default
    assert "is 2, expected at least 3" in model_error(md.get_int, typed, "llama.block_count", min=3)
    assert "is -3, expected at most -4" in model_error(md.get_int, typed, "i8", max=-4)


def test_get_float(typed):
    assert md.get_float(typed, "f32") == float(np.float32(1e-5)) and md.get_float(typed, "f64") == 0.25
    assert md.get_float(typed, "llama.block_count") == 2.0 and type(md.get_float(typed, "i8")) is float
    assert md.get_float(typed, "absent", 1e6) == 1e6
    assert "has type BOOL, expected a number" in model_error(md.get_float, typed, "flag")
    assert "is nan, expected a finite number" in model_error(md.get_float, typed, "nan")
    assert np.isnan(md.get_float(typed, "nan", finite=False))
    assert "expected at least 1.0" in model_error(md.get_float, typed, "f64", min=1.0)


def test_get_str_and_bool(typed):
    assert md.get_str(typed, "name") == "tiny" and md.get_str(typed, "absent", "x") == "x"
    assert "has type UINT32, expected a string" in model_error(md.get_str, typed, "llama.block_count")
    assert md.get_bool(typed, "flag") is True and md.get_bool(typed, "absent", False) is False
    assert "has type INT8, expected a BOOL" in model_error(md.get_bool, typed, "i8")


def test_get_array(typed):
    ints = md.get_array(typed, "ints", "int")
    assert ints.dtype == np.int64 and ints.tolist() == [1, 2, 3]
    floats = md.get_array(typed, "floats", "float", length=2)
    assert floats.dtype == np.float64 and floats.tolist() == [0.5, 1.5]
    assert md.get_array(typed, "ints", "float").tolist() == [1.0, 2.0, 3.0]
    assert md.get_array(typed, "words", "str") == ["a", "b"]
    assert md.get_array(typed, "absent", "str", default=None) is None
    ints[0] = 99  # a copy: the file's metadata is unchanged
    assert typed.metadata["ints"].tolist() == [1, 2, 3]
    assert model_error(md.get_array, typed, "words", "str", length=49152) == \
        "model.gguf: metadata 'words' has 2 entries, expected 49152"
    assert "has type ARRAY of FLOAT32, expected an array of integers" in model_error(md.get_array, typed,
                                                                                      "floats", "int")
    assert "has type ARRAY of STRING, expected an array of numbers" in model_error(md.get_array, typed, "words",
                                                                                    "float")
    assert "has type STRING, expected an array of strings" in model_error(md.get_array, typed, "name", "str")
    assert "has type ARRAY of ARRAY" in model_error(md.get_array, typed, "nested", "int")
    assert "does not fit a 64-bit signed integer" in model_error(md.get_array, typed, "big_u64s", "int")
    assert "is missing" in model_error(md.get_array, typed, "absent", "int")


# ---- check_tokenizer_metadata ----

def test_tokenizer_metadata_of_the_real_models(pulled, model_name):
    g = GGUFFile(pulled(model_name))
    n_vocab = md.check_tokenizer_metadata(g)
    assert n_vocab == len(g.metadata["tokenizer.ggml.tokens"]) == g.tensors["token_embd.weight"].shape[0]


def tokenizer_file(tmp_path, **changes):
    """A tokenizer-only GGUF; `changes` maps key suffixes to (value, type[, sub_type]) or None to drop."""
    n = 10
    keys = {
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("default", V.STRING),
        "tokenizer.ggml.tokens": ([f"t{i}" for i in range(n)], V.ARRAY, V.STRING),
        "tokenizer.ggml.scores": ([0.0] * n, V.ARRAY, V.FLOAT32),
        "tokenizer.ggml.token_type": ([1] * (n - 1) + [3], V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (["t1 t2", "t t0"], V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (9, V.UINT32),
        "tokenizer.ggml.eos_token_id": (0, V.UINT32),
        "tokenizer.ggml.add_bos_token": (True, V.BOOL),
        "tokenizer.chat_template": ("{{ messages }}", V.STRING),
    }
    for key, change in changes.items():
        key = key.replace("__", ".")
        if change is None:
            keys.pop(key, None)
        else:
            keys[key] = change
    path = tmp_path / "model.gguf"
    w = GGUFWriter(path, "llama")
    for key, (value, vtype, *sub) in keys.items():
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


def test_check_tokenizer_metadata_accepts_a_complete_tokenizer(tmp_path):
    assert md.check_tokenizer_metadata(tokenizer_file(tmp_path)) == 10
    assert md.check_tokenizer_metadata(tokenizer_file(
        tmp_path, tokenizer__ggml__scores=None, tokenizer__ggml__merges=None, tokenizer__ggml__token_type=None,
        tokenizer__ggml__pre=None, tokenizer__chat_template=None)) == 10


T = "tokenizer__ggml__"


@pytest.mark.parametrize("changes, fragment", [
    ({T + "tokens": None}, "'tokenizer.ggml.tokens' is missing"),
    ({T + "model": None}, "'tokenizer.ggml.model' is missing"),
    ({T + "model": (3, V.UINT32)}, "'tokenizer.ggml.model' has type UINT32, expected a string"),
    ({T + "tokens": ("t0", V.STRING)}, "'tokenizer.ggml.tokens' has type STRING, expected an array of strings"),
    ({T + "tokens": ([1, 2], V.ARRAY, V.INT32)}, "has type ARRAY of INT32, expected an array of strings"),
    ({T + "scores": ([0.0] * 9, V.ARRAY, V.FLOAT32)}, "'tokenizer.ggml.scores' has 9 entries, expected 10"),
    ({T + "scores": (["x"] * 10, V.ARRAY, V.STRING)}, "'tokenizer.ggml.scores' has type ARRAY of STRING"),
    ({T + "token_type": ([1.0] * 10, V.ARRAY, V.FLOAT32)}, "'tokenizer.ggml.token_type' has type ARRAY of FLOAT32, "
                                                          "expected an array of integers"),
    ({T + "token_type": ([1] * 11, V.ARRAY, V.INT32)}, "'tokenizer.ggml.token_type' has 11 entries, expected 10"),
    ({T + "token_type": ([1] * 9 + [7], V.ARRAY, V.INT32)}, "gives token 9 the type 7, expected 0..6"),
    ({T + "token_type": ([-1] + [1] * 9, V.ARRAY, V.INT32)}, "gives token 0 the type -1"),
    ({T + "merges": ([1, 2], V.ARRAY, V.UINT8)}, "'tokenizer.ggml.merges' has type ARRAY of UINT8"),
    ({T + "merges": (["t1 t2", "t3"], V.ARRAY, V.STRING)}, "entry 1 ('t3') is not two tokens separated by a space"),
    ({T + "merges": ([" t3"], V.ARRAY, V.STRING)}, "entry 0 (' t3')"),
    ({T + "bos_token_id": (10, V.UINT32)}, "'tokenizer.ggml.bos_token_id' is 10, outside the vocabulary of 10 tokens"),
    ({T + "eos_token_id": (-1, V.INT32)}, "'tokenizer.ggml.eos_token_id' is -1, outside the vocabulary"),
    ({T + "padding_token_id": (2**32 - 1, V.UINT32)}, "'tokenizer.ggml.padding_token_id' is 4294967295"),
    ({T + "eot_token_id": ("0", V.STRING)}, "'tokenizer.ggml.eot_token_id' has type STRING, expected an integer"),
    ({T + "add_bos_token": (1, V.UINT8)}, "'tokenizer.ggml.add_bos_token' has type UINT8, expected a BOOL"),
    ({T + "add_space_prefix": ("no", V.STRING)}, "'tokenizer.ggml.add_space_prefix' has type STRING"),
    ({"tokenizer__chat_template": ([1], V.ARRAY, V.INT32)}, "'tokenizer.chat_template' has type ARRAY of INT32"),
])
def test_check_tokenizer_metadata_rejects(tmp_path, changes, fragment):
    g = tokenizer_file(tmp_path, **changes)
    with pytest.raises(ModelFormatError) as info:
        md.check_tokenizer_metadata(g)
    assert str(info.value).startswith("model.gguf: metadata 'tokenizer.") and fragment in str(info.value)


def test_empty_vocabulary_is_rejected(write):
    path = write(gguf_bytes([kv("tokenizer.ggml.model", STRING, string("gpt2")),
                             kv("tokenizer.ggml.tokens", ARRAY, array(STRING, 0))]))
    with pytest.raises(ModelFormatError, match="'tokenizer.ggml.tokens' is empty"):
        md.check_tokenizer_metadata(GGUFFile(path))
