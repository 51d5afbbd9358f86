"""`nibble doctor` and `nibble.doctor`: every check shown for each catalogue model, the failing check named
for a truncated file, a broken chat template and too little memory, and the JSON report's keys."""

from __future__ import annotations

import json

import pytest

import nibble

MACHINE_IDS = ["machine.cpu", "machine.threads", "machine.numba", "machine.kernel_cache", "machine.bandwidth"]
MODEL_IDS = ["file.gguf", "file.sha256", "file.tensor_types", "file.metadata", "tokenizer.build",
             "tokenizer.roundtrip", "tokenizer.special", "chat.template", "chat.render", "memory.plan",
             "kernels.cache", "speed.decode"]
TITLES = ["CPU", "threads", "Numba", "kernel cache", "read bandwidth", "GGUF", "sha256", "tensor types", "metadata",
          "tokenizer", "round trip", "special tokens", "chat template", "chat render", "memory", "kernels", "speed"]
CHECK_KEYS = {"id", "title", "status", "summary", "advice", "details"}


def _line(stdout: str, title: str) -> str:
    return next(line for line in stdout.splitlines() if line[3:].startswith(title + " "))


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_every_catalogue_model_is_ready(cli, pulled, name):
    pulled(name)
    r = cli("doctor", name)
    assert r.returncode == 0, r.stdout + r.stderr
    for title in TITLES:
        line = _line(r.stdout, title)
        assert line[1] in "✓!", line                 # no check fails (a cold kernel cache or a slow machine warns)
    assert "sha256" in r.stdout and "matches the catalogue" in _line(r.stdout, "sha256")
    assert "generation prompt" in _line(r.stdout, "chat render")
    assert r.stdout.rstrip().endswith("ready")


def test_json_report_is_stable(cli, pulled):
    r = cli("doctor", str(pulled("smollm2-135m")), "--n-ctx", "512", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report) == {"ok", "machine", "models"} and report["ok"] is True
    assert [c["id"] for c in report["machine"]] == MACHINE_IDS
    (model,) = report["models"]
    assert set(model) == {"model", "path", "ok", "checks"} and model["model"] == "smollm2-135m"
    assert [c["id"] for c in model["checks"]] == MODEL_IDS
    for check in report["machine"] + model["checks"]:
        assert set(check) == CHECK_KEYS
        assert check["status"] in ("ok", "warn", "skip")
        assert check["advice"] == "" if check["status"] == "ok" else check["advice"]
    checks = {c["id"]: c for c in model["checks"]}
    assert checks["file.sha256"]["status"] == "ok"                   # found by its size in the catalogue
    mem = checks["memory.plan"]["details"]
    assert mem["n_ctx"] == 512 and mem["largest_n_ctx"] == 8192
    assert mem["required"] == mem["weights"] + mem["kv_cache"] + mem["buffers"]
    assert checks["speed.decode"]["details"]["tokens_per_s"] > 0
    assert checks["chat.render"]["details"]["generation_prompt"] == "<|im_start|>assistant\n"


def test_truncated_file_fails_the_gguf_check(cli, pulled, tmp_path):
    data = pulled("smollm2-135m").read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:len(data) // 2])
    r = cli("doctor", str(path))
    assert r.returncode == 1
    assert _line(r.stdout, "GGUF")[1] == "✗" and "past the end of the file" in r.stdout
    assert _line(r.stdout, "tokenizer")[1] == "–"                    # skipped: nothing to check
    assert "not ready: truncated: GGUF" in r.stdout


def test_broken_template_fails_the_template_check(cli, pulled, tmp_path):
    data = pulled("smollm2-135m").read_bytes()
    good = b"{% for message in messages %}"
    assert data.count(good) == 1
    path = tmp_path / "broken-template.gguf"
    path.write_bytes(data.replace(good, b"{{ for message in messages %}"))   # same length: nothing moves
    r = cli("doctor", str(path))
    assert r.returncode == 1
    assert _line(r.stdout, "chat template")[1] == "✗"
    assert _line(r.stdout, "memory")[1] == "✓" and _line(r.stdout, "speed")[1] in "✓!"  # the model itself runs
    assert "not ready: broken-template: chat template" in r.stdout


def test_too_little_memory_fails_the_memory_check(cli, pulled):
    r = cli("doctor", str(pulled("smollm2-135m")), env={"NIBBLE_MAX_MEMORY": str(50 << 20)})
    assert r.returncode == 1
    assert _line(r.stdout, "memory")[1] == "✗" and "the weights alone do not fit" in r.stdout
    assert _line(r.stdout, "speed")[1] == "–"
    assert "not ready: smollm2-135m: memory" in r.stdout
    r = cli("doctor", str(pulled("smollm2-135m")), "--n-ctx", "100000")
    assert r.returncode == 1 and "outside 1..8192" in _line(r.stdout, "memory")


def test_without_a_model_checks_the_machine_and_every_pulled_model(cli, tmp_store):
    r = cli("doctor")                                   # an empty store: the machine alone
    assert r.returncode == 0, r.stderr
    assert _line(r.stdout, "CPU") and "no models pulled" in r.stdout


def test_library_doctor_on_a_tiny_model(tiny_gguf):
    report = nibble.doctor(tiny_gguf("llama"), n_ctx=64)
    assert report.ok
    (model,) = report.models
    checks = {c.id: c for c in model.checks}
    assert list(checks) == MODEL_IDS
    assert checks["file.sha256"].status == "skip"       # not a catalogue model
    assert checks["chat.template"].status == "warn" and checks["chat.template"].advice   # no template, no built-in
    assert checks["chat.render"].status == "skip"
    assert checks["memory.plan"].details["largest_n_ctx"] == 256
    assert report.to_json()["models"][0]["checks"][0]["id"] == "file.gguf"


def test_list_piped_prints_whole_paths(cli, pulled):
    path = pulled("smollm2-135m")
    r = cli("list")                                     # stdout is a pipe here, not a terminal
    assert r.returncode == 0 and str(path) in r.stdout and "…" not in r.stdout
