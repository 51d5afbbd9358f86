"""The `nibble` command line. Heavy modules (numba, the kernels) are imported inside the commands that need
them, so `nibble --help` stays instant."""

from __future__ import annotations

import functools
import json
import sys
from typing import Optional

import typer
from rich.console import Console

from ..errors import NibbleError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="nibble: quantized LLM inference on consumer CPUs.")
err = Console(stderr=True)
out = Console()


def handles_errors(fn):
    """Turn every NibbleError into a one-line message on stderr and exit code 1 (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NibbleError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
    return wrapper


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


@app.command()
@handles_errors
def pull(name: str = typer.Argument(..., help="catalogue model name (see `nibble list`)")):
    """Download a catalogue model into the model store and verify its sha256."""
    from ..runtime import store
    path, fetched = store.pull_with_progress(name)
    if fetched:
        out.print(f"pulled {name} -> {path}")
    else:
        out.print(f"{name} is already present and verified: {path}")


@app.command("list")
@handles_errors
def list_models(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """The catalogue: which models are pulled, their sizes and paths."""
    from ..models.catalog import CATALOG, DEFAULT_MODEL
    from ..runtime import store
    rows = []
    for name, entry in CATALOG.items():
        rows.append({"name": name, "description": entry.description, "size": entry.size,
                     "pulled": store.is_pulled(name), "path": str(store.model_path(name)),
                     "default": name == DEFAULT_MODEL})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table
    table = Table("name", "description", "size", "pulled", "path")
    for r in rows:
        table.add_row(r["name"] + (" (default)" if r["default"] else ""), r["description"], _fmt_bytes(r["size"]),
                      "yes" if r["pulled"] else "no", r["path"] if r["pulled"] else "")
    out.print(table)


@app.command()
@handles_errors
def show(model: str = typer.Argument(..., help="catalogue name or path to a .gguf file"),
         as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Architecture, size, context length, quant types and KV-cache cost of a model."""
    from ..runtime.model import load
    m = load(model, vocab_only=True)
    info = m.info()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    out.print(f"[bold]{m.name}[/]  ({m.path})")
    out.print(f"  architecture        {info['architecture']}")
    out.print(f"  parameters          {info['n_params'] / 1e6:.1f}M ({info['n_params']:,})")
    out.print(f"  file size           {_fmt_bytes(info['file_size'])}")
    out.print(f"  context length      {info['context_length']}")
    out.print("  quant types         " + ", ".join(f"{k} × {v}" for k, v in info["quant_types"].items()))
    out.print(f"  chat template       {'yes' if info['chat_template'] else 'no'}")
    out.print(f"  KV cache per token  {_fmt_bytes(info['kv_bytes_per_token'])} (float32)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
