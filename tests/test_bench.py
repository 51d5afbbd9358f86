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
        assert row["avg_ts"] > 0 and row["gbps"] > 0 and row["n_threads"] >= 1
        assert {"model_type", "n_prompt", "n_gen", "n_threads", "avg_ts", "stddev_ts", "gbps"} <= set(row)


def test_bench_model_table(cli, pulled):
    pulled("smollm2-135m")
    r = cli("bench", "smollm2-135m", "-p", "8", "-n", "4", "-r", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "| model | size | params | backend | threads | test | t/s | GB/s |"
    assert "| pp8 |" in lines[2] and "| tg4 |" in lines[3] and "| 1 |" in lines[2]
    assert "TTFT" in r.stdout and "TPOT" in r.stdout and "compile" in r.stdout


def test_bench_kernels_smoke(cli):
    r = cli("bench", "--kernels", "--size-mb", "1", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows and all(isinstance(row, dict) for row in rows)


def test_bench_needs_a_model(cli):
    r = cli("bench")
    assert r.returncode == 1 and "MODEL" in r.stderr
