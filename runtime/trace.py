"""Tracing: the intermediate tensors of a forward pass, named as llama.cpp names its graph nodes, and the
comparison of two traces.

    tensors = model.trace(ids)                    # the fast path; model.trace(ids, reference=True): numpy
    save(path, tensors, meta)                     # one .npz, tensors in forward order
    rows = diff(load(a)[0], load(b)[0])           # NMSE and max |Δ| per tensor, in forward order

Names are llama.cpp's (`cb(cur, "Qcur", il)` in its model graphs gives the node `Qcur-0`), so a trace can
be set beside a llama.cpp eval-callback dump: `inp_embd` (Gemma: `inp_scaled`), then per layer `attn_norm`,
`Qcur`, `Kcur` (after RoPE), `Vcur`, `kqv_out` (the heads' outputs, before the output projection),
`attn_out`, `ffn_inp`, `ffn_norm`, `ffn_out`, `l_out` (Gemma 3: `attn_post_norm`, `sa_out` and
`ffn_post_norm` in place of `attn_out`, `ffn_inp` and `ffn_out`, as its graph names them), then
`result_norm` and `result_output` (the logits). Every tensor is float32 (n_tokens, features): llama.cpp's
[features..., n_tokens] with the feature dimensions flattened.

The architectures' `forward` and `forward_reference` take an optional `trace` (a `Trace`); when it is None
the only cost is a few `if trace is not None` tests between kernels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import NibbleError

DEFAULT_THRESHOLD = 1e-3    # NMSE over which `diff` marks a tensor as diverged


class Trace:
    """Receives tensors from a forward: `record(layer, name=array, ...)` copies each as `name-layer` (or
    `name` when layer is None). A name recorded again (the next prefill chunk) appends rows."""

    def __init__(self):
        self._parts: dict[str, list[np.ndarray]] = {}

    def record(self, layer: int | None, **tensors) -> None:
        for name, x in tensors.items():
            key = name if layer is None else f"{name}-{layer}"
            x = np.array(x, dtype=np.float32)
            self._parts.setdefault(key, []).append(x.reshape(x.shape[0], -1))

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in self._parts.items()}


class _Traced:
    """An architecture module whose fast `forward` records into a Trace."""

    def __init__(self, arch, trace: Trace):
        self._arch, self._trace = arch, trace

    def __getattr__(self, name):
        return getattr(self._arch, name)

    def forward(self, *args):
        return self._arch.forward(*args, trace=self._trace)


def trace_engine(engine, ids, reference: bool = False, per_layer: bool = True) -> dict[str, np.ndarray]:
    """On the engine thread: the tensors of the forward of `ids` from an empty slot 0. The fast path runs
    through `Engine.eval_all`, the call `Model.logits` makes, so `result_output` is bit for bit the logits
    an untraced evaluation gives; `reference` runs the architecture's numpy `forward_reference` instead.

    With `per_layer` (the default), each layer of the reference starts from the residual stream the fast
    path gave that layer (its `l_out` of the layer before), as llama.cpp's test-backend-ops compares one op
    on the same inputs: a tensor's NMSE is then that layer's own error. Run freely (`per_layer=False`), the
    reference also carries every earlier layer's difference, which compounds (8-bit activations and f16
    attention against float64): on SmolLM2 to NMSE ~6e-3 by the middle layers, wherever a bug is."""
    ids = engine._as_ids(ids)
    if len(ids) == 0:
        raise NibbleError("a trace needs at least one token")
    trace = Trace()
    if reference:
        inputs = None
        if per_layer:
            fast = trace_engine(engine, ids)
            n_layers = len(engine.weights.layers)
            inputs = [None] + [fast[f"l_out-{i}"] for i in range(n_layers)]
        engine.arch.forward_reference(engine.args, engine.weights, ids.tolist(), trace, inputs)
        return trace.tensors
    arch = engine.arch
    engine.arch = _Traced(arch, trace)
    try:
        engine.reset(0)
        logits = engine.eval_all(ids, 0)
    finally:
        engine.arch = arch
    trace.record(None, result_output=logits)
    return trace.tensors


# ---- files ----

def save(path: str | os.PathLike, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """One .npz: the tensors in forward order, and `meta` (model, tokens, path, ...) as JSON under `_meta`."""
    np.savez(path, **tensors, _meta=np.array(json.dumps(meta)))


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors in forward order, meta) of a trace file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            tensors = {k: z[k] for k in z.files if not k.startswith("_")}
            meta = json.loads(str(z["_meta"])) if "_meta" in z.files else {}
    except FileNotFoundError:
        raise NibbleError(f"{path}: no such trace file") from None
    except (OSError, ValueError) as e:
        raise NibbleError(f"{path}: not a trace file ({e})") from None
    return tensors, meta


# ---- comparison ----

@dataclass(frozen=True)
class TensorDiff:
    name: str
    shape: tuple[int, ...] | None   # None: the tensor is missing from one trace, or the shapes differ
    nmse: float | None              # Σ(a - b)² / Σb²: b is the reference
    max_abs: float | None           # max |a - b|
    note: str = ""                  # "only in a", "only in b", "shapes differ: ..."


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mean squared error of a against the reference b (0 when both are all zeros)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    err, ref = float(np.sum((a - b) ** 2)), float(np.sum(b ** 2))
    return err / ref if ref else (0.0 if err == 0 else float("inf"))


def diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[TensorDiff]:
    """Each tensor of a against the same name in b (the reference), in a's order, then those only in b."""
    rows = []
    for name, x in a.items():
        y = b.get(name)
        if y is None:
            rows.append(TensorDiff(name, None, None, None, "only in a"))
        elif x.shape != y.shape:
            rows.append(TensorDiff(name, None, None, None, f"shapes differ: {x.shape} and {y.shape}"))
        else:
            rows.append(TensorDiff(name, x.shape, nmse(x, y), float(np.max(np.abs(x.astype(np.float64) - y)))
                                   if x.size else 0.0))
    rows += [TensorDiff(name, None, None, None, "only in b") for name in b if name not in a]
    return rows


def first_over(rows: list[TensorDiff], threshold: float = DEFAULT_THRESHOLD) -> TensorDiff | None:
    """The first tensor, in forward order, whose NMSE passes the threshold."""
    return next((r for r in rows if r.nmse is not None and r.nmse > threshold), None)


def largest(rows: list[TensorDiff]) -> TensorDiff | None:
    """The compared tensor with the largest NMSE."""
    compared = [r for r in rows if r.nmse is not None]
    return max(compared, key=lambda r: r.nmse) if compared else None
