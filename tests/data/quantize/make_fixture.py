"""Regenerate expected.json: llama-quantize's output, per tensor, for the catalogue models.

    python tests/data/quantize/make_fixture.py LLAMA_BIN_DIR MODELS_DIR [--types Q8_0,...] [--models ...]

For every (model, type) it runs `llama-quantize --allow-requantize IN OUT TYPE`, records each tensor's type
and the sha256 of its bytes (and the whole file's sha256), and deletes OUT. See README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gguf import GGUFReader

HERE = Path(__file__).parent
TYPES = ["Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_S", "Q6_K"]
MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def tensor_hashes(path: Path) -> dict[str, list]:
    """{name: [type name, row length, sha256 of the bytes]} in file order."""
    reader = GGUFReader(path)
    return {t.name: [t.tensor_type.name, int(t.shape[0]), hashlib.sha256(t.data.tobytes()).hexdigest()]
            for t in reader.tensors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bin_dir", type=Path)
    ap.add_argument("models_dir", type=Path)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    out_path = HERE / "expected.json"
    expected = json.loads(out_path.read_text()) if out_path.exists() else {"models": {}}
    for model in args.models.split(","):
        src = args.models_dir / f"{model}.gguf"
        entry = expected["models"].setdefault(model, {"source_sha256": sha256_file(src), "types": {}})
        for qtype in args.types.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                dst = Path(tmp) / "out.gguf"
                cmd = ["nice", "-n", "19", str(args.bin_dir / "llama-quantize"), "--allow-requantize", str(src),
                       str(dst), qtype]
                started = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                seconds = time.perf_counter() - started
                entry["types"][qtype] = {"file_sha256": sha256_file(dst), "file_size": dst.stat().st_size,
                                         "seconds": round(seconds, 2), "tensors": tensor_hashes(dst)}
            print(f"{model} {qtype}: {seconds:.1f} s", file=sys.stderr)
            out_path.write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
