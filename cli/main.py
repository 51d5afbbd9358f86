"""The `nibble` console entry point: the typer app with every command module registered."""

from __future__ import annotations

from .app import app
from . import (bench, doctor, evaluate, generate, models, quantize, serve, tokenize,  # noqa: F401  (each registers
               trace)                                                           # its commands on `app`)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
