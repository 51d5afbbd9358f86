"""One module per architecture, chosen by GGUF `general.architecture`, and the numeric layers they share
(`ops.py`: norms, rope, attention, activations; `linear.py`: weights by name and the quantized linear).

Each architecture module has `ModelArgs.from_gguf(gguf)`, `load_weights(gguf, args)`, `RunState(args,
max_batch)`, the fast `forward(...)` and the readable `forward_reference(args, weights, tokens)`.
Adding an architecture is one file and one line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UnsupportedModelError

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}


def architecture(name: str, file: str = "model") -> ModuleType:
    """The module implementing GGUF architecture `name`."""
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(f"{file}: architecture {name!r} is not supported; nibble supports "
                                    f"{', '.join(sorted(ARCHITECTURES))}")
    return importlib.import_module(f"{__name__}.{ARCHITECTURES[name]}")
