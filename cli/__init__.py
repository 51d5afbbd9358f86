"""The `nibble` command line (typer + rich)."""
