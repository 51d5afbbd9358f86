"""nibble: quantized LLM inference on consumer CPUs.

    import nibble
    model = nibble.load("smollm2-135m")          # a catalogue name (pulled on first use) or a .gguf path
    print(model.generate("Why is the sky blue?").text)
"""

from .errors import (ConfigError, ContextOverflowError, GGUFError, GrammarError, InvalidRequestError, ModelFormatError,
                     ModelNotFoundError, NibbleError, OutOfMemoryError, PullError, SessionError, TemplateError,
                     TokenizerError, UnsupportedModelError, UnsupportedQuantError)
from .runtime.catalog import CATALOG, DEFAULT_MODEL
from .runtime.model import Model, load
from .runtime.session import Session
from .runtime.store import pull

__version__ = "0.1.0"


def doctor(model=None, n_ctx: int | None = None):
    """Check this machine and `model` (a catalogue name or a .gguf path; None: every pulled catalogue model):
    a `runtime.doctor.Report` whose `ok` is what `nibble doctor` exits 0 on. See runtime/doctor.py."""
    from .runtime.doctor import doctor as run
    return run(model, n_ctx)


__all__ = [
    "load", "Model", "Session", "pull", "doctor", "CATALOG", "DEFAULT_MODEL", "__version__",
    "NibbleError", "ModelNotFoundError", "PullError", "GGUFError", "ModelFormatError", "UnsupportedModelError",
    "UnsupportedQuantError", "TokenizerError", "TemplateError", "ContextOverflowError", "OutOfMemoryError",
    "SessionError", "InvalidRequestError", "GrammarError", "ConfigError",
]
