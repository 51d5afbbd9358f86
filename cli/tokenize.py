"""`nibble tokenize`."""

from __future__ import annotations

from .app import app, handles_errors  # noqa: F401
