"""`nibble bench`: llama-bench's table for a model, or the quantized kernels alone (`--kernels`)."""

from __future__ import annotations

import json

import typer

from .app import app, handles_errors


@app.command()
@handles_errors
def bench(model: str = typer.Argument(None, help="catalogue name or path (not needed with --kernels)"),
          n_prompt: int = typer.Option(512, "-p", "--n-prompt", help="prompt tokens (pp test); 0 to skip"),
          n_gen: int = typer.Option(128, "-n", "--n-gen", help="generated tokens (tg test); 0 to skip"),
          reps: int = typer.Option(3, "-r", "--repetitions", help="repetitions after one warm-up"),
          n_depth: int = typer.Option(0, "-d", "--n-depth", help="tokens already in the KV cache before each "
                                                                   "test (llama-bench's -d)"),
          threads: int = typer.Option(None, "--threads", "-t", help="threads (default: all cores)"),
          kernels: bool = typer.Option(False, "--kernels", help="benchmark the quantized matmul kernels"),
          size_mb: int = typer.Option(64, "--size-mb", help="--kernels: weight matrix size in MB"),
          speculative: str = typer.Option(None, "--speculative", metavar="ngram|MODEL",
                                          help="plain vs speculative decoding on nibble's fixed workloads "
                                               "(code edit, quoting summary, free text)"),
          compare: str = typer.Option(None, "--compare-llama-bench", metavar="PATH",
                                      help="run llama-bench (this binary) on the same file and settings, "
                                           "interleaved with nibble's runs, and print both with the ratio"),
          concurrency: str = typer.Option(None, "--concurrency", metavar="1,2,4,8",
                                          help="concurrent streams through the engine's continuous batching: "
                                               "aggregate generated tokens/s and TTFT per level"),
          cache_type_k: str = typer.Option("f16", "--cache-type-k", "-ctk", metavar="f16|q8_0",
                                           help="KV cache type for K"),
          cache_type_v: str = typer.Option("f16", "--cache-type-v", "-ctv", metavar="f16|q8_0",
                                           help="KV cache type for V"),
          as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Prompt processing and generation speed, as llama-bench measures them, with what they achieve: GFLOP/s
    (prefill) and GB/s of weights read (decode)."""
    from ..errors import NibbleError
    from ..quant.jit import get_threads, set_threads

    if threads is not None:
        set_threads(threads)
    threads = get_threads()
    if kernels:
        from ..quant import bench as kbench
        rows = kbench.run(size_mb=size_mb)
        print(json.dumps(rows, indent=2) if as_json else kbench.markdown(rows))
        return
    if speculative:
        from ..runtime import bench as mbench
        rows, costs = mbench.run_speculative(speculative, model_override=model, threads=threads,
                                             max_tokens=n_gen if n_gen != 128 else 256, reps=reps)
        if as_json:
            print(json.dumps({"workloads": [r.as_json() for r in rows], "verify_costs": [c.as_json() for c in costs]},
                             indent=2))
        else:
            print(mbench.speculative_markdown(rows, costs))
        return
    if model is None:
        raise NibbleError("bench needs a MODEL (or --kernels)")
    from ..runtime import bench as mbench
    from ..runtime.model import load
    if concurrency:
        from ..runtime import bench_serving
        try:
            levels = sorted({int(c) for c in concurrency.split(",")})
        except ValueError:
            raise NibbleError(f"--concurrency takes numbers separated by commas, e.g. 1,2,4,8; got {concurrency!r}")
        if levels[0] < 1:
            raise NibbleError("--concurrency levels must be at least 1")
        n_p, n_g = (n_prompt if n_prompt != 512 else 64), (n_gen if n_gen != 128 else 64)
        m = load(model, n_ctx=max(n_p + n_g + 8, 16), threads=threads, parallel=levels[-1])
        rows = bench_serving.run(m, levels, n_prompt=n_p, n_gen=n_g)
        print(json.dumps([r.to_dict() for r in rows], indent=2) if as_json else bench_serving.table(rows))
        return
    if n_depth < 0:
        raise NibbleError(f"-d must be >= 0, got {n_depth}")
    m = load(model, n_ctx=max(n_depth + max(n_prompt, n_gen), 16), threads=threads, cache_type_k=cache_type_k,
             cache_type_v=cache_type_v)
    compile_s = mbench.measure_compile(m)
    if compare:
        rows = mbench.run_compared(m, compare, n_prompt, n_gen, max(reps, 1), threads, n_depth=n_depth)
        if as_json:
            print(json.dumps([{**r.as_json(), "llama_bench_ts": theirs} for r, theirs in rows], indent=2))
        else:
            print(mbench.compared_markdown(rows))
        return
    results = mbench.run(m, n_prompt, n_gen, max(reps, 1), threads, n_depth=n_depth)
    if as_json:
        print(json.dumps([r.as_json() for r in results], indent=2))
        return
    print(mbench.markdown(results))
    by_test = {r.test: r for r in results}
    suffix = f" @ d{n_depth}" if n_depth else ""
    pp, tg = by_test.get(f"pp{n_prompt}{suffix}"), by_test.get(f"tg{n_gen}{suffix}")
    line = []
    if pp:
        line.append(f"TTFT ({n_prompt}-token prompt): {1000 * n_prompt / pp.avg_ts:.1f} ms")
    if tg:
        line.append(f"TPOT ({n_gen} tokens): {1000 / tg.avg_ts:.2f} ms")
    print("  ".join(line))
    print(f"one-time Numba compile / cache load: {compile_s:.2f} s (excluded above)")
