"""Tokenizers built only from a GGUF's `tokenizer.ggml.*` metadata, reproducing llama.cpp's `llama_tokenize`.

How llama.cpp turns text into ids (src/llama-vocab.cpp), and where each step lives here:

1. Load (`_read_vocab`): tokens, token types, scores or merges, special ids, add_bos/add_eos. Then tokens are
   re-typed by their text: every end-of-generation name (`<|im_end|>`, `<end_of_turn>`, `</s>`, ...) and
   fill-in-middle name becomes a control token, whatever the file says. Ids with a control, user-defined or
   unknown type form the "special" list, longest text (in bytes) first.
2. Partition (`Tokenizer._partition`): for each special token in that order, every occurrence in the text not
   yet claimed is cut out as that token. User-defined tokens are always cut out; control and unknown tokens only
   with parse_special.
3. Each remaining text fragment goes to the tokenizer model:
   - `gpt2`: byte-level BPE. The pre-tokenizer named by `tokenizer.ggml.pre` is a sequence of regex splits
     (table PRE_TOKENIZERS, copied from llm_tokenizer_bpe), then bytes are mapped to GPT-2's printable
     alphabet and merged by rank. Built with HF `tokenizers` (the same regexes, Oniguruma's \\p classes).
   - `llama`: SentencePiece-style merging by score with `<0xNN>` byte fallback; a space is prepended to a
     fragment that follows a special token when `add_space_prefix` says so. Built with `sentencepiece`
     (formats/spm.py), which starts in ~0.05 s from its cache where HF `tokenizers` needs ~1.2 s.
4. BOS/EOS are added around the result when add_special and the file's add_bos_token/add_eos_token ask.

Decoding is `token_to_piece` per token: control and unknown tokens give nothing unless `special`,
user-defined ones their text, byte tokens their byte, normal ones their text with `▁` (SPM) or the GPT-2
byte alphabet (BPE) undone. Bytes that are not valid UTF-8 become U+FFFD. llama.cpp's `clean_spaces` pass
("Hello ." -> "Hello.") is not applied: it is off for all three catalogue models, and without it decoding
is lossless and the same whether done at once or token by token.
"""

from __future__ import annotations

import codecs
import warnings
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
from gguf.constants import GGUFValueType

from ..errors import ModelFormatError, TokenizerError
from .gguf import VALUE_TYPE_NAMES, GGUFFile

# ---- token types (GGUF `tokenizer.ggml.token_type`) and llama.cpp's attribute bits (llama_token_attr) ----

TYPE_UNDEFINED, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = range(7)

ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5

_ATTR_OF_TYPE = {TYPE_NORMAL: ATTR_NORMAL, TYPE_UNKNOWN: ATTR_UNKNOWN, TYPE_CONTROL: ATTR_CONTROL,
                 TYPE_USER_DEFINED: ATTR_USER_DEFINED, TYPE_UNUSED: ATTR_UNUSED, TYPE_BYTE: ATTR_BYTE}
_ATTR_SPECIAL = ATTR_CONTROL | ATTR_UNKNOWN   # cut out of text only with parse_special; decoded only with special

# ---- names llama.cpp re-types at load (llama_vocab::impl::load) ----

# Any token with one of these texts ends generation and becomes a control token.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
})
# Fill-in-middle names, found by text when the file gives no id; the found token becomes a control token.
# pad, repo and file-separator tokens also end generation.
FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_FIM_EOG = ("fim_pad", "fim_rep", "fim_sep")

# `tokenizer.ggml.<kind>_token_id` keys; the old `prefix/suffix/middle` names are aliases of fim_pre/suf/mid.
_SPECIAL_ID_KEYS = {"bos": "bos", "eos": "eos", "eot": "eot", "eom": "eom", "unknown": "unk", "seperator": "sep",
                    "padding": "pad", "mask": "mask", "fim_pre": "fim_pre", "fim_suf": "fim_suf",
                    "fim_mid": "fim_mid", "fim_pad": "fim_pad", "fim_rep": "fim_rep", "fim_sep": "fim_sep",
                    "prefix": "fim_pre", "suffix": "fim_suf", "middle": "fim_mid"}

# ---- BPE pre-tokenizers: llm_tokenizer_bpe's regex lists, applied in order, each isolating its matches ----

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False   # a whole pre-token that is itself a token is taken as is (llama 3)
    add_bos: bool = False         # llama.cpp's default when the file has no add_bos_token


def _family(names: str, pre: PreTokenizer) -> dict[str, PreTokenizer]:
    return {name: pre for name in names.split()}


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **_family("gpt-2 phi-2 mpt olmo jais trillion granite-docling exaone4", PreTokenizer((_GPT2,))),
    # digits split off one by one *before* the GPT-2 regex runs (transformers' converter gets this wrong)
    **_family("smollm starcoder refact command-r codeshell exaone minerva-7b", PreTokenizer((r"\p{N}", _GPT2))),
    **_family("qwen2 deepseek-r1-qwen stablelm2 megrez hunyuan", PreTokenizer((_QWEN2,))),
    **_family("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
              PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (openai/gpt-2 encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


# ---- reading and checking the metadata ----

@dataclass
class Vocab:
    """Everything llama.cpp's vocabulary loader derives from the metadata, checked."""
    model: str                       # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None                  # tokenizer.ggml.pre (BPE only)
    tokens: list[str]
    token_to_id: dict[str, int]
    attrs: np.ndarray                # (n_vocab,) uint8 ATTR_* bits, after llama.cpp's re-typing
    scores: np.ndarray | None        # (n_vocab,) float32, SPM only
    merges: list[tuple[str, str]] | None   # BPE only, in rank order
    special: dict[str, int | None]   # bos, eos, eot, eom, unk, sep, pad, mask, fim_*
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    eog_ids: frozenset[int] = field(default_factory=frozenset)


_INT_TYPES = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
              GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}


def _type_name(t: int | None) -> str:
    return VALUE_TYPE_NAMES.get(t, f"type {t}")


def _array(gguf: GGUFFile, key: str, item_types: set[int], n: int | None = None, required: bool = False):
    f = gguf.fields.get(key)
    if f is None:
        if required:
            raise ModelFormatError(f"{gguf.name}: metadata {key!r} is missing; the file has no usable tokenizer")
        return None
    expected = " or ".join(sorted(_type_name(t) for t in item_types))
    if f.type != GGUFValueType.ARRAY or f.item_type not in item_types:
        got = f"ARRAY of {_type_name(f.item_type)}" if f.type == GGUFValueType.ARRAY else _type_name(f.type)
        raise ModelFormatError(f"{gguf.name}: metadata {key!r} must be an ARRAY of {expected}, got {got}")
    if n is not None and len(f.value) != n:
        raise ModelFormatError(f"{gguf.name}: metadata {key!r} has {len(f.value)} entries but the vocabulary has "
                               f"{n} tokens")
    return f.value


def _bool(gguf: GGUFFile, key: str, default: bool) -> bool:
    f = gguf.fields.get(key)
    if f is None:
        return default
    if f.type != GGUFValueType.BOOL:
        raise ModelFormatError(f"{gguf.name}: metadata {key!r} must be a BOOL, got {_type_name(f.type)} {f.value!r}")
    return bool(f.value)


def _string(gguf: GGUFFile, key: str) -> str | None:
    f = gguf.fields.get(key)
    if f is None:
        return None
    if f.type != GGUFValueType.STRING:
        raise ModelFormatError(f"{gguf.name}: metadata {key!r} must be a STRING, got {_type_name(f.type)}")
    return f.value


def _special_ids(gguf: GGUFFile, model: str, pre: str | None, n_vocab: int) -> dict[str, int | None]:
    # llama.cpp's defaults per tokenizer model; a default outside the vocabulary means "none"
    special: dict[str, int | None] = dict.fromkeys(set(_SPECIAL_ID_KEYS.values()))
    if model == "llama":
        special.update(bos=1, eos=2, unk=0)
    else:
        special.update(bos=11, eos=11)
        if pre in ("glm4", "chatglm-bpe"):
            special["bos"] = None
    for k, v in special.items():
        if v is not None and v >= n_vocab:
            special[k] = None
    for key_name, kind in _SPECIAL_ID_KEYS.items():
        key = f"tokenizer.ggml.{key_name}_token_id"
        f = gguf.fields.get(key)
        if f is None:
            continue
        if f.type not in _INT_TYPES:
            raise ModelFormatError(f"{gguf.name}: metadata {key!r} must be an integer, got {_type_name(f.type)} "
                                   f"{f.value!r}")
        if not 0 <= f.value < n_vocab:
            raise ModelFormatError(f"{gguf.name}: metadata {key!r} = {f.value} is outside the vocabulary "
                                   f"(ids 0..{n_vocab - 1})")
        special[kind] = int(f.value)
    return special


def read_vocab(gguf: GGUFFile) -> Vocab:
    """Read and check `tokenizer.ggml.*`, then apply llama.cpp's re-typing and end-of-generation marking."""
    name = gguf.name
    model = _string(gguf, "tokenizer.ggml.model")
    if model is None:
        raise ModelFormatError(f"{name}: metadata 'tokenizer.ggml.model' is missing; the file has no tokenizer")
    if model not in ("gpt2", "llama"):
        raise TokenizerError(f"{name}: tokenizer model {model!r} is not supported (nibble implements 'gpt2' "
                             f"byte-level BPE and 'llama' SentencePiece-style vocabularies)")
    pre = _string(gguf, "tokenizer.ggml.pre") if model == "gpt2" else None
    if model == "gpt2":
        if pre is None:
            warnings.warn(f"{name}: no 'tokenizer.ggml.pre'; using the 'default' pre-tokenizer as llama.cpp does "
                          f"(generation quality may suffer: convert the model again)", stacklevel=3)
            pre = "default"
        elif pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"{name}: pre-tokenizer {pre!r} is not supported (nibble knows: "
                                 f"{', '.join(sorted(PRE_TOKENIZERS))})")

    tokens = _array(gguf, "tokenizer.ggml.tokens", {GGUFValueType.STRING}, required=True)
    n = len(tokens)
    if n == 0:
        raise ModelFormatError(f"{name}: metadata 'tokenizer.ggml.tokens' is empty")
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]   # as llama.cpp names empty tokens
    token_to_id = dict(zip(tokens, range(n)))
    if len(token_to_id) != n:
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if seen.setdefault(t, i) != i:
                raise ModelFormatError(f"{name}: token {t!r} appears twice in the vocabulary (ids {seen[t]} and {i})")

    types = _array(gguf, "tokenizer.ggml.token_type", {GGUFValueType.INT32}, n)
    scores = _array(gguf, "tokenizer.ggml.scores", {GGUFValueType.FLOAT32, GGUFValueType.INT32}, n)
    merges = None
    if model == "gpt2":
        merges = _split_merges(_array(gguf, "tokenizer.ggml.merges", {GGUFValueType.STRING}, required=True), name)
    else:
        scores = np.zeros(n, np.float32) if scores is None else scores.astype(np.float32)

    attrs = np.full(n, ATTR_NORMAL, np.uint8)
    if types is not None:
        attrs[:] = ATTR_UNDEFINED   # type numbers outside the table stay undefined, as in llama.cpp
        for t, a in _ATTR_OF_TYPE.items():
            attrs[types == t] = a

    special = _special_ids(gguf, model, pre, n)
    if model == "llama":
        add_bos, add_eos, add_space_prefix = True, False, True
    else:
        add_bos, add_eos, add_space_prefix = PRE_TOKENIZERS[pre].add_bos, False, False
    add_space_prefix = _bool(gguf, "tokenizer.ggml.add_space_prefix", add_space_prefix)
    add_bos = _bool(gguf, "tokenizer.ggml.add_bos_token", add_bos)
    add_eos = _bool(gguf, "tokenizer.ggml.add_eos_token", add_eos)
    for flag, kind in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and special[kind] is None:
            raise ModelFormatError(f"{name}: 'tokenizer.ggml.add_{kind}_token' is true but the file sets no "
                                   f"'tokenizer.ggml.{kind}_token_id'")

    # Re-typing by text, as llama.cpp does at load. Fill-in-middle names only where the file gave no id.
    for kind, texts in FIM_TEXTS.items():
        if special[kind] is None:
            for t in texts:
                if t in token_to_id:
                    special[kind] = token_to_id[t]
                    attrs[special[kind]] |= ATTR_CONTROL
                    break
    eog = {special[k] for k in _FIM_EOG if special[k] is not None}
    for t in EOG_TEXTS:
        i = token_to_id.get(t)
        if i is not None:
            eog.add(i)
            attrs[i] |= ATTR_CONTROL
    eog.update(special[k] for k in ("eos", "eot", "eom") if special[k] is not None)

    return Vocab(model=model, pre=pre, tokens=tokens, token_to_id=token_to_id, attrs=attrs, scores=scores,
                 merges=merges, special=special, add_bos=add_bos, add_eos=add_eos,
                 add_space_prefix=add_space_prefix, eog_ids=frozenset(eog))


def special_token_texts(gguf: GGUFFile) -> tuple[str, str]:
    """The text of the BOS and EOS tokens ("" where there is none): `bos_token` and `eos_token` for chat
    templates, without building the tokenizer."""
    model = _string(gguf, "tokenizer.ggml.model")
    tokens = _array(gguf, "tokenizer.ggml.tokens", {GGUFValueType.STRING})
    if model not in ("gpt2", "llama") or not tokens:
        return "", ""
    pre = _string(gguf, "tokenizer.ggml.pre") if model == "gpt2" else None
    special = _special_ids(gguf, model, pre, len(tokens))
    return tuple("" if special[k] is None else tokens[special[k]] for k in ("bos", "eos"))


def _split_merges(merges: list[str], name: str) -> list[tuple[str, str]]:
    """"a b" -> ("a", "b"), split at the first space at or after the second character (as llama.cpp, so that a
    merge may start with a space)."""
    pairs = []
    for i, m in enumerate(merges):
        cut = m.find(" ", 1)
        if cut < 0:
            raise ModelFormatError(f"{name}: merge #{i} {m!r} in 'tokenizer.ggml.merges' is not two tokens "
                                   f"separated by a space")
        pairs.append((m[:cut], m[cut + 1:]))
    return pairs


# ---- finding special tokens in text ----

class _SpecialIndex:
    """Which of a fixed, ordered list of token texts occur in a text. Gemma has ~6,400 special tokens, most of
    them `<unusedN>`: tokens are grouped by their first 4 characters, and a group is looked at only when its
    prefix occurs, so a text costs a few hundred substring searches instead of thousands."""

    def __init__(self, ids: list[int], texts: list[str]):
        self.ids = ids
        self.texts = texts
        groups: dict[str, list[int]] = {}
        for order, t in enumerate(texts):
            groups.setdefault(t[:4], []).append(order)
        self.groups = list(groups.items())

    def present(self, text: str) -> list[int]:
        """Positions (in the list's order) of the texts that occur in `text`."""
        found = []
        for prefix, members in self.groups:
            if prefix in text:
                found.extend(o for o in members if self.texts[o] in text)
        found.sort()
        return found


# ---- the tokenizer ----

class Tokenizer:
    """A GGUF vocabulary as llama.cpp uses it: `encode` is llama_tokenize, `decode` is llama_detokenize.

    `tokens` is the vocabulary as stored; `eog_ids` the tokens that end generation (EOS, EOT, `<|im_end|>`,
    `<end_of_turn>`, ... as llama.cpp marks them)."""

    def __init__(self, vocab: Vocab, backend):
        self.vocab = vocab
        self.tokens: list[str] = vocab.tokens
        self.n_vocab = len(vocab.tokens)
        self.bos_id: int | None = vocab.special["bos"]
        self.eos_id: int | None = vocab.special["eos"]
        self.add_bos: bool = vocab.add_bos
        self.add_eos: bool = vocab.add_eos
        self.add_space_prefix: bool = vocab.add_space_prefix
        self.eog_ids: frozenset[int] = vocab.eog_ids
        self.model = vocab.model
        self._attrs = vocab.attrs
        self._backend = backend
        special = np.nonzero(self._attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))[0].tolist()
        special.sort(key=lambda i: (-len(self.tokens[i].encode("utf-8")), i))   # longest first, in bytes
        plain = [i for i in special if not self._attrs[i] & _ATTR_SPECIAL]
        self._specials = {True: _SpecialIndex(special, [self.tokens[i] for i in special]),
                          False: _SpecialIndex(plain, [self.tokens[i] for i in plain])}
        self._pieces: list[bytes | None] = [None] * self.n_vocab

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, cache_dir: Path | None = None) -> "Tokenizer":
        """The tokenizer the file describes. `cache_dir`: where a SentencePiece vocabulary's built model is
        cached between runs (None: built every time, ~1 s for Gemma)."""
        vocab = read_vocab(gguf)
        if vocab.model == "gpt2":
            backend = _BPEBackend(vocab, gguf.name)
        else:
            backend = _SPMBackend(vocab, gguf.name, cache_dir)
        return cls(vocab, backend)

    # ---- text -> ids ----

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text -> token ids, as llama_tokenize(text, add_special, parse_special)."""
        return self._encode_fragments(self._partition(_clean(text), parse_special), add_special)

    def encode_marked(self, text: str, barrier: str, add_special: bool = False) -> list[int]:
        """Encode `text` with special tokens parsed, where no special token may span a `barrier` character;
        the barriers are then removed. formats/chat.py writes barriers around message content and inside
        control-token text that a user typed, so such text stays plain text."""
        fragments = [f if type(f) is int else f.replace(barrier, "")
                     for f in self._partition(_clean(text), parse_special=True)]
        return self._encode_fragments([f for f in fragments if f != ""], add_special)

    def control_texts_in(self, text: str) -> list[str]:
        """The texts of the control and unknown tokens that occur in `text` (those that parse_special would
        turn into tokens), longest first."""
        index = self._specials[True]
        return [index.texts[o] for o in index.present(text) if self._attrs[index.ids[o]] & _ATTR_SPECIAL]

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """tokenizer_st_partition: cut special tokens out of the text, longest first (see the module
        docstring). Returns text fragments (str) and token ids (int), in order."""
        if not text:
            return []
        fragments: list[str | int] = [text]
        index = self._specials[parse_special]
        for order in index.present(text):
            tid, piece = index.ids[order], index.texts[order]
            out: list[str | int] = []
            for frag in fragments:
                if type(frag) is int or piece not in frag:
                    out.append(frag)
                    continue
                start = 0
                while (hit := frag.find(piece, start)) >= 0:
                    if hit > start:
                        out.append(frag[start:hit])
                    out.append(tid)
                    start = hit + len(piece)
                if start < len(frag):
                    out.append(frag[start:])
            fragments = out
        return fragments

    def _encode_fragments(self, fragments: list[str | int], add_special: bool) -> list[int]:
        ids: list[int] = []
        if add_special and self.add_bos:
            ids.append(self.bos_id)
        prev_special = True
        space_prefix = self.add_space_prefix and self.model == "llama"
        for frag in fragments:
            if type(frag) is int:
                ids.append(frag)
                prev_special = True
            else:
                if space_prefix and prev_special:   # llama.cpp: "prefix with space if previous is special"
                    frag = " " + frag
                ids.extend(self._backend.encode(frag))
                prev_special = False
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    # ---- ids -> text ----

    def _piece(self, token_id: int) -> bytes:
        """token_to_piece(special=True): the bytes this token stands for."""
        piece = self._pieces[token_id]
        if piece is None:
            text, attr = self.tokens[token_id], int(self._attrs[token_id])
            if attr & (_ATTR_SPECIAL | ATTR_USER_DEFINED):
                piece = text.encode("utf-8")
            elif attr & ATTR_NORMAL:
                if self.model == "llama":
                    piece = text.replace("\u2581", " ").encode("utf-8")
                else:
                    piece = b"".join(bytes((_BYTE_OF_CHAR[c],)) if c in _BYTE_OF_CHAR else c.encode("utf-8")
                                     for c in text)
            elif attr & ATTR_BYTE:
                piece = _byte_token_value(text)
            else:
                piece = b""   # unused and undefined tokens stand for nothing
            self._pieces[token_id] = piece
        return piece

    def _check_id(self, token_id) -> int:
        try:
            i = int(token_id)
        except (TypeError, ValueError):
            raise TokenizerError(f"token id {token_id!r} is not an integer") from None
        if not 0 <= i < self.n_vocab:
            raise TokenizerError(f"token id {i} is outside the vocabulary (ids 0..{self.n_vocab - 1})")
        return i

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The raw bytes a token stands for (possibly part of a UTF-8 character); b"" for a control or unknown
        token unless `special`."""
        i = self._check_id(token_id)
        if not special and self._attrs[i] & _ATTR_SPECIAL:
            return b""
        return self._piece(i)

    def _decode_piece(self, token_id, special: bool, first: bool) -> bytes:
        piece = self.token_bytes(token_id, special)
        if first and self.add_space_prefix and piece.startswith(b" "):
            piece = piece[1:]   # llama_detokenize drops the space that encoding added in front
        return piece

    def decode(self, ids, special: bool = False) -> str:
        """Token ids -> text: control tokens left out unless `special`; invalid UTF-8 becomes U+FFFD."""
        data = b"".join(self._decode_piece(t, special, first=k == 0) for k, t in enumerate(ids))
        return data.decode("utf-8", "replace")

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[self._check_id(token_id)] & ATTR_CONTROL)

    def is_eog(self, token_id: int) -> bool:
        return int(token_id) in self.eog_ids

    def token_text(self, token_id: int | None) -> str:
        """The stored text of a token ("" for None): `<bos>`, `<|im_end|>`, ..."""
        return "" if token_id is None else self.tokens[self._check_id(token_id)]

    def __repr__(self) -> str:
        kind = f"BPE, pre={self.vocab.pre}" if self.model == "gpt2" else "SPM"
        return f"Tokenizer({kind}, {self.n_vocab} tokens, bos={self.bos_id}, eos={self.eos_id})"


class IncrementalDecoder:
    """Decode tokens one at a time: `add(id)` returns the text completed so far (never half a UTF-8 character),
    `flush()` what is left. Everything returned, concatenated, equals `tokenizer.decode(all ids, special)`."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._first = True

    def add(self, token_id: int) -> str:
        piece = self.tokenizer._decode_piece(token_id, self.special, self._first)
        self._first = False
        return self._utf8.decode(piece)

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _byte_token_value(text: str) -> bytes:
    # "<0xNN>" -> the byte NN (llama.cpp's token_to_byte reads the two hex digits at [3:5])
    try:
        return bytes((int(text[3:5], 16),))
    except ValueError:
        return b""


def _clean(text: str) -> str:
    """Text as UTF-8 can carry it: lone surrogates (from undecodable bytes) become U+FFFD."""
    if isinstance(text, bytes):
        return text.decode("utf-8", "replace")
    if not isinstance(text, str):
        raise TypeError(f"expected text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


# ---- tokenizer models ----

class _BPEBackend:
    """Byte-level BPE over one text fragment, with HF `tokenizers`: the GGUF token list as the vocabulary
    (already in GPT-2's byte alphabet), merges split at their first space (at or after the second character,
    as llama.cpp), ranked by their order."""

    def __init__(self, vocab: Vocab, name: str):
        from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers

        pre = PRE_TOKENIZERS[vocab.pre]
        t2i = vocab.token_to_id
        try:
            model = models.BPE(t2i, vocab.merges, ignore_merges=pre.ignore_merges)
        except Exception:   # tokenizers raises plain Exceptions
            # HF refuses merges whose parts or result are not tokens. llama.cpp keeps them, but what they build
            # can only fall back to single-byte tokens; drop them.
            merges = [(a, b) for a, b in vocab.merges if a in t2i and b in t2i and a + b in t2i]
            try:
                model = models.BPE(t2i, merges, ignore_merges=pre.ignore_merges)
            except Exception as e:
                raise TokenizerError(f"{name}: cannot build the BPE tokenizer: {e}") from None
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._hf = hf

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids


class _SPMBackend:
    """SentencePiece-style merging over one text fragment (formats/spm.py)."""

    def __init__(self, vocab: Vocab, name: str, cache_dir: Path | None):
        from . import spm

        unk = vocab.special["unk"]
        if unk is None:
            raise TokenizerError(f"{name}: the SentencePiece vocabulary has no unknown token")
        try:
            self._sp = spm.load_processor(vocab.tokens, vocab.scores, unk, vocab.token_to_id, cache_dir)
        except TokenizerError as e:
            raise TokenizerError(f"{name}: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)
