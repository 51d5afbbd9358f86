"""`nibble trace`: the intermediate tensors of one evaluation to a .npz, and `--diff` of two such files."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .app import app, handles_errors, out


@app.command()
@handles_errors
def trace(model: str = typer.Argument(None, help="catalogue name or path to a .gguf file"),
          prompt: str = typer.Argument(None, help="text to evaluate (tokenized with the model's BOS rule)"),
          out_path: Path = typer.Option(None, "--out", "-o", help="the .npz to write"),
          reference: bool = typer.Option(False, "--reference", help="trace the numpy forward_reference, each "
                                         "layer started from the fast path's input to it"),
          free_running: bool = typer.Option(False, "--free-running",
                                            help="--reference: run the reference through on its own"),
          threads: int = typer.Option(None, "--threads", "-t", help="threads (default: all cores)"),
          diff: tuple[Path, Path] = typer.Option(None, "--diff", metavar="A.npz B.npz",
                                                 help="compare two traces (B is the reference)"),
          threshold: float = typer.Option(1e-3, "--threshold", help="--diff: NMSE that marks a divergence"),
          as_json: bool = typer.Option(False, "--json", help="--diff: print JSON")):
    """Write the intermediate tensors of one evaluation of PROMPT, named as llama.cpp names its graph nodes
    (attn_norm-0, Qcur-0, ..., result_output), or compare two traces with --diff."""
    from ..errors import NibbleError
    from ..runtime import trace as tr

    if diff:
        show_diff(diff[0], diff[1], threshold, as_json)
        return
    if model is None or prompt is None:
        raise NibbleError("trace needs MODEL and PROMPT (or --diff A.npz B.npz)")
    if out_path is None:
        raise NibbleError("trace needs --out FILE.npz: where to write the tensors")
    from ..runtime.model import load
    m = load(model, threads=threads)
    ids = m.tokenize(prompt)
    tensors = m.trace(ids, reference=reference, per_layer=not free_running)
    forward = ("reference (free-running)" if free_running else "reference (per layer)") if reference else "fast"
    meta = {"model": m.name, "path": str(m.path), "prompt": prompt, "tokens": ids, "forward": forward,
            "threads": m.threads}
    tr.save(out_path, tensors, meta)
    out.print(f"{len(tensors)} tensors of {len(ids)} tokens ({meta['forward']} forward) -> {out_path}",
              highlight=False, soft_wrap=True)


def show_diff(a: Path, b: Path, threshold: float, as_json: bool) -> None:
    from ..runtime import trace as tr
    ta, meta_a = tr.load(a)
    tb, meta_b = tr.load(b)
    rows = tr.diff(ta, tb)
    first, worst = tr.first_over(rows, threshold), tr.largest(rows)
    if as_json:
        print(json.dumps({
            "a": str(a), "b": str(b), "threshold": threshold,
            "tensors": [{"name": r.name, "shape": list(r.shape) if r.shape else None, "nmse": r.nmse,
                         "max_abs": r.max_abs, "note": r.note} for r in rows],
            "first_over": first.name if first else None, "largest": worst.name if worst else None}, indent=2))
        return
    from rich.table import Table
    if meta_a.get("tokens") != meta_b.get("tokens"):
        out.print("[yellow]the two traces evaluated different tokens[/]")
    out.print(f"a: {a}\nb: {b} (the reference)", highlight=False, soft_wrap=True)
    table = Table("tensor", "shape", "NMSE", "max |Δ|", "")
    for r in rows:
        mark = "← first over" if r is first else ("identical" if r.nmse == 0 and r.max_abs == 0 else r.note)
        style = "red" if r is first else ("dim" if r.nmse is not None and r.nmse <= threshold else None)
        table.add_row(r.name, "×".join(map(str, r.shape)) if r.shape else "", _num(r.nmse), _num(r.max_abs),
                      mark, style=style)
    out.print(table)
    if worst is not None:
        out.print(f"largest NMSE: {worst.name} ({worst.nmse:.3g})", highlight=False)
    if first is not None:
        out.print(f"first over {threshold:g}: {first.name} ({first.nmse:.3g})", highlight=False)
    else:
        out.print(f"every tensor within NMSE {threshold:g}", highlight=False)


def _num(x: float | None) -> str:
    return "" if x is None else ("0" if x == 0 else f"{x:.3g}")
