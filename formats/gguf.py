"""A GGUF reader that never trusts the file.

Layout of a GGUF v2/v3 file (all little-endian):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv × (key: string, value_type u32, value)
    n_tensors × (name: string, n_dims u32, dims u64 × n_dims, ggml_type u32, offset u64)
    padding to `general.alignment` (default 32)
    data section: each tensor at data_start + offset, offsets aligned, in order

    string = length u64 | UTF-8 bytes        array = elem_type u32 | count u64 | elements

Every count and length read from the file is checked against the bytes that remain before anything is
allocated or looped over, so a crafted file fails fast with a GGUFError naming the file, the field and the
byte offset. Each check raises where it detects the problem. Tensor data is never read here: each tensor is a
zero-copy uint8 view over one read-only mmap, so opening a 500 MB model touches only its header.

The checks follow llama.cpp's `gguf_init_from_file` (ggml/src/gguf.cpp) so that what it rejects we reject:
tensor names under 64 bytes (GGML_MAX_NAME), at most 4 dims, element counts that fit an int64, type ids that
ggml defines (removed ones such as Q4_2 are not), rows a multiple of the block size, and tensors packed in
order, each at the previous one's end padded to the alignment. Unlike llama.cpp we also read nested arrays
(bounded in depth), and we reject BOOL bytes other than 0 and 1.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import GGUFError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 4     # an array may hold arrays, 4 levels in all
MAX_DIMS = 4            # GGML_MAX_DIMS
MAX_NAME_BYTES = 63     # GGML_MAX_NAME - 1: ggml keeps tensor names in a char[64]

# value type ids, as in gguf.constants.GGUFValueType
(UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64) = range(13)
_SCALAR_DTYPES = {
    UINT8: np.dtype("<u1"), INT8: np.dtype("<i1"), UINT16: np.dtype("<u2"), INT16: np.dtype("<i2"),
    UINT32: np.dtype("<u4"), INT32: np.dtype("<i4"), FLOAT32: np.dtype("<f4"), BOOL: np.dtype("u1"),
    UINT64: np.dtype("<u8"), INT64: np.dtype("<i8"), FLOAT64: np.dtype("<f8"),
}
_SCALAR_STRUCTS = {t: struct.Struct("<" + f) for t, f in {
    UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "B",
    UINT64: "Q", INT64: "q", FLOAT64: "d"}.items()}
VALUE_TYPE_NAMES = {UINT8: "UINT8", INT8: "INT8", UINT16: "UINT16", INT16: "INT16", UINT32: "UINT32",
                    INT32: "INT32", FLOAT32: "FLOAT32", BOOL: "BOOL", STRING: "STRING", ARRAY: "ARRAY",
                    UINT64: "UINT64", INT64: "INT64", FLOAT64: "FLOAT64"}
INTEGER_TYPES = frozenset({UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64})
FLOAT_TYPES = frozenset({FLOAT32, FLOAT64})

# Smallest possible encodings, to bound counts before looping over them:
_MIN_KV_BYTES = 8 + 1 + 4 + 1           # key length, a 1-byte key, value type, a UINT8 value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length (empty name), n_dims = 0, type, offset
_MIN_ARRAY_BYTES = 4 + 8                # element type, count

_u32 = struct.Struct("<I").unpack_from
_u64 = struct.Struct("<Q").unpack_from

# ggml type id -> (block size in elements, bytes per block), for every type ggml defines today
_QUANT_SIZES = {int(k): v for k, v in GGML_QUANT_SIZES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: `shape` in numpy order (rows first, row length last); `data` its raw bytes (uint8, read-only,
    zero-copy over the file's mmap)."""
    name: str
    shape: tuple[int, ...]
    qtype: int
    offset: int          # absolute offset of the first byte in the file
    nbytes: int
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def type_name(self) -> str:
        return qtype_name(self.qtype)


@dataclass(frozen=True)
class MetadataValue:
    """A metadata value with its GGUF type: `type` is the value type id, `item_type` the element type of an
    array (None otherwise). Scalars are Python values (BOOL a `bool`), strings `str`, numeric and BOOL arrays
    numpy arrays of the matching dtype, string arrays lists of `str`, and arrays of arrays lists of
    `MetadataValue` (each of type ARRAY), so that every level keeps its type."""
    value: Any
    type: int
    item_type: int | None = None

    @property
    def type_name(self) -> str:
        if self.type == ARRAY:
            return f"ARRAY of {VALUE_TYPE_NAMES[self.item_type]}"
        return VALUE_TYPE_NAMES[self.type]

    def plain(self) -> Any:
        """The value with nested arrays unwrapped into plain lists."""
        if self.item_type == ARRAY:
            return [item.plain() for item in self.value]
        return self.value


def qtype_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


class GGUFFile:
    """A parsed GGUF file. `metadata` maps keys to plain values; `fields` to `MetadataValue` (with types);
    `tensors` maps names to `TensorInfo`, in file order. `data_start` is the absolute offset of the data
    section, `alignment` its alignment."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = self.path.name
        self._mmap = _map_file(self.path)
        self.file_size = len(self._mmap)
        self._buf = np.frombuffer(self._mmap, dtype=np.uint8)
        self.fields: dict[str, MetadataValue] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._parse()
        except GGUFError:
            self.close()
            raise
        self.metadata: dict[str, Any] = {k: v.plain() for k, v in self.fields.items()}

    # ---- low-level reads: each checks that the bytes exist before touching them ----

    def _fail(self, what: str, pos: int, msg: str) -> GGUFError:
        return GGUFError(f"{self.name}: {what}: {msg} (at byte offset {pos})")

    def _need(self, pos: int, n: int, what: str) -> None:
        if pos + n > self.file_size:
            raise self._fail(what, pos, f"needs {n} bytes but the file ends at {self.file_size} bytes")

    def _read_u32(self, pos: int, what: str) -> int:
        self._need(pos, 4, what)
        return _u32(self._mmap, pos)[0]

    def _read_u64(self, pos: int, what: str) -> int:
        self._need(pos, 8, what)
        return _u64(self._mmap, pos)[0]

    def _string(self, pos: int, what: str) -> tuple[str, int]:
        n = self._read_u64(pos, what + " (string length)")
        left = self.file_size - pos - 8
        if n > left:
            raise self._fail(what, pos, f"string length {n} exceeds the {left} bytes left in the file")
        try:
            return self._mmap[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n
        except UnicodeDecodeError as e:
            raise self._fail(what, pos, f"string is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def _value(self, pos: int, vtype: int, what: str) -> tuple[MetadataValue, int]:
        """Read the value of a key-value pair, of type `vtype`, at `pos`; returns (value, next_pos)."""
        if vtype in _SCALAR_DTYPES:
            size = _SCALAR_DTYPES[vtype].itemsize
            self._need(pos, size, what)
            v = _SCALAR_STRUCTS[vtype].unpack_from(self._mmap, pos)[0]
            if vtype == BOOL:
                if v > 1:
                    raise self._fail(what, pos, f"BOOL value {v} is neither 0 nor 1")
                v = bool(v)
            return MetadataValue(v, vtype), pos + size
        if vtype == STRING:
            s, end = self._string(pos, what)
            return MetadataValue(s, STRING), end
        if vtype == ARRAY:
            return self._array(pos, what, depth=0)
        raise self._fail(what, pos - 4, f"unknown value type {vtype}")

    def _array(self, pos: int, what: str, depth: int) -> tuple[MetadataValue, int]:
        if depth >= MAX_ARRAY_DEPTH:
            raise self._fail(what, pos, f"arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
        itype = self._read_u32(pos, what + " (array element type)")
        count = self._read_u64(pos + 4, what + " (array length)")
        start = pos + _MIN_ARRAY_BYTES
        left = self.file_size - start
        if itype in _SCALAR_DTYPES:
            dt = _SCALAR_DTYPES[itype]
            if count > left // dt.itemsize:
                raise self._fail(what, pos + 4, f"array of {count} {VALUE_TYPE_NAMES[itype]} needs "
                                                f"{count * dt.itemsize} bytes but only {left} are left")
            end = start + count * dt.itemsize
            arr = self._buf[start:end].view(dt).copy()
            if itype == BOOL:
                if count and arr.max() > 1:
                    bad = int(np.argmax(arr > 1))
                    raise self._fail(f"{what}[{bad}]", start + bad, f"BOOL value {arr[bad]} is neither 0 nor 1")
                arr = arr.astype(bool)
            return MetadataValue(arr, ARRAY, itype), end
        if itype == STRING:
            if count > left // 8:  # each string takes at least its 8-byte length
                raise self._fail(what, pos + 4, f"array of {count} strings cannot fit in the {left} bytes left")
            strings, end = self._string_array(start, count, what)
            return MetadataValue(strings, ARRAY, STRING), end
        if itype == ARRAY:
            if count > left // _MIN_ARRAY_BYTES:
                raise self._fail(what, pos + 4, f"array of {count} arrays cannot fit in the {left} bytes left")
            items = []
            for i in range(count):
                item, start = self._array(start, f"{what}[{i}]", depth + 1)
                items.append(item)
            return MetadataValue(items, ARRAY, ARRAY), start
        raise self._fail(what, pos, f"unknown array element type {itype}")

    def _string_array(self, pos: int, count: int, what: str) -> tuple[list[str], int]:
        """Decode `count` strings starting at `pos`; returns them and the position after the last one.
        Token lists hold up to ~262k strings, so this is the tightest loop of the reader: struct over the
        mmap, one slice and one decode per string, locals only, and the 8-byte length read left to raise
        struct.error at the end of the file (measured ~20% faster than checking first; memoryview slices,
        chunked copies and a separate pass for the offsets were all slower)."""
        mm, size, unpack = self._mmap, self.file_size, _u64
        out: list[str] = []
        append = out.append
        i = 0
        try:
            for i in range(count):
                n = unpack(mm, pos)[0]
                start = pos + 8
                pos = start + n
                if pos > size:
                    raise self._fail(f"{what}[{i}]", start - 8, f"string length {n} exceeds the {size - start} "
                                                                f"bytes left in the file")
                append(mm[start:pos].decode())
        except struct.error:
            raise self._fail(f"{what}[{i}]", pos, f"needs 8 bytes but the file ends at {size} bytes") from None
        except UnicodeDecodeError as e:
            raise self._fail(f"{what}[{i}]", start, f"string is not valid UTF-8 ({e.reason} at byte {e.start})"
                             ) from None
        return out, pos

    # ---- the file ----

    def _parse(self) -> None:
        self._need(0, 4, "magic")
        magic = bytes(self._mmap[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.name}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        version = self._read_u32(4, "version")
        if version not in SUPPORTED_VERSIONS:
            # A big-endian file read as little-endian puts the small version number in the top byte.
            if version and version & 0xFFFF == 0:
                swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
                raise GGUFError(f"{self.name}: version {version:#010x} is byte-swapped (a big-endian GGUF, "
                                f"version {swapped}); only little-endian GGUF files are supported")
            if version == 1:
                raise GGUFError(f"{self.name}: GGUF version 1 is obsolete and not supported; "
                                f"convert the model again with a current llama.cpp")
            raise GGUFError(f"{self.name}: unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        n_tensors = self._read_u64(8, "tensor count")
        n_kv = self._read_u64(16, "metadata count")
        pos = 24
        left = self.file_size - pos
        if n_kv > left // _MIN_KV_BYTES:
            raise self._fail("metadata count", 16, f"{n_kv} key-value pairs cannot fit in a "
                                                   f"{self.file_size}-byte file")
        if n_tensors > left // _MIN_TENSOR_INFO_BYTES:
            raise self._fail("tensor count", 8, f"{n_tensors} tensors cannot fit in a {self.file_size}-byte file")

        self.alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key_pos = pos
            key, pos = self._string(pos, f"metadata key #{i}")
            if not key:
                raise self._fail(f"metadata key #{i}", key_pos, "empty key")
            if key in self.fields:
                raise self._fail(f"metadata {key!r}", key_pos, "duplicate key")
            vtype = self._read_u32(pos, f"metadata {key!r} (value type)")
            value_pos = pos + 4
            self.fields[key], pos = self._value(value_pos, vtype, f"metadata {key!r}")
            if key == "general.alignment":
                self.alignment = self._check_alignment(self.fields[key], value_pos)

        if n_tensors > (self.file_size - pos) // _MIN_TENSOR_INFO_BYTES:
            raise self._fail("tensor count", 8, f"{n_tensors} tensor infos cannot fit in the "
                                                f"{self.file_size - pos} bytes after the metadata (at {pos})")
        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            info, pos = self._tensor_info(i, pos, names)
            infos.append(info)

        alignment = self.alignment
        self.data_start = data_start = _pad(pos, alignment)
        expected = 0  # where the next tensor must start, relative to data_start
        for name, shape, qtype, offset, nbytes, offset_pos in infos:
            what = f"tensor {name!r}"
            if offset != expected:
                if offset < expected:
                    raise self._fail(what, offset_pos, f"data at offset {offset} overlaps the previous tensor, "
                                                       f"which ends at {expected} (padded)")
                raise self._fail(what, offset_pos, f"data at offset {offset} is not where the previous tensor "
                                                   f"ends ({expected}, padded)")
            start = data_start + offset
            if start + nbytes > self.file_size:
                where = "is past the end of the file" if start >= self.file_size else \
                        f"holds {nbytes} bytes from file offset {start}, past the end of the file"
                raise self._fail(what, offset_pos, f"offset {offset} {where} ({self.file_size} bytes)")
            self.tensors[name] = TensorInfo(name, shape, qtype, start, nbytes, self._buf[start:start + nbytes])
            expected = _pad(offset + nbytes, alignment)

    def _check_alignment(self, field: MetadataValue, pos: int) -> int:
        if field.type != UINT32:
            raise self._fail("metadata 'general.alignment'", pos, f"has type {field.type_name}, must be UINT32")
        a = field.value
        if a == 0 or a & (a - 1):
            raise self._fail("metadata 'general.alignment'", pos, f"{a} is not a power of two")
        return a

    def _tensor_info(self, i: int, pos: int, names: set[str]) -> tuple[tuple, int]:
        """Read and check the i-th tensor info at `pos`; returns ((name, shape, qtype, offset, nbytes,
        offset_pos), next_pos)."""
        name_pos = pos
        name, pos = self._string(pos, f"tensor #{i} name")
        what = f"tensor {name!r}"
        if pos - name_pos - 8 > MAX_NAME_BYTES:
            raise self._fail(what, name_pos, f"name is {pos - name_pos - 8} bytes long; ggml allows at most "
                                             f"{MAX_NAME_BYTES}")
        if name in names:
            raise self._fail(what, name_pos, "duplicate tensor name")
        names.add(name)

        n_dims = self._read_u32(pos, what + " n_dims")
        if n_dims > MAX_DIMS:
            raise self._fail(what, pos, f"n_dims {n_dims} exceeds the maximum of {MAX_DIMS}")
        dims_pos = pos + 4
        self._need(dims_pos, 8 * n_dims, what + " dims")
        dims = struct.unpack_from(f"<{n_dims}q", self._mmap, dims_pos)  # ggml order: row length first
        pos = dims_pos + 8 * n_dims
        if any(d < 0 for d in dims):
            raise self._fail(what, dims_pos, f"negative dimension in {list(dims)}")
        n_el = math.prod(dims)
        # The element count must fit an int64 (as in ggml); a zero-element tensor is legal, but its other
        # dimensions must not overflow either.
        if math.prod(d for d in dims if d) >= 1 << 63:
            raise self._fail(what, dims_pos, f"dimensions {list(dims)} overflow a 64-bit element count")

        qtype = self._read_u32(pos, what + " type")
        if qtype not in _QUANT_SIZES:
            raise self._fail(what, pos, f"type id {qtype} is not a GGML type")
        block, type_size = _QUANT_SIZES[qtype]
        row = dims[0] if n_dims else 1
        if row % block:
            raise self._fail(what, pos, f"row length {row} is not a multiple of the {qtype_name(qtype)} "
                                        f"block size {block}")
        offset_pos = pos + 4
        offset = self._read_u64(offset_pos, what + " offset")
        if offset % self.alignment:
            raise self._fail(what, offset_pos, f"offset {offset} is not a multiple of the alignment "
                                               f"{self.alignment}")
        nbytes = n_el // block * type_size
        shape = tuple(reversed(dims))
        return (name, shape, qtype, offset, nbytes, offset_pos), offset_pos + 8

    # ---- conveniences ----

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def close(self) -> None:
        self._buf = None
        self.tensors = {}
        try:
            self._mmap.close()
        except BufferError:
            pass  # numpy views are still alive; the mmap closes when they go

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.fields)} keys, {len(self.tensors)} tensors)"


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _map_file(path: Path) -> mmap.mmap:
    """One read-only mmap of a regular, non-empty file. Opened with O_NONBLOCK so that a FIFO given as the
    model path is rejected instead of blocking forever."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ModelNotFoundError(f"{path}: is a directory, not a GGUF file") from None
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ModelNotFoundError(f"{path}: is a directory, not a GGUF file")
        if not stat.S_ISREG(st.st_mode):
            raise GGUFError(f"{path}: not a regular file, so not a GGUF file")
        if st.st_size == 0:
            raise GGUFError(f"{path.name}: the file is empty, not a GGUF file")
        try:
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{path}: cannot map the file into memory: {e.strerror}") from None
    finally:
        os.close(fd)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
