"""Model-store commands: pull, list, show."""

from __future__ import annotations

import json

import typer

from .app import app, handles_errors, out, fmt_bytes


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
    from ..runtime.catalog import CATALOG, DEFAULT_MODEL
    from ..runtime import store
    rows = []
    for name, entry in CATALOG.items():
        rows.append({"name": name, "description": entry.description, "size": entry.size,
                     "pulled": store.is_pulled(name), "path": str(store.model_path(name)),
                     "default": name == DEFAULT_MODEL})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table("name", "description", "size", "pulled", "path")
    for r in rows:
        table.add_row(r["name"] + (" (default)" if r["default"] else ""), r["description"], fmt_bytes(r["size"]),
                      "yes" if r["pulled"] else "no", r["path"] if r["pulled"] else "")
    # piped: whole values, however wide (a terminal's width would cut the paths short)
    (out if out.is_terminal else Console(width=100_000)).print(table)


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
    out.print(f"  file size           {fmt_bytes(info['file_size'])}")
    out.print(f"  context length      {info['context_length']}")
    out.print("  quant types         " + ", ".join(f"{k} × {v}" for k, v in info["quant_types"].items()))
    out.print(f"  chat template       {'yes' if info['chat_template'] else 'no'}")
    q8 = info.get("kv_bytes_per_token_q8_0")
    out.print(f"  KV cache per token  {fmt_bytes(info['kv_bytes_per_token'])} (f16)"
              + (f"; {fmt_bytes(q8)} with --cache-type-k/-v q8_0" if q8 else ""))
