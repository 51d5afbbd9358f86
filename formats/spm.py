"""The SentencePiece side of a `tokenizer.ggml.model = llama` vocabulary, built from the GGUF arrays alone.

llama.cpp's SPM tokenizer (`llm_tokenizer_spm_session` in src/llama-vocab.cpp) splits text into UTF-8
characters and repeatedly merges the adjacent pair whose concatenation is a vocabulary token with the highest
score, leftmost on ties; symbols that end up outside the vocabulary become `<0xNN>` byte tokens. That is
exactly sentencepiece's BPE encoder (llama.cpp's code is a port of it), given a model whose

    pieces      = the GGUF tokens with their scores, all NORMAL (llama.cpp merges into any token, whatever its
                  type, so every piece must be a merge target), except the 256 `<0xNN>` pieces (BYTE) and the
                  unknown token (UNKNOWN, which sentencepiece requires exactly once);
    trainer     = BPE, byte_fallback;
    normalizer  = identity: no NFKC, no dummy prefix (llama.cpp adds its own space where the file asks), no
                  removal of extra whitespace, spaces escaped to U+2581 `▁` (as `llama_escape_whitespace`).

Special tokens never reach sentencepiece: the caller splits them out first, as llama.cpp does.

Serializing the ModelProto for Gemma's 262,144 pieces takes ~0.7 s in Python while sentencepiece loads it in
~0.05 s, so the bytes are cached in the user's cache dir, keyed by a hash of everything that goes into them.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from ..errors import TokenizerError

CACHE_FORMAT = b"nibble-spm-v1\n"   # bump when the proto layout below changes: old entries are then ignored
_DIGEST = 32                         # sha256 of the proto, stored after CACHE_FORMAT so a torn file is caught

# sentencepiece_model.proto field numbers and enum values (ModelProto, SentencePiece, TrainerSpec, NormalizerSpec)
_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_BYTE = 1, 2, 6
_MODEL_BPE = 2
_NO_ID = (1 << 64) - 1   # -1 as a protobuf int32 varint: "no such token" for bos/eos/pad in TrainerSpec


def byte_piece(b: int) -> str:
    return f"<0x{b:02X}>"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def model_proto(tokens: list[str], scores: np.ndarray, unk_id: int, token_to_id: dict[str, int]) -> bytes:
    """The serialized sentencepiece ModelProto for this vocabulary (see the module docstring)."""
    byte_ids = {}
    for b in range(256):
        piece = byte_piece(b)
        i = token_to_id.get(piece)
        if i is None:
            raise TokenizerError(f"the SentencePiece vocabulary has no byte token {piece}; nibble needs all 256 "
                                 f"<0xNN> tokens for byte fallback")
        byte_ids[i] = b
    if not 0 <= unk_id < len(tokens) or unk_id in byte_ids:
        raise TokenizerError(f"the SentencePiece vocabulary needs an unknown token; id {unk_id} is not one")
    score_bytes = np.ascontiguousarray(scores, dtype="<f4").tobytes()
    pieces = []
    append = pieces.append
    for i, text in enumerate(tokens):
        kind = _PIECE_BYTE if i in byte_ids else _PIECE_UNKNOWN if i == unk_id else _PIECE_NORMAL
        raw = text.encode("utf-8")
        # SentencePiece { piece = 1 (string); score = 2 (float, wire type 5 -> tag 0x15); type = 3 (enum) }
        body = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + score_bytes[4 * i:4 * i + 4] + b"\x18" + _varint(kind)
        append(b"\x0a" + _varint(len(body)) + body)          # ModelProto.pieces = 1
    trainer = (_int_field(3, _MODEL_BPE) + _int_field(4, len(tokens)) + _int_field(35, 1)   # model_type, vocab_size, byte_fallback
               + _int_field(40, unk_id) + _int_field(41, _NO_ID) + _int_field(42, _NO_ID) + _int_field(43, _NO_ID))
    normalizer = (_len_field(1, b"identity") + _int_field(3, 0) + _int_field(4, 0)            # name, add_dummy_prefix,
                  + _int_field(5, 1))                                                         # remove_extra_ws, escape_ws
    return b"".join(pieces) + _len_field(2, trainer) + _len_field(3, normalizer)


def cache_key(tokens: list[str], scores: np.ndarray, unk_id: int) -> str:
    h = hashlib.sha256(CACHE_FORMAT)
    h.update(np.array([len(t) for t in tokens], dtype="<i8").tobytes())
    h.update("\x00".join(tokens).encode("utf-8", "surrogatepass"))
    h.update(np.ascontiguousarray(scores, dtype="<f4").tobytes())
    h.update(struct.pack("<q", unk_id))
    return h.hexdigest()


def _read_cached(path: Path) -> bytes | None:
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    head = len(CACHE_FORMAT) + _DIGEST
    if len(blob) <= head or not blob.startswith(CACHE_FORMAT):
        return None
    proto = blob[head:]
    if hashlib.sha256(proto).digest() != blob[len(CACHE_FORMAT):head]:
        return None
    return proto


def _write_cached(path: Path, proto: bytes) -> None:
    """Write atomically (a temporary file in the same folder, then rename); a cache that cannot be written is
    not an error, only a slower next start."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(CACHE_FORMAT + hashlib.sha256(proto).digest() + proto)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def load_processor(tokens: list[str], scores: np.ndarray, unk_id: int, token_to_id: dict[str, int],
                   cache_dir: Path | None = None):
    """A sentencepiece processor for this vocabulary, from `cache_dir` (None: no cache) when a valid entry
    exists. A cache entry that is truncated, altered or rejected by sentencepiece is rebuilt, never trusted."""
    import sentencepiece

    path = Path(cache_dir) / f"spm-{cache_key(tokens, scores, unk_id)}.model" if cache_dir is not None else None
    if path is not None:
        proto = _read_cached(path)
        if proto is not None:
            try:
                return sentencepiece.SentencePieceProcessor(model_proto=proto)
            except (RuntimeError, OSError):
                pass  # digest matched but sentencepiece refused it: rebuild below
    proto = model_proto(tokens, scores, unk_id, token_to_id)
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"sentencepiece rejected the vocabulary built from the GGUF: {e}") from None
    if path is not None:
        _write_cached(path, proto)
    return processor
