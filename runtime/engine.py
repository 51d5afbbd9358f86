"""The engine: one architecture's weights, run state and KV cache, and the calls that move tokens through them.

The KV cache is allocated once, shaped (slots, layers, n_ctx, n_head_kv, head_dim). It holds fp16-rounded
values, as llama.cpp's F16 cache does (so the attention arithmetic is llama.cpp's), stored as float32 so the
attention loop pays no conversion (Numba has no fast f16 arithmetic); the models nibble targets are small:
SmolLM2 at n_ctx 4096 needs 180 MiB. Halving it with real f16 storage is a later option. Slot 0 serves the
library and the CLI; a server decodes several slots together, each row of a batch carrying its own
(slot, position).
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np

from ..errors import ContextOverflowError, NibbleError, OutOfMemoryError
from ..formats.gguf import GGUFFile
from ..models.linear import linear
from ..quant.ggml_exact import batch_kinds_into

DEFAULT_MAX_CTX = 4096
MAX_BATCH = 512          # prefill chunk (llama.cpp's default n_ubatch)
LOGIT_ROWS = 64          # rows of logits computed at once when every position's logits are wanted


def available_memory() -> int:
    """Bytes we may use: NIBBLE_MAX_MEMORY when set, else the kernel's MemAvailable."""
    limit = os.environ.get("NIBBLE_MAX_MEMORY")
    if limit:
        try:
            return int(limit)
        except ValueError:
            raise NibbleError(f"NIBBLE_MAX_MEMORY must be a number of bytes, got {limit!r}") from None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class Engine:
    def __init__(self, gguf: GGUFFile, arch: ModuleType, n_ctx: int | None = None, n_slots: int = 1,
                 max_batch: int = MAX_BATCH):
        self.arch = arch
        self.args = args = arch.ModelArgs.from_gguf(gguf)
        if n_ctx is None:
            n_ctx = min(args.context_length, DEFAULT_MAX_CTX)
        if n_ctx <= 0:
            raise NibbleError(f"n_ctx must be positive, got {n_ctx}")
        if n_ctx > args.context_length:
            raise ContextOverflowError(n_ctx, args.context_length,
                                       f"n_ctx {n_ctx} is larger than the model's context length "
                                       f"{args.context_length}")
        self.n_ctx, self.n_slots = n_ctx, n_slots
        self.max_batch = max_batch = min(max_batch, n_ctx)
        self._plan_memory(gguf)
        self.weights = arch.load_weights(gguf, args)
        self.model_bytes = sum(t.nbytes for t in gguf.tensors.values())
        # bytes a decode step reads: every weight once, except an untied embedding table (one row of it)
        w = self.weights
        self.weight_bytes = self.model_bytes - (w.token_embd.data.nbytes if w.output is not w.token_embd else 0)
        self.state = arch.RunState(args, max_batch)
        kv_shape = (n_slots, args.n_layers, n_ctx, args.n_head_kv, args.head_dim)
        self.k_cache = np.zeros(kv_shape, np.float32)
        self.v_cache = np.zeros(kv_shape, np.float32)
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.logits_buf = np.zeros((LOGIT_ROWS, args.n_vocab), np.float32)
        self._tok = np.zeros(max_batch, np.int64)
        self._pos = np.zeros(max_batch, np.int64)
        self._slot = np.zeros(max_batch, np.int64)
        self._kinds = np.zeros(max_batch, np.int8)
        self._outputs = np.arange(max_batch, dtype=np.int64)

    def kv_bytes(self, n_ctx: int) -> int:
        a = self.args
        return 2 * self.n_slots * a.n_layers * n_ctx * a.n_head_kv * a.head_dim * 4

    def _plan_memory(self, gguf: GGUFFile) -> None:
        """Weights (mmap'd, but resident once touched) + KV cache + activations must fit, or we refuse."""
        a = self.args
        widest = max(a.n_embd, a.q_dim, a.n_ff, a.kv_dim)
        scratch = self.max_batch * (6 * widest + 2 * a.n_ff) * 4 + LOGIT_ROWS * a.n_vocab * 4
        fixed = gguf.file_size + scratch
        required = fixed + self.kv_bytes(self.n_ctx)
        available = available_memory()
        if required > available:
            per_token = self.kv_bytes(1)
            fits = (available - fixed) // per_token if available > fixed else 0
            hint = (f"n_ctx={int(fits)} would fit" if fits >= 1 else "the weights alone do not fit")
            raise OutOfMemoryError(required, available,
                                   f"{gguf.name} with n_ctx={self.n_ctx} needs {required / 2**20:.0f} MiB "
                                   f"(weights {gguf.file_size / 2**20:.0f} MiB, KV cache "
                                   f"{self.kv_bytes(self.n_ctx) / 2**20:.0f} MiB, buffers "
                                   f"{scratch / 2**20:.0f} MiB) but {available / 2**20:.0f} MiB is available; "
                                   f"{hint}")

    # ---- the cache ----

    def n_past(self, slot: int = 0) -> int:
        return len(self.tokens[slot])

    def truncate(self, n: int, slot: int = 0) -> None:
        """Keep the first n cached tokens of a slot (what is past them is simply overwritten later)."""
        del self.tokens[slot][max(n, 0):]

    def reset(self, slot: int = 0) -> None:
        self.tokens[slot].clear()

    # ---- evaluation ----

    def _check_fits(self, n_new: int, slot: int) -> None:
        total = self.n_past(slot) + n_new
        if total > self.n_ctx:
            raise ContextOverflowError(total, self.n_ctx)

    def _run(self, ids: np.ndarray, slot: int, n_out: int) -> np.ndarray:
        """One forward over a chunk (len <= max_batch) appended to `slot`; returns the final hidden states of
        the last n_out rows."""
        B, p0 = len(ids), self.n_past(slot)
        tok, pos, slots = self._tok[:B], self._pos[:B], self._slot[:B]
        tok[:] = ids
        pos[:] = np.arange(p0, p0 + B) if B > 1 else p0
        slots[:] = slot
        kinds = self._kinds[:B]
        batch_kinds_into(kinds, B)
        hidden = self.arch.forward(self.args, self.weights, self.state, self.k_cache, self.v_cache,
                                   tok, slots, pos, kinds, self._outputs[B - n_out:B])
        self.tokens[slot].extend(int(t) for t in ids)
        return hidden

    def eval(self, ids, slot: int = 0) -> np.ndarray:
        """Append ids to the slot's cache (chunked prefill) and return the last position's logits (n_vocab,),
        a buffer reused by the next call."""
        ids = self._as_ids(ids)
        if len(ids) == 0:
            raise NibbleError("eval needs at least one token")
        self._check_fits(len(ids), slot)
        for c in range(0, len(ids), self.max_batch):
            hidden = self._run(ids[c:c + self.max_batch], slot, 1)
        out = self.logits_buf[:1]
        linear(out, hidden, self.weights.output, self.state.scratch)
        return out[0]

    def eval_all(self, ids, slot: int = 0, first: int = 0, consume=None) -> np.ndarray | None:
        """Append ids and produce the logits of positions first..len(ids)-1 of this call: returned as one
        (len - first, n_vocab) array, or, with `consume(index, logits_block)`, handed over LOGIT_ROWS rows at a
        time in a reused buffer (so a long perplexity run never holds every position's logits)."""
        ids = self._as_ids(ids)
        self._check_fits(len(ids), slot)
        result = None if consume else np.empty((max(len(ids) - first, 0), self.args.n_vocab), np.float32)
        for c in range(0, len(ids), self.max_batch):
            chunk = ids[c:c + self.max_batch]
            lo = max(first - c, 0)                  # rows of this chunk whose logits are wanted
            hidden = self._run(chunk, slot, len(chunk) - lo if lo < len(chunk) else 1)
            if lo >= len(chunk):
                continue
            for r in range(0, len(hidden), LOGIT_ROWS):
                rows = hidden[r:r + LOGIT_ROWS]
                index = c + lo + r - first
                dst = self.logits_buf[:len(rows)] if consume else result[index:index + len(rows)]
                linear(dst, rows, self.weights.output, self.state.scratch)
                if consume:
                    consume(index, dst)
        return result

    def _as_ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        n_vocab = self.args.n_vocab
        if arr.size and (arr.min() < 0 or arr.max() >= n_vocab):
            bad = int(arr[(arr < 0) | (arr >= n_vocab)][0])
            raise NibbleError(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})")
        return arr
