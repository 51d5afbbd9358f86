"""Numba's options for every kernel, decided in one place, and the thread count.

Every kernel of nibble (those in `nibble.quant` and `nibble.models.ops`) is compiled through the decorators
below, with these flags:

- `cache=True`: the machine code is written to `__pycache__` on first use, so a cold compile happens once
  per machine, not once per process. Numba keys a cached kernel on its own file; kernels call intrinsics and
  helpers across files (`models/ops.py` and `quant/ggml_exact.py` into `quant/simd.py`), so the key also
  holds the source of every module in nibble.quant (see `_QuantCache`). Kernels outside nibble.quant call
  only into nibble.quant, never into each other's files, which keeps that key complete;
- fast-math: `kernel`/`parallel_kernel` use `FASTMATH` (reassociation and FMA contraction let LLVM vectorise
  reductions; no `nnan`/`ninf`, so a NaN or an infinity still propagates instead of being optimised into
  garbage). `exact_kernel`/`exact_parallel_kernel`, which the models run, use none: they reproduce
  llama.cpp's float arithmetic in its order, and any reassociation or contraction would change the bits;
- `boundscheck=False`, `error_model="numpy"`: no per-element checks, no exceptions on division by zero;
- `nogil=True`: a server thread can decode while another thread runs Python.

Threads: the parallel kernels use Numba's pool; they run on `NIBBLE_THREADS` of its threads (default: every
core this process may run on; 0 or a negative count also means every core, as in llama.cpp).
`set_threads(n)` changes how many of them the calling thread's kernels use; Numba keeps that setting per
calling thread, so call it from the thread that runs the model.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import threading
from pathlib import Path

import numba
from numba.core.caching import FunctionCache

from ..errors import ConfigError

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# The same flags as LLVM instruction flags, for the hand-built vector operations in simd.py.
LLVM_FASTMATH = tuple(sorted(FASTMATH))

JIT_OPTIONS = dict(cache=True, fastmath=FASTMATH, boundscheck=False, error_model="numpy", nogil=True)
# the exact kernels' options where Numba compiles a function into its callers (no cache of its own)
EXACT_OPTIONS = dict(fastmath=False, boundscheck=False, error_model="numpy", nogil=True)


def _source_hash() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(here.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


_QUANT_SOURCE_HASH = _source_hash()


class _QuantCache(FunctionCache):
    """Numba keys a cached kernel on its own bytecode and file only, so a change to an intrinsic in simd.py
    or a helper in another module would leave stale machine code behind. Kernels compiled through
    `kernel`/`parallel_kernel` are also keyed on the source of every module in nibble.quant."""

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (_QUANT_SOURCE_HASH,)


def _compile(fn, **options):
    dispatcher = numba.njit(**{**JIT_OPTIONS, **options, "cache": False})(fn)
    dispatcher._cache = _QuantCache(fn)  # what Dispatcher.enable_caching does, with the wider key
    return dispatcher


def kernel(fn):
    """Compile `fn` as a serial kernel with nibble's options."""
    return _compile(fn)


def parallel_kernel(fn):
    """Compile `fn` as a kernel whose `prange` loops run on Numba's thread pool."""
    return _compile(fn, parallel=True)


def exact_kernel(fn):
    """Compile `fn` without fast-math: the order and rounding of every f32 operation is kept as written
    (what `ggml_exact` needs to reproduce llama.cpp bit for bit)."""
    return _compile(fn, fastmath=False)


def exact_parallel_kernel(fn):
    return _compile(fn, fastmath=False, parallel=True)


def inlined(fn):
    """Compile `fn` into each caller (Numba IR inlining, before typing), without fast-math: a per-type
    dispatch whose type argument is a constant in the caller (see `ggml_exact._typed`) then keeps only that
    type's branch, and compiles only the kernels that branch calls."""
    return numba.njit(inline="always", **EXACT_OPTIONS)(fn)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _all_cores() -> int:
    return max(1, min(available_cores(), numba.config.NUMBA_NUM_THREADS))


def _thread_count(n, source: str) -> int:
    """A requested thread count as Numba can run it: llama.cpp's convention that 0 or a negative count means
    every core this process may use, and at most Numba's pool (fixed when Numba starts)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ConfigError(f"{source}: the number of threads must be a whole number, not {n!r}")
    return _all_cores() if n <= 0 else min(int(n), numba.config.NUMBA_NUM_THREADS)


def default_threads() -> int:
    """`NIBBLE_THREADS` if set (0 or negative: every core), else every core the process may use; clamped to
    Numba's pool."""
    env = os.environ.get("NIBBLE_THREADS", "").strip()
    if not env:
        return _all_cores()
    try:
        wanted = int(env)
    except ValueError:
        raise ConfigError(f"NIBBLE_THREADS={env!r} is not a whole number of threads (0: every core)") from None
    return _thread_count(wanted, "NIBBLE_THREADS")


# Decided on first use rather than at import, so that a bad NIBBLE_THREADS is reported as a ConfigError by the
# call that needs the count (`nibble.load`, which dequantizes through `apply_threads`), not by an import.
_threads: int | None = None


def thread_count(n: int | None) -> int:
    """The count `set_threads(n)` would use, without using it."""
    return default_threads() if n is None else _thread_count(n, "threads")


def set_threads(n: int | None) -> int:
    """Use `n` threads in the kernels this thread runs: None is the default (`NIBBLE_THREADS`, else every
    core), 0 or negative every core. Returns the count now in use, which is at most the size of Numba's pool
    (fixed when Numba starts: raise it with NUMBA_NUM_THREADS)."""
    global _threads
    _threads = default_threads() if n is None else _thread_count(n, "threads")
    numba.set_num_threads(_threads)
    return _threads


def get_threads() -> int:
    global _threads
    if _threads is None:
        _threads = default_threads()
    return _threads


def apply_threads() -> None:
    """Make the calling thread's kernels use the configured count (cheap; the public wrappers call it so a
    thread that never called `set_threads` still gets the configured count)."""
    n = get_threads()
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


# Numba's workqueue threading layer aborts the process when two threads enter parallel kernels at once:
# whatever runs kernels (a model's engine thread, the public nibble.quant functions) holds this lock.
KERNEL_LOCK = threading.RLock()
