"""nibble: quantized LLM inference on consumer CPUs.

    import nibble
    model = nibble.load("smollm2-135m")          # a catalogue name (pulled on first use) or a .gguf path
    print(model.generate("Why is the sky blue?").text)
"""

from .errors import (ContextOverflowError, GGUFError, GrammarError, InvalidRequestError, ModelFormatError,
                     ModelNotFoundError, NibbleError, OutOfMemoryError, PullError, SessionError, TemplateError,
                     TokenizerError, UnsupportedModelError, UnsupportedQuantError)
from .runtime.catalog import CATALOG, DEFAULT_MODEL
from .runtime.model import Model, load
from .runtime.session import Session
from .runtime.store import pull

__version__ = "0.1.0"

__all__ = [
    "load", "Model", "Session", "pull", "CATALOG", "DEFAULT_MODEL", "__version__",
    "NibbleError", "ModelNotFoundError", "PullError", "GGUFError", "ModelFormatError", "UnsupportedModelError",
    "UnsupportedQuantError", "TokenizerError", "TemplateError", "ContextOverflowError", "OutOfMemoryError",
    "SessionError", "InvalidRequestError", "GrammarError",
]
