"""Shared fixtures: real models from the store (pulled on first use; a failed pull fails the test), the
llama.cpp reference outputs copied into tests/data/reference, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nibble
from nibble.runtime import store

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent
USER_STORE = store.store_dir()  # the real store, fixed before any test points NIBBLE_HOME elsewhere
REFERENCE = DATA / "reference"
MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
REFERENCE_DIR = {"smollm2-135m": "smollm2-135m", "gemma3-270m": "gemma3-270m",
                 "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b"}


def model_file(name: str) -> Path:
    """The verified GGUF of a catalogue model, pulled if needed (a failed pull raises, failing the test)."""
    path, _ = store.pull(name, verify_existing=False, directory=USER_STORE)
    return path


def reference(name: str, file: str):
    path = REFERENCE / REFERENCE_DIR[name] / file
    return json.loads(path.read_text()) if path.suffix == ".json" else path


@pytest.fixture(params=MODELS)
def model_name(request) -> str:
    return request.param


def run_cli(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 600):
    """Run the real `nibble` console entry point in a subprocess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "nibble.cli.main", *args], capture_output=True, text=True,
                          input=input, env=full_env, timeout=timeout)


# Test files are imported with --import-mode=importlib and cannot import this module by name, so the
# helpers above reach them as fixtures.

@pytest.fixture(scope="session")
def pulled():
    """pulled(name) -> Path of the verified GGUF."""
    return model_file


@pytest.fixture(scope="session")
def ref():
    """ref(model_name, file) -> parsed JSON, or the Path of a non-JSON reference file."""
    return reference


@pytest.fixture(scope="session")
def cli():
    """cli(*args, input=None, env=None) -> CompletedProcess of the real `nibble` command."""
    return run_cli


@pytest.fixture
def tmp_store(tmp_path, monkeypatch) -> Path:
    """An empty model store (NIBBLE_HOME) for this test only."""
    monkeypatch.setenv("NIBBLE_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "models"


def pytest_collection_modifyitems(session, config, items):
    # The repository root is the package `nibble` itself (package-dir {"nibble": "."}), so pytest sees a
    # Package there whose setup would import the root __init__.py a second time under the folder's name.
    # Nothing in it is a test fixture; skip that import so only the installed `nibble` is ever loaded.
    for item in items:
        for node in item.listchain():
            if isinstance(node, pytest.Package) and node.path.resolve() == ROOT:
                node.setup = lambda: None
