"""`nibble perplexity`: llama-perplexity's method over a text file, and its KL divergence flags."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .app import app, err, handles_errors, out


@app.command()
@handles_errors
def perplexity(model: str = typer.Argument(..., help="catalogue name or path to a .gguf file"),
               file: Path = typer.Argument(None, help="text file to score (with --kl-divergence: the tokens "
                                                      "saved in the base file are used instead)"),
               n_ctx: int = typer.Option(512, "--n-ctx", "-c", help="tokens per chunk"),
               kl_divergence_base: Path = typer.Option(
                   None, "--kl-divergence-base",
                   help="without --kl-divergence: save this model's log-probabilities here (the base); with it: "
                        "the base file to compare against (llama-perplexity's format)"),
               kl_divergence: bool = typer.Option(False, "--kl-divergence",
                                                  help="compare MODEL with the base saved in --kl-divergence-base"),
               threads: int = typer.Option(None, "--threads", "-t", help="threads (default: all cores)"),
               cache_type_k: str = typer.Option("f16", "--cache-type-k", "-ctk", metavar="f16|q8_0",
                                                help="KV cache type for K"),
               cache_type_v: str = typer.Option("f16", "--cache-type-v", "-ctv", metavar="f16|q8_0",
                                                help="KV cache type for V"),
               as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Perplexity of MODEL on FILE, computed as llama.cpp's llama-perplexity does; with the KL divergence
    flags, its distributions saved as a base, or compared with a saved base."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..errors import NibbleError
    from ..runtime import kld
    from ..runtime.model import load
    from ..runtime.perplexity import perplexity as compute

    if kl_divergence and kl_divergence_base is None:
        raise NibbleError("--kl-divergence needs --kl-divergence-base FILE: the base model's saved log-probabilities")
    if kl_divergence:
        n_ctx = kld.read_base_header(kl_divergence_base)[0]
    elif file is None:
        raise NibbleError("give a text FILE to score")
    text = None
    if not kl_divergence:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise NibbleError(f"cannot read {file}: {e}") from None
    m = load(model, n_ctx=max(n_ctx, 4), threads=threads, cache_type_k=cache_type_k, cache_type_v=cache_type_v)
    with Progress(TextColumn("kl-divergence" if kl_divergence else "perplexity"), BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("chunks", total=None)

        def progress(done, total):
            bar.update(task, completed=done, total=total)
        if kl_divergence:
            result = kld.kl_divergence_from_file(m, kl_divergence_base, progress=progress)
        elif kl_divergence_base is not None:
            result = kld.save_base(m, text, kl_divergence_base, n_ctx=n_ctx, progress=progress)
        else:
            result = compute(m, text, n_ctx=n_ctx, progress=progress)
    if kl_divergence:
        if as_json:
            print(json.dumps({"model": m.name, "base": str(kl_divergence_base), **result.as_dict()}))
        else:
            out.print(f"{result.n_chunks} chunks of {result.n_ctx} tokens, {result.count} tokens scored")
            out.print(result.report(), highlight=False)
        return
    if as_json:
        print(json.dumps({"model": m.name, "file": str(file), "n_ctx": n_ctx, "chunks": result.n_chunks,
                          "ppl": result.ppl, "ppl_stderr": result.stderr,
                          **({"kl_divergence_base": str(kl_divergence_base)} if kl_divergence_base else {})}))
        return
    out.print(f"{result.n_chunks} chunks of {n_ctx} tokens, {result.n_scored} tokens scored")
    if kl_divergence_base is not None:
        out.print(f"saved the log-probabilities to {kl_divergence_base}", highlight=False)
    out.print(f"PPL = {result.ppl:.4f} +/- {result.stderr:.4f}", highlight=False)
