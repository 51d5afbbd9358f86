"""`nibble run` end to end: the real CLI in a subprocess on the real SmolLM2 model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import nibble

CAPITAL = "The capital of France is"
STORY = "Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="module")
def vocab(pulled):
    return nibble.load(pulled("smollm2-135m"), vocab_only=True)


@pytest.fixture(scope="module")
def greedy(ref, vocab):
    prompt = next(p for p in ref("smollm2-135m", "prompts.json") if p["prompt"] == CAPITAL)
    return prompt["greedy_ids"]


def test_greedy_raw_run_prints_llama_cpp_text(cli, vocab, greedy):
    r = cli("run", "smollm2-135m", CAPITAL, "--raw", "--temperature", "0", "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert r.stdout == vocab.detokenize(greedy[:16])
    assert r.stdout.startswith(" Paris.")


def test_one_positional_is_the_prompt_with_the_default_model_and_json(cli, vocab, greedy):
    r = cli("run", CAPITAL, "--raw", "--temperature", "0", "--max-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert set(obj) == {"model", "text", "finish_reason", "prompt_tokens", "completion_tokens", "ttft_ms",
                        "tpot_ms", "tokens_per_second"}
    assert obj["model"] == "smollm2-135m"
    assert obj["text"] == vocab.detokenize(greedy[:4])
    assert (obj["finish_reason"], obj["prompt_tokens"], obj["completion_tokens"]) == ("length", 5, 4)
    assert obj["ttft_ms"] > 0 and obj["tpot_ms"] > 0 and obj["tokens_per_second"] > 0


def test_prompt_from_stdin(cli, vocab, greedy):
    for args in (["run", "smollm2-135m", "-"], ["run", "-m", "smollm2-135m"]):
        r = cli(*args, "--raw", "--temperature", "0", "--max-tokens", "6", input=CAPITAL)
        assert r.returncode == 0, r.stderr
        assert r.stdout == vocab.detokenize(greedy[:6])


def test_same_seed_same_text_other_seed_other_text(cli):
    def run(seed):
        r = cli("run", "-m", "smollm2-135m", STORY, "--raw", "--seed", str(seed), "--temperature", "0.8",
                "--max-tokens", "32", "--json")
        assert r.returncode == 0, r.stderr
        obj = json.loads(r.stdout)
        assert obj["completion_tokens"] == 32
        return obj["text"]

    a = run(11)
    assert a == run(11)
    assert a != run(12)


def test_stop_string_is_honoured_and_not_printed(cli):
    args = ["run", "smollm2-135m", CAPITAL, "--raw", "--temperature", "0", "--max-tokens", "16"]
    full = json.loads(cli(*args, "--json").stdout)["text"]
    # a stop string that starts in the middle of the text and spans tokens
    i = next(i for i in range(len(full) // 3, len(full) - 6) if full.find(full[i:i + 6]) == i)
    stop = full[i:i + 6]
    r = cli(*args, "--stop", stop, "--stop", "never appears")
    assert r.returncode == 0, r.stderr
    assert r.stdout == full[:i]
    obj = json.loads(cli(*args, "--stop", stop, "--json").stdout)
    assert (obj["text"], obj["finish_reason"]) == (full[:i], "stop")


def test_chat_template_is_applied_unless_raw(cli):
    r = cli("run", "smollm2-135m", "Name a colour.", "--temperature", "0", "--max-tokens", "60",
            "--system", "You are terse.", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["finish_reason"] == "stop" and obj["text"].strip() and "<|im_end|>" not in obj["text"]
    assert obj["prompt_tokens"] > 15   # the template's scaffolding and the system prompt
    raw = json.loads(cli("run", "smollm2-135m", "Name a colour.", "--raw", "--temperature", "0",
                         "--max-tokens", "4", "--json").stdout)
    assert raw["prompt_tokens"] == 4


def test_verbose_reports_timings_and_bandwidth(cli):
    r = cli("run", "smollm2-135m", CAPITAL, "--raw", "--temperature", "0", "--max-tokens", "8", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "TTFT" in r.stderr and "tokens/s" in r.stderr and "GB/s" in r.stderr


def test_overflowing_prompt_exits_nonzero_with_the_message(cli):
    r = cli("run", "smollm2-135m", "word " * 50, "--raw", "--n-ctx", "16")
    assert r.returncode == 1
    assert "error:" in r.stderr and "context holds 16" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--top-p", "2"], "top_p"),
    (["--logit-bias", "abc"], "TOKEN_ID=BIAS"),
    (["a", "b", "c"], "too many arguments"),
])
def test_bad_arguments_are_one_error_line(cli, args, message):
    r = cli("run", *args, *(["x"] if args[0].startswith("-") else []))
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr


def test_ctrl_c_stops_the_stream(pulled):
    proc = subprocess.Popen([sys.executable, "-m", "nibble.cli.main", "run", "smollm2-135m", STORY, "--raw",
                             "--seed", "1", "--max-tokens", "2000", "--verbose"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        first = proc.stdout.read(1)          # generation has begun
        assert first
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr.decode()
    assert b"finish reason cancelled" in stderr
    assert b"Traceback" not in stderr
    n = int(stderr.decode().split("generated")[1].split("tokens")[0])
    assert 0 < n < 2000


def test_speculative_run_prints_the_plain_text_and_reports_the_drafts(cli):
    prompt = "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog."
    common = ("run", "smollm2-135m", prompt, "--temperature", "0", "--max-tokens", "24", "--json")
    plain = json.loads(cli(*common).stdout)
    r = cli(*common, "--speculative", "ngram", "--draft-max", "6")
    assert r.returncode == 0, r.stderr
    spec = json.loads(r.stdout)
    assert spec["text"] == plain["text"] and spec["draft_tokens"] > 0
    assert 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
    bad = cli("run", "smollm2-135m", "hi", "--speculative", "ngram", "--draft-max", "0")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --draft-max")


def test_cold_start_shows_a_status_line_on_a_terminal_only(pulled, cli, tmp_path):
    """With an empty kernel cache, `nibble run` on a terminal shows what it compiles on one status line
    (stderr), then the answer; on a pipe it prints nothing of the kind, and a second run compiles nothing."""
    import pty
    pulled("smollm2-135m")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    args = [sys.executable, "-m", "nibble.cli.main", "run", "smollm2-135m", "Why is the sky blue?", "-n", "4",
            "--temperature", "0"]
    pid, fd = pty.fork()
    if pid == 0:                                      # the child: stdin, stdout and stderr are the terminal
        os.execve(sys.executable, args, env)
    seen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:                               # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen[-2000:]
    text = seen.decode(errors="replace")
    assert "compiling" in text and "for this CPU (first run only)" in text
    piped = cli("run", "smollm2-135m", "Why is the sky blue?", "-n", "4", "--temperature", "0",
                env={"NUMBA_CACHE_DIR": str(tmp_path / "numba")})
    assert piped.returncode == 0 and piped.stdout and "compiling" not in piped.stderr
    assert piped.stdout.strip() in text               # the same answer after the status line
