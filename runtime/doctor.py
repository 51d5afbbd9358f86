"""`nibble doctor`: whether this machine and a model are ready to run, one check at a time.

    report = nibble.doctor("smollm2-135m")       # or a path; None: the machine and every pulled model
    report.ok                                    # no check failed (what `nibble doctor` exits 0 on)
    report.to_json()                             # what `nibble doctor --json` prints

Each check has a stable id, a status (`ok`, `warn`, `fail`, `skip`), a one-line summary of what it found and,
when not ok, one line of advice. A failed check means the model cannot run as asked; a warning that it runs,
but slower or with a limitation; the speed probe only ever warns. Checks that need an earlier one (a file
that does not open has no tokenizer to check) are skipped.

The machine: CPU and the features the kernels use, threads, Numba and its threading layer, the compiled-kernel
cache, memory read bandwidth. Per model: the file (GGUF header, sha256 against the catalogue, tensor types,
metadata), the tokenizer (builds, round-trips, special tokens), the chat template (which one, a two-turn
render and its generation prompt), the memory plan for the n_ctx asked for, the kernels (warm in the cache
or compiled now) and one decode step's speed.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from numba import prange

from ..errors import NibbleError
from ..quant.jit import KERNEL_LOCK, apply_threads, available_cores, get_threads, parallel_kernel
from ..quant.simd import hsum, load_f32x8, zeros
from . import precompile

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

CHAT_SAMPLE = [{"role": "user", "content": "Hi! Who are you?"},
               {"role": "assistant", "content": "A helpful assistant."},
               {"role": "user", "content": "What is 2 + 2?"}]
TEXT_SAMPLE = "Hello, world! Ünïcödé café, 你好 🙂 12345\n\tindented  twice"
COMPILE_S_PER_KERNEL = 3.2      # a cold compile per kernel loaded from the cache, with what it calls
                                # (SmolLM2: 7 kernels, 22.5 s on a 2-core EPYC, the two attention kernels
                                # about 6 s each)
HELPER_SHARE = 0.57             # of that time, with runtime.precompile's helper process compiling beside the
                                # engine (SmolLM2, 8 tokens on an empty cache: 13.1 s against 22.9 s)
SLOW_TOKENS_PER_S = 5.0         # decode below this warns
PROBE_S = 1.0                   # each half of the 2-second speed probe: read bandwidth, then decode steps
PROBE_BYTES = 256 << 20         # the buffer the bandwidth probe reads: larger than any L3 cache
PROBE_CTX = 64                  # the context the decode probe loads the model with


@dataclass
class Check:
    id: str                 # stable: "machine.cpu", "file.gguf", ... (documented in the README)
    title: str              # what the table shows
    status: str             # ok | warn | fail | skip
    summary: str            # one line: what was found
    advice: str = ""        # one line, when not ok
    details: dict = field(default_factory=dict)


@dataclass
class ModelReport:
    model: str
    path: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)


@dataclass
class Report:
    machine: list[Check]
    models: list[ModelReport]

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.machine) and all(m.ok for m in self.models)

    def to_json(self) -> dict:
        return {"ok": self.ok, "machine": [asdict(c) for c in self.machine],
                "models": [{"model": m.model, "path": m.path, "ok": m.ok, "checks": [asdict(c) for c in m.checks]}
                           for m in self.models]}


class _Skip(Exception):
    """A check that cannot run because an earlier one failed."""


def _run(id: str, title: str, fn: Callable[[], tuple], advice: str, report: Callable[[Check], None]) -> Check:
    """Run one check: fn returns (status, summary[, advice][, details]). A NibbleError (or any other error: the
    doctor never crashes) fails it with `advice`; _Skip skips it."""
    try:
        status, summary, *rest = fn()
        check = Check(id, title, status, summary, *rest)
    except _Skip as e:
        check = Check(id, title, SKIP, str(e))
    except NibbleError as e:
        check = Check(id, title, FAIL, str(e), advice)
    except Exception as e:   # a bug, or a file that breaks an assumption: report it, keep checking
        check = Check(id, title, FAIL, f"{type(e).__name__}: {e}", advice)
    if check.status == OK:
        check.advice = ""
    report(check)
    return check


def doctor(model: str | os.PathLike | None = None, n_ctx: int | None = None,
           on_check: Callable[[str | None, Check], None] | None = None,
           on_model: Callable[[str, str], None] | None = None) -> Report:
    """Check the machine and `model` (a catalogue name or a path; None: every pulled catalogue model).
    `on_check(model_name or None, check)` is called as each check completes, `on_model(name, path)` before a
    model's checks (the CLI prints as it goes)."""
    from .catalog import CATALOG
    from . import store
    machine, bandwidth = machine_checks(lambda c: on_check and on_check(None, c))
    if model is None:
        models = [(name, store.model_path(name)) for name in CATALOG if store.is_pulled(name)]
    elif isinstance(model, str) and model in CATALOG:
        models = [(model, store.model_path(model))]
    else:
        models = [(Path(model).stem, Path(model))]
    reports = []
    for name, path in models:
        if on_model:
            on_model(name, str(path))
        checks = model_checks(name, path, n_ctx, bandwidth, lambda c, name=name: on_check and on_check(name, c))
        reports.append(ModelReport(name, str(path), checks))
    return Report(machine, reports)


# ---- the machine ----

def machine_checks(report: Callable[[Check], None]) -> tuple[list[Check], float | None]:
    """The machine's checks, and the read bandwidth measured (bytes/s; None if the probe failed)."""
    checks = [_run("machine.cpu", "CPU", _cpu, "", report),
              _run("machine.threads", "threads", _threads, "set NIBBLE_THREADS to a whole number", report)]
    bw = _run("machine.bandwidth", "read bandwidth", _bandwidth, "", lambda c: None)  # runs Numba's pool first
    checks += [_run("machine.numba", "Numba", _numba, "reinstall numba (pip install -U numba)", report),
               _run("machine.kernel_cache", "kernel cache", _kernel_cache, "", report)]
    report(bw)
    checks.append(bw)
    return checks, bw.details.get("bytes_per_s")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu():
    from ..quant import simd
    features = {"AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX-512": "avx512f", "VNNI": "avx512vnni"}
    has = {label: simd._cpu_has(flag) for label, flag in features.items()}
    used = {"int8 dot products (pmaddubsw)": simd.USE_PMADDUBSW, "VNNI (vpdpbusd)": simd.USE_VNNI,
            "F16C conversions": simd._F16C}
    found = " ".join(label for label, yes in has.items() if yes) or "none of AVX2, FMA, F16C, AVX-512"
    summary = f"{cpu_name()} ({platform.machine()}): {found}"
    details = {"name": cpu_name(), "arch": platform.machine(), "features": has, "kernels_use": used}
    if has["AVX2"] and has["FMA"] and has["F16C"]:
        return OK, summary, "", details
    return (WARN, summary, "without AVX2, FMA and F16C the kernels run portable vector code: slower, and the "
                           "logits may differ from llama.cpp's AVX2 build", details)


def _physical_cores() -> int | None:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None


def _threads():
    import numba
    cores, threads, physical = available_cores(), get_threads(), _physical_cores()
    env = os.environ.get("NIBBLE_THREADS")
    summary = (f"{cores} cores available to this process, nibble uses {threads} thread(s) "
               f"({'NIBBLE_THREADS=' + env if env else 'NIBBLE_THREADS unset'}; Numba's pool: "
               f"{numba.config.NUMBA_NUM_THREADS})")
    details = {"cores": cores, "physical_cores": physical, "threads": threads,
               "numba_pool": numba.config.NUMBA_NUM_THREADS, "NIBBLE_THREADS": env}
    if physical and threads > physical:
        return (WARN, summary, f"more threads than the {physical} physical cores: decode is memory-bound and "
                               f"hyperthreads rarely help; try --threads {physical}", details)
    return OK, summary, "", details


def _numba():
    import numba
    layer = numba.threading_layer()     # known once a parallel kernel has run (the bandwidth probe)
    return OK, f"numba {numba.__version__}, llvmlite {_version('llvmlite')}, threading layer {layer}", "", {
        "numba": numba.__version__, "llvmlite": _version("llvmlite"), "threading_layer": layer}


def _version(package: str) -> str:
    from importlib.metadata import version
    try:
        return version(package)
    except Exception:
        return "?"


def _kernel_cache():
    from ..models import ops
    cache = ops.rmsnorm._cache          # every kernel of nibble caches through the same locator rules
    path = Path(cache._cache_path)
    details = {"path": str(path), "writable": True}
    try:
        cache._impl.locator.ensure_cache_path()
    except OSError as e:
        details["writable"] = False
        return (WARN, f"{path} is not writable ({e.strerror})",
                "every run compiles the kernels again: set NUMBA_CACHE_DIR to a writable folder", details)
    return OK, f"{path} (writable)", "", details


@parallel_kernel
def _sum_parts(sums, values):
    """sums[p] = Σ of part p of values (a multiple of 32 long): every byte read once, 8-wide, the parts on
    Numba's threads."""
    n_parts = sums.shape[0]
    step = values.shape[0] // n_parts // 32 * 32
    for p in prange(n_parts):
        a, b, c, d = zeros(), zeros(), zeros(), zeros()
        for i in range(p * step, (p + 1) * step, 32):
            a = a + load_f32x8(values, i)
            b = b + load_f32x8(values, i + 8)
            c = c + load_f32x8(values, i + 16)
            d = d + load_f32x8(values, i + 24)
        sums[p] = hsum((a + b) + (c + d))


def _bandwidth():
    values = np.ones(PROBE_BYTES // 4, np.float32)
    sums = np.zeros(64, np.float32)
    best, runs, start = 0.0, 0, time.perf_counter()
    with KERNEL_LOCK:
        apply_threads()
        _sum_parts(sums, values[:1024])         # compiled (or loaded) outside the timing
        while runs < 2 or time.perf_counter() - start < PROBE_S / 2:
            t = time.perf_counter()
            _sum_parts(sums, values)
            best = max(best, values.nbytes / (time.perf_counter() - t))
            runs += 1
    return OK, f"{best / 1e9:.1f} GB/s ({get_threads()} threads reading {PROBE_BYTES >> 20} MiB)", "", {
        "bytes_per_s": best, "threads": get_threads()}


# ---- a model ----

def model_checks(name: str, path: Path, n_ctx: int | None, bandwidth: float | None,
                 report: Callable[[Check], None]) -> list[Check]:
    from ..formats.gguf import GGUFFile
    from .model import Model

    state: dict = {"cache_counts": _cache_counts()}     # kernels loaded or compiled for this model from here

    def need(key: str, why: str):
        if key not in state:
            raise _Skip(why)
        return state[key]

    def gguf():
        if not path.is_file():
            from .catalog import CATALOG
            hint = f"run `nibble pull {name}`" if name in CATALOG else "check the path"
            return FAIL, f"{path}: no such file", hint
        g = state["gguf"] = GGUFFile(path)
        return OK, (f"GGUF v{g.version}, {g.file_size / 2**20:.1f} MiB, {len(g.tensors)} tensors, "
                    f"{len(g.fields)} metadata keys"), "", {"version": g.version, "size": g.file_size,
                                                            "tensors": len(g.tensors), "keys": len(g.fields)}

    def sha256():
        g = need("gguf", "the file did not open")
        from .catalog import CATALOG
        from .store import model_path, sha256_file
        # a catalogue model (by name or its place in the store) must match; another file may be one by size
        entry = CATALOG.get(name) or next((e for e in CATALOG.values() if model_path(e.name) == path), None)
        same_size = next((e for e in CATALOG.values() if e.size == g.file_size), None)
        if entry is None and same_size is None:
            return SKIP, "not a catalogue model: nothing to compare with"
        digest = sha256_file(path)
        if entry is None:
            if digest != same_size.sha256:
                return SKIP, "not a catalogue model: nothing to compare with", "", {"sha256": digest}
            entry = same_size
        details = {"catalogue": entry.name, "sha256": digest, "expected": entry.sha256}
        if digest != entry.sha256 or g.file_size != entry.size:
            return (FAIL, f"sha256 {digest[:16]}… differs from the catalogue's {entry.sha256[:16]}… ({entry.name})",
                    f"the file is damaged or another build: `nibble pull {entry.name}` fetches it again", details)
        return OK, f"{digest[:16]}… matches the catalogue ({entry.name})", "", details

    def tensor_types():
        g = need("gguf", "the file did not open")
        from .. import quant
        counts = Counter(t.type_name for t in g.tensors.values())
        bad = [n for n, t in g.tensors.items() if int(t.qtype) not in quant.FORMATS]
        summary = ", ".join(f"{k} × {v}" for k, v in sorted(counts.items()))
        details = {"types": dict(counts), "unsupported": bad}
        if bad:
            return (FAIL, f"{len(bad)} tensor(s) of a type nibble cannot read ({g.tensors[bad[0]].type_name}: "
                          f"{bad[0]}, ...); {summary}",
                    "use a GGUF quantized with a supported type (Q4_K_M, Q8_0, ...)", details)
        return OK, f"every type supported: {summary}", "", details

    def metadata():
        g = need("gguf", "the file did not open")
        m = state["vocab_model"] = Model(g, name=name, vocab_only=True)   # architecture, hyperparameters
        m.arch.load_weights(g, m.args)                                    # every tensor by name and shape
        a = m.args
        return OK, (f"{m.architecture}: {a.n_layers} layers, n_embd {a.n_embd}, {a.n_head} heads "
                    f"({a.n_head_kv} KV), n_ff {a.n_ff}, context {a.context_length}, vocabulary {a.n_vocab}"), "", {
            "architecture": m.architecture, "n_layers": a.n_layers, "n_embd": a.n_embd, "n_head": a.n_head,
            "n_head_kv": a.n_head_kv, "n_ff": a.n_ff, "context_length": a.context_length, "n_vocab": a.n_vocab}

    def tokenizer():
        m = need("vocab_model", "the metadata did not check out")
        t = time.perf_counter()
        tok = state["tokenizer"] = m.tokenizer
        ms = (time.perf_counter() - t) * 1e3
        kind = f"BPE (pre-tokenizer {tok.vocab.pre})" if tok.model == "gpt2" else "SentencePiece"
        return OK, f"{kind}, {tok.n_vocab} tokens, built in {ms:.0f} ms", "", {"kind": tok.model,
                                                                               "n_vocab": tok.n_vocab}

    def roundtrip():
        m = need("vocab_model", "the metadata did not check out")
        need("tokenizer", "the tokenizer did not build")
        ids = m.tokenize(TEXT_SAMPLE, add_special=False)
        back = m.detokenize(ids)
        details = {"text": TEXT_SAMPLE, "ids": ids, "decoded": back}
        if back != TEXT_SAMPLE:
            return (WARN, f"{len(ids)} tokens decode to {back!r}, not the sample text",
                    "text this vocabulary cannot hold comes back changed", details)
        return OK, f"a sample of {len(TEXT_SAMPLE)} characters: {len(ids)} tokens, decoded unchanged", "", details

    def special():
        tok = need("tokenizer", "the tokenizer did not build")
        from ..formats.tokenizer import ATTR_CONTROL, ATTR_USER_DEFINED
        parts, details, untyped = [], {}, []
        for kind in ("bos", "eos", "eot"):
            i = tok.vocab.special.get(kind)
            if i is None:
                parts.append(f"{kind.upper()} none")
                details[kind] = None
                continue
            attrs = int(tok.vocab.attrs[i])
            typed = "control" if attrs & ATTR_CONTROL else ("user-defined" if attrs & ATTR_USER_DEFINED else "normal")
            if typed == "normal":
                untyped.append(kind.upper())
            parts.append(f"{kind.upper()} {tok.tokens[i]!r} ({i}, {typed})")
            details[kind] = {"id": i, "text": tok.tokens[i], "type": typed}
        details["add_bos"], details["end_of_generation"] = tok.add_bos, sorted(tok.eog_ids)
        summary = ", ".join(parts) + f"; adds BOS: {'yes' if tok.add_bos else 'no'}"
        if not tok.eog_ids:
            return WARN, summary, "no end-of-generation token: generation stops only at max_tokens or a stop string", details
        if untyped:
            return (WARN, summary, f"{', '.join(untyped)} is typed as normal text: typed text could produce it",
                    details)
        return OK, summary, "", details

    def template():
        m = need("vocab_model", "the metadata did not check out")
        from ..errors import TemplateError
        try:
            t = state["template"] = m.chat_template_object
        except TemplateError as e:
            if "tokenizer.chat_template" in m.gguf.metadata:
                raise
            return WARN, str(e), "`nibble run --raw` skips the template; --chat-template FILE brings one"
        where = (f"the file's ({len(t.source)} characters)" if not t.name.startswith("builtin:")
                 else f"none in the file: nibble's built-in {t.name.removeprefix('builtin:')} format")
        return OK, where, "", {"name": t.name, "chars": len(t.source)}

    def render():
        t = need("template", "no chat template")
        from ..formats.chat import chat_tokens
        start = time.perf_counter()
        text = t.render(CHAT_SAMPLE, add_generation_prompt=True)
        ms = (time.perf_counter() - start) * 1e3
        before = t.render(CHAT_SAMPLE, add_generation_prompt=False)
        ids = chat_tokens(state["tokenizer"], t, CHAT_SAMPLE) if "tokenizer" in state else []
        generation = text[len(before):] if text.startswith(before) else None
        shown = json.dumps(generation, ensure_ascii=False) if generation is not None else "(not a suffix)"
        details = {"rendered": text, "generation_prompt": generation, "tokens": len(ids), "ms": ms,
                   "budget_ms": t.time_budget_s * 1e3}
        summary = (f"a two-turn chat renders in {ms:.0f} ms (budget {t.time_budget_s * 1e3:.0f} ms), "
                   f"{len(ids)} tokens; generation prompt {shown}")
        if not generation:
            return WARN, summary, "the template adds no generation prompt: the model may not answer as the assistant", details
        return OK, summary, "", details

    def memory():
        m = need("vocab_model", "the metadata did not check out")
        from .engine import Engine, available_memory
        a, size = m.args, m.gguf.file_size
        ctx = Engine.default_n_ctx(a) if n_ctx is None else n_ctx
        if ctx <= 0 or ctx > a.context_length:
            return FAIL, f"n_ctx {ctx} is outside 1..{a.context_length}, the model's context length", \
                f"ask for n_ctx <= {a.context_length}"
        plan = Engine.memory_plan(a, size, ctx)
        need_bytes, available = sum(plan.values()), available_memory()
        lo, hi = 0, a.context_length                     # the largest n_ctx whose plan fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if sum(Engine.memory_plan(a, size, mid).values()) <= available else (lo, mid - 1)
        details = {"n_ctx": ctx, **plan, "required": need_bytes, "available": available, "largest_n_ctx": lo}
        mib = lambda n: f"{n / 2**20:,.0f} MiB"
        summary = (f"n_ctx {ctx}: {mib(need_bytes)} (weights {mib(plan['weights'])}, KV cache "
                   f"{mib(plan['kv_cache'])}, buffers {mib(plan['buffers'])}) of {mib(available)} available; "
                   + (f"the largest n_ctx that fits: {lo}" + (" (the model's maximum)" if lo == a.context_length else "")
                      if lo else "the weights alone do not fit"))
        if need_bytes > available:
            return FAIL, summary, (f"use --n-ctx {lo}" if lo else "free memory, or use a smaller model") + \
                (" (NIBBLE_MAX_MEMORY is set)" if os.environ.get("NIBBLE_MAX_MEMORY") else ""), details
        state["fits"] = True
        if need_bytes > 0.8 * available:
            return WARN, summary, "more than 80% of the available memory: other programs may push it to swap", details
        return OK, summary, "", details

    def kernels():
        m = need("vocab_model", "the metadata did not check out")
        need("fits", "the model does not fit in memory")
        hits, misses = state["cache_counts"]
        start = time.perf_counter()
        live = state["live"] = Model(m.gguf, name=name, n_ctx=min(PROBE_CTX, m.args.context_length))
        ids = (m.tokenize(TEXT_SAMPLE) * 4)[:16]
        live.eval(ids)                  # a prompt batch and a decode step: every kernel the model runs
        live.eval(ids[:1])
        seconds = time.perf_counter() - start
        hits2, misses2 = _cache_counts()
        loaded, compiled = hits2 - hits, misses2 - misses
        # kernels an earlier model of this process loaded count too: they are part of this model's compile
        estimate = seconds if compiled else \
            max(hits2, 1) * COMPILE_S_PER_KERNEL * (HELPER_SHARE if precompile.enabled() else 1)
        details = {"loaded": loaded, "compiled": compiled, "seconds": seconds, "cold_compile_s": estimate}
        if compiled:
            return (WARN, f"cold: compiled {compiled} kernel(s) for {', '.join(live.quant_types)} in {seconds:.0f} s "
                          f"(cached now)", "a first run compiles once per machine; the next start is fast", details)
        what = f"{loaded} kernel(s) loaded from the cache" if loaded else "the kernels were already loaded"
        return OK, (f"warm: {what}, first evaluation in {seconds:.1f} s (a cold compile takes about "
                    f"{estimate:.0f} s)"), "", details

    def speed():
        live = need("live", "the model did not load")
        prompt = live.tokenize(TEXT_SAMPLE)[:8]
        live.reset()
        live.eval(prompt)
        steps, start = [], time.perf_counter()
        while len(steps) < 3 or (time.perf_counter() - start < PROBE_S and len(steps) < 200):
            t = time.perf_counter()
            live.eval(prompt[-1:])
            steps.append(time.perf_counter() - t)
            if live.n_past() >= live.n_ctx:
                live.truncate(len(prompt))
        step = float(np.median(steps))
        tps, achieved = 1 / step, live.weight_bytes / step
        of = f" of {bandwidth / 1e9:.1f} GB/s measured" if bandwidth else ""
        details = {"step_ms": step * 1e3, "tokens_per_s": tps, "bytes_per_s": achieved,
                   "weight_bytes": live.weight_bytes, "threads": get_threads()}
        summary = (f"one decode step {step * 1e3:.1f} ms: expect ~{tps:.0f} tokens/s "
                   f"({achieved / 1e9:.1f} GB/s of weights read{of})")
        if tps < SLOW_TOKENS_PER_S:
            return WARN, summary, "decoding will be slow: a smaller model or quantization, or more threads", details
        return OK, summary, "", details

    checks = [
        _run("file.gguf", "GGUF", gguf, "the file is not a complete GGUF: download or convert it again", report),
        _run("file.sha256", "sha256", sha256, "", report),
        _run("file.tensor_types", "tensor types", tensor_types, "", report),
        _run("file.metadata", "metadata", metadata, "the file describes a model nibble cannot build", report),
        _run("tokenizer.build", "tokenizer", tokenizer, "the vocabulary cannot be built exactly", report),
        _run("tokenizer.roundtrip", "round trip", roundtrip, "the tokenizer fails on ordinary text", report),
        _run("tokenizer.special", "special tokens", special, "", report),
        _run("chat.template", "chat template", template,
             "fix the template, pass --chat-template FILE, or use --raw", report),
        _run("chat.render", "chat render", render, "fix the template, pass --chat-template FILE, or use --raw",
             report),
        _run("memory.plan", "memory", memory, "", report),
        _run("kernels.cache", "kernels", kernels, "", report),
        _run("speed.decode", "speed", speed, "", report),
    ]
    if "live" in state:
        state["live"].close()
    return checks


def _nibble_dispatchers():
    from numba.core.dispatcher import Dispatcher
    package = __name__.split(".")[0] + "."
    for name, module in list(sys.modules.items()):
        if name.startswith(package) and module is not None:
            for value in vars(module).values():
                if isinstance(value, Dispatcher):
                    yield value


def _cache_counts() -> tuple[int, int]:
    """(kernel signatures loaded from Numba's disk cache, compiled) so far in this process."""
    hits = misses = 0
    for d in set(_nibble_dispatchers()):
        hits += sum(d.stats.cache_hits.values())
        misses += sum(d.stats.cache_misses.values())
    return hits, misses
