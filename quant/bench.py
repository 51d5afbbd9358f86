"""Kernel benchmark: decode matvec bandwidth and prefill throughput for every supported type.

    rows = run(size_mb=64)        # one dict per type (plus the machine's read bandwidth), see `run`
    print(markdown(rows))

Matvec speed is reported as GB/s of weight bytes read, on a matrix bigger than the last-level cache, so it
can be compared with `read_gbs`, what a plain parallel sum over the same number of bytes achieves (the
machine's practical limit). Prefill is GFLOP/s of x (512, k) @ W.T (2 flops per multiply-add). Both time
`quant.multiply`, the call the models' linear layers make, with the arithmetic a model gives a batch of
that many rows.
"""

from __future__ import annotations

import time

import numpy as np
from numba import prange
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from . import SUPPORTED_TYPES, _prepare, multiply, scratch_shape
from .jit import apply_threads, get_threads, kernel, parallel_kernel, set_threads
from .simd import f32x8_at, hsum, zeros

K = 4096                    # row length of the benchmark matrices (a multiple of every block size)
PREFILL_ROWS = 1024         # weight rows of the prefill matrix (its size does not change GFLOP/s much)
_F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def bench_weights(qtype: GGMLQuantizationType, m: int, k: int, seed: int = 0) -> np.ndarray:
    """(m, k) weights of `qtype` with random quants and normal (not subnormal) f16 scales."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = m * k // block_size
    if qtype == GGMLQuantizationType.F32:
        return rng.standard_normal(m * k, dtype=np.float32).view(np.uint8)
    if qtype == GGMLQuantizationType.F16:
        return rng.standard_normal(m * k, dtype=np.float32).astype(np.float16).view(np.uint8)
    if qtype == GGMLQuantizationType.BF16:
        return (rng.standard_normal(m * k, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in _F16_FIELDS[qtype.name]:
        scales = (0.01 + 0.02 * rng.random((n_blocks, 1))).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8)
    return blocks.reshape(-1)


def _best_time(fn, min_time: float) -> float:
    fn()  # compile / warm
    best, spent = float("inf"), 0.0
    while spent < min_time or best == float("inf"):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best


@kernel
def _sum_range(w, lo, hi):
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    for p in range(lo, hi, 128):
        a0 = a0 + f32x8_at(w, p)
        a1 = a1 + f32x8_at(w, p + 32)
        a2 = a2 + f32x8_at(w, p + 64)
        a3 = a3 + f32x8_at(w, p + 96)
    return hsum((a0 + a1) + (a2 + a3))


@parallel_kernel
def _read_all(w, partial):
    """Reads every byte of w (a multiple of 128 KiB) as float vectors, one contiguous run per task."""
    n_tasks = partial.size
    step = w.size // n_tasks
    for t in prange(n_tasks):
        partial[t] = _sum_range(w, t * step, (t + 1) * step)


def read_bandwidth(n_bytes: int, min_time: float = 0.3) -> float:
    """GB/s of a parallel streaming read of n_bytes (the practical memory bandwidth, with the current
    thread count)."""
    n_bytes = max(1 << 17, n_bytes - n_bytes % (1 << 17))
    w = np.ones(n_bytes, np.uint8)
    partial = np.zeros(64, np.float32)
    return n_bytes / _best_time(lambda: _read_all(w, partial), min_time) / 1e9


def run(size_mb: float = 64, types=None, threads=None, n_prefill: int = 512, min_time: float | None = None,
        prefill: bool = True) -> list[dict]:
    """Benchmark each type (all supported types by default) with 1, 2 and the configured number of threads
    (or `threads`); each timing is the best of repeated runs over `min_time` seconds (default 0.3, or 0.05
    for a smoke run under 16 MB). Returns one dict per type:

        type, bits_per_weight, matvec_shape [m, k], matvec_mb,
        matvec_gbs_<t>t    GB/s of weights read by the decode matvec with t threads
        read_gbs_<t>t      GB/s of a plain streaming read of the same number of bytes with t threads
        prefill_gflops     GFLOP/s of the n_prefill-row gemm (x @ W.T, W PREFILL_ROWS × 4096) with
                           prefill_threads = max(threads) threads; prefill_rows = n_prefill
    """
    qtypes = sorted(SUPPORTED_TYPES if types is None else [GGMLQuantizationType[t] if isinstance(t, str)
                                                           else GGMLQuantizationType(t) for t in types])
    before = get_threads()
    if threads is None:
        threads = (1, 2, before)
    threads = sorted({set_threads(t) for t in threads if t >= 1})  # clamped to Numba's pool
    if min_time is None:
        min_time = 0.3 if size_mb >= 16 else 0.05
    rows = []
    try:
        read = {}
        for t in threads:
            set_threads(t)
            read[t] = read_bandwidth(int(size_mb * 2**20), min_time)
        for qtype in qtypes:
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            m = max(1, int(size_mb * 2**20) // (K // block_size * type_size))
            w, q, m, k = _prepare(bench_weights(qtype, m, K), qtype, (m, K))
            x = np.random.default_rng(1).standard_normal((1, K), dtype=np.float32)
            xq_shape, xs_shape = scratch_shape(K)
            xq, xs = np.empty(xq_shape, np.int8), np.empty(xs_shape, np.float32)
            out = np.empty((1, m), np.float32)
            row = {"type": qtype.name, "bits_per_weight": 8 * type_size / block_size, "matvec_shape": [m, K],
                   "matvec_mb": round(w.nbytes / 2**20, 1)}
            for t in threads:
                set_threads(t)
                dt = _best_time(lambda: multiply(out, x, xq, xs, w, q, m, k), min_time)
                row[f"matvec_gbs_{t}t"] = round(w.nbytes / dt / 1e9, 2)
                row[f"read_gbs_{t}t"] = round(read[t], 2)
            if prefill:
                set_threads(max(threads))
                mp = min(m, PREFILL_ROWS)
                wp = w[:mp * (K // block_size * type_size)]
                xp = np.random.default_rng(2).standard_normal((n_prefill, K), dtype=np.float32)
                xq_shape, xs_shape = scratch_shape(K, n_prefill)
                xqp, xsp = np.empty(xq_shape, np.int8), np.empty(xs_shape, np.float32)
                outp = np.empty((n_prefill, mp), np.float32)
                dt = _best_time(lambda: multiply(outp, xp, xqp, xsp, wp, q, mp, k), min_time)
                row["prefill_gflops"] = round(2 * n_prefill * mp * K / dt / 1e9, 1)
                row["prefill_threads"] = max(threads)
                row["prefill_rows"] = n_prefill
            rows.append(row)
    finally:
        set_threads(before)
        apply_threads()
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows of `run` as a markdown table; matvec columns show GB/s and the share of the read bandwidth."""
    if not rows:
        return ""
    threads = sorted(int(key[len("matvec_gbs_"):-1]) for key in rows[0] if key.startswith("matvec_gbs_"))
    head = ["type", "bits/weight", "matrix"] + [f"matvec {t}T GB/s" for t in threads]
    if "prefill_gflops" in rows[0]:
        head.append(f"prefill n={rows[0]['prefill_rows']} {rows[0]['prefill_threads']}T GFLOP/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["type"], f"{r['bits_per_weight']:.2f}", f"{r['matvec_shape'][0]}×{r['matvec_shape'][1]} "
                 f"({r['matvec_mb']:.0f} MB)"]
        for t in threads:
            gbs, read = r[f"matvec_gbs_{t}t"], r[f"read_gbs_{t}t"]
            cells.append(f"{gbs:.1f} ({100 * gbs / read:.0f}%)")
        if "prefill_gflops" in r:
            cells.append(f"{r['prefill_gflops']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    reads = ", ".join(f"{t}T {rows[0][f'read_gbs_{t}t']:.1f} GB/s" for t in threads)
    lines.append("")
    lines.append(f"Percentages are of a plain streaming read of the same bytes ({reads}).")
    return "\n".join(lines)
