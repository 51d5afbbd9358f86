"""A conversation that keeps its KV cache between turns.

    session = model.session(system="You are terse.")
    for piece in session.send("Hi!"):
        print(piece, end="")
    session.save("chat.npz");  session = Session.load(model, "chat.npz")

Each turn renders the whole conversation with the chat template and hands the ids to `generate.stream`,
whose prefill keeps the longest prefix the cache already holds and evaluates only the rest: the system
prompt and earlier turns are not evaluated again (prompt caching). The assistant's reply is recorded as the
text that was shown, so a stop string, Ctrl-C (`cancel`) or `max_tokens` leave a conversation that matches
the screen; a turn cancelled before any text appeared is dropped.

Save format (no pickle): one `.npz` written with numpy's savez, holding the model's KV state arrays
(`kv.tokens` int64 (n,), `kv.kinds` int8 (n,): each cell's row kind (runtime/engine.py), `kv.k` and `kv.v`
float16 (n_layers, n, n_head_kv, head_dim)) and `meta`, a uint8
array of UTF-8 JSON: the conversation, the cached token ids, the n_ctx it was saved with and a fingerprint of
the model file. `load` trusts none of it: it reads the zip and the .npy headers itself and checks every
size, dtype and shape (against the model) before it decompresses or allocates anything, bounds the JSON's
size and nesting before parsing it, checks the type of every field, and refuses NaN or infinite KV values;
any failure is a SessionError (ContextOverflowError when the session does not fit the model's n_ctx) and
leaves the model's cache as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import threading
import zipfile
from pathlib import Path

import numpy as np

from ..errors import ContextOverflowError, SessionError
from . import generate

FORMAT = "nibble-session"
VERSION = 2          # 2: the KV cache in float16, with each cell's kind (version 1 files are refused)
_FINGERPRINT_HEAD = 8 << 20   # the GGUF header (metadata, tensor table) and the first tensors
_FINGERPRINT_TAIL = 1 << 20


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the file's size, its first 8 MiB (metadata and tensor table) and its last 1 MiB: cheap
    to compute at every load and different for any other model or quantization."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_HEAD))
        if size > _FINGERPRINT_HEAD:
            f.seek(max(_FINGERPRINT_HEAD, size - _FINGERPRINT_TAIL))
            h.update(f.read())
    return h.hexdigest()


class Session:
    """A chat with `model` on KV slot `slot`. `defaults` are keywords of `generate.stream` (temperature,
    max_tokens, stop, ...) used by every `send` unless overridden there."""

    def __init__(self, model, system: str | None = None, *, template=None, slot: int = 0, **defaults):
        self.model = model
        self.system = system
        self.template = template or generate.chat_template(model)
        self.slot = slot
        self.defaults = defaults
        self.messages: list[dict] = []   # user and assistant turns; the system prompt is kept apart
        self.last: generate.Stream | None = None

    def conversation(self, user_message: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += self.messages
        if user_message is not None:
            msgs.append({"role": "user", "content": user_message})
        return msgs

    def send(self, message: str, *, cancel: threading.Event | None = None, **kw) -> generate.Stream:
        """Stream the assistant's reply to `message`; the turn joins the conversation when the stream ends.
        Raises ContextOverflowError (conversation unchanged) when the conversation no longer fits."""
        ids = generate.chat_prompt(self.model, self.conversation(message), template=self.template)
        stream = generate.stream(self.model, ids, cancel=cancel, cache_prompt=True, **{**self.defaults, **kw})
        stream._on_finish = lambda s: self._record(message, s)
        self.last = stream
        return stream

    def _record(self, message: str, stream: generate.Stream) -> None:
        if stream.slot >= 0:
            self.slot = stream.slot          # where the engine left this conversation's cache
        if stream.finish_reason == "cancelled" and not stream.text:
            return
        self.messages.append({"role": "user", "content": message})
        self.messages.append({"role": "assistant", "content": stream.text})

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and empty the KV cache."""
        self.messages.clear()
        self.model.reset(self.slot)
        self.last = None

    @property
    def n_past(self) -> int:
        return self.model.n_past(self.slot)

    # ---- save / load ----

    def save(self, path: str | os.PathLike) -> Path:
        """Write the conversation and the KV cache to `path` (an .npz file, replaced atomically). Raises
        SessionError, leaving nothing behind, when it cannot be written (a directory, no permission, a full
        disk)."""
        path = Path(path)
        if path.is_dir():
            raise SessionError(f"{path} is a directory; give a file name, such as {path / 'chat.npz'}")
        tmp = path.with_name(path.name + ".tmp")
        try:
            meta = {
                "format": FORMAT, "version": VERSION,
                "model": {"name": getattr(self.model, "name", None),
                          "architecture": getattr(self.model, "architecture", None),
                          "file_size": os.path.getsize(self.model.path),
                          "fingerprint": model_fingerprint(self.model.path)},
                "n_ctx": self.model.n_ctx,
                "system": self.system,
                "messages": self.messages,
                "tokens": [int(t) for t in self.model.cached_tokens(self.slot)],
            }
            arrays = {f"kv.{name}": np.ascontiguousarray(a) for name, a in self.model.kv_state(self.slot).items()}
            arrays["meta"] = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), dtype=np.uint8)
            try:
                with open(tmp, "wb") as f:   # a file object: savez would otherwise append ".npz" to the name
                    np.savez(f, **arrays)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()   # still there only if something failed
        except OSError as e:
            raise SessionError(f"cannot save the session to {path}: {e.strerror or e}") from None
        return path

    @classmethod
    def load(cls, model, path: str | os.PathLike, *, slot: int = 0, **defaults) -> "Session":
        """A Session restored from `save`'s file: conversation and KV cache. Raises SessionError if the file
        is not a well-formed session file or was saved with another model file, and ContextOverflowError if
        its tokens do not fit in `model.n_ctx`; the model's cache is touched only once the whole file has
        passed (see `_SessionFile`)."""
        path = Path(path)
        with _SessionFile(path) as file:
            meta = _check_meta(file.meta(), path)
            n = file.n_tokens
            if len(meta["tokens"]) != n:
                raise SessionError(f"{path}: the file holds {n} cached tokens but its metadata lists "
                                   f"{len(meta['tokens'])}; the file is damaged")
            saved = meta["model"]
            if saved["fingerprint"] != model_fingerprint(model.path):
                raise SessionError(f"{path}: saved with another model file ({saved.get('name')}, "
                                   f"{saved.get('file_size')} bytes), not {model.path}; load it with that model")
            engine = model.engine
            if engine is None:
                raise SessionError(f"{path}: {model.name} was loaded with vocab_only=True and has no KV cache")
            _, n_layers, n_ctx, n_head_kv, head_dim = engine.k_cache.shape
            if n > n_ctx:
                raise ContextOverflowError(n, n_ctx, f"{path}: the session holds {n} tokens (it was saved with "
                                                     f"n_ctx {meta['n_ctx']}) but the context holds {n_ctx}; "
                                                     f"load the model with n_ctx >= {n}")
            state = {"tokens": file.array("tokens", (n,)), "kinds": file.array("kinds", (n,)),
                     "k": file.array("k", (n_layers, n, n_head_kv, head_dim)),
                     "v": file.array("v", (n_layers, n, n_head_kv, head_dim))}
        tokens = state["tokens"]
        if n and (tokens.min() < 0 or tokens.max() >= model.n_vocab):
            raise SessionError(f"{path}: a cached token is outside the vocabulary; the file is damaged")
        if tokens.tolist() != meta["tokens"]:
            raise SessionError(f"{path}: the cached tokens do not match the saved ones; the file is damaged")
        if n and (state["kinds"].min() < 0 or state["kinds"].max() > 7):
            raise SessionError(f"{path}: a cell's kind is not one nibble writes; the file is damaged")
        for name in ("k", "v"):
            if not np.isfinite(state[name]).all():
                raise SessionError(f"{path}: the saved KV cache holds NaN or infinite values; the file is damaged")
        session = cls(model, meta["system"], slot=slot, **defaults)
        session.messages = [{"role": m["role"], "content": m["content"]} for m in meta["messages"]]
        model.load_kv_state(state, slot)
        return session


# ---- reading a session file: every size, type and shape checked before anything is decompressed ----

MAX_META_BYTES = 8 << 20          # a 128k-token conversation takes ~3 MB: ids and text
MAX_META_CONTAINERS = 1 << 16     # arrays and objects in it: one per message, and a few
MAX_META_DEPTH = 4                # meta -> messages -> message; meta -> model
_MAX_CENTRAL_DIRECTORY = 1 << 16  # five entries take ~300 bytes
# name in the file: (dtype, number of dimensions)
_MEMBERS = {"meta": (np.dtype("|u1"), 1), "kv.tokens": (np.dtype("<i8"), 1), "kv.kinds": (np.dtype("|i1"), 1),
            "kv.k": (np.dtype("<f2"), 4), "kv.v": (np.dtype("<f2"), 4)}
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKETS = re.compile(r"[^\[\]{}]+")
_JSON_INNERMOST = re.compile(r"\[\]|\{\}")


class _SessionFile:
    """The arrays of a session file (an .npz: a zip of .npy files), read the way a GGUF reader reads a
    tensor table: the zip's central directory is sized from its end record before zipfile parses it; the
    members must be exactly those `save` writes, stored or deflated; each member's .npy header is parsed
    from its stream (numpy's own header reader) and its dtype, rank and declared size are checked against
    the header before a byte of data is read. `array` then reads into an array whose shape the caller
    checked against the model, so a zip bomb or a header that declares 10^12 floats costs nothing."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as e:
            raise SessionError(f"{path}: cannot read the session file: {e.strerror or e}") from None
        self._zip = None
        try:
            self._zip = self._open_zip()
            self._headers = {name: self._header(name) for name in _MEMBERS}
            self.n_tokens = self._headers["kv.tokens"][0][0]
            if self._headers["kv.kinds"][0][0] != self.n_tokens:
                raise self._damaged(f"kv.kinds holds {self._headers['kv.kinds'][0][0]} cells, not {self.n_tokens}")
            for name in ("kv.k", "kv.v"):
                shape = self._headers[name][0]
                if shape[1] != self.n_tokens:
                    raise self._damaged(f"{name} holds {shape[1]} tokens, not {self.n_tokens}")
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self) -> "_SessionFile":
        return self

    def __exit__(self, *exc) -> None:
        if self._zip is not None:
            self._zip.close()
        self._file.close()

    def _damaged(self, why: str) -> SessionError:
        return SessionError(f"{self.path}: not a nibble session file, or a damaged one ({why})")

    def _open_zip(self) -> zipfile.ZipFile:
        # zipfile on crafted bytes raises BadZipFile, but also NotImplementedError (a version or a method),
        # struct.error, UnicodeDecodeError (a name), OSError (a seek before the start), ...: all mean damaged.
        try:
            end = zipfile._EndRecData(self._file)   # the end record (zip64 too), as ZipFile reads it
        except Exception as e:
            raise self._damaged(f"{type(e).__name__}: {e}") from None
        if end is None:
            raise self._damaged("not a zip archive")
        if end[zipfile._ECD_ENTRIES_TOTAL] != len(_MEMBERS) or end[zipfile._ECD_SIZE] > _MAX_CENTRAL_DIRECTORY:
            raise self._damaged(f"{end[zipfile._ECD_ENTRIES_TOTAL]} entries in a {end[zipfile._ECD_SIZE]}-byte "
                                f"directory")
        try:
            zf = zipfile.ZipFile(self._file)
        except Exception as e:
            raise self._damaged(f"{type(e).__name__}: {e}") from None
        names = sorted(info.filename for info in zf.infolist())
        if names != sorted(f"{name}.npy" for name in _MEMBERS):
            zf.close()
            raise self._damaged(f"it holds {', '.join(names)[:200]}")
        return zf

    def _header(self, name: str) -> tuple[tuple[int, ...], int]:
        """(shape, offset of the data) of member `name`, its dtype and declared size checked."""
        dtype, ndim = _MEMBERS[name]
        info = self._zip.getinfo(f"{name}.npy")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x1:
            raise self._damaged(f"{name} is encrypted or compressed with method {info.compress_type}")
        try:
            with self._zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"npy format version {version}")
                shape, fortran_order, found = read(f)
                offset = f.tell()
        except Exception as e:   # as in _open_zip; and numpy parses the header with ast.literal_eval
            raise self._damaged(f"{name}: {type(e).__name__}: {e}") from None
        if found != dtype or fortran_order or len(shape) != ndim:
            raise self._damaged(f"{name} is a {'Fortran-order ' if fortran_order else ''}{found} array of "
                                f"shape {shape}, not {ndim}-dimensional {dtype}")
        if info.file_size != offset + math.prod(shape) * dtype.itemsize:
            raise self._damaged(f"{name} declares {info.file_size} bytes for an array of shape {shape}")
        return shape, offset

    def _read_into(self, name: str, out: np.ndarray) -> np.ndarray:
        """Fill `out` (whose shape the caller chose) with member `name`'s data, 1 MiB at a time."""
        if out.shape != self._headers[name][0]:
            raise self._damaged(f"{name} has shape {self._headers[name][0]}, expected {out.shape}")
        view = memoryview(out.reshape(-1)).cast("B")
        offset = self._headers[name][1]
        try:
            with self._zip.open(f"{name}.npy") as f:
                if len(f.read(offset)) != offset:   # the .npy header, checked in _header
                    raise EOFError(f"{name} ends in its header")
                done = 0
                while done < len(view):
                    chunk = f.read(min(1 << 20, len(view) - done))
                    if not chunk:
                        raise EOFError(f"{name} ends after {done} of {len(view)} bytes")
                    view[done:done + len(chunk)] = chunk
                    done += len(chunk)
        except Exception as e:   # as in _open_zip; here also a bad CRC and zlib.error
            raise self._damaged(f"{type(e).__name__}: {e}") from None
        return out

    def meta(self):
        """The JSON metadata, parsed once its size and nesting are known to be a session's."""
        (size,), _ = self._headers["meta"]
        if size > MAX_META_BYTES:
            raise self._damaged(f"{size} bytes of metadata, more than {MAX_META_BYTES}")
        raw = self._read_into("meta", np.empty(size, np.uint8))
        try:
            text = raw.tobytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._damaged(f"metadata: {e}") from None
        # Before json.loads builds anything: its arrays and objects, counted and peeled innermost first on
        # the brackets outside strings.
        brackets = _JSON_BRACKETS.sub("", _JSON_STRING.sub("", text))
        if brackets.count("[") + brackets.count("{") > MAX_META_CONTAINERS:
            raise self._damaged("the metadata holds too many arrays and objects")
        for _ in range(MAX_META_DEPTH):
            brackets = _JSON_INNERMOST.sub("", brackets)
        if brackets:
            raise self._damaged(f"the metadata nests deeper than {MAX_META_DEPTH} levels")
        try:
            return json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise self._damaged(f"metadata: {e}") from None

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = f"kv.{name}"
        return self._read_into(key, np.empty(shape, _MEMBERS[key][0]))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a session file holds")


def _check_meta(meta, path: Path) -> dict:
    """`meta` with every field of the right type, or SessionError."""
    def bad(why: str) -> SessionError:
        return SessionError(f"{path}: the session's metadata is malformed ({why})")

    def text(v) -> bool:   # a str that can be written out (no lone surrogates from a \ud800 escape)
        return isinstance(v, str) and _encodes(v)

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SessionError(f"{path}: not a nibble session file")
    if not whole(meta.get("version")) or meta["version"] != VERSION:
        raise SessionError(f"{path}: session format version {meta.get('version')!r:.20} is not supported "
                           f"(this nibble reads version {VERSION})")
    model = meta.get("model")
    if not (isinstance(model, dict) and text(model.get("fingerprint"))
            and all(model.get(k) is None or text(model[k]) for k in ("name", "architecture"))
            and (model.get("file_size") is None or whole(model["file_size"]))):
        raise bad("model")
    if not whole(meta.get("n_ctx")) or meta["n_ctx"] < 1:
        raise bad("n_ctx")
    if not (meta.get("system") is None or text(meta["system"])):
        raise bad("system")
    messages = meta.get("messages")
    if not (isinstance(messages, list) and all(isinstance(m, dict) and m.get("role") in ("user", "assistant")
                                               and text(m.get("content")) for m in messages)):
        raise bad("messages: each must be a user or assistant turn with text content")
    tokens = meta.get("tokens")
    if not (isinstance(tokens, list) and all(map(whole, tokens))):
        raise bad("tokens")
    if len(tokens) > meta["n_ctx"]:
        raise bad(f"{len(tokens)} tokens in a context of {meta['n_ctx']}")
    return meta


def _encodes(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
