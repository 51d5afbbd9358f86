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
byte offset. Tensor data is never read here: each tensor is a zero-copy uint8 view over one read-only mmap.
"""

from __future__ import annotations

import mmap
import os
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
MAX_ARRAY_DEPTH = 4
MAX_DIMS = 4

# value type id -> (name, numpy dtype or None for string/array)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALAR_DTYPES = {
    _UINT8: np.dtype("<u1"), _INT8: np.dtype("<i1"), _UINT16: np.dtype("<u2"), _INT16: np.dtype("<i2"),
    _UINT32: np.dtype("<u4"), _INT32: np.dtype("<i4"), _FLOAT32: np.dtype("<f4"), _BOOL: np.dtype("u1"),
    _UINT64: np.dtype("<u8"), _INT64: np.dtype("<i8"), _FLOAT64: np.dtype("<f8"),
}
VALUE_TYPE_NAMES = {_UINT8: "UINT8", _INT8: "INT8", _UINT16: "UINT16", _INT16: "INT16", _UINT32: "UINT32",
                    _INT32: "INT32", _FLOAT32: "FLOAT32", _BOOL: "BOOL", _STRING: "STRING", _ARRAY: "ARRAY",
                    _UINT64: "UINT64", _INT64: "INT64", _FLOAT64: "FLOAT64"}


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
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def type_name(self) -> str:
        return qtype_name(self.qtype)


@dataclass(frozen=True)
class MetadataValue:
    """A metadata value with its GGUF type: `type` is the value type id, `item_type` the element type of an
    array (None otherwise). Scalars are Python values, strings `str`, numeric arrays numpy arrays, arrays of
    strings or arrays Python lists."""
    value: Any
    type: int
    item_type: int | None = None


def qtype_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


class GGUFFile:
    """A parsed GGUF file. `metadata` maps keys to plain values; `fields` to `MetadataValue` (with types);
    `tensors` maps names to `TensorInfo`, in file order."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = self.path.name
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise GGUFError(f"{self.name}: the file is empty, not a GGUF file")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ModelNotFoundError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise ModelNotFoundError(f"{self.path}: is a directory, not a GGUF file") from None
        except PermissionError as e:
            raise GGUFError(f"{self.path}: cannot read: {e.strerror}") from None
        self.file_size = size
        self._buf = np.frombuffer(self._mmap, dtype=np.uint8)
        self.fields: dict[str, MetadataValue] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()
        self.metadata: dict[str, Any] = {k: v.value for k, v in self.fields.items()}

    # ---- low-level reads: each checks that the bytes exist before touching them ----

    def _fail(self, what: str, pos: int, msg: str) -> GGUFError:
        return GGUFError(f"{self.name}: {what}: {msg} (at byte offset {pos})")

    def _need(self, pos: int, n: int, what: str) -> None:
        if n < 0 or pos + n > self.file_size:
            raise self._fail(what, pos, f"needs {n} bytes but the file ends at {self.file_size} bytes")

    def _u32(self, pos: int, what: str) -> int:
        self._need(pos, 4, what)
        return struct.unpack_from("<I", self._mmap, pos)[0]

    def _u64(self, pos: int, what: str) -> int:
        self._need(pos, 8, what)
        return struct.unpack_from("<Q", self._mmap, pos)[0]

    def _string(self, pos: int, what: str) -> tuple[str, int]:
        n = self._u64(pos, what)
        if n > self.file_size - pos - 8:
            raise self._fail(what, pos, f"string length {n} exceeds the {self.file_size - pos - 8} bytes left")
        raw = self._mmap[pos + 8:pos + 8 + n]
        try:
            return raw.decode("utf-8"), pos + 8 + n
        except UnicodeDecodeError as e:
            raise self._fail(what, pos, f"string is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def _value(self, pos: int, vtype: int, what: str, depth: int = 0) -> tuple[Any, int | None, int]:
        """Read one value of type `vtype` at `pos`; returns (value, item_type, next_pos)."""
        if vtype in _SCALAR_DTYPES:
            dt = _SCALAR_DTYPES[vtype]
            self._need(pos, dt.itemsize, what)
            v = self._buf[pos:pos + dt.itemsize].view(dt)[0].item()
            if vtype == _BOOL:
                if v not in (0, 1):
                    raise self._fail(what, pos, f"BOOL value {v} is neither 0 nor 1")
                v = bool(v)
            return v, None, pos + dt.itemsize
        if vtype == _STRING:
            s, end = self._string(pos, what)
            return s, None, end
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self._fail(what, pos, f"arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
            itype = self._u32(pos, what + " (array element type)")
            count = self._u64(pos + 4, what + " (array length)")
            pos += 12
            left = self.file_size - pos
            if itype in _SCALAR_DTYPES:
                dt = _SCALAR_DTYPES[itype]
                if count > left // dt.itemsize:
                    raise self._fail(what, pos - 8, f"array of {count} {VALUE_TYPE_NAMES[itype]} needs "
                                                    f"{count * dt.itemsize} bytes but only {left} are left")
                arr = self._buf[pos:pos + count * dt.itemsize].view(dt).copy()
                if itype == _BOOL:
                    if arr.size and arr.max() > 1:
                        raise self._fail(what, pos, "BOOL array holds a value that is neither 0 nor 1")
                    arr = arr.astype(bool)
                return arr, itype, pos + count * dt.itemsize
            if itype == _STRING:
                # each string takes at least its 8-byte length
                if count > left // 8:
                    raise self._fail(what, pos - 8, f"array of {count} strings cannot fit in the {left} bytes left")
                return self._string_array(pos, count, what), itype, self._end
            if itype == _ARRAY:
                if count > left // 12:
                    raise self._fail(what, pos - 8, f"array of {count} arrays cannot fit in the {left} bytes left")
                items = []
                for i in range(count):
                    v, _, pos = self._value(pos, _ARRAY, f"{what}[{i}]", depth + 1)
                    items.append(v)
                return items, itype, pos
            raise self._fail(what, pos - 12, f"unknown array element type {itype}")
        raise self._fail(what, pos, f"unknown value type {vtype}")

    def _string_array(self, pos: int, count: int, what: str) -> list[str]:
        """Decode `count` strings starting at `pos`; sets self._end to the position after the last one.
        Token lists hold up to ~262k strings, so this is a tight loop over the mmap."""
        mm, size = self._mmap, self.file_size
        unpack = struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                raise self._fail(f"{what}[{i}]", pos, f"needs 8 bytes but the file ends at {size} bytes")
            n = unpack(mm, pos)[0]
            pos += 8
            if n > size - pos:
                raise self._fail(f"{what}[{i}]", pos - 8, f"string length {n} exceeds the {size - pos} bytes left")
            try:
                append(mm[pos:pos + n].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise self._fail(f"{what}[{i}]", pos, f"string is not valid UTF-8 ({e.reason})") from None
            pos += n
        self._end = pos
        return out

    # ---- the file ----

    def _parse(self) -> None:
        self._need(0, 4, "magic")
        magic = bytes(self._mmap[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.name}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        version = self._u32(4, "version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 16) in (1, 2, 3):
                raise GGUFError(f"{self.name}: version field is byte-swapped (big-endian file); "
                                f"only little-endian GGUF is supported")
            if version == 1:
                raise GGUFError(f"{self.name}: GGUF version 1 is obsolete and not supported; "
                                f"convert the model again with a current llama.cpp")
            raise GGUFError(f"{self.name}: unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        n_tensors = self._u64(8, "tensor count")
        n_kv = self._u64(16, "metadata count")
        pos = 24
        # Each key-value pair takes at least 8 (key length) + 1 (key) + 4 (type) + 1 bytes; each tensor info at
        # least 8 + 1 + 4 + 8 + 4 + 8. Bound the counts before looping over them.
        if n_kv > (self.file_size - pos) // 14:
            raise self._fail("metadata count", 16, f"{n_kv} key-value pairs cannot fit in a {self.file_size}-byte file")
        if n_tensors > (self.file_size - pos) // 33:
            raise self._fail("tensor count", 8, f"{n_tensors} tensors cannot fit in a {self.file_size}-byte file")

        for i in range(n_kv):
            key_pos = pos
            key, pos = self._string(pos, f"metadata key #{i}")
            if not key:
                raise self._fail(f"metadata key #{i}", key_pos, "empty key")
            if key in self.fields:
                raise self._fail(f"metadata key {key!r}", key_pos, "duplicate key")
            vtype = self._u32(pos, f"metadata {key!r} type")
            value, item_type, pos = self._value(pos + 4, vtype, f"metadata {key!r}")
            self.fields[key] = MetadataValue(value, vtype, item_type)

        alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.fields:
            f = self.fields["general.alignment"]
            if f.type != _UINT32 or f.value == 0 or f.value & (f.value - 1):
                raise GGUFError(f"{self.name}: metadata 'general.alignment': must be a UINT32 power of two, got "
                                f"{f.value!r} ({VALUE_TYPE_NAMES.get(f.type, f.type)})")
            alignment = f.value
        self.alignment = alignment

        infos = []
        for i in range(n_tensors):
            name_pos = pos
            name, pos = self._string(pos, f"tensor #{i} name")
            what = f"tensor {name!r}"
            if name in self.tensors:
                raise self._fail(what, name_pos, "duplicate tensor name")
            n_dims = self._u32(pos, what + " n_dims")
            if n_dims > MAX_DIMS:
                raise self._fail(what, pos, f"n_dims {n_dims} exceeds the maximum of {MAX_DIMS}")
            self._need(pos + 4, 8 * n_dims, what + " dims")
            dims = struct.unpack_from(f"<{n_dims}q", self._mmap, pos + 4)
            pos += 4 + 8 * n_dims
            if any(d < 0 for d in dims):
                raise self._fail(what, pos - 8 * n_dims, f"negative dimension in {list(dims)}")
            n_el = 1
            for d in dims:
                n_el *= d
            if n_el >= 1 << 62:
                raise self._fail(what, pos - 8 * n_dims, f"dimensions {list(dims)} overflow")
            qtype = self._u32(pos, what + " type")
            if qtype not in _QUANT_SIZES:
                raise self._fail(what, pos, f"type id {qtype} is not a GGML type")
            block, type_size = _QUANT_SIZES[qtype]
            if n_dims and dims[0] % block:
                raise self._fail(what, pos, f"row length {dims[0]} is not a multiple of the "
                                            f"{qtype_name(qtype)} block size {block}")
            offset = self._u64(pos + 4, what + " offset")
            if offset % alignment:
                raise self._fail(what, pos + 4, f"offset {offset} is not a multiple of the alignment {alignment}")
            pos += 12
            nbytes = n_el // block * type_size
            shape = tuple(int(d) for d in reversed(dims))
            infos.append((name, shape, qtype, offset, nbytes, name_pos))
            self.tensors[name] = None  # reserve the name for the duplicate check

        data_start = (pos + alignment - 1) // alignment * alignment
        self.data_start = data_start
        self.tensors = {}
        expected = 0
        for name, shape, qtype, offset, nbytes, name_pos in infos:
            what = f"tensor {name!r}"
            if offset != expected:
                if offset < expected:
                    raise self._fail(what, name_pos, f"data at offset {offset} overlaps the previous tensor, "
                                                     f"which ends at {expected}")
                raise self._fail(what, name_pos, f"data at offset {offset} is not where the previous tensor "
                                                 f"ends ({expected}, padded)")
            start = data_start + offset
            if start + nbytes > self.file_size:
                past = "is past the end of the file" if start >= self.file_size else "runs past the end of the file"
                raise self._fail(what, name_pos, f"offset {offset} ({nbytes} bytes at file offset {start}) {past} "
                                                 f"({self.file_size} bytes)")
            data = self._buf[start:start + nbytes]
            self.tensors[name] = TensorInfo(name, shape, qtype, start, nbytes, data)
            expected = (offset + nbytes + alignment - 1) // alignment * alignment

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

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.fields)} keys, {len(self.tensors)} tensors)"


_QUANT_SIZES = {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
