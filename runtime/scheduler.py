"""The engine thread: requests in, one batched forward per step, tokens out (nano-vllm's shape).

    scheduler = Scheduler(engine)
    scheduler.submit(request)          # from any thread; the request streams its pieces to its consumer
    scheduler.call(fn)                 # run fn(engine) on the engine thread, between steps (eval, logits, ...)

Every use of a model's engine goes through the process's one engine thread (`EngineThread`: all models
take turns on it, a step each), so a `Model` shared by many threads never interleaves two callers in the KV
cache or the run state, and one OpenMP team serves every kernel; the kernels run under `KERNEL_LOCK`, held
for a whole step, so a caller of nibble.quant's public functions on another thread never enters Numba's
thread pool at the same time (its workqueue layer aborts the process when two threads do).

A step: `schedule()` admits waiting requests to free slots (each to the slot whose cached prefix it can
reuse the most of) and picks the rows: one decode row per running request, then prompt chunks of the
requests still prefilling, up to `max_batch` prompt rows per step (a long prompt stalls the running streams
for at most one chunk). `engine.forward_rows` evaluates them all at once, each row with the kind a lone
evaluation would give it, and `postprocess()` hands each request the logits of its last row: the request
samples its next token, streams its text and says whether it is finished; a finished, cancelled or
disconnected request frees its slot at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from ..errors import NibbleError
import numba

from ..quant.jit import KERNEL_LOCK, thread_count
from .speculative import DRAFT_MAX

WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"


class Request:
    """One generation: prompt ids in, tokens out. `state` holds the sampling and streaming logic
    (`generate.Generation`); the scheduler only moves tokens through the engine for it."""

    def __init__(self, ids: list[int], state, cancel: threading.Event | None = None):
        self.ids = ids
        self.state = state
        self.cancel = cancel or threading.Event()
        self.phase = WAITING
        self.slot = -1
        self.n_done = 0                     # prompt tokens in the slot's cache
        self.kinds: np.ndarray | None = None
        self.next_token: int | None = None  # sampled, to be evaluated in the next step
        self.proposals: list[int] = []      # draft tokens verified after it in this step
        self.t_submit = time.perf_counter()


class Scheduler:
    def __init__(self, engine, threads: int | None = None, max_queue: int = 64):
        self.engine = engine
        self.threads = threads
        self.max_queue = max_queue
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.busy_slots: set[int] = set()
        self.steps = 0
        self.n_threads = thread_count(threads)
        self._stop = self._stopped = False
        self._done = threading.Event()          # set once the engine thread has let this scheduler go
        self._lock = threading.Lock()

    # ---- from any thread ----

    def submit(self, request: Request) -> None:
        self._ensure_thread()
        self.inbox.put(("request", request))
        ENGINE_THREAD.wake()

    def call(self, fn: Callable):
        """Run fn(engine) on the engine thread between steps and return its result (or raise its error)."""
        if ENGINE_THREAD.is_current():           # e.g. a draft model's guesses, inside the target's step
            before = numba.get_num_threads()
            numba.set_num_threads(self.n_threads)
            try:
                return fn(self.engine)
            finally:
                numba.set_num_threads(before)
        self._ensure_thread()
        done = threading.Event()
        box: list = []
        self.inbox.put(("call", (fn, done, box)))
        ENGINE_THREAD.wake()
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def wake(self) -> None:
        ENGINE_THREAD.wake()

    def queue_length(self) -> int:
        return len(self.waiting) + self.inbox.qsize()

    def close(self, wait: bool = True) -> None:
        """Cancel every request and let the engine thread go of this model (waiting for it unless `wait` is
        false)."""
        with self._lock:
            self._stop = True
            registered = self in ENGINE_THREAD.schedulers
        if not registered:
            return
        ENGINE_THREAD.wake()
        if wait and not ENGINE_THREAD.is_current():
            self._done.wait()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._stop:
                raise NibbleError("the model is closed")
            ENGINE_THREAD.add(self)

    # ---- the engine thread ----

    def run_once(self) -> bool:
        """One turn on the engine thread: take what arrived, then one step if there is work. Returns whether
        it did anything (the thread sleeps when no scheduler did)."""
        numba.set_num_threads(self.n_threads)     # Numba keeps the thread count per calling thread
        busy = self._drain()
        if self._stop:
            for r in list(self.waiting) + self.running:
                r.cancel.set()
                self._finish(r)
            self.waiting.clear()
            self.running.clear()
            self._stopped = True
            return True
        if self.waiting or self.running:
            busy = self.step() or busy
        return busy

    def _drain(self) -> bool:
        took = False
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return took
            took = True
            if kind == "request":
                self.waiting.append(item)
                continue
            fn, done, box = item
            try:
                with KERNEL_LOCK:
                    box.append((True, fn(self.engine)))
            except BaseException as e:          # handed to the caller, who raises it
                box.append((False, e))
            done.set()

    def step(self) -> bool:
        """schedule -> one batched forward -> postprocess. Returns whether it ran a forward."""
        work, owners = self.schedule()
        if not work:                            # every stream waits for its consumer
            return False
        try:
            with KERNEL_LOCK:
                logits = self.engine.forward_rows(work)
        except Exception as e:                  # a bug or an impossible state: fail the requests, not the thread
            for r, _ in owners:
                r.state.fail(e)
                self._finish(r)
            return True
        self.steps += 1
        self.postprocess(owners, logits)
        return True

    def schedule(self) -> tuple[list, list]:
        """Admit waiting requests to free slots; the rows of this step: (work for forward_rows, the request
        that owns each logits row)."""
        engine = self.engine
        while self.waiting and len(self.busy_slots) < engine.n_slots:
            r = self.waiting.popleft()
            if r.cancel.is_set():
                r.state.finish_reason = "cancelled"
                self._finish(r)
                continue
            self._admit(r)
        for r in list(self.running):            # cancelled while waiting for its consumer or prefilling
            if r.phase != DECODE or not r.state.ready():
                if r.cancel.is_set():
                    r.state.finish_reason = "cancelled"
                    self._finish(r)
        work, owners = [], []
        for r in self.running:                  # decode rows first: one per stream whose consumer keeps up
            if r.phase == DECODE and r.state.ready():
                r.proposals = self._draft(r)
                rows = np.array([r.next_token] + r.proposals, np.int64)
                work.append((r.slot, rows, np.zeros(len(rows), np.int8), len(rows)))
                owners.append((r, len(rows)))
        budget = engine.max_batch
        for r in self.running:
            if r.phase != PREFILL or budget == 0:
                continue
            n = min(budget, len(r.ids) - r.n_done)
            end = r.n_done + n
            last = end == len(r.ids)
            work.append((r.slot, np.asarray(r.ids[r.n_done:end], np.int64), r.kinds[r.n_done:end], int(last)))
            if last:
                owners.append((r, 1))
            r.n_done = end
            budget -= n
        return work, owners

    def _admit(self, r: Request) -> None:
        """Give r the free slot whose cache it can reuse the most of, rolled back to that prefix."""
        engine = self.engine
        r.kinds = engine.fresh_kinds(len(r.ids))
        free = [s for s in range(engine.n_slots) if s not in self.busy_slots]
        reuse = {s: engine.reusable(s, r.ids, r.kinds) if r.state.cache_prompt else 0 for s in free}
        # the longest reusable prefix; among equals the slot holding least (keep other prefixes warm)
        slot = max(free, key=lambda s: (reuse[s], -engine.n_past(s)))
        n_keep = engine.keep_prefix(slot, r.ids, r.kinds, reuse[slot])
        self.busy_slots.add(slot)
        r.slot, r.n_done, r.phase = slot, n_keep, PREFILL
        r.state.started(slot, n_keep)
        self.running.append(r)

    def _draft(self, r: Request) -> list[int]:
        """Draft tokens to verify after r's next token (none without a drafter), as many as the adaptive
        length asks and the context, max_tokens and the step's rows allow."""
        g = r.state
        if g.drafter is None:
            return []
        engine = self.engine
        room = min(engine.n_ctx - engine.n_past(r.slot) - 1, DRAFT_MAX)
        if g.max_tokens is not None:
            room = min(room, g.max_tokens - len(g.tokens))
        k = min(g.draft_length.next(), room)
        return g.drafter.propose(g.context, k, r.slot)[:k] if k > 0 else []

    def postprocess(self, owners: list[tuple[Request, int]], logits: np.ndarray) -> None:
        """Hand each request the logits of its rows: one (prefill, plain decode) or 1 + k (a verification of
        k draft tokens: accepted while each draw equals the draft; the cells of the rest are dropped)."""
        engine = self.engine
        row = 0
        for r, n_rows in owners:
            block, row = logits[row:row + n_rows], row + n_rows
            if r.phase == PREFILL:
                r.state.prompt_done()
                r.phase = DECODE
            if r.cancel.is_set():
                r.state.finish_reason = "cancelled"
                engine.truncate(engine.n_past(r.slot) - (n_rows - 1), r.slot)   # drafts are not shown
                self._finish(r)
                continue
            p = engine.n_past(r.slot) - n_rows          # cells before this step's rows
            drafts = r.proposals if n_rows > 1 else []
            accepted = 0
            for j in range(n_rows):
                token = r.state.advance(block[j], p + j + 1, engine.n_ctx)
                if token is not None and j < len(drafts) and token == drafts[j]:
                    accepted += 1
                    continue
                engine.truncate(p + j + 1, r.slot)      # the cells after row j held rejected drafts
                if token is None:
                    self._finish(r)
                else:
                    r.next_token = token
                break
            if drafts:
                r.state.drafted(len(drafts), accepted)

    def _finish(self, r: Request) -> None:
        if r.phase == DONE:
            return
        r.phase = DONE
        if r in self.running:
            self.running.remove(r)
        self.busy_slots.discard(r.slot)
        r.state.finished()


class EngineThread:
    """The one thread that runs every model's steps in this process. OpenMP (Numba's threading layer here)
    keeps a team of worker threads per calling thread: kernels launched from a second thread, even one
    that is idle by then, slowed each step by half on a 2-core machine. So all models (a draft model and its
    target, two models side by side) take turns on one thread, one step each, and one team serves them."""

    def __init__(self):
        self.schedulers: list[Scheduler] = []
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, scheduler: Scheduler) -> None:
        with self._lock:
            if scheduler not in self.schedulers:
                self.schedulers.append(scheduler)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="nibble-engine", daemon=True)
                self._thread.start()

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            busy = False
            for scheduler in list(self.schedulers):
                busy = scheduler.run_once() or busy
                if scheduler._stopped:
                    with self._lock:
                        self.schedulers.remove(scheduler)
                    scheduler._done.set()
            if not busy:
                self._wake.wait(0.5)


ENGINE_THREAD = EngineThread()
