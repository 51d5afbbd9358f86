"""`nibble bench --concurrency 1,2,4,8`: aggregate generated tokens/s and TTFT of concurrent streams on one
model, through the same engine thread and scheduler the server uses (continuous batching)."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class ConcurrencyResult:
    concurrency: int
    streams: int
    generated: int
    seconds: float
    ttft_ms: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.ttft_ms, q))

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second,
                "ttft_p50_ms": self.percentile(50), "ttft_p95_ms": self.percentile(95)}


def prompts(model, n: int, n_prompt: int, seed: int = 0) -> list[list[int]]:
    """n different prompts of n_prompt random tokens (the same for every run)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.n_vocab, n_prompt).tolist() for _ in range(n)]


def run_level(model, concurrency: int, n_prompt: int, n_gen: int, rounds: int = 2) -> ConcurrencyResult:
    """`concurrency` clients, each sending `rounds` requests one after another (n_prompt random prompt
    tokens, exactly n_gen generated: end-of-generation tokens are banned), all at once."""
    batch = prompts(model, concurrency * rounds, n_prompt, seed=concurrency)
    ban = {int(t): float("-inf") for t in model.tokenizer.eog_ids}
    ttft: list[float] = []
    generated = [0] * concurrency
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(rounds):
            c = model.generate(batch[i * rounds + r], temperature=0, max_tokens=n_gen, logit_bias=ban)
            with lock:
                ttft.append(c.timings.ttft_ms)
                generated[i] += c.usage.completion_tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ConcurrencyResult(concurrency, concurrency * rounds, sum(generated), time.perf_counter() - t0, ttft)


def run(model, levels: list[int], n_prompt: int = 64, n_gen: int = 64) -> list[ConcurrencyResult]:
    """One warm-up request, then each level in turn. The model needs parallel >= max(levels) slots."""
    if max(levels) > model.parallel:
        raise ValueError(f"concurrency {max(levels)} needs a model loaded with parallel >= {max(levels)}")
    model.generate(prompts(model, 1, n_prompt, seed=99)[0], temperature=0, max_tokens=4)
    return [run_level(model, c, n_prompt, n_gen) for c in levels]


def table(results: list[ConcurrencyResult]) -> str:
    base = results[0].tokens_per_second
    lines = ["| streams | generated t/s | vs 1 stream | TTFT p50 ms | TTFT p95 ms |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.concurrency} | {r.tokens_per_second:.1f} | {r.tokens_per_second / base:.2f}x | "
                     f"{r.percentile(50):.0f} | {r.percentile(95):.0f} |")
    return "\n".join(lines)
