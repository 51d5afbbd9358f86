"""`nibble tokenize`."""

from __future__ import annotations

import json
import sys

import typer

from .app import app, handles_errors


@app.command()
@handles_errors
def tokenize(model: str = typer.Argument(..., help="catalogue name or path to a .gguf file"),
             text: str = typer.Argument(..., help="the text to tokenize ('-' reads standard input)"),
             pieces: bool = typer.Option(False, "--pieces", help="print each token's id and text, one per line"),
             parse_special: bool = typer.Option(False, "--parse-special",
                                                help="turn control-token text such as <|im_start|> into tokens"),
             no_add_special: bool = typer.Option(False, "--no-add-special",
                                                 help="do not add the BOS/EOS tokens the model asks for"),
             as_json: bool = typer.Option(False, "--json", help="print JSON: ids, pieces and the count")):
    """Token ids of TEXT, exactly as llama.cpp's llama_tokenize gives them."""
    from ..runtime.model import load

    if text == "-":
        text = sys.stdin.read()
    m = load(model, vocab_only=True)
    tok = m.tokenizer
    ids = m.tokenize(text, add_special=not no_add_special, parse_special=parse_special)
    # a token may hold part of a UTF-8 character (byte tokens): show such bytes escaped
    texts = [tok.token_bytes(i, special=True).decode("utf-8", "backslashreplace") for i in ids]
    if as_json:
        print(json.dumps({"model": m.name, "n_tokens": len(ids), "ids": ids, "pieces": texts},
                         ensure_ascii=False, indent=2))
    elif pieces:
        width = len(str(max(ids, default=0)))
        for i, t in zip(ids, texts):
            print(f"{i:>{width}}  {t!r}")
    else:
        print(" ".join(map(str, ids)))
