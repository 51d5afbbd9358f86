"""`nibble doctor`: the machine's and a model's readiness, one check per line (runtime/doctor.py)."""

from __future__ import annotations

import json

import typer
from rich.markup import escape

from .app import app, handles_errors, out

SYMBOLS = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[bold red]✗[/]", "skip": "[dim]–[/]"}
TITLE_WIDTH = 15


@app.command()
@handles_errors
def doctor(model: str = typer.Argument(None, help="catalogue name or path (default: every pulled model)"),
           n_ctx: int = typer.Option(None, "--n-ctx", help="the context to plan memory for (default: the model's, "
                                                            "capped at 4096)"),
           as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """Check that this machine and a model are ready to run: CPU features, threads, Numba and its kernel
    cache, the file, tokenizer, chat template, memory plan and a 2-second speed probe. Exit status 1 when a
    check fails."""
    from ..runtime.doctor import doctor as run_doctor

    def on_model(name: str, path: str) -> None:
        out.print(f"\n[bold]{escape(name)}[/]  [dim]{escape(path)}[/]", highlight=False, soft_wrap=True)

    def on_check(model_name, check) -> None:
        line = f" {SYMBOLS[check.status]} {check.title:<{TITLE_WIDTH}} {escape(check.summary)}"
        if check.advice:
            line += f"\n   {'':<{TITLE_WIDTH}} [yellow]→ {escape(check.advice)}[/]"
        out.print(line, highlight=False, soft_wrap=not out.is_terminal)

    if as_json:
        report = run_doctor(model, n_ctx)
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        out.print("[bold]machine[/]", highlight=False)
        report = run_doctor(model, n_ctx, on_check=on_check, on_model=on_model)
        if not report.models and model is None:
            out.print("\nno models pulled: `nibble pull smollm2-135m` fetches the default one", highlight=False)
        failed = [c.title for c in report.machine if c.status == "fail"] + \
                 [f"{m.model}: {c.title}" for m in report.models for c in m.checks if c.status == "fail"]
        out.print("\n" + ("[green]ready[/]" if report.ok else f"[bold red]not ready[/]: {escape(', '.join(failed))}"),
                  highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)
