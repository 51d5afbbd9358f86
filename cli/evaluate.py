"""`nibble perplexity`: llama-perplexity's method over a text file."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .app import app, err, handles_errors, out


@app.command()
@handles_errors
def perplexity(model: str = typer.Argument(..., help="catalogue name or path to a .gguf file"),
               file: Path = typer.Argument(..., help="text file to score"),
               n_ctx: int = typer.Option(512, "--n-ctx", "-c", help="tokens per chunk"),
               threads: int = typer.Option(None, "--threads", "-t", help="threads (default: all cores)"),
               as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Perplexity of MODEL on FILE, computed as llama.cpp's llama-perplexity does."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..errors import NibbleError
    from ..runtime.model import load
    from ..runtime.perplexity import perplexity as compute

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NibbleError(f"cannot read {file}: {e}") from None
    m = load(model, n_ctx=max(n_ctx, 4), threads=threads)
    with Progress(TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("chunks", total=None)
        result = compute(m, text, n_ctx=n_ctx, progress=lambda done, total: bar.update(task, completed=done,
                                                                                      total=total))
    if as_json:
        print(json.dumps({"model": m.name, "file": str(file), "n_ctx": n_ctx, "chunks": result.n_chunks,
                          "ppl": result.ppl, "ppl_stderr": result.stderr}))
        return
    out.print(f"{result.n_chunks} chunks of {n_ctx} tokens, {result.n_scored} tokens scored")
    out.print(f"PPL = {result.ppl:.4f} +/- {result.stderr:.4f}", highlight=False)
