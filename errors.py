"""Every error a user can cause, in one tree. Catch `NibbleError` to catch them all."""

from __future__ import annotations


class NibbleError(Exception):
    """Base of every error nibble raises on bad input or a failed operation."""


class ConfigError(NibbleError, ValueError):
    """A setting nibble cannot use: a keyword (`threads=`, `top_p=`, `max_tokens=`), a command-line option or an
    environment variable (`NIBBLE_THREADS`) out of range or of the wrong kind."""


class ModelNotFoundError(NibbleError, FileNotFoundError):
    """An unknown catalogue name or a path that does not exist."""


class PullError(NibbleError):
    """Fetching a model from the package registry failed; nothing was left in the store."""


class GGUFError(NibbleError, ValueError):
    """The file is not a well-formed GGUF file."""


class ModelFormatError(NibbleError, ValueError):
    """The GGUF file is well formed but describes an inconsistent model."""


class UnsupportedModelError(NibbleError):
    """The model's architecture is not one nibble implements."""


class UnsupportedQuantError(NibbleError):
    """A GGML tensor type that exists but that nibble does not implement."""


class TokenizerError(NibbleError):
    """The tokenizer described by the file cannot be built exactly."""


class TemplateError(NibbleError):
    """A chat template failed to render, or tried something it may not."""


class SessionError(NibbleError):
    """A saved session file that is damaged, of another version, or saved with another model."""


class GrammarError(NibbleError, ValueError):
    """A JSON Schema, grammar, regex or list of choices that is malformed or that llguidance cannot compile
    (raised before any token is generated)."""


class InvalidRequestError(NibbleError, ValueError):
    """A request (library keywords or an HTTP body) with a missing, mistyped or out-of-range field;
    `param` names it."""

    def __init__(self, message: str, param: str | None = None):
        self.param = param
        super().__init__(message)


class ContextOverflowError(NibbleError):
    """More tokens than the context holds."""

    def __init__(self, n_tokens: int, n_ctx: int, message: str | None = None):
        self.n_tokens = n_tokens
        self.n_ctx = n_ctx
        super().__init__(message or f"the prompt has {n_tokens} tokens but the context holds {n_ctx}; "
                                    f"shorten the prompt or raise n_ctx")


class OutOfMemoryError(NibbleError, MemoryError):
    """The model with the requested context does not fit in memory."""

    def __init__(self, required: int, available: int, message: str | None = None):
        self.required = required
        self.available = available
        super().__init__(message or f"needs {required / 2**20:.0f} MiB but only {available / 2**20:.0f} MiB "
                                    f"is available")
