"""The engine: one architecture's weights, run state and KV cache, and the calls that move tokens through them.

The KV cache is allocated once, shaped (slots, layers, n_ctx, n_head_kv, head_dim), in IEEE halves as
llama.cpp's F16 cache (so the attention arithmetic is llama.cpp's; the kernels widen each value to float32
exactly): SmolLM2 at n_ctx 4096 needs 90 MiB.

Batches and kinds. Every row of a forward carries its own (slot, position) and its *kind*
(`quant.ggml_exact.batch_kinds`): which of llama.cpp's kernel variants computes it, the one thing through which
llama.cpp's bits depend on the batch. A prompt's rows get the kinds a one-call evaluation of that prompt
gives them (`fresh_kinds`: batches of up to `max_batch` rows, llama.cpp's n_ubatch), a decode row the
single-row kind; so one `forward_rows` can mix rows of several requests (a server's step, a verification of
draft tokens) and each row's bits are what it would get alone. Each cached cell remembers its kind
(`cell_kinds`): a cached prefix is reused only where its cells are what a fresh evaluation would compute.
"""

from __future__ import annotations

import mmap
import os
from types import ModuleType

import numpy as np

from ..errors import ConfigError, ContextOverflowError, NibbleError, OutOfMemoryError
from ..formats.gguf import GGUFFile
from ..models.linear import linear
from ..models.ops import Q8_0_BLOCK
from ..quant import ggml_exact
from .precompile import Precompile, wanted as precompile_wanted
from .speculative import DRAFT_MAX

DEFAULT_MAX_CTX = 4096
MAX_BATCH = 512          # prefill chunk (llama.cpp's default n_ubatch)
LOGIT_ROWS = 64          # rows of logits computed at once when every position's logits are wanted
# KV cache types (llama.cpp's -ctk/-ctv): the bytes of one head row of head_dim values, and the array dtype
CACHE_TYPES = {"f16": (lambda head_dim: 2 * head_dim, np.float16),
               "q8_0": (lambda head_dim: head_dim // 32 * Q8_0_BLOCK, np.uint8)}


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


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.zeros(shape, dtype) in memory that the kernel backs page by page as it is first written, in 4 KiB
    pages (MADV_NOHUGEPAGE). For the KV cache: numpy asks for huge pages on large arrays, and a slot's first
    prompt writes a few KiB into each layer's region of it, so each of those writes faulted in and zeroed a
    whole 2 MiB page: at n_ctx 4096 the first 64-token SmolLM2 prompt into each slot took 300-330 instead of
    90-110 ms (a 2-vCPU VM); in 4 KiB pages its first prompt costs ~15 ms more than the next ones."""
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if n == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype)
    # anonymous and private (a forked process gets a copy on write, not this memory): zero-filled, backed
    # on first write
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype).reshape(shape)


class Engine:
    def __init__(self, gguf: GGUFFile, arch: ModuleType, n_ctx: int | None = None, n_slots: int = 1,
                 max_batch: int = MAX_BATCH, cache_type_k: str = "f16", cache_type_v: str = "f16"):
        self.arch = arch
        self.args = args = arch.ModelArgs.from_gguf(gguf)
        self.cache_types = (self.check_cache_type(cache_type_k, args, "k"),
                            self.check_cache_type(cache_type_v, args, "v"))
        if n_ctx is None:
            n_ctx = self.default_n_ctx(args)
        if n_ctx <= 0:
            raise NibbleError(f"n_ctx must be positive, got {n_ctx}")
        if n_slots <= 0:
            raise NibbleError(f"the number of KV slots (parallel sequences) must be positive, got {n_slots}")
        if n_ctx > args.context_length:
            raise ContextOverflowError(n_ctx, args.context_length,
                                       f"n_ctx {n_ctx} is larger than the model's context length "
                                       f"{args.context_length}")
        self.n_ctx, self.n_slots = n_ctx, n_slots
        self.max_batch = min(max_batch, n_ctx)
        self.max_rows = self.step_rows(max_batch, n_ctx, n_slots)
        self._plan_memory(gguf)
        self.gguf_path = gguf.path
        self.weights = arch.load_weights(gguf, args)
        self.model_bytes = sum(t.nbytes for t in gguf.tensors.values())
        # bytes a decode step reads: every weight once, except an untied embedding table (one row of it)
        w = self.weights
        self.weight_bytes = self.model_bytes - (w.token_embd.data.nbytes if w.output is not w.token_embd else 0)
        # the kind bits that can change this model's values (Q4_K groups and Q6_K tiles only matter where the
        # layers have such matrices), so that cells are not refused for a difference that changes nothing
        layer_types = {int(t.qtype) for name, t in gguf.tensors.items() if name.startswith("blk.")}
        self.kind_mask = np.int8(ggml_exact.ROW_BATCHED
                                 | (ggml_exact.ROW_GROUP4 if ggml_exact.Q4_K in layer_types else 0)
                                 | (ggml_exact.ROW_TILED if ggml_exact.Q6_K in layer_types else 0))
        self.state = arch.RunState(args, self.max_rows)
        # (slots, layers, n_ctx, n_head_kv, row): f16 values, or q8_0 blocks as bytes (see models/ops.py); the
        # kernels get f16 as its uint16 bits
        self.k_cache, self.v_cache = (
            lazy_zeros((n_slots, args.n_layers, n_ctx, args.n_head_kv,
                        row(args.head_dim) // np.dtype(dtype).itemsize), dtype)
            for row, dtype in (CACHE_TYPES[t] for t in self.cache_types))
        self._k_arg, self._v_arg = (c.view(np.uint16) if c.dtype == np.float16 else c
                                    for c in (self.k_cache, self.v_cache))
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.cell_kinds: list[list[int]] = [[] for _ in range(n_slots)]
        self.logits_buf = np.zeros((max(LOGIT_ROWS, (DRAFT_MAX + 1) * n_slots), args.n_vocab), np.float32)
        rows = self.max_rows
        self._tok = np.zeros(rows, np.int64)
        self._pos = np.zeros(rows, np.int64)
        self._slot = np.zeros(rows, np.int64)
        self._kinds = np.zeros(rows, np.int8)
        self._outputs = np.zeros(rows, np.int64)
        self._single = np.zeros(rows, np.int8)     # the output projection: every row as a single-row batch
        # a cold start: the kernels of the first evaluations compiled by a helper process as well, which starts
        # now (runtime/precompile.py); `precompiled` then names the kernels the engine and the helper compiled
        self._evaluated = False
        self.precompiled: dict[str, list[str]] = {}
        self._helper: Precompile | None = None
        if precompile_wanted():
            self._helper = Precompile.spawn(self)

    @staticmethod
    def kv_bytes(args, n_ctx: int, n_slots: int = 1, cache_types: tuple[str, str] = ("f16", "f16")) -> int:
        """Bytes of the K and V caches for n_slots sequences of n_ctx tokens: the one KV-size formula."""
        rows = sum(CACHE_TYPES[t][0](args.head_dim) for t in cache_types)
        return n_slots * args.n_layers * n_ctx * args.n_head_kv * rows

    @staticmethod
    def check_cache_type(name: str, args, which: str = "k") -> str:
        """A KV cache type by name ("f16", "q8_0") for K or V (`which`), checked against the model's head size."""
        name = str(name).lower()
        what = f"the {which.upper()} cache type (--cache-type-{which}, cache_type_{which}=)"
        if name not in CACHE_TYPES:
            raise ConfigError(f"{what} must be one of {', '.join(CACHE_TYPES)}, not {name!r}")
        if name == "q8_0" and args.head_dim % 32:
            raise ConfigError(f"{what} q8_0 needs a head size that is a multiple of 32; this model's is "
                              f"{args.head_dim}")
        return name

    @staticmethod
    def default_n_ctx(args) -> int:
        """The context when none is asked for: the model's, capped at DEFAULT_MAX_CTX."""
        return min(args.context_length, DEFAULT_MAX_CTX)

    @staticmethod
    def step_rows(max_batch: int, n_ctx: int, n_slots: int) -> int:
        """Rows one step can hold: a prompt chunk and, per slot, a decode row and up to DRAFT_MAX draft rows."""
        return min(max_batch, n_ctx) + (DRAFT_MAX + 1) * n_slots

    @classmethod
    def memory_plan(cls, args, weights_bytes: int, n_ctx: int, n_slots: int = 1, max_batch: int = MAX_BATCH,
                    cache_types: tuple[str, str] = ("f16", "f16")) -> dict[str, int]:
        """Bytes an engine needs: {"weights", "kv_cache", "buffers"} (the run state and the logits)."""
        widest = max(args.n_embd, args.q_dim, args.n_ff, args.kv_dim)
        rows = cls.step_rows(max_batch, n_ctx, n_slots)
        buffers = rows * (6 * widest + 2 * args.n_ff) * 4 + LOGIT_ROWS * args.n_vocab * 4
        return {"weights": weights_bytes, "kv_cache": cls.kv_bytes(args, n_ctx, n_slots, cache_types),
                "buffers": buffers}

    def _plan_memory(self, gguf: GGUFFile) -> None:
        """Weights (mmap'd, but resident once touched) + KV cache + activations must fit, or we refuse."""
        a = self.args
        plan = self.memory_plan(a, gguf.file_size, self.n_ctx, self.n_slots, self.max_batch, self.cache_types)
        scratch, kv = plan["buffers"], plan["kv_cache"]
        fixed = gguf.file_size + scratch
        required = fixed + kv
        available = available_memory()
        if required > available:
            per_token = self.kv_bytes(a, 1, self.n_slots, self.cache_types)
            fits = (available - fixed) // per_token if available > fixed else 0
            hint = (f"n_ctx={int(fits)} would fit" if fits >= 1 else "the weights alone do not fit")
            slots = f" x {self.n_slots} slots" if self.n_slots > 1 else ""
            raise OutOfMemoryError(required, available,
                                   f"{gguf.name} with n_ctx={self.n_ctx}{slots} needs {required / 2**20:.0f} MiB "
                                   f"(weights {gguf.file_size / 2**20:.0f} MiB, KV cache "
                                   f"{kv / 2**20:.0f} MiB, buffers "
                                   f"{scratch / 2**20:.0f} MiB) but {available / 2**20:.0f} MiB is available; "
                                   f"{hint}")

    # ---- the cache ----

    def n_past(self, slot: int = 0) -> int:
        return len(self.tokens[slot])

    def truncate(self, n: int, slot: int = 0) -> None:
        """Keep the first n cached tokens of a slot (what is past them is simply overwritten later)."""
        del self.tokens[slot][max(n, 0):]
        del self.cell_kinds[slot][max(n, 0):]

    def reset(self, slot: int = 0) -> None:
        self.truncate(0, slot)

    def fresh_kinds(self, n: int) -> np.ndarray:
        """The kinds of the rows of an n-token prompt evaluated in one call from its first token: batches of
        max_batch rows (llama.cpp's n_ubatch), each with its batch's kinds; masked to this model's bits."""
        kinds = np.empty(n, np.int8)
        for c in range(0, n, self.max_batch):
            ggml_exact.batch_kinds_into(kinds[c:c + self.max_batch], min(self.max_batch, n - c))
        return kinds & self.kind_mask

    def reusable(self, slot: int, ids, kinds: np.ndarray | None) -> int:
        """How many of the slot's cached cells a request for `ids` with row kinds `kinds` can keep: the
        longest prefix whose tokens and kinds both match (a cell of another kind holds other bits). With
        kinds None, tokens alone (where other bits do not matter: a draft model's guesses)."""
        cached, cached_kinds = self.tokens[slot], self.cell_kinds[slot]
        n = min(len(cached), len(ids))
        i = 0
        while i < n and cached[i] == ids[i] and (kinds is None or cached_kinds[i] == kinds[i]):
            i += 1
        return i

    def keep_prefix(self, slot: int, ids, kinds: np.ndarray | None, reusable: int | None = None) -> int:
        """Roll the slot back to the longest prefix of `ids` it can reuse (`reusable`, unless the caller
        computed it), leaving at least the last id to evaluate (its logits are needed); returns the tokens
        kept."""
        if reusable is None:
            reusable = self.reusable(slot, ids, kinds)
        n_keep = min(reusable, len(ids) - 1)
        self.truncate(n_keep, slot)
        return n_keep

    # ---- evaluation ----

    def prefill(self, ids, slot: int = 0, reuse: bool = True) -> tuple[np.ndarray, int]:
        """Bring the slot's cache to exactly `ids` and return (the logits after the last id, tokens reused):
        what a fresh evaluation of `ids` gives, evaluating only what the cache does not already hold with
        the same bits. ContextOverflowError, the cache untouched, when `ids` does not fit."""
        ids = self._as_ids(ids)
        if len(ids) == 0:
            raise NibbleError("the prompt is empty: give at least one token")
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(len(ids), self.n_ctx)
        kinds = self.fresh_kinds(len(ids))
        n_keep = self.keep_prefix(slot, ids, kinds, None if reuse else 0)
        return self.eval(ids[n_keep:], slot, kinds[n_keep:]), n_keep

    def forward_rows(self, work: list[tuple[int, np.ndarray, np.ndarray, int]], plan_only: bool = False) -> np.ndarray:
        """One forward over the rows of several sequences: `work` is a list of (slot, ids, kinds, n_logits),
        each appending `ids` (with row kinds `kinds`) after the slot's cached tokens and asking for the logits
        of its last n_logits rows (0, 1, or all of them to verify draft tokens). Returns those logits in order,
        (n_out, n_vocab): a buffer the next call reuses. The caller keeps the rows within max_rows and every
        slot within n_ctx. The first call compiles the kernels it needs that Numba's cache lacks with a helper
        process (`runtime.precompile`; `plan_only` is its dry run); the next one waits for the helper."""
        if not plan_only:
            self._compile_kernels(work)
        B = sum(len(ids) for _, ids, _, _ in work)
        if B > self.max_rows:
            raise NibbleError(f"a step of {B} rows is more than the {self.max_rows} this engine holds")
        tok, pos, slots, kinds, outputs = (self._tok[:B], self._pos[:B], self._slot[:B], self._kinds[:B],
                                           self._outputs)
        b = n_out = 0
        for slot, ids, row_kinds, want in work:
            n, p0 = len(ids), self.n_past(slot)
            want = int(want)
            if p0 + n > self.n_ctx:
                raise ContextOverflowError(p0 + n, self.n_ctx)
            tok[b:b + n] = ids
            pos[b:b + n] = np.arange(p0, p0 + n)
            slots[b:b + n] = slot
            kinds[b:b + n] = row_kinds
            outputs[n_out:n_out + want] = np.arange(b + n - want, b + n)
            n_out += want
            b += n
        hidden = self.arch.forward(self.args, self.weights, self.state, self._k_arg, self._v_arg,
                                   tok, slots, pos, kinds, outputs[:n_out])
        for slot, ids, row_kinds, _ in work:
            self.tokens[slot].extend(int(t) for t in ids)
            self.cell_kinds[slot].extend(int(k) for k in row_kinds)
        out = self.logits_buf[:n_out]
        if n_out:
            linear(out, hidden, self.weights.output, self.state.scratch, self._single[:n_out])
        return out

    def _compile_kernels(self, work) -> None:
        if self._helper is None:
            return
        if not self._evaluated:
            self._evaluated = True
            self._helper.first(self, work)
        else:
            helper, self._helper = self._helper, None
            helper.finish(self, work)
            self.precompiled = helper.report

    def close(self) -> None:
        """Stop a helper process still compiling."""
        if self._helper is not None:
            helper, self._helper = self._helper, None
            helper.close()
            self.precompiled = helper.report

    def eval(self, ids, slot: int = 0, kinds: np.ndarray | None = None) -> np.ndarray:
        """Append ids to the slot's cache and return the last position's logits (n_vocab,), a buffer reused by
        the next call. The rows get `kinds` (default: `fresh_kinds`, one llama_decode of ids per max_batch
        chunk)."""
        ids = self._as_ids(ids)
        if len(ids) == 0:
            raise NibbleError("eval needs at least one token")
        self._check_fits(len(ids), slot)
        kinds = self.fresh_kinds(len(ids)) if kinds is None else kinds
        for c in range(0, len(ids), self.max_batch):
            last = c + self.max_batch >= len(ids)
            out = self.forward_rows([(slot, ids[c:c + self.max_batch], kinds[c:c + self.max_batch], int(last))])
        return out[0]

    def eval_all(self, ids, slot: int = 0, first: int = 0, consume=None) -> np.ndarray | None:
        """Append ids and produce the logits of positions first..len(ids)-1 of this call: returned as one
        (len - first, n_vocab) array, or, with `consume(index, logits_block)`, handed over LOGIT_ROWS rows at a
        time in a reused buffer (so a long perplexity run never holds every position's logits). The logits
        rows are projected as llama.cpp's output layer projects a batch of them (n_outputs rows at once)."""
        ids = self._as_ids(ids)
        self._check_fits(len(ids), slot)
        result = None if consume else np.empty((max(len(ids) - first, 0), self.args.n_vocab), np.float32)
        kinds = self.fresh_kinds(len(ids))
        # this path runs the forward itself: a helper compiling the kernels (see `forward_rows`) is first done
        # with the first chunk's and then waited for, so that it writes no cache index this one compiles into
        n = min(len(ids), self.max_batch)
        while self._helper is not None:
            self._compile_kernels([(slot, ids[:n], kinds[:n], n)])
        for c in range(0, len(ids), self.max_batch):
            chunk = ids[c:c + self.max_batch]
            lo = max(first - c, 0)                  # rows of this chunk whose logits are wanted
            B, p0 = len(chunk), self.n_past(slot)
            self._tok[:B], self._pos[:B], self._slot[:B] = chunk, np.arange(p0, p0 + B), slot
            self._kinds[:B] = kinds[c:c + B]
            outputs = self._outputs[:max(B - lo, 1)]
            outputs[:] = np.arange(B - len(outputs), B)
            hidden = self.arch.forward(self.args, self.weights, self.state, self._k_arg, self._v_arg,
                                       self._tok[:B], self._slot[:B], self._pos[:B], self._kinds[:B], outputs)
            self.tokens[slot].extend(int(t) for t in chunk)
            self.cell_kinds[slot].extend(int(k) for k in kinds[c:c + B])
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

    def _check_fits(self, n_new: int, slot: int) -> None:
        total = self.n_past(slot) + n_new
        if total > self.n_ctx:
            raise ContextOverflowError(total, self.n_ctx)

    def _as_ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        n_vocab = self.args.n_vocab
        if arr.size and (arr.min() < 0 or arr.max() >= n_vocab):
            bad = int(arr[(arr < 0) | (arr >= n_vocab)][0])
            raise NibbleError(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})")
        return arr
