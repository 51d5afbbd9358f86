"""`nibble serve`: OpenAI's and Ollama's HTTP APIs over one model (runtime/server.py), on uvicorn."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import NibbleError
from ..runtime.catalog import DEFAULT_MODEL
from .app import app, err, handles_errors
from .generate import CacheTypeK, CacheTypeV, ModelArg, NCtx, Threads


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads so that a taken port is reported at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise NibbleError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@app.command()
@handles_errors
def serve(
    model_arg: ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="address to bind (loopback unless --api-key or "
                                                     "--insecure)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="0 picks a free port")] = 8080,
    parallel: Annotated[int, typer.Option("--parallel", "-np", min=1,
                                          help="requests generated at once (KV slots of n_ctx each)")] = 4,
    n_ctx: NCtx = None, threads: Threads = None, cache_type_k: CacheTypeK = "f16",
    cache_type_v: CacheTypeV = "f16",
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="NIBBLE_API_KEY",
                                                   help="require 'Authorization: Bearer KEY'")] = None,
    alias: Annotated[Optional[str], typer.Option("--alias", help="another name the model answers to")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", metavar="ORIGIN",
                                                             help="let browsers on ORIGIN call the API "
                                                                  "(repeatable; '*' for any)")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="allow a non-loopback --host without "
                                                              "--api-key")] = False,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="requests that may wait for a slot; "
                                                                      "more get 503")] = 64,
    speculative: Annotated[Optional[str], typer.Option("--speculative", metavar="ngram|MODEL",
                                                       help="speculative decoding by default: prompt lookup or a "
                                                            "draft model (same tokens, faster where guessable)")] = None,
    draft_max: Annotated[int, typer.Option("--draft-max", min=1, max=16, help="most draft tokens per step")] = 16,
):
    """Serve a model over HTTP: OpenAI's /v1 API (chat, completions, models), Ollama's /api, /health and
    /metrics. Ctrl-C (or SIGTERM) stops it, cancelling what is running."""
    if not is_loopback(host) and not api_key and not insecure:
        raise typer.BadParameter(f"--host {host} is reachable from other machines: set --api-key KEY, or "
                                 f"--insecure to serve without one", param_hint="--host")
    import uvicorn

    from ..runtime.model import load
    from ..runtime.server import create_app

    sock = listen(host, port)
    try:
        model = load(model_arg or DEFAULT_MODEL, n_ctx=n_ctx, threads=threads, parallel=parallel,
                     cache_type_k=cache_type_k, cache_type_v=cache_type_v)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    # compile (or load from Numba's cache) the kernels now rather than in the first request
    model.generate(model.tokenize("Hello"), max_tokens=2, temperature=0)
    model.reset(0)

    draft = None
    if speculative and speculative != "ngram":
        draft = load(speculative, n_ctx=model.n_ctx, threads=threads, parallel=parallel)
        from ..runtime.speculative import check_compatible
        check_compatible(draft, model)
        model._drafts[speculative] = draft          # closed with the model
    application = create_app(model, alias=alias, api_key=api_key, cors_origins=cors_origin or (),
                             max_queue=max_queue, close_model=True, speculative=draft or speculative,
                             draft_max=draft_max)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    err.print(f"[dim]nibble serve · {escape(model.name)} · {parallel} slots × n_ctx {model.n_ctx} · "
              f"listening on http://{shown}:{bound_port}[/]", highlight=False, soft_wrap=True)
    config = uvicorn.Config(application, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn_server(config, application.state.server.cancel_all).run(sockets=[sock])


def uvicorn_server(config, cancel_all):
    """uvicorn's server, told to cancel the running generations when a signal asks it to stop (so that
    open streams end instead of holding the shutdown) and to exit 0 after a signal rather than re-raise it."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            cancel_all()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()   # uvicorn raises the caught signal again after shutdown

    return Server(config)
