"""The typer app and what every command shares. Commands live in one module per area (`models.py`,
`tokenize.py`, ...), each registering itself on `app`; heavy modules are imported inside the commands."""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import NibbleError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="nibble: quantized LLM inference on consumer CPUs.")
err = Console(stderr=True)
out = Console()


def handles_errors(fn):
    """Turn every NibbleError into a one-line message on stderr and exit code 1 (no traceback, no usage box):
    a value the command itself finds out of range is a ConfigError, not a typer.BadParameter. (What click
    cannot parse, such as `--top-k abc`, click refuses before the command runs, with its usage message.)"""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NibbleError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    return wrapper


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)
