"""The typer app and what every command shares. Commands live in one module per area (`models.py`,
`tokenize.py`, ...), each registering itself on `app`; heavy modules are imported inside the commands."""

from __future__ import annotations

import contextlib
import functools
import threading

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


@contextlib.contextmanager
def compile_status(console: Console = err):
    """While the block runs, one status line with a spinner on a terminal (nothing on a pipe) whenever Numba
    compiles a kernel: the first run on a machine compiles the kernels the model's types need (several
    seconds), later runs load them from the cache. Yields `done()`, to call before the first output."""
    if not console.is_terminal:
        yield lambda: None
        return
    from numba.core import event

    status = console.status("", spinner="dots")
    lock = threading.Lock()
    state = {"shown": False, "done": False}

    class Listener(event.Listener):            # called on the thread that compiles (the engine thread)
        def on_start(self, ev):
            fn = getattr(ev.data.get("dispatcher"), "py_func", None)
            nibbles = getattr(fn, "__module__", "").startswith("nibble.")
            name = fn.__name__ if nibbles and fn.__name__.isidentifier() else "kernels"
            with lock:
                if state["done"]:
                    return
                if not state["shown"]:
                    status.start()
                    state["shown"] = True
                status.update(f"compiling {name} for this CPU (first run only)")

        def on_end(self, ev):
            pass

    def done():
        with lock:
            state["done"] = True
            if state["shown"]:
                status.stop()
                state["shown"] = False

    listener = Listener()
    event.register("numba:compile", listener)
    try:
        yield done
    finally:
        event.unregister("numba:compile", listener)
        done()
