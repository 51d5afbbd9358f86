"""`nibble quantize`: llama-quantize's file types and per-tensor choices, bit for bit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from .app import app, err, fmt_bytes, handles_errors, out


@app.command()
@handles_errors
def quantize(src: Path = typer.Argument(..., metavar="IN", help="input .gguf file"),
             dst: Path = typer.Argument(..., metavar="OUT", help="output .gguf file"),
             qtype: str = typer.Argument(..., metavar="TYPE",
                                         help="Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, "
                                              "Q6_K, F16 or BF16"),
             allow_requantize: bool = typer.Option(False, "--allow-requantize",
                                                   help="dequantize already-quantized tensors and quantize again"),
             pure: bool = typer.Option(False, "--pure", help="every quantizable tensor gets TYPE's default type "
                                                              "(no _S/_M/_L mix)"),
             output_tensor_type: str = typer.Option(None, "--output-tensor-type", help="type of output.weight"),
             token_embedding_type: str = typer.Option(None, "--token-embedding-type",
                                                      help="type of token_embd.weight"),
             threads: int = typer.Option(None, "--threads", "-t", help="threads (default: all cores)"),
             as_json: bool = typer.Option(False, "--json", help="print a JSON summary")):
    """Quantize IN to TYPE as llama-quantize does, writing OUT (complete, or not at all)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..errors import NibbleError
    from ..quant.quantize_gguf import quantize_model
    from gguf.constants import GGMLQuantizationType as T

    if not src.is_file():
        raise NibbleError(f"{src}: no such file")
    if allow_requantize:
        err.print("[yellow]warning:[/] requantizing: quantized tensors are dequantized and quantized again, which "
                  "loses more quality than quantizing from F32/F16/BF16", highlight=False)
    started = time.perf_counter()
    bar = None      # started with the first tensor, so that an error before it prints one clean line

    def show(i, n, p):
        nonlocal bar
        if bar is None:
            bar = Progress(TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=err, transient=True)
            bar.start()
            bar.add_task("quantize", total=n)
        what = "done" if p is None else f"{p.name} {T(p.src_type).name}" + (
            "" if p.copied else f" -> {T(p.dst_type).name}")
        bar.update(bar.task_ids[0], completed=i, total=n, description=what)
    try:
        summary = quantize_model(src, dst, qtype, allow_requantize=allow_requantize, pure=pure,
                                 output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
                                 threads=threads, progress=show)
    finally:
        if bar is not None:
            bar.stop()
    seconds = time.perf_counter() - started
    counts: dict[str, int] = {}
    for p in summary.tensors:
        counts[T(p.dst_type).name] = counts.get(T(p.dst_type).name, 0) + 1
    fallbacks = [p.name for p in summary.tensors if p.fallback]
    if as_json:
        print(json.dumps({"output": str(dst), "type": summary.file_type, "seconds": round(seconds, 3),
                          "bytes_in": summary.bytes_in, "bytes_out": summary.bytes_out, "tensor_types": counts,
                          "requantized": summary.requantized, "fallbacks": fallbacks,
                          "tensors": [{"name": p.name, "from": T(p.src_type).name, "to": T(p.dst_type).name}
                                      for p in summary.tensors]}))
        return
    if fallbacks:
        err.print(f"[yellow]warning:[/] {len(fallbacks)} of {len(summary.tensors)} tensors have rows that are not "
                  f"a multiple of 256 values and fell back to a 32-value type", highlight=False)
    types = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    out.print(f"{dst}: {summary.file_type}, {fmt_bytes(summary.bytes_in)} -> {fmt_bytes(summary.bytes_out)} "
              f"in {seconds:.1f} s ({types})", highlight=False)
