"""A cold start's kernels compiled by two processes at once.

Numba compiles one function at a time (its compiler holds a process-wide lock), so the first run on a
machine kept one core busy for ~15 s before the first token while the other idled. When the first engine of
a process finds kernels of a likely first evaluation (a prompt) missing from Numba's cache, it starts a
helper process; the two then compile the kernels the first evaluation calls, the engine in the order it
calls them, the helper the slowest first (the attention kernels) and then from the far end, each skipping
what the other took. Each writes what it compiles to Numba's cache, where the real evaluation then finds it.
While the engine evaluates the prompt, the helper goes on with what a decode step needs.

The list of kernels comes from a dry run of the evaluation that records each kernel's argument types instead
of compiling and running it (`dry_run`): the exact signatures the real run asks for.

Two processes must never add entries to one cache index at once: Numba names a new entry's data file from
the index it read, so a race could pair one kernel's key with another's machine code. So the unit of work is
an index (one function, all its signatures): a process claims it by creating a file, the engine waits until
what the helper claimed is done, and for the helper to exit before its second evaluation (and before the
first, where that needs something the helper has claimed but not compiled).

    python -m nibble.runtime.precompile SPEC     the helper (SPEC: the JSON `Precompile.spawn` writes)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numba
import numpy as np
from numba.core.dispatcher import Dispatcher

from ..quant.jit import _QuantCache, available_cores

ENV_SWITCH = "NIBBLE_PRECOMPILE"       # "0": never start a helper; "1": start one even on one core
POLL_S = 0.01


@dataclass
class Group:
    """One cache index: a kernel and the signatures of it that the evaluation needs."""
    index_path: str
    calls: list          # (dispatcher, argument types)

    @property
    def name(self) -> str:
        fn = self.calls[0][0].py_func
        return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"

    @property
    def slow_first(self) -> int:
        """The helper's order: kernels marked `compiles_slowly` (the attention kernels), then the other
        parallel ones (Numba's parfor passes, and LLVM optimizes the task body again), then the rest."""
        dispatcher = self.calls[0][0]
        if getattr(dispatcher, "compiles_slowly", False):
            return 0
        return 1 if dispatcher.targetoptions.get("parallel") else 2

    @property
    def claim_name(self) -> str:
        return hashlib.sha1(self.index_path.encode()).hexdigest()[:20]

    def compile(self) -> None:
        for dispatcher, sig in self.calls:
            dispatcher.compile(sig)


def _skip(*args):
    return None


def dry_run(engine, work) -> list[tuple[Dispatcher, tuple]]:
    """The (kernel, argument types) that `engine.forward_rows(work)` calls for the first time, in order, found
    without compiling them: each of nibble's kernels called with types it has no machine code for records
    them and returns without running. (A kernel already compiled runs, on buffers the real evaluation writes
    again; so does one marked `runs_in_dry_run`, whose result Python keeps, as `ops.gelu_table` does.) The
    engine's cache and token lists are left as they were."""
    calls: list[tuple[Dispatcher, tuple]] = []
    original = Dispatcher._compile_for_args

    def record(self, *args, **kws):
        if not isinstance(self._cache, _QuantCache) or getattr(self, "runs_in_dry_run", False):
            return original(self, *args, **kws)
        calls.append((self, tuple(self.typeof_pyval(a) for a in args)))
        return _skip

    n_past = {slot: engine.n_past(slot) for slot, _, _, _ in work}
    Dispatcher._compile_for_args = record
    try:
        engine.forward_rows(work, plan_only=True)
    except Exception:     # a kernel's result that Python goes on with: what was recorded so far is the plan
        pass
    finally:
        Dispatcher._compile_for_args = original
        for slot, n in n_past.items():
            engine.truncate(n, slot)
    return calls


def cold_groups(calls) -> list[Group]:
    """The cache indexes, in first-call order, that lack one of `calls` (empty where caching is off)."""
    groups: dict[str, Group] = {}
    seen = set()
    for dispatcher, sig in calls:
        cache = dispatcher._cache
        if (dispatcher, sig) in seen or not getattr(cache, "_enabled", False):
            continue
        seen.add((dispatcher, sig))
        try:
            if cache._index_key(sig, dispatcher.targetctx.codegen()) in cache._cache_file._load_index():
                continue
        except Exception:             # an unreadable index: as good as missing (Numba recompiles it too)
            pass
        path = cache._cache_file._index_path
        groups.setdefault(path, Group(path, [])).calls.append((dispatcher, sig))
    return list(groups.values())


class Claims:
    """Who compiles which group: a process takes a group by creating its claim file (holding `who`, "engine"
    or "helper", and the kernel's name), and a group it took stays its own."""

    def __init__(self, directory: str, who: str):
        self.directory, self.who = directory, who
        self.owned: set[str] = set()

    def take(self, group: Group) -> bool:
        if group.claim_name in self.owned:
            return True
        try:
            fd = os.open(os.path.join(self.directory, group.claim_name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.who} {group.name}")
        self.owned.add(group.claim_name)
        return True

    def done_path(self, group: Group) -> str:
        return os.path.join(self.directory, group.claim_name + ".done")

    def compile(self, groups: list[Group]) -> None:
        """Compile each group in turn unless the other process took it, marking it done."""
        for g in groups:
            if not self.take(g):
                continue
            g.compile()
            open(self.done_path(g), "w").close()


_first_engine = True


def enabled() -> bool:
    """Whether a cold start here compiles with a helper: on two or more cores unless NIBBLE_PRECOMPILE says
    otherwise, and never in a frozen application (PyInstaller and the like: sys.executable is the app, not a
    Python that runs `-m`)."""
    switch = os.environ.get(ENV_SWITCH, "")
    if switch == "0" or numba.config.DISABLE_JIT or getattr(sys, "frozen", False):
        return False
    return switch == "1" or available_cores() >= 2


def wanted() -> bool:
    """Whether a new engine should look for kernels to compile with a helper: only the first of the process
    (the dry run runs a kernel that is already compiled, which none is before the first engine evaluates but
    all may be after it), where `enabled`."""
    global _first_engine
    first, _first_engine = _first_engine, False
    return first and enabled()


def likely_first_work(engine) -> list:
    """What a first evaluation usually is: a prompt of two or more rows into slot 0, one row of logits (the
    kernels it calls do not depend on the number of rows past that)."""
    return [(0, np.zeros(2, np.int64), np.full(2, engine.kind_mask, np.int8), 1)]


class Precompile:
    """The engine's side: `spawn` when the engine is made (the helper starts on the likely first evaluation
    while the caller tokenizes), `first` before the first evaluation (it compiles its share, and returns once
    the helper's share is in the cache too), `finish` before the second one."""

    def __init__(self, proc: subprocess.Popen, claims: str):
        self.proc, self.claims = proc, claims
        self.mine = Claims(claims, "engine")
        self.report: dict[str, list[str]] = {}   # after close: the kernels each process compiled

    @classmethod
    def spawn(cls, engine) -> "Precompile | None":
        """Start a helper process when two or more of the indexes a likely first evaluation needs are not in
        Numba's cache (None: no helper)."""
        work = likely_first_work(engine)
        if len(cold_groups(dry_run(engine, work))) < 2:
            return None
        try:
            claims = tempfile.mkdtemp(prefix="nibble-precompile-")
        except OSError:
            return None
        spec = {"path": os.fspath(engine.gguf_path), "n_ctx": engine.n_ctx, "n_slots": engine.n_slots,
                "max_batch": engine.max_batch, "cache_types": list(engine.cache_types), "claims": claims,
                "work": [[int(slot), len(ids), [int(k) for k in kinds], int(want)]
                         for slot, ids, kinds, want in work]}
        spec_path = os.path.join(claims, "spec.json")
        try:
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            proc = subprocess.Popen([sys.executable, "-m", "nibble.runtime.precompile", spec_path],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=dict(os.environ, **{ENV_SWITCH: "0"}))      # (no helper of its own)
        except OSError:
            shutil.rmtree(claims, ignore_errors=True)
            return None
        return cls(proc, claims)

    def first(self, engine, work) -> None:
        """Before the first evaluation (`work`): compile what it needs that the helper has not taken, then wait
        until what the helper took is compiled. Where the helper has not compiled something of it (a first
        evaluation unlike the likely one), wait for the helper to exit: it may be writing that index."""
        try:
            groups = cold_groups(dry_run(engine, work))
            self.mine.compile(groups)
            self._wait_done(groups)
            if cold_groups([call for g in groups for call in g.calls]):
                self.proc.wait()
        except BaseException:
            self.close()
            raise

    def _wait_done(self, groups: list[Group]) -> None:
        """Until the helper has compiled every group, or has exited (crashed, killed: what it left undone then
        compiles on first use, with no one else writing)."""
        for g in groups:
            while not os.path.exists(self.mine.done_path(g)) and self.proc.poll() is None:
                time.sleep(POLL_S)

    def finish(self, engine, work) -> None:
        """Before the second evaluation (`work`, usually the first decode step): compile what it needs that
        the helper has not taken, then wait for the helper to exit."""
        try:
            self.mine.compile(cold_groups(dry_run(engine, work)))
            self.proc.wait()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the helper (closing its stdin ends it) and remove the claim files."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for name in os.listdir(self.claims):
            if "." not in name:
                with open(os.path.join(self.claims, name)) as f:
                    who, _, kernel = f.read().partition(" ")
                self.report.setdefault(who, []).append(kernel)
        shutil.rmtree(self.claims, ignore_errors=True)


def _exit_with_parent() -> None:
    """The engine closes our stdin when it is done with us or exits: stop at once."""
    sys.stdin.read()
    os._exit(0)


def helper_main(spec_path: str) -> None:
    from ..formats.gguf import GGUFFile
    from ..models import architecture
    from .engine import Engine

    threading.Thread(target=_exit_with_parent, daemon=True).start()
    with open(spec_path) as f:
        spec = json.load(f)
    gguf = GGUFFile(spec["path"])
    k, v = spec["cache_types"]
    engine = Engine(gguf, architecture(gguf.architecture, gguf.name), n_ctx=spec["n_ctx"],
                    n_slots=spec["n_slots"], max_batch=spec["max_batch"], cache_type_k=k, cache_type_v=v)
    claims = Claims(spec["claims"], "helper")
    work = [(slot, np.zeros(n, np.int64), np.array(kinds, np.int8), want) for slot, n, kinds, want in spec["work"]]
    # the first evaluation's kernels, slowest first and from the far end, while the engine takes them in
    # order; then those a decode step needs
    claims.compile(sorted(cold_groups(dry_run(engine, work))[::-1], key=lambda g: g.slow_first))
    decode = [(0, np.zeros(1, np.int64), np.zeros(1, np.int8), 1)]
    claims.compile(cold_groups(dry_run(engine, decode)))


if __name__ == "__main__":
    helper_main(sys.argv[1])
