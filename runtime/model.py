"""`nibble.load` and the `Model` object that the CLI, the library and (later) the server share."""

from __future__ import annotations

import functools
import os
import weakref
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelFormatError, ModelNotFoundError, NibbleError
from ..formats.gguf import GGUFFile, qtype_name
from ..formats.metadata import check_tokenizer_metadata
from ..models import architecture
from .catalog import CATALOG
from . import store


def resolve(model: str | os.PathLike) -> tuple[Path, str]:
    """A catalogue name (pulled on first use) or a path to a .gguf file -> (path, display name)."""
    if isinstance(model, str) and model in CATALOG:
        path, _ = store.pull_with_progress(model, verify_existing=False)  # `nibble pull` re-verifies
        return path, model
    path = Path(model)
    if path.exists():
        return path, path.stem
    if isinstance(model, str) and os.sep not in model and not model.endswith(".gguf"):
        store.catalog_entry(model)  # raises ModelNotFoundError naming the known models
    raise ModelNotFoundError(f"{model}: no such file, and not a catalogue model ({', '.join(CATALOG)})")


def load(model: str | os.PathLike, *, n_ctx: int | None = None, threads: int | None = None,
         vocab_only: bool = False, parallel: int = 1, cache_type_k: str = "f16",
         cache_type_v: str = "f16") -> "Model":
    """Open a model: a catalogue name (pulled on first use) or a path to a .gguf file. `parallel`: how many
    sequences (KV slots of n_ctx tokens each) it generates at once; more requests queue. `cache_type_k`,
    `cache_type_v`: the KV cache's types, "f16" (llama.cpp's arithmetic, bit for bit) or "q8_0" (about half
    the memory, as llama.cpp's -ctk/-ctv q8_0)."""
    path, name = resolve(model)
    return Model(GGUFFile(path), name=name, n_ctx=n_ctx, threads=threads, vocab_only=vocab_only,
                 parallel=parallel, cache_type_k=cache_type_k, cache_type_v=cache_type_v)


class Model:
    """A loaded GGUF model. Safe to share between threads: every evaluation goes through the model's scheduler
    on nibble's one engine thread (`runtime/scheduler.py`), which batches concurrent generations. `close()`
    (or `with`) lets the engine thread go of it."""

    def __init__(self, gguf: GGUFFile, *, name: str, n_ctx: int | None = None, threads: int | None = None,
                 vocab_only: bool = False, parallel: int = 1, cache_type_k: str = "f16", cache_type_v: str = "f16"):
        self.gguf = gguf
        self.name = name
        self.path = gguf.path
        self.vocab_only = vocab_only
        self.threads = threads
        arch = gguf.architecture
        if arch is None:
            raise ModelFormatError(f"{gguf.name}: metadata 'general.architecture' is missing or not a string")
        self.architecture = arch
        self.arch = architecture(arch, gguf.name)
        self.args = self.arch.ModelArgs.from_gguf(gguf)      # metadata checks, also for vocab_only
        n_tokens = check_tokenizer_metadata(gguf)
        if n_tokens != self.args.n_vocab:
            raise ModelFormatError(f"{gguf.name}: the tokenizer has {n_tokens} tokens but the model's vocabulary "
                                   f"is {self.args.n_vocab}")
        self.engine = self.scheduler = None
        self._open_streams = weakref.WeakSet()      # submitted streams not yet ended (generate.Stream)
        self._drafts: dict = {}                      # draft models loaded by name for speculative decoding
        if not vocab_only:
            from .engine import Engine
            from .scheduler import Scheduler
            self.engine = Engine(gguf, self.arch, n_ctx=n_ctx, n_slots=parallel, cache_type_k=cache_type_k,
                                 cache_type_v=cache_type_v)
            self.scheduler = Scheduler(self.engine, threads=threads)

    def close(self) -> None:
        """Stop the engine thread (cancelling what it runs); the model can no longer evaluate."""
        if self.scheduler is not None:
            self.scheduler.close()
            self.engine.close()
        for draft in self._drafts.values():
            draft.close()

    def __del__(self):
        # the engine thread holds the engine (KV cache, buffers): let it go with the model
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close(wait=False)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- evaluation (runtime/engine.py), always on the engine thread; slot 0 unless said otherwise ----

    def _call(self, fn):
        self._engine()
        return self.scheduler.call(fn)

    def _submit(self, stream) -> None:
        self._engine()
        self._open_streams.add(stream)
        self.scheduler.submit(stream.request)

    def _wake(self) -> None:
        self.scheduler.wake()

    @property
    def parallel(self) -> int:
        return self._engine().n_slots

    def _engine(self):
        if self.engine is None:
            raise NibbleError(f"{self.name} was loaded with vocab_only=True: it can tokenize but not evaluate; "
                              f"load it without vocab_only")
        return self.engine

    @property
    def n_ctx(self) -> int:
        return self._engine().n_ctx

    @property
    def n_vocab(self) -> int:
        return self.args.n_vocab

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights read per decoded token: every tensor once, but only a row of an untied embedding."""
        return self._engine().weight_bytes

    def eval(self, ids, slot: int = 0) -> np.ndarray:
        """Append ids after the slot's cached tokens (chunked prefill); return the last position's logits
        (n_vocab,) float32, a buffer the next call reuses. ContextOverflowError before touching the cache if
        they do not fit."""
        return self._call(lambda e: e.eval(ids, slot).copy())

    def prefill(self, ids, slot: int = 0, reuse: bool = True) -> tuple[np.ndarray, int]:
        """Bring the slot's KV cache to exactly `ids`: (the logits after the last id, as a fresh evaluation
        gives them; how many cached tokens were reused). Only cells whose bits a fresh evaluation would
        reproduce are reused (see runtime/engine.py); without `reuse` the slot is emptied first."""
        def run(e):
            logits, reused = e.prefill(ids, slot, reuse)
            return logits.copy(), reused             # the engine's buffer is reused by the next step
        return self._call(run)

    def n_past(self, slot: int = 0) -> int:
        return self._call(lambda e: e.n_past(slot))

    def cached_tokens(self, slot: int = 0) -> list[int]:
        return self._call(lambda e: list(e.tokens[slot]))

    def _check_f16_cache(self) -> None:
        if self.cache_types != ("f16", "f16"):
            raise ConfigError(f"saved KV state (sessions) holds an f16 cache, and this model was loaded with "
                              f"cache types {'/'.join(self.cache_types)}: load it with the default f16 cache")

    def truncate(self, n: int, slot: int = 0) -> None:
        """Keep only the first n cached tokens of the slot."""
        self._call(lambda e: e.truncate(n, slot))

    def reset(self, slot: int = 0) -> None:
        self._call(lambda e: e.reset(slot))

    def kv_state(self, slot: int = 0) -> dict[str, np.ndarray]:
        """A copy of the slot's cache: the tokens, the kind of each cell and their K/V rows (an f16 cache)."""
        self._check_f16_cache()

        def copy(e):
            n = e.n_past(slot)
            return {"tokens": np.array(e.tokens[slot], np.int64), "kinds": np.array(e.cell_kinds[slot], np.int8),
                    "k": e.k_cache[slot, :, :n].copy(), "v": e.v_cache[slot, :, :n].copy()}
        return self._call(copy)

    def load_kv_state(self, state: dict[str, np.ndarray], slot: int = 0) -> None:
        """Restore what kv_state returned (checked against this model's shapes)."""
        self._check_f16_cache()

        def restore(e):
            tokens, kinds, k, v = state["tokens"], state["kinds"], state["k"], state["v"]
            n = len(tokens)
            expected = e.k_cache.shape[1:2] + (n,) + e.k_cache.shape[3:]
            if n > e.n_ctx or k.shape != expected or v.shape != expected or kinds.shape != (n,):
                raise ModelFormatError(f"saved KV state of shape {k.shape} does not fit this model's cache "
                                       f"(expected {expected}, n_ctx {e.n_ctx})")
            e._as_ids(tokens)
            e.k_cache[slot, :, :n] = k
            e.v_cache[slot, :, :n] = v
            e.tokens[slot] = [int(t) for t in tokens]
            e.cell_kinds[slot] = [int(t) & int(e.kind_mask) for t in kinds]
        self._call(restore)

    def logits(self, ids) -> np.ndarray:
        """Logits at every position of ids, (len(ids), n_vocab) float32, evaluated from an empty cache
        (slot 0 is reset)."""
        def run(e):
            e.reset(0)
            return e.eval_all(ids, 0)
        return self._call(run)

    def trace(self, ids, reference: bool = False, per_layer: bool = True) -> dict[str, np.ndarray]:
        """The intermediate tensors of the evaluation of ids from an empty cache (slot 0 is reset), in forward
        order and named as llama.cpp names its graph nodes (`attn_norm-0`, `Qcur-0`, ..., `result_output`):
        float32 arrays (len(ids), features). `result_output` is bit for bit what `logits(ids)` returns;
        `reference=True` traces the architecture's numpy `forward_reference` instead, each layer started
        from the fast path's input to it unless `per_layer=False`. See runtime/trace.py."""
        from .trace import trace_engine
        return self._call(lambda e: trace_engine(e, ids, reference, per_layer))

    def perplexity(self, text: str, n_ctx: int = 512, progress=None) -> float:
        """llama-perplexity's method; see runtime/perplexity.py."""
        from .perplexity import perplexity
        return perplexity(self, text, n_ctx=n_ctx, progress=progress).ppl

    def kl_divergence(self, other: "Model", text: str, n_ctx: int = 512, progress=None):
        """KL divergence of `other` from this model (the base) on `text`, by llama-perplexity's method:
        a KLDivergence with the mean KLD, its percentiles, same-top-p, RMS Δp and both PPLs; see runtime/kld.py."""
        from .kld import kl_divergence
        return kl_divergence(self, other, text, n_ctx=n_ctx, progress=progress)

    # ---- text <-> tokens (formats/tokenizer.py, formats/chat.py) ----

    @functools.cached_property
    def chat_template_object(self):
        """The model's ChatTemplate: its GGUF's, or the built-in format of its family."""
        from ..formats.chat import ChatTemplate
        return ChatTemplate.from_gguf(self.gguf)

    @functools.cached_property
    def tokenizer(self):
        from ..formats.tokenizer import Tokenizer
        return Tokenizer.from_gguf(self.gguf, cache_dir=store.cache_dir())

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text -> token ids, as llama.cpp's llama_tokenize: `add_special` adds BOS/EOS where the model's
        add_bos_token/add_eos_token say so; `parse_special` turns control-token text into control tokens."""
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids, special: bool = False) -> str:
        """Token ids -> text; control tokens are left out unless `special`; invalid UTF-8 becomes U+FFFD."""
        return self.tokenizer.decode(ids, special=special)

    # ---- generation (runtime/generate.py, runtime/session.py) ----

    def stream(self, prompt, **kw):
        """Stream text generated from `prompt` (str or ids): an iterator of str pieces whose `finish_reason`,
        `usage` and `timings` are set when it ends. Keywords: max_tokens, temperature, top_k, top_p, min_p,
        repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, logit_bias, seed, stop, cancel,
        and one constraint: json_schema, format="json", grammar, regex or choices (runtime/structured.py)."""
        from . import generate
        return generate.stream(self, prompt, **kw)

    def generate(self, prompt, **kw):
        """`stream` run to the end: a Completion (text, finish_reason, usage, timings)."""
        from . import generate
        return generate.generate(self, prompt, **kw)

    def chat(self, messages: list[dict], **kw):
        """The assistant's reply to `messages` ({"role", "content"} dicts), with the chat template applied;
        `tools`, `tool_choice`, `parallel_tool_calls` as OpenAI's (the calls in the Completion's `tool_calls`)."""
        from . import generate
        return generate.chat(self, messages, **kw)

    def astream(self, prompt, **kw):
        """`stream` as an async iterator of str pieces, for event loops: `async for piece in
        model.astream(prompt, ...)`. `prompt` may also be a list of chat messages. Same keywords as `stream`."""
        from . import openai_api
        return openai_api.astream(self, prompt, **kw)

    def create_chat_completion(self, messages: list[dict], stream: bool = False, **opts):
        """OpenAI's chat completion (as llama-cpp-python's): a response dict, or with stream=True an iterator
        of chunk dicts. `opts` are OpenAI's request fields (temperature, top_p, seed, stop, max_tokens,
        logit_bias, logprobs, top_logprobs, ...) and top_k, min_p, repeat_penalty; see runtime/openai_api.py."""
        from . import openai_api
        return openai_api.chat_completion(self, messages, stream=stream, **opts)

    def create_completion(self, prompt, stream: bool = False, **opts):
        """OpenAI's (legacy) text completion of `prompt` (text or token ids): a response dict, or with
        stream=True an iterator of chunk dicts; `logprobs=n` returns the n most likely tokens at each step."""
        from . import openai_api
        return openai_api.completion(self, prompt, stream=stream, **opts)

    def session(self, system: str | None = None, **defaults):
        """A multi-turn conversation that reuses the KV cache between turns."""
        from .session import Session
        return Session(self, system, **defaults)

    # ---- facts for `nibble show` ----

    def _meta_int(self, key: str, default: int | None = None) -> int:
        v = self.gguf.get(f"{self.architecture}.{key}", default)
        if v is None or isinstance(v, (str, bool, list)) or not float(v).is_integer():
            raise ModelFormatError(f"{self.gguf.name}: metadata '{self.architecture}.{key}' is missing or not an integer")
        return int(v)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.gguf.tensors.values())

    @property
    def file_size(self) -> int:
        return self.gguf.file_size

    @property
    def context_length(self) -> int:
        return self._meta_int("context_length")

    @property
    def quant_types(self) -> dict[str, int]:
        counts = Counter(qtype_name(t.qtype) for t in self.gguf.tensors.values())
        return dict(sorted(counts.items()))

    @property
    def chat_template(self) -> str | None:
        t = self.gguf.get("tokenizer.chat_template")
        return t if isinstance(t, str) else None

    @property
    def cache_types(self) -> tuple[str, str]:
        """The KV cache's (K, V) types."""
        return self.engine.cache_types if self.engine is not None else ("f16", "f16")

    @property
    def kv_bytes_per_token(self) -> int:
        from .engine import Engine
        return Engine.kv_bytes(self.args, 1, 1, self.cache_types)

    def info(self) -> dict:
        from .engine import Engine
        return {
            "architecture": self.architecture,
            "n_params": self.n_params,
            "file_size": self.file_size,
            "context_length": self.context_length,
            "quant_types": self.quant_types,
            "chat_template": self.chat_template is not None,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "cache_types": list(self.cache_types),
            **({"kv_bytes_per_token_q8_0": Engine.kv_bytes(self.args, 1, 1, ("q8_0", "q8_0"))}
               if self.args.head_dim % 32 == 0 else {}),
        }

    def __repr__(self) -> str:
        return f"Model({self.name!r}, {self.architecture}, {self.n_params / 1e6:.0f}M params)"
