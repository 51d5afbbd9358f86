"""`nibble bench` smoke runs (the benchmark itself is not a test: CI runs only tiny sizes)."""

from __future__ import annotations

import json


def test_bench_model_smoke(cli, pulled):
    pulled("smollm2-135m")
    r = cli("bench", "smollm2-135m", "-p", "8", "-n", "4", "-r", "1", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["n_prompt"], row["n_gen"]) for row in rows] == [(8, 0), (0, 4)]
    for row in rows:
        assert row["model_type"].startswith("llama 135M")
        assert row["avg_ts"] > 0 and row["n_threads"] >= 1
        assert {"model_type", "n_prompt", "n_gen", "n_threads", "avg_ts", "stddev_ts"} <= set(row)
    pp, tg = rows
    assert pp["gflops"] > 0 and "gbps" not in pp            # a batch reads the weights once: no bandwidth
    assert tg["gbps"] > 0 and "gflops" not in tg


def test_bench_model_table(cli, pulled):
    pulled("smollm2-135m")
    r = cli("bench", "smollm2-135m", "-p", "8", "-n", "4", "-r", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "| model | size | params | backend | threads | test | t/s | GB/s | GFLOP/s |"
    assert "| pp8 |" in lines[2] and "| tg4 |" in lines[3] and "| 1 |" in lines[2]
    pp, tg = ([cell.strip() for cell in line.split("|")[-3:-1]] for line in lines[2:4])
    assert pp[0] == "" and float(pp[1]) > 0                   # pp: GFLOP/s, no GB/s
    assert float(tg[0]) > 0 and tg[1] == ""                   # tg: GB/s, no GFLOP/s
    assert "TTFT" in r.stdout and "TPOT" in r.stdout and "compile" in r.stdout


def test_prefill_figure_is_flops_of_the_layer_matmuls(tiny_gguf):
    """pp's GFLOP/s = 2 × (m × k of every layer matrix) × tokens/s; tg's GB/s = weight bytes × tokens/s."""
    import nibble
    from nibble.runtime import bench
    from nibble.formats.gguf import GGUFFile
    path = tiny_gguf("llama")
    model = nibble.load(path, n_ctx=32)
    layer_matrices = [t for name, t in GGUFFile(path).tensors.items()
                      if name.startswith("blk.") and len(t.shape) == 2]
    params = sum(t.n_elements for t in layer_matrices)
    assert len(layer_matrices) == 7 * model.args.n_layers and bench.matmul_params(model) == params
    pp, tg = bench.run(model, n_prompt=4, n_gen=2, reps=1, threads=1)
    assert pp.gflops == 2 * params * pp.avg_ts / 1e9 and pp.gbps is None
    assert tg.gbps == model.weight_bytes * tg.avg_ts / 1e9 and tg.gflops is None


def test_bench_kernels_smoke(cli):
    r = cli("bench", "--kernels", "--size-mb", "1", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows and all(isinstance(row, dict) for row in rows)


def test_bench_needs_a_model(cli):
    r = cli("bench")
    assert r.returncode == 1 and "MODEL" in r.stderr


def test_bench_interleaves_llama_bench_and_prints_the_ratio(cli, pulled, tmp_path):
    """--compare-llama-bench runs the given binary with the same file and settings once per repetition; a
    stand-in llama-bench records its arguments and answers in llama-bench's JSON."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\n"
                    f"echo \"$@\" >> {log}\n"
                    "echo '[{\"n_prompt\": 8, \"n_gen\": 0, \"avg_ts\": 100.0},"
                    " {\"n_prompt\": 0, \"n_gen\": 4, \"avg_ts\": 50.0}]'\n")
    fake.chmod(0o755)
    pulled("smollm2-135m")
    r = cli("bench", "smollm2-135m", "-p", "8", "-n", "4", "-r", "2", "--threads", "1",
            "--compare-llama-bench", str(fake), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["llama_bench_ts"] for row in rows] == [[100.0, 100.0], [50.0, 50.0]]
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and all("-p 8 -n 4 -t 1 -r 1 -o json" in c and "smollm2-135m.gguf" in c for c in calls)
    table = cli("bench", "smollm2-135m", "-p", "8", "-n", "4", "-r", "1", "--threads", "1",
                "--compare-llama-bench", str(fake))
    assert "| llama.cpp t/s | ratio |" in table.stdout and "100.00" in table.stdout


def test_bench_bad_llama_bench_is_one_error_line(cli, pulled):
    pulled("smollm2-135m")
    r = cli("bench", "smollm2-135m", "-p", "8", "-n", "4", "-r", "1", "--compare-llama-bench", "/nonexistent")
    assert r.returncode == 1 and r.stderr.startswith("error: llama-bench failed")


def test_bench_speculative_smoke(pulled):
    """`nibble bench --speculative`: a workload plain and speculative (the same tokens), and the cost of a
    verification step by rows, relative to one row."""
    from nibble.runtime import bench
    pulled("smollm2-135m")
    results, costs = bench.run_speculative("ngram", workloads=["quote"], max_tokens=24, reps=1)
    (r,) = results
    assert r.identical and r.plain_ts > 0 and r.speculative_ts > 0 and r.tokens > 0
    assert [c.rows for c in costs] == [1, 4, 8, 16] and all(c.ms > 0 for c in costs)
    assert costs[0].as_json()["relative"] == 1.0
    table = bench.speculative_markdown(results, costs)
    assert "| quote | smollm2-135m |" in table and "| smollm2-135m | 16 |" in table


def test_bench_concurrency_smoke(cli, pulled):
    pulled("smollm2-135m")
    r = cli("bench", "smollm2-135m", "--concurrency", "1,2", "-p", "8", "-n", "4", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["concurrency"] for row in rows] == [1, 2]
    for row in rows:
        assert row["generated"] == row["streams"] * 4 and row["tokens_per_second"] > 0
        assert row["ttft_p95_ms"] >= row["ttft_p50_ms"] > 0
