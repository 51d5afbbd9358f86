"""The `nibble` console entry point: the typer app with every command module registered."""

from __future__ import annotations

from .app import app
from . import bench, evaluate, generate, models, quantize, tokenize  # noqa: F401  (each registers its commands on `app`)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
