"""A cold start's kernels compiled by the engine and a helper process at once (runtime/precompile.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

import nibble
from nibble.runtime import precompile

COLD_RUN = """
import json, sys, nibble
with nibble.load(sys.argv[1], n_ctx=128) as m:
    tokens = m.generate(PROMPT, max_tokens=6, temperature=0).tokens
print(json.dumps({"tokens": tokens, "precompiled": m.engine.precompiled}))
"""
PROMPT = "Once upon a time, in a small village by the sea,"


def test_a_cold_start_compiles_with_a_helper_and_gives_the_same_tokens(tmp_path, pulled):
    path = pulled("smollm2-135m")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), NIBBLE_PRECOMPILE="1")
    script = f"PROMPT = {PROMPT!r}\n" + COLD_RUN
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    cold = json.loads(run.stdout.strip().splitlines()[-1])
    with nibble.load(path, n_ctx=128) as m:
        warm = m.generate(PROMPT, max_tokens=6, temperature=0).tokens
    assert len(warm) == 6 and cold["tokens"] == warm
    # both processes compiled a share of the first evaluation, and between them the kernels it needs
    engine, helper = cold["precompiled"].get("engine", []), cold["precompiled"].get("helper", [])
    assert engine and helper, cold["precompiled"]
    assert not set(engine) & set(helper)
    assert {"ops.attention_rows", "ggml_exact.gemm_t", "ggml_exact.matvec_t"} <= set(engine) | set(helper)
    # and each wrote what it compiled to the cache: a second cold-cache-dir run has nothing left to compile
    again = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                           env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert second == {"tokens": warm, "precompiled": {}}


def test_the_engine_stops_waiting_when_the_helper_dies(tmp_path):
    """A helper that exits before compiling its share (crashed, killed) leaves it to the engine."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE)
    claims = tmp_path / "claims"
    claims.mkdir()
    helper = precompile.Precompile(proc, str(claims))
    never_done = precompile.Group(str(tmp_path / "kernel.nbi"), [])
    t = time.perf_counter()
    helper._wait_done([never_done])
    assert time.perf_counter() - t < 60
    helper.close()
    assert not claims.exists()


def test_only_the_first_engine_of_a_process_looks_for_a_helper(monkeypatch):
    monkeypatch.setattr(precompile, "_first_engine", True)
    monkeypatch.setenv(precompile.ENV_SWITCH, "1")
    assert precompile.wanted()
    assert not precompile.wanted()
    monkeypatch.setattr(precompile, "_first_engine", True)
    monkeypatch.setenv(precompile.ENV_SWITCH, "0")
    assert not precompile.wanted()
    monkeypatch.setenv(precompile.ENV_SWITCH, "1")
    monkeypatch.setattr(sys, "frozen", True, raising=False)      # an app bundle: no `python -m` to start
    assert not precompile.enabled()


def test_a_first_evaluation_unlike_the_likely_one(tmp_path, pulled):
    """A one-token prompt first (the single-row kernels, not the prompt's the helper starts on): the engine
    waits for the helper where it must, and the tokens are those of a warm run."""
    path = pulled("smollm2-135m")
    script = "PROMPT = [1]\n" + COLD_RUN
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), NIBBLE_PRECOMPILE="1")
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    cold = json.loads(run.stdout.strip().splitlines()[-1])
    with nibble.load(path, n_ctx=128) as m:
        assert cold["tokens"] == m.generate([1], max_tokens=6, temperature=0).tokens
    assert cold["precompiled"].get("helper"), cold["precompiled"]


DRY_RUN_FIRST = """
import json, sys, nibble
with nibble.load(sys.argv[1], n_ctx=128) as m:
    print(json.dumps(m.generate("The capital of France is", max_tokens=8, temperature=0).tokens))
"""


def test_the_dry_run_before_any_kernel_leaves_the_tokens_alone(model_name, pulled):
    """The first engine of a process dry-runs a prompt before any kernel has run (with a warm cache, no helper
    starts): kernels whose results Python keeps (Gemma's GELU table) must still have run."""
    path = str(pulled(model_name))
    tokens = []
    for switch in ("1", "0"):
        run = subprocess.run([sys.executable, "-c", DRY_RUN_FIRST, path], capture_output=True, text=True,
                             env=dict(os.environ, NIBBLE_PRECOMPILE=switch), timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        tokens.append(json.loads(run.stdout.strip().splitlines()[-1]))
    assert tokens[0] == tokens[1] and len(tokens[0]) == 8


COLD_LOGITS = """
import sys, numpy as np, nibble
with nibble.load(sys.argv[1], n_ctx=128) as m:
    np.save(sys.argv[2], m.logits(m.tokenize("Once upon a time, in a small village")))
    print(m.engine.precompiled)
"""


def test_a_cold_start_whose_first_evaluation_is_all_logits(tmp_path, pulled):
    """`Model.logits` (perplexity, traces) runs the forward itself: it lets the helper finish first, and its
    logits are a warm run's, bit for bit."""
    path = pulled("smollm2-135m")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), NIBBLE_PRECOMPILE="1")
    run = subprocess.run([sys.executable, "-c", COLD_LOGITS, str(path), str(tmp_path / "cold.npy")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "helper" in run.stdout
    with nibble.load(path, n_ctx=128) as m:
        warm = m.logits(m.tokenize("Once upon a time, in a small village"))
    assert np.array_equal(np.load(tmp_path / "cold.npy"), warm)
