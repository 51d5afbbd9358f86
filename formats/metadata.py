"""Typed access to GGUF metadata.

Every model-level check reads metadata through these accessors, so a key that is missing, of the wrong type
or of the wrong length fails with a `ModelFormatError` that names the file and the key, instead of an
IndexError or a TypeError deep inside a kernel:

    n_layers = get_int(gguf, "llama.block_count", min=1)
    eps = get_float(gguf, "llama.attention.layer_norm_rms_epsilon", min=0.0)
    scores = get_array(gguf, "tokenizer.ggml.scores", "float", length=n_vocab, default=None)

Integers accept any GGUF integer type (not BOOL, not FLOAT); floats accept FLOAT32/FLOAT64 and integers;
booleans only BOOL. A `default` is returned only when the key is absent: a key that is present with the wrong
type is an error even when a default exists.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from ..errors import ModelFormatError
from .gguf import ARRAY, BOOL, FLOAT_TYPES, INTEGER_TYPES, STRING, GGUFFile, MetadataValue

_REQUIRED: Any = object()  # the default of `default`: the key must be present

_ITEM_TYPES = {"int": (INTEGER_TYPES, "integers"), "float": (INTEGER_TYPES | FLOAT_TYPES, "numbers"),
               "str": (frozenset({STRING}), "strings")}

# llama.cpp's token types (llama_token_type / LLAMA_TOKEN_TYPE_*): UNDEFINED 0, NORMAL 1, UNKNOWN 2, CONTROL 3,
# USER_DEFINED 4, UNUSED 5, BYTE 6.
N_TOKEN_TYPES = 7
TOKENIZER_BOOL_KEYS = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                       "tokenizer.ggml.add_sep_token", "tokenizer.ggml.add_space_prefix",
                       "tokenizer.ggml.remove_extra_whitespaces")
_SPECIAL_ID_KEY = re.compile(r"tokenizer\.ggml\.[a-z_]+_token_id")


def _error(gguf: GGUFFile, key: str, msg: str) -> ModelFormatError:
    return ModelFormatError(f"{gguf.name}: metadata {key!r} {msg}")


def _field(gguf: GGUFFile, key: str, default: Any) -> MetadataValue | None:
    """The field, or None when it is absent and a default exists."""
    field = gguf.fields.get(key)
    if field is None and default is _REQUIRED:
        raise _error(gguf, key, "is missing")
    return field


def _check_range(gguf: GGUFFile, key: str, value, min, max) -> None:
    if min is not None and value < min:
        raise _error(gguf, key, f"is {value}, expected at least {min}")
    if max is not None and value > max:
        raise _error(gguf, key, f"is {value}, expected at most {max}")


def get_int(gguf: GGUFFile, key: str, default: Any = _REQUIRED, *, min: int | None = None,
            max: int | None = None) -> int:
    """An integer of any GGUF integer type, optionally bounded by `min`/`max` (inclusive)."""
    field = _field(gguf, key, default)
    if field is None:
        return default
    if field.type not in INTEGER_TYPES:
        raise _error(gguf, key, f"has type {field.type_name}, expected an integer")
    _check_range(gguf, key, field.value, min, max)
    return field.value


def get_float(gguf: GGUFFile, key: str, default: Any = _REQUIRED, *, min: float | None = None,
              max: float | None = None, finite: bool = True) -> float:
    """A FLOAT32/FLOAT64 or integer value as a Python float; NaN and infinities are rejected unless
    `finite=False`."""
    field = _field(gguf, key, default)
    if field is None:
        return default
    if field.type not in FLOAT_TYPES and field.type not in INTEGER_TYPES:
        raise _error(gguf, key, f"has type {field.type_name}, expected a number")
    value = float(field.value)
    if finite and not math.isfinite(value):
        raise _error(gguf, key, f"is {value}, expected a finite number")
    _check_range(gguf, key, value, min, max)
    return value


def _get_typed(gguf: GGUFFile, key: str, default: Any, value_type, expected: str):
    field = _field(gguf, key, default)
    if field is None:
        return default
    if field.type != value_type:
        raise _error(gguf, key, f"has type {field.type_name}, expected {expected}")
    return field.value


def get_str(gguf: GGUFFile, key: str, default: Any = _REQUIRED) -> str:
    return _get_typed(gguf, key, default, STRING, "a string")


def get_bool(gguf: GGUFFile, key: str, default: Any = _REQUIRED) -> bool:
    return _get_typed(gguf, key, default, BOOL, "a BOOL")


def get_array(gguf: GGUFFile, key: str, item: str, length: int | None = None, default: Any = _REQUIRED):
    """An array of `item` "int" (-> int64 ndarray), "float" (-> float64 ndarray, exact for FLOAT32) or "str"
    (-> list of str), with exactly `length` entries when given. The returned arrays are fresh copies."""
    accepted, plural = _ITEM_TYPES[item]
    field = _field(gguf, key, default)
    if field is None:
        return default
    if field.type != ARRAY or field.item_type not in accepted:
        raise _error(gguf, key, f"has type {field.type_name}, expected an array of {plural}")
    value = field.value
    if length is not None and len(value) != length:
        raise _error(gguf, key, f"has {len(value)} entries, expected {length}")
    if item == "str":
        return list(value)
    if item == "int":
        if value.dtype == np.uint64 and len(value) and value.max() > np.iinfo(np.int64).max:
            raise _error(gguf, key, f"holds {int(value.max())}, which does not fit a 64-bit signed integer")
        return value.astype(np.int64)
    return value.astype(np.float64)


def check_tokenizer_metadata(gguf: GGUFFile) -> int:
    """Check the types and lengths of the `tokenizer.ggml.*` metadata; returns the vocabulary size.

    `tokens` must be a non-empty string array; `scores` (numbers) and `token_type` (integers in 0..6) the same
    length when present; `merges` a string array of "left right" pairs when present; `model`/`pre` strings and
    the add_* flags BOOLs when present; every `tokenizer.ggml.*_token_id` present an integer inside the
    vocabulary; `tokenizer.chat_template` a string when present.

    Unlike llama.cpp, which warns and falls back to a default for a special-token id outside the vocabulary,
    this rejects the file: such an id would index past the embedding table.
    """
    get_str(gguf, "tokenizer.ggml.model")
    get_str(gguf, "tokenizer.ggml.pre", default=None)
    tokens = get_array(gguf, "tokenizer.ggml.tokens", "str")
    n_vocab = len(tokens)
    if n_vocab == 0:
        raise _error(gguf, "tokenizer.ggml.tokens", "is empty")
    get_array(gguf, "tokenizer.ggml.scores", "float", length=n_vocab, default=None)
    types = get_array(gguf, "tokenizer.ggml.token_type", "int", length=n_vocab, default=None)
    if types is not None and len(types) and (types.min() < 0 or types.max() >= N_TOKEN_TYPES):
        bad = int(np.flatnonzero((types < 0) | (types >= N_TOKEN_TYPES))[0])
        raise _error(gguf, "tokenizer.ggml.token_type", f"gives token {bad} the type {int(types[bad])}, "
                                                        f"expected 0..{N_TOKEN_TYPES - 1}")
    merges = get_array(gguf, "tokenizer.ggml.merges", "str", default=None)
    # llama.cpp splits each merge at its first space after the first character
    if merges is not None and not all(merge.find(" ", 1) > 0 for merge in merges):
        i = next(i for i, merge in enumerate(merges) if merge.find(" ", 1) <= 0)
        raise _error(gguf, "tokenizer.ggml.merges", f"entry {i} ({merges[i]!r}) is not two tokens separated "
                                                    f"by a space")
    for key in TOKENIZER_BOOL_KEYS:
        get_bool(gguf, key, default=None)
    for key in gguf.fields:
        if _SPECIAL_ID_KEY.fullmatch(key):
            token_id = get_int(gguf, key)
            if not 0 <= token_id < n_vocab:
                raise _error(gguf, key, f"is {token_id}, outside the vocabulary of {n_vocab} tokens")
    get_str(gguf, "tokenizer.chat_template", default=None)
    return n_vocab
