"""`nibble chat` through a real pseudo-terminal (pexpect), and with stdin piped."""

from __future__ import annotations

import os
import signal
import sys

import pexpect
import pytest

PROMPT = ">>> "


def default_sigint() -> None:
    # A suite started in the background by a shell (`pytest &`) runs with SIGINT ignored, and the child would
    # inherit that: Ctrl-C (sendintr) would then do nothing and the tests that send it would wait forever.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(*args: str) -> pexpect.spawn:
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", COLUMNS="200")
    child = pexpect.spawn(sys.executable, ["-m", "nibble.cli.main", "chat", *args], env=env,
                          encoding="utf-8", timeout=120, dimensions=(50, 200), preexec_fn=default_sigint)
    child.expect_exact(PROMPT)   # the model is loaded
    return child


@pytest.fixture(scope="module")
def model_path(pulled):
    return str(pulled("smollm2-135m"))


def test_two_turns_stats_ctrl_c_mid_answer_and_exit(model_path):
    child = spawn(model_path, "--temperature", "0", "--max-tokens", "24", "--n-ctx", "1024")
    try:
        child.sendline("What is the capital of France?")
        child.expect("France\\?\r\n")                            # the echoed input line
        child.expect(r"\w+")                                     # the streamed answer
        child.expect(r"\d+ tokens · [\d.]+ tokens/s")           # the dim line after the answer
        child.expect_exact(PROMPT)

        child.sendline("/stats")
        child.expect(r"TTFT \d+ ms · [\d.]+ tokens/s .* context (\d+) / 1024 tokens")
        used_after_one = int(child.match.group(1))
        child.expect_exact(PROMPT)

        # a multi-line message
        child.sendline('"""')
        child.sendline("Name one more city")
        child.sendline('in France."""')
        child.expect(r"\d+ tokens · [\d.]+ tokens/s")
        child.expect_exact(PROMPT)

        # Ctrl-C mid-answer returns to the prompt
        child.sendline("/set max_tokens 1000")
        child.expect_exact(PROMPT)
        child.sendline("Write a very long story about a dragon who learns to sail across the ocean.")
        child.expect("ocean.\r\n")                              # the echoed input line
        child.expect(r"\w\w\w")                                  # the answer is streaming
        child.sendintr()
        child.expect("interrupted")
        child.expect_exact(PROMPT)

        child.sendline("/stats")
        child.expect(r"answer (\d+) tokens · context (\d+) / 1024 tokens")
        cut, used = int(child.match.group(1)), int(child.match.group(2))
        assert 0 < cut < 1000 and used > used_after_one
        child.expect_exact(PROMPT)

        # the next turn still works
        child.sendline("/set max_tokens 16")
        child.expect_exact(PROMPT)
        child.sendline("Thank you!")
        child.expect(r"(\d+) tokens · [\d.]+ tokens/s")
        child.expect_exact(PROMPT)

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_ctrl_d_and_ctrl_c_at_an_empty_prompt_exit(model_path):
    child = spawn(model_path)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    child = spawn(model_path)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_commands(model_path, tmp_path):
    child = spawn(model_path, "--temperature", "0", "--max-tokens", "8")
    try:
        child.sendline("/help")
        child.expect("/save PATH")
        child.expect_exact(PROMPT)
        child.sendline("/set top_k 5")
        child.expect("top_k = 5")
        child.expect_exact(PROMPT)
        child.sendline("/set top_k -3")
        child.expect("error: top_k must be >= 0")
        child.expect_exact(PROMPT)
        child.sendline("/system You answer in one word.")
        child.expect("system prompt set")
        child.expect_exact(PROMPT)
        child.sendline("Capital of Italy?")
        child.expect(r"tokens/s")
        child.expect_exact(PROMPT)
        saved = tmp_path / "chat.npz"
        child.sendline(f"/save {saved}")
        child.expect("saved to")
        child.expect_exact(PROMPT)
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect_exact(PROMPT)
        child.sendline("/stats")
        child.expect(r"context 0 / ")
        child.expect_exact(PROMPT)
        child.sendline(f"/load {saved}")
        child.expect(r"loaded 1 turn\(s\), (\d+) tokens")
        assert int(child.match.group(1)) > 0
        child.expect_exact(PROMPT)
        child.sendline("/load /nonexistent/file.npz")
        child.expect("error:")
        child.expect_exact(PROMPT)
        child.sendline("/nonsense")
        child.expect("unknown command")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert saved.exists()


def test_piped_stdin_one_message_per_line(cli, model_path):
    r = cli("chat", model_path, "--temperature", "0", "--max-tokens", "12",
            input="What is the capital of France?\n/stats\nAnd of Germany?\n")
    assert r.returncode == 0, r.stderr
    assert ">>>" not in r.stdout and "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    stats = next(i for i, line in enumerate(lines) if line.startswith("TTFT "))
    assert "context" in lines[stats] and "answer 12 tokens" in lines[stats]
    assert any(line.strip() for line in lines[:stats])        # the first answer
    assert any(line.strip() for line in lines[stats + 1:])    # the second


def test_a_failed_load_is_one_error_line_and_the_conversation_goes_on(cli, model_path, tmp_path):
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"PK\x03\x04" + bytes(200))
    r = cli("chat", model_path, "--temperature", "0", "--max-tokens", "4",
            input=f"What is the capital of France?\n/stats\n/load {damaged}\n/load {tmp_path}\n/stats\n"
                  f"And of Italy?\n/stats\n")
    assert r.returncode == 0, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 2 and all(e.startswith("error: ") for e in errors), r.stderr
    assert "not a nibble session" in errors[0] and "Traceback" not in r.stderr
    used = [int(line.split("context ")[1].split(" /")[0]) for line in r.stdout.splitlines()
            if line.startswith("TTFT ")]
    assert used[0] > 0 and used[1] == used[0] and used[2] > used[1]   # the conversation was kept
