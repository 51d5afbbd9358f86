"""`nibble bench`: llama-bench's method, on our engine.

pp = one batch of p prompt tokens from an empty cache; tg = n single-token decode steps from an empty
cache; each repeated r times after one warm-up; mean ± stddev of tokens/s. Beside each figure, what it means
against the machine's limit:

    tg  GB/s     weight bytes read per token × tokens/s: the memory bandwidth decode achieved
    pp  GFLOP/s  2 × `matmul_params` × tokens/s: the compute prefill achieved in the weight matmuls (a
                 batch reads the weights once for all its tokens, so bytes × tokens/s would be no bandwidth)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import NibbleError


@dataclass
class BenchResult:
    model_type: str
    size: int               # bytes of weights
    n_params: int
    n_threads: int
    n_prompt: int
    n_gen: int
    samples_ts: list[float] = field(default_factory=list)
    weight_bytes: int = 0   # read per decoded token
    matmul_params: int = 0  # weights each prompt token is multiplied with
    n_depth: int = 0        # tokens already in the cache when the test starts (llama-bench's -d)

    @property
    def test(self) -> str:
        name = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
        return name + (f" @ d{self.n_depth}" if self.n_depth else "")

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ts) > 1 else 0.0

    @property
    def gbps(self) -> float | None:
        """tg: GB/s of weights read (None for pp)."""
        return self.weight_bytes * self.avg_ts / 1e9 if not self.n_prompt else None

    @property
    def gflops(self) -> float | None:
        """pp: GFLOP/s of the weight matmuls, 2 flops per multiply-add (None for tg)."""
        return 2 * self.matmul_params * self.avg_ts / 1e9 if self.n_prompt else None

    def as_json(self) -> dict:
        speed = {"gflops": self.gflops} if self.n_prompt else {"gbps": self.gbps}
        return {"model_type": self.model_type, "n_prompt": self.n_prompt, "n_gen": self.n_gen,
                "n_depth": self.n_depth, "n_threads": self.n_threads, "avg_ts": self.avg_ts, "stddev_ts": self.stddev_ts,
                **speed, "samples_ts": self.samples_ts}


def model_type(model) -> str:
    """llama-bench's model description: architecture, size label, dominant weight type."""
    from gguf import LlamaFileType
    label = model.gguf.get("general.size_label") or f"{model.n_params / 1e6:.0f}M"
    ftype = model.gguf.get("general.file_type")
    try:
        kind = LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else "?"
    except ValueError:
        kind = f"ftype {ftype}"
    return f"{model.architecture} {label} {kind}"


def matmul_params(model) -> int:
    """Weights each prompt token is multiplied with: every matrix of every layer (m × k each). Left out: the
    output projection, which a prefill runs for the last position only, and attention's products."""
    from ..models.linear import Linear
    return sum(w.m * w.k for layer in model.engine.weights.layers for w in vars(layer).values()
               if isinstance(w, Linear))


def measure_compile(model) -> float:
    """Seconds spent on the first decode and the first batched step: Numba compiling (or loading its
    cache) for every kernel the model's weights use. Excluded from the figures."""
    t = time.perf_counter()
    model.reset()
    model.eval([0, 1])
    model.eval([2])
    model.reset()
    return time.perf_counter() - t


def _timed(model, evals: list, depth: np.ndarray | None = None) -> float:
    """Seconds to evaluate `evals` (arrays of ids, one engine call each) after `depth` (untimed; None: from an
    empty cache), timed on the model's engine thread (no hand-over between threads inside the figure)."""
    def run(e):
        e.reset(0)
        if depth is not None and len(depth):
            e.eval(depth, 0)
        t = time.perf_counter()
        for ids in evals:
            e.eval(ids, 0)
        return time.perf_counter() - t
    return model._call(run)


def run(model, n_prompt: int, n_gen: int, reps: int, threads: int, seed: int = 0,
        n_depth: int = 0) -> list[BenchResult]:
    rng = np.random.default_rng(seed)
    common = dict(model_type=model_type(model), size=model.engine.model_bytes, n_params=model.n_params,
                  n_threads=threads, weight_bytes=model.weight_bytes, matmul_params=matmul_params(model),
                  n_depth=n_depth)
    depth = rng.integers(0, model.n_vocab, n_depth)
    results = []
    if n_prompt:
        r = BenchResult(n_prompt=n_prompt, n_gen=0, **common)
        prompt = rng.integers(0, model.n_vocab, n_prompt)
        for i in range(reps + 1):
            dt = _timed(model, [prompt], depth)
            if i:                                   # the first run is the warm-up
                r.samples_ts.append(n_prompt / dt)
        results.append(r)
    if n_gen:
        r = BenchResult(n_prompt=0, n_gen=n_gen, **common)
        tokens = rng.integers(0, model.n_vocab, n_gen)
        for i in range(reps + 1):
            dt = _timed(model, [tokens[j:j + 1] for j in range(n_gen)], depth)
            if i:
                r.samples_ts.append(n_gen / dt)
        results.append(r)
    model.reset()
    return results


def llama_bench(binary: str, model_path, n_prompt: int, n_gen: int, threads: int, n_depth: int = 0,
                cache_types: tuple[str, str] = ("f16", "f16")) -> dict:
    """One run of llama-bench (`-r 1`, JSON output) on the same file and settings: {"pp": t/s, "tg": t/s}.
    A q8_0 cache is given to llama-bench as -ctk/-ctv with -fa 1 (its quantized V cache needs it)."""
    import json
    import subprocess
    cmd = [binary, "-m", str(model_path), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads), "-r", "1",
           "-o", "json"] + (["-d", str(n_depth)] if n_depth else [])
    if tuple(cache_types) != ("f16", "f16"):
        cmd += ["-ctk", cache_types[0], "-ctv", cache_types[1], "-fa", "1"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise NibbleError(f"llama-bench failed ({' '.join(cmd)}): {e}") from None
    rows = json.loads(out)
    return {("pp" if r["n_prompt"] else "tg"): float(r["avg_ts"]) for r in rows}


def run_compared(model, binary: str, n_prompt: int, n_gen: int, reps: int, threads: int,
                 n_depth: int = 0) -> list[tuple[BenchResult, list[float]]]:
    """`run` and llama-bench interleaved, one repetition of each at a time (so both see the same machine
    load): [(nibble's result, llama-bench's t/s samples)] for pp and tg."""
    ours = run(model, n_prompt, n_gen, 0, threads, n_depth=n_depth)      # the warm-up run only
    for r in ours:
        r.samples_ts.clear()
    theirs: dict[str, list[float]] = {"pp": [], "tg": []}
    for i in range(reps):
        for r, new in zip(ours, run(model, n_prompt, n_gen, 1, threads, seed=i + 1, n_depth=n_depth)):
            r.samples_ts.extend(new.samples_ts)
        for key, ts in llama_bench(binary, model.path, n_prompt, n_gen, threads, n_depth, model.cache_types).items():
            theirs[key].append(ts)
    return [(r, theirs["pp" if r.n_prompt else "tg"]) for r in ours]


def compared_markdown(rows: list[tuple[BenchResult, list[float]]]) -> str:
    lines = ["| model | test | nibble t/s | llama.cpp t/s | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
    for r, theirs in rows:
        t = statistics.fmean(theirs) if theirs else float("nan")
        sd = statistics.stdev(theirs) if len(theirs) > 1 else 0.0
        lines.append(f"| {r.model_type} | {r.test} | {r.avg_ts:.2f} ± {r.stddev_ts:.2f} | {t:.2f} ± {sd:.2f} | "
                     f"{r.avg_ts / t:.2f} |")
    return "\n".join(lines)


def markdown(results: list[BenchResult]) -> str:
    rows = ["| model | size | params | backend | threads | test | t/s | GB/s | GFLOP/s |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        gbps = f"{r.gbps:.2f}" if r.gbps is not None else ""
        gflops = f"{r.gflops:.1f}" if r.gflops is not None else ""
        rows.append(f"| {r.model_type} | {r.size / 2**20:.2f} MiB | {r.n_params / 1e6:.2f} M | CPU (numba) | "
                    f"{r.n_threads} | {r.test} | {r.avg_ts:.2f} ± {r.stddev_ts:.2f} | {gbps} | {gflops} |")
    return "\n".join(rows)


# ---- speculative decoding on the fixed workloads (runtime/workloads.py) ----

@dataclass
class SpeculativeResult:
    workload: str
    model: str
    tokens: int
    plain_ts: float
    speculative_ts: float
    draft_tokens: int
    accepted_tokens: int
    verify_steps: int
    identical: bool           # the speculative tokens equal the plain ones (they always should)

    @property
    def speedup(self) -> float:
        return self.speculative_ts / self.plain_ts

    def as_json(self) -> dict:
        return {**self.__dict__, "speedup": self.speedup,
                "acceptance_rate": self.accepted_tokens / self.draft_tokens if self.draft_tokens else None,
                "mean_accepted": self.accepted_tokens / self.verify_steps if self.verify_steps else None}


def run_speculative(speculative, workloads: list[str] | None = None, max_tokens: int = 256,
                    model_override: str | None = None, threads: int | None = None,
                    reps: int = 3) -> tuple[list[SpeculativeResult], list[VerifyCost]]:
    """Each workload greedy, plain and with `speculative` in turn `reps` times, on its model (or
    `model_override`): the median decode tokens/s of each (generated tokens after the first / their time),
    drafted and accepted tokens; and what a verification step costs on each model (`verify_costs`)."""
    from .model import load
    from .workloads import WORKLOADS
    results, costs = [], []
    loaded: dict = {}
    for name in workloads or list(WORKLOADS):
        model_name, messages = WORKLOADS[name]
        model_name = model_override or model_name
        if model_name not in loaded:
            loaded[model_name] = load(model_name, n_ctx=2048, threads=threads)
            costs += verify_costs(loaded[model_name])
        model = loaded[model_name]
        model.chat(messages, temperature=0, max_tokens=4)                    # warm-up: compile, caches
        model.chat(messages, temperature=0, max_tokens=4, speculative=speculative)
        plain_ts, spec_ts = [], []
        for _ in range(max(1, reps)):                                        # interleaved: the same conditions
            plain = model.chat(messages, temperature=0, max_tokens=max_tokens)
            spec = model.chat(messages, temperature=0, max_tokens=max_tokens, speculative=speculative)
            plain_ts.append(plain.timings.tokens_per_second or 0.0)
            spec_ts.append(spec.timings.tokens_per_second or 0.0)
        t = spec.timings
        results.append(SpeculativeResult(name, model_name, len(plain.tokens), statistics.median(plain_ts),
                                          statistics.median(spec_ts), t.draft_tokens, t.accepted_tokens,
                                          t.verify_steps, spec.tokens == plain.tokens))
    for model in loaded.values():
        model.close()
    return results, costs


@dataclass
class VerifyCost:
    model: str
    rows: int
    ms: float                 # one forward of `rows` single-token-kind rows in one slot (median)
    one_row_ms: float         # the same for one row: a plain decode step

    def as_json(self) -> dict:
        return {**self.__dict__, "relative": self.ms / self.one_row_ms,
                "per_row_relative": self.ms / self.one_row_ms / self.rows}


def verify_costs(model, rows=(1, 4, 8, 16), reps: int = 10) -> list[VerifyCost]:
    """What a verification step costs on `model`: one forward of n rows of the single-token kind in one
    slot (the token and n - 1 drafts, logits for all), after a short prompt, median of `reps` (ms)."""
    prompt = model.tokenize("def add(a, b):\n    return a + b\n")

    def run(engine):
        engine.reset(0)
        engine.eval(prompt, 0)
        n0, token = len(prompt), prompt[-1]
        times = {}
        for n in rows:
            samples = []
            for _ in range(reps + 1):
                engine.truncate(n0, 0)
                t = time.perf_counter()
                engine.forward_rows([(0, np.full(n, token), np.zeros(n, np.int8), n)])   # kind 0: a decode row
                samples.append(time.perf_counter() - t)
            times[n] = statistics.median(samples[1:]) * 1e3
        engine.reset(0)
        return times

    times = model._call(run)
    return [VerifyCost(model.name, n, times[n], times[rows[0]]) for n in rows]


def speculative_markdown(results: list[SpeculativeResult], costs: list[VerifyCost] = ()) -> str:
    lines = ["| workload | model | tokens | plain t/s | speculative t/s | speedup | accepted / drafted | "
             "mean accepted per step | identical |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        j = r.as_json()
        rate = f"{r.accepted_tokens} / {r.draft_tokens}" + (f" ({j['acceptance_rate']:.0%})" if r.draft_tokens else "")
        mean = f"{j['mean_accepted']:.2f}" if r.verify_steps else "-"
        lines.append(f"| {r.workload} | {r.model} | {r.tokens} | {r.plain_ts:.1f} | {r.speculative_ts:.1f} | "
                     f"{r.speedup:.2f}x | {rate} | {mean} | {'yes' if r.identical else 'NO'} |")
    if costs:
        lines += ["", "| model | verify rows | ms | vs 1 row | per row |", "|---|---|---|---|---|"]
        for c in costs:
            j = c.as_json()
            lines.append(f"| {c.model} | {c.rows} | {c.ms:.2f} | {j['relative']:.2f}x | {j['per_row_relative']:.2f}x |")
    return "\n".join(lines)
