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


def model_file(name: str) -> Path:
    """The verified GGUF of a catalogue model, pulled if needed (a failed pull raises, failing the test)."""
    path, _ = store.pull(name, verify_existing=False, directory=USER_STORE)
    return path


def reference(name: str, file: str):
    path = REFERENCE / name / file
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
def reference_root() -> Path:
    """tests/data/reference: the llama.cpp outputs and the texts they were computed on."""
    return REFERENCE


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


# ---- tiny synthetic models, one per architecture, for the shared runner and edge cases ----

TINY = {
    # arch: metadata (besides the tokenizer) and the per-layer extras the architecture needs
    "llama": dict(n_layers=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=96, head_dim=16),
    "qwen2": dict(n_layers=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=96, head_dim=16),
    "gemma3": dict(n_layers=6, n_embd=64, n_head=4, n_head_kv=1, n_ff=96, head_dim=32, sliding_window=5),
}


def _byte_level_vocab() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 single-byte tokens of a byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


# K-quants gguf-py cannot write: byte offsets of each block's f16 d and dmin (None: no minimum), the largest
# |sub-block scale × quant| (d × that is about the block's largest value) and the mean quant (random bytes:
# uniform quants, sub-block scales and mins alike, so dmin = d × mean quant centres the values on 0)
K_QUANT_SCALES = {"Q2_K": (80, 82, 15 * 3, 1.5), "Q3_K": (108, None, 32 * 4, 0), "Q4_K": (0, 2, 63 * 15, 7.5),
                  "Q5_K": (0, 2, 63 * 31, 15.5), "Q6_K": (208, None, 32 * 32, 0)}


def k_quant_blocks(blocks, qtype: str, rng, scale: float):
    """Random K-quant blocks (rows, bytes), their f16 d (and dmin) set in place so that the values are of
    order `scale` around 0 (random bytes there would make infinities and NaNs)."""
    import numpy as np
    import gguf
    d_at, dmin_at, largest, mean_quant = K_QUANT_SCALES[qtype]
    flat = blocks.reshape(-1, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1])
    d = (0.5 + rng.random((flat.shape[0], 1))) * 3 * scale / largest
    flat[:, d_at:d_at + 2] = d.astype(np.float16).view(np.uint8)
    if dmin_at is not None:
        flat[:, dmin_at:dmin_at + 2] = (d * mean_quant).astype(np.float16).view(np.uint8)
    return blocks


def write_tiny_gguf(path: Path, arch: str, qtype: str = "Q8_0", seed: int = 0, **overrides) -> Path:
    """A complete tiny model of `arch` with random weights: matrices in `qtype`, norms F32, gpt2 tokenizer."""
    import numpy as np
    import gguf
    from gguf.quants import quantize

    cfg = {**TINY[arch], **overrides}
    rng = np.random.default_rng(seed)
    d, L, H, Hkv, ff, hd = (cfg[k] for k in ("n_embd", "n_layers", "n_head", "n_head_kv", "n_ff", "head_dim"))
    tokens = _byte_level_vocab() + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if arch == "gemma3":
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_sliding_window(cfg["sliding_window"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (n_vocab - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(n_vocab - 1)
    w.add_eos_token_id(n_vocab - 1)
    w.add_add_bos_token(False)
    qt = gguf.GGMLQuantizationType[qtype]

    def matrix(name, m, k, scale=None):
        a = (rng.standard_normal((m, k)) * (scale or 1 / np.sqrt(k))).astype(np.float32)
        if qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            try:
                blocks = quantize(a, qt)
            except NotImplementedError:        # types gguf cannot write (IQ*): random blocks of the right size
                block, size = gguf.GGML_QUANT_SIZES[qt]
                blocks = rng.integers(0, 256, (m, k // block * size), dtype=np.uint8)
                if qtype in K_QUANT_SCALES:    # K-quants nibble reads: finite scales, values of the same order
                    blocks = k_quant_blocks(blocks, qtype, rng, scale or 1 / np.sqrt(k))
            w.add_tensor(name, blocks, raw_dtype=qt)

    def vector(name, n, around=1.0):
        w.add_tensor(name, (around + 0.1 * rng.standard_normal(n)).astype(np.float32))

    q_dim, kv_dim = H * hd, Hkv * hd
    matrix("token_embd.weight", n_vocab, d, scale=1.0)
    for i in range(L):
        vector(f"blk.{i}.attn_norm.weight", d)
        matrix(f"blk.{i}.attn_q.weight", q_dim, d)
        matrix(f"blk.{i}.attn_k.weight", kv_dim, d)
        matrix(f"blk.{i}.attn_v.weight", kv_dim, d)
        matrix(f"blk.{i}.attn_output.weight", d, q_dim)
        if arch == "qwen2":
            vector(f"blk.{i}.attn_q.bias", q_dim, 0.0)
            vector(f"blk.{i}.attn_k.bias", kv_dim, 0.0)
            vector(f"blk.{i}.attn_v.bias", kv_dim, 0.0)
        if arch == "gemma3":
            vector(f"blk.{i}.attn_q_norm.weight", hd)
            vector(f"blk.{i}.attn_k_norm.weight", hd)
            vector(f"blk.{i}.post_attention_norm.weight", d)
            vector(f"blk.{i}.post_ffw_norm.weight", d)
        vector(f"blk.{i}.ffn_norm.weight", d)
        matrix(f"blk.{i}.ffn_gate.weight", ff, d)
        matrix(f"blk.{i}.ffn_up.weight", ff, d)
        matrix(f"blk.{i}.ffn_down.weight", d, ff)
    vector("output_norm.weight", d)
    if arch == "llama":
        matrix("output.weight", n_vocab, d)     # untied here; qwen2 and gemma3 tie it to token_embd
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    """tiny_gguf(arch, qtype="Q8_0", **overrides) -> Path of a freshly written tiny model."""
    def make(arch: str, qtype: str = "Q8_0", **overrides) -> Path:
        return write_tiny_gguf(tmp_path / f"tiny-{arch}-{qtype}.gguf", arch, qtype, **overrides)
    return make
