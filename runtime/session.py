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

Save format (no pickle): one `.npz` written with numpy's savez and read with allow_pickle=False, holding the
model's KV state arrays (`kv.<name>`) and `meta`, a uint8 array of UTF-8 JSON: the conversation, the cached
token ids and a fingerprint of the model file that `load` checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
import numpy as np

from ..errors import ContextOverflowError, SessionError
from . import generate

FORMAT = "nibble-session"
VERSION = 2          # 2: the KV state holds each cell's kind
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
        """Write the conversation and the KV cache to `path` (an .npz file, replaced atomically)."""
        path = Path(path)
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
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:   # a file object: savez would otherwise append ".npz" to the name
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, model, path: str | os.PathLike, *, slot: int = 0, **defaults) -> "Session":
        """A Session restored from `save`'s file: conversation and KV cache. Raises SessionError if the file
        is not a session file, or was saved with another model file, or does not fit in `model.n_ctx`."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(bytes(npz["meta"]).decode())
                state = {name[3:]: npz[name] for name in npz.files if name.startswith("kv.")}
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise SessionError(f"{path}: not a nibble session file ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SessionError(f"{path}: not a nibble session file")
        if meta.get("version") != VERSION:
            raise SessionError(f"{path}: session format version {meta.get('version')} is not supported "
                              f"(this nibble reads version {VERSION})")
        saved = meta.get("model") or {}
        if saved.get("fingerprint") != model_fingerprint(model.path):
            raise SessionError(f"{path}: saved with another model file ({saved.get('name')}, "
                              f"{saved.get('file_size')} bytes), not {model.path}; load it with that model")
        tokens = [int(t) for t in meta.get("tokens", [])]
        if len(tokens) > model.n_ctx:
            raise ContextOverflowError(len(tokens), model.n_ctx,
                                       f"{path}: the session holds {len(tokens)} tokens but the context "
                                       f"holds {model.n_ctx}; load it with n_ctx >= {len(tokens)}")
        messages = meta.get("messages", [])
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in messages):
            raise SessionError(f"{path}: the conversation in the file is malformed")
        session = cls(model, meta.get("system"), slot=slot, **defaults)
        session.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        model.load_kv_state(state, slot)
        if list(model.cached_tokens(slot)) != tokens:
            model.reset(slot)
            raise SessionError(f"{path}: the KV state does not match the saved tokens; the file is damaged")
        return session

