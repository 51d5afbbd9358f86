"""`nibble run` (one-shot generation) and `nibble chat` (a REPL), both over `runtime.generate`'s stream."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import ConfigError
from ..runtime.catalog import DEFAULT_MODEL
from ..runtime.sampling import SamplingParams, token_limit
from .app import app, compile_status, err, handles_errors, out

DEFAULTS = SamplingParams()   # the library's defaults are the options' defaults

# ---- options shared by `run` and `chat`, named like the library's keywords ----

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="catalogue name or path to a .gguf file")]
ModelArg = Annotated[Optional[str], typer.Argument(metavar="[MODEL]", show_default=False,
                                                   help=f"catalogue name or .gguf path (default {DEFAULT_MODEL})")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="system prompt")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 is greedy")]
TopK = Annotated[int, typer.Option("--top-k", help="keep the k most likely tokens (0: off)")]
TopP = Annotated[float, typer.Option("--top-p", help="keep the most likely tokens up to this mass (1: off)")]
MinP = Annotated[float, typer.Option("--min-p", help="drop tokens below this fraction of the top one (0: off)")]
RepeatPenalty = Annotated[float, typer.Option("--repeat-penalty", help="penalise recent tokens (1: off)")]
RepeatLastN = Annotated[int, typer.Option("--repeat-last-n", help="how many recent tokens the penalties see")]
PresencePenalty = Annotated[float, typer.Option("--presence-penalty")]
FrequencyPenalty = Annotated[float, typer.Option("--frequency-penalty")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="makes sampling reproducible (-1: random)")]
MaxTokens = Annotated[Optional[int], typer.Option("--max-tokens", "-n",
                                                  help="stop after this many tokens (default, or -1: until "
                                                       "the model ends or the context is full)")]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", help="stop at this string (repeatable)")]
LogitBias = Annotated[Optional[list[str]], typer.Option("--logit-bias", metavar="TOKEN_ID=BIAS",
                                                        help="add BIAS to a token's logit (repeatable; "
                                                             "-inf bans it)")]
NCtx = Annotated[Optional[int], typer.Option("--n-ctx", help="context size in tokens")]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t",
                                                help="threads for the kernels (0 or negative: every core)")]
CacheTypeK = Annotated[str, typer.Option("--cache-type-k", "-ctk", metavar="f16|q8_0",
                                         help="KV cache type for K (q8_0: about half the memory)")]
CacheTypeV = Annotated[str, typer.Option("--cache-type-v", "-ctv", metavar="f16|q8_0",
                                         help="KV cache type for V (q8_0: about half the memory)")]
Speculative = Annotated[Optional[str], typer.Option("--speculative", metavar="ngram|MODEL",
                                                   help="speculative decoding: prompt lookup (ngram) or a draft "
                                                        "model; the same tokens, faster where guessable")]
DraftMax = Annotated[int, typer.Option("--draft-max", help="most draft tokens per step (1..16)")]
ChatTemplateOpt = Annotated[Optional[Path], typer.Option("--chat-template", metavar="FILE",
                                                         help="a Jinja chat template to use instead of the "
                                                              "model's")]

FormatOpt = Annotated[Optional[str], typer.Option("--format", help="'json': the output is a JSON object")]
JsonSchemaOpt = Annotated[Optional[str], typer.Option("--json-schema", metavar="FILE|JSON",
                                                      help="the output is JSON valid against this schema")]
GrammarOpt = Annotated[Optional[Path], typer.Option("--grammar", metavar="FILE",
                                                    help="the output is a sentence of this Lark or GBNF grammar")]
RegexOpt = Annotated[Optional[str], typer.Option("--regex", help="the output matches this regular expression")]
ChoiceOpt = Annotated[Optional[list[str]], typer.Option("--choice", help="the output is one of these (repeatable)")]

SETTABLE = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float,
            "repeat_last_n": int, "presence_penalty": float, "frequency_penalty": float, "seed": int,
            "max_tokens": int}


def sampling_kwargs(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty,
                    frequency_penalty, seed, max_tokens, stop, logit_bias) -> dict:
    """The options as `generate.stream` keywords, checked before the model loads (ConfigError)."""
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
              repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
              frequency_penalty=frequency_penalty, seed=seed, max_tokens=token_limit(max_tokens),
              stop=tuple(stop or ()))
    if logit_bias:
        kw["logit_bias"] = parse_logit_bias(logit_bias)
    SamplingParams(**{k: v for k, v in kw.items() if k in SamplingParams.names()}).check(2**31 - 1)
    return kw


def speculative_kwargs(speculative: str | None, draft_max: int) -> dict:
    from ..runtime.speculative import DRAFT_MAX
    if not 1 <= draft_max <= DRAFT_MAX:
        raise ConfigError(f"--draft-max must be between 1 and {DRAFT_MAX}, not {draft_max}")
    return dict(speculative=speculative, draft_max=draft_max) if speculative else {}


def constraint_kwargs(format, json_schema, grammar, regex, choice) -> dict:
    """--format, --json-schema, --grammar, --regex, --choice -> generate.stream's keywords (runtime/structured.py)."""
    if json_schema is not None and Path(json_schema).is_file():
        json_schema = Path(json_schema).read_text()
    return {k: v for k, v in dict(format=format, json_schema=json_schema, regex=regex, choices=choice or None,
                                  grammar=grammar.read_text() if grammar else None).items() if v is not None}


def parse_logit_bias(items: list[str]) -> dict[int, float]:
    bias = {}
    for item in items:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise ConfigError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS, e.g. 13=-inf") from None
    return bias


def load_model(name: str, n_ctx: int | None, threads: int | None, cache_type_k: str = "f16",
               cache_type_v: str = "f16"):
    from ..runtime.model import load
    try:
        return load(name, n_ctx=n_ctx, threads=threads, cache_type_k=cache_type_k, cache_type_v=cache_type_v)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def load_template(model, path: Path | None):
    from ..runtime.generate import chat_template
    if path is None:
        return chat_template(model)
    try:
        source = path.read_text()
    except OSError as e:
        raise ConfigError(f"--chat-template {path}: {e.strerror}") from None
    return chat_template(model, override=source)


@contextlib.contextmanager
def ctrl_c_sets(event: threading.Event):
    """While generating, Ctrl-C sets `event` (the stream stops after the current token, the KV cache
    consistent) instead of raising KeyboardInterrupt somewhere inside the forward pass."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def timing_line(stream) -> str:
    t, u = stream.timings, stream.usage
    parts = [f"{u.completion_tokens} tokens"]
    if t.tokens_per_second:
        parts.append(f"{t.tokens_per_second:.1f} tokens/s")
    if t.ttft_ms is not None:
        parts.append(f"TTFT {t.ttft_ms:.0f} ms")
    return " · ".join(parts)


# ---- nibble run ----

@app.command()
@handles_errors
def run(
    args: Annotated[Optional[list[str]], typer.Argument(
        metavar="[MODEL] [PROMPT]", show_default=False,
        help=f"with two arguments, the model and the prompt; with one, the prompt (model {DEFAULT_MODEL}); "
             "the prompt is read from stdin when it is '-' or absent")] = None,
    model: ModelOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="do not apply the chat template")] = False,
    system: SystemOpt = None,
    temperature: Temperature = DEFAULTS.temperature, top_k: TopK = DEFAULTS.top_k, top_p: TopP = DEFAULTS.top_p,
    min_p: MinP = DEFAULTS.min_p, repeat_penalty: RepeatPenalty = DEFAULTS.repeat_penalty,
    repeat_last_n: RepeatLastN = DEFAULTS.repeat_last_n,
    presence_penalty: PresencePenalty = DEFAULTS.presence_penalty,
    frequency_penalty: FrequencyPenalty = DEFAULTS.frequency_penalty, seed: Seed = DEFAULTS.seed,
    max_tokens: MaxTokens = None, stop: Stop = None, logit_bias: LogitBias = None,
    n_ctx: NCtx = None, threads: Threads = None, cache_type_k: CacheTypeK = "f16",
    cache_type_v: CacheTypeV = "f16", chat_template: ChatTemplateOpt = None,
    speculative: Speculative = None, draft_max: DraftMax = 16,
    format: FormatOpt = None, json_schema: JsonSchemaOpt = None, grammar: GrammarOpt = None, regex: RegexOpt = None,
    choice: ChoiceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of streaming")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="timings and memory bandwidth on stderr")]
        = False,
):
    """Generate once from a prompt and stream the text to stdout."""
    args = list(args or [])
    if len(args) > (1 if model else 2):
        raise ConfigError(f"too many arguments: {' '.join(args)!r} (expected [MODEL] [PROMPT]; quote the prompt)")
    if model is None:
        model = args.pop(0) if len(args) == 2 else DEFAULT_MODEL
    prompt = args[0] if args else "-"
    kw = sampling_kwargs(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty,
                         frequency_penalty, seed, max_tokens, stop, logit_bias)
    kw.update(constraint_kwargs(format, json_schema, grammar, regex, choice))
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():   # as a chat turn it would be answered until the context is full
        raise ConfigError("the prompt is empty: give it as an argument, or on stdin with '-'")
    if raw and system:
        raise ConfigError("--system needs the chat template; drop --raw")

    from ..runtime import generate
    m = load_model(model, n_ctx, threads, cache_type_k, cache_type_v)
    kw.update(speculative_kwargs(speculative, draft_max))
    cancel = threading.Event()
    if raw:
        stream = generate.stream(m, prompt, cancel=cancel, **kw)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}]
        stream = generate.chat_stream(m, messages, template=load_template(m, chat_template), cancel=cancel, **kw)

    with ctrl_c_sets(cancel), compile_status() as compiled:
        for piece in stream:
            compiled()
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    if as_json:
        t, u = stream.timings, stream.usage
        print(json.dumps({"model": m.name, "text": stream.text, "finish_reason": stream.finish_reason,
                          "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                          "ttft_ms": t.ttft_ms, "tpot_ms": t.tpot_ms, "tokens_per_second": t.tokens_per_second,
                          **({"draft_tokens": t.draft_tokens, "accepted_tokens": t.accepted_tokens,
                              "acceptance_rate": t.acceptance_rate} if speculative else {})},
                         ensure_ascii=False))
    elif sys.stdout.isatty() and not stream.text.endswith("\n"):
        sys.stdout.write("\n")   # piped output stays byte-exact
    sys.stdout.flush()
    if verbose:
        report_timings(m, stream)
    if stream.finish_reason == "cancelled":
        raise typer.Exit(130)


def report_timings(model, stream) -> None:
    t, u = stream.timings, stream.usage
    evaluated = u.prompt_tokens - u.cached_tokens
    lines = [f"prompt      {u.prompt_tokens} tokens ({u.cached_tokens} cached), {evaluated} evaluated in "
             f"{t.prompt_ms:.0f} ms" + (f" ({t.prompt_tokens_per_second:.1f} tokens/s)"
                                         if t.prompt_tokens_per_second else "")]
    if t.ttft_ms is not None:
        lines.append(f"TTFT        {t.ttft_ms:.0f} ms")
    lines.append(f"generated   {u.completion_tokens} tokens, finish reason {stream.finish_reason}")
    if t.tokens_per_second:
        bandwidth = model.weight_bytes * t.tokens_per_second
        lines.append(f"decode      {t.tpot_ms:.1f} ms/token, {t.tokens_per_second:.1f} tokens/s")
        lines.append(f"bandwidth   {model.weight_bytes / 2**20:.1f} MiB of weights per token × "
                     f"{t.tokens_per_second:.1f} tokens/s = {bandwidth / 1e9:.2f} GB/s")
    if t.draft_tokens:
        lines.append(f"speculative {t.accepted_tokens} of {t.draft_tokens} drafted tokens accepted "
                     f"({t.acceptance_rate:.0%}) in {t.verify_steps} verification steps")
    lines.append(f"total       {t.total_ms:.0f} ms")
    for line in lines:
        err.print(f"[dim]{escape(line)}[/]", highlight=False, soft_wrap=True)


# ---- nibble chat ----

HELP = """\
/help              this list
/reset             forget the conversation (the system prompt stays)
/system TEXT       set the system prompt (no TEXT: show it)
/set PARAM VALUE   change a setting: temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                   presence_penalty, frequency_penalty, seed, max_tokens (VALUE none: default), stop
/set               show the settings
/stats             the last answer's TTFT and tokens/s, and how much of the context is used
/save PATH         save the conversation and its KV cache
/load PATH         load a saved conversation
/exit              leave (also Ctrl-D, or Ctrl-C at an empty prompt)
\"\"\"               begin or end a message of several lines
Ctrl-C while the model answers stops the answer."""


@app.command()
@handles_errors
def chat(
    model_arg: ModelArg = None,
    model: ModelOpt = None,
    system: SystemOpt = None,
    temperature: Temperature = DEFAULTS.temperature, top_k: TopK = DEFAULTS.top_k, top_p: TopP = DEFAULTS.top_p,
    min_p: MinP = DEFAULTS.min_p, repeat_penalty: RepeatPenalty = DEFAULTS.repeat_penalty,
    repeat_last_n: RepeatLastN = DEFAULTS.repeat_last_n,
    presence_penalty: PresencePenalty = DEFAULTS.presence_penalty,
    frequency_penalty: FrequencyPenalty = DEFAULTS.frequency_penalty, seed: Seed = DEFAULTS.seed,
    max_tokens: MaxTokens = None, stop: Stop = None, logit_bias: LogitBias = None,
    n_ctx: NCtx = None, threads: Threads = None, cache_type_k: CacheTypeK = "f16",
    cache_type_v: CacheTypeV = "f16", chat_template: ChatTemplateOpt = None,
    speculative: Speculative = None, draft_max: DraftMax = 16,
):
    """Chat with a model: streamed answers, history and line editing, /help for commands. With stdin
    piped, each line is one message."""
    if model and model_arg:
        raise ConfigError("give the model either as an argument or with --model, not both")
    kw = sampling_kwargs(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty,
                         frequency_penalty, seed, max_tokens, stop, logit_bias)
    from ..runtime.session import Session
    m = load_model(model or model_arg or DEFAULT_MODEL, n_ctx, threads, cache_type_k, cache_type_v)
    kw.update(speculative_kwargs(speculative, draft_max))
    session = Session(m, system, template=load_template(m, chat_template), **kw)
    Repl(session, interactive=sys.stdin.isatty()).run()


class Repl:
    """The read-eval-print loop of `nibble chat`. Answers go to stdout as plain text (never through rich
    markup); everything else is rich, dim where it is commentary."""

    def __init__(self, session, interactive: bool):
        self.session = session
        self.interactive = interactive

    def run(self) -> None:
        if self.interactive:
            import readline  # noqa: F401  (line editing and history for input())
            m = self.session.model
            out.print(f"[dim]nibble chat · {escape(m.name)} · n_ctx {m.n_ctx} · /help for commands, "
                      f"/exit or Ctrl-D to leave[/]", highlight=False, soft_wrap=True)
        while True:
            try:
                message = self.read()
            except (EOFError, KeyboardInterrupt):
                if self.interactive:
                    print()
                return
            if message is None:
                continue
            if message.startswith("/"):
                try:
                    if not self.command(message):
                        return
                except KeyboardInterrupt:
                    out.print("[dim]interrupted[/]", soft_wrap=True)
            elif message.strip():
                try:
                    self.answer(message)
                except KeyboardInterrupt:   # only in the instant before the handler is installed
                    out.print("\n[dim]interrupted[/]", soft_wrap=True)

    def read(self) -> str | None:
        """One message: a line, or the lines between two \"\"\" lines. None when a multi-line message
        was abandoned with Ctrl-C."""
        line = self.input(">>> ")
        if not line.lstrip().startswith('"""'):
            return line
        first = line.lstrip()[3:]
        if first.rstrip().endswith('"""') and len(first.rstrip()) >= 3:
            return first.rstrip()[:-3]
        lines = [first] if first else []
        try:
            while True:
                line = self.input("... ")
                if line.rstrip().endswith('"""'):
                    lines.append(line.rstrip()[:-3])
                    break
                lines.append(line)
        except KeyboardInterrupt:
            if self.interactive:
                print()
            return None
        return "\n".join(lines).strip("\n")

    def input(self, prompt: str) -> str:
        if self.interactive:
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def answer(self, message: str) -> None:
        from ..errors import ContextOverflowError, NibbleError
        cancel = threading.Event()
        with ctrl_c_sets(cancel):   # from the moment the message is in: Ctrl-C never leaves the REPL here
            try:
                stream = self.session.send(message, cancel=cancel)
            except (NibbleError, ValueError) as e:
                hint = " (/reset starts over)" if isinstance(e, ContextOverflowError) else ""
                err.print(f"[bold red]error:[/] {escape(str(e))}{hint}", highlight=False, soft_wrap=True)
                return
            with compile_status() as compiled:
                for piece in stream:
                    compiled()
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if self.interactive:
            note = " · interrupted" if stream.finish_reason == "cancelled" else \
                   " · context full" if stream.finish_reason == "length" and self.session.n_past >= \
                   self.session.model.n_ctx else ""
            out.print(f"[dim]{escape(timing_line(stream))}{note}[/]", highlight=False, soft_wrap=True)

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        from ..errors import NibbleError
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        s = self.session
        try:
            if name in ("/exit", "/quit", "/bye"):
                return False
            elif name in ("/help", "/?"):
                out.print(escape(HELP), highlight=False, soft_wrap=True)
            elif name == "/reset":
                s.reset()
                out.print("[dim]conversation cleared[/]", soft_wrap=True)
            elif name == "/system":
                if arg:
                    s.system = arg
                    out.print("[dim]system prompt set[/]", soft_wrap=True)
                else:
                    out.print(escape(s.system or "(no system prompt)"), highlight=False, soft_wrap=True)
            elif name == "/set":
                self.set(arg)
            elif name == "/stats":
                self.stats()
            elif name == "/save":
                if not arg:
                    raise ValueError("/save PATH")
                saved = s.save(Path(arg).expanduser())
                out.print(f"[dim]saved to {escape(str(saved))}[/]", highlight=False, soft_wrap=True)
            elif name == "/load":
                if not arg:
                    raise ValueError("/load PATH")
                from ..runtime.session import Session
                self.session = Session.load(s.model, Path(arg).expanduser(), **s.defaults)
                self.session.template = s.template
                out.print(f"[dim]loaded {len(self.session.messages) // 2} turn(s), "
                          f"{self.session.n_past} tokens[/]", highlight=False, soft_wrap=True)
            else:
                out.print(f"unknown command {escape(name)}; /help lists them", highlight=False, soft_wrap=True)
        except (NibbleError, ValueError, OSError) as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return True

    def set(self, arg: str) -> None:
        d = self.session.defaults
        if not arg:
            for k in (*SETTABLE, "stop"):
                out.print(f"{k:18} {d.get(k)!r}", highlight=False, soft_wrap=True)
            return
        key, _, value = arg.partition(" ")
        key, value = key.replace("-", "_"), value.strip()
        if key == "stop":
            d["stop"] = (value,) if value else ()
        elif key in SETTABLE:
            if value.lower() in ("none", "") and key in ("seed", "max_tokens"):
                d[key] = None
            else:
                try:
                    new = SETTABLE[key](value)
                except ValueError:
                    raise ValueError(f"/set {key}: {value!r} is not a {SETTABLE[key].__name__}") from None
                if key == "max_tokens":
                    new = token_limit(new)
                else:
                    SamplingParams(**{k: v for k, v in {**d, key: new}.items()
                                      if k in SamplingParams.names()}).check(self.session.model.n_vocab)
                d[key] = new
        else:
            raise ValueError(f"/set: unknown setting {key!r}; settable: {', '.join([*SETTABLE, 'stop'])}")
        out.print(f"[dim]{key} = {d[key]!r}[/]", highlight=False, soft_wrap=True)

    def stats(self) -> None:
        s = self.session
        used = f"context {s.n_past} / {s.model.n_ctx} tokens"
        if s.last is None or s.last.timings is None:
            out.print(f"[dim]no answer yet · {used}[/]", soft_wrap=True)
            return
        t, u = s.last.timings, s.last.usage
        parts = [f"TTFT {t.ttft_ms:.0f} ms" if t.ttft_ms is not None else "TTFT -",
                 f"{t.tokens_per_second:.1f} tokens/s" if t.tokens_per_second else "tokens/s -",
                 f"prompt {u.prompt_tokens} tokens ({u.cached_tokens} cached)",
                 f"answer {u.completion_tokens} tokens", used]
        if t.draft_tokens:
            parts.append(f"drafted {t.draft_tokens}, accepted {t.accepted_tokens} ({t.acceptance_rate:.0%})")
        out.print(" · ".join(parts), highlight=False, soft_wrap=True)
