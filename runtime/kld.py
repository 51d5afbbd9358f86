"""KL divergence between a model and a base model, by llama-perplexity's method and in its file format.

llama-perplexity measures a quantized model against a base in two runs. `--kl-divergence-base FILE` with the
base model evaluates the text chunk by chunk as for perplexity (runtime/perplexity.py) and saves, for every
scored position, the base's log-probabilities over the vocabulary, compressed to 16 bits each:

    file:   "_logits_" | n_ctx: i32 | n_vocab: i32 | n_chunk: i32 | tokens: i32 × n_chunk·n_ctx |
            per chunk, per scored position (n_ctx - 1 - n_ctx/2 of them): one row of nv = 2⌈n_vocab/2⌉ + 4 u16
    row:    scale: f32 | min_log_prob: f32 | q: u16 × n_vocab (+ one u16 of padding when n_vocab is odd)
            log p_i = scale·q_i + min_log_prob, over the logit range [max - 16, max] (lower logits: q = 0)

`--kl-divergence` with the other model then evaluates the same tokens and compares at every scored position:
KL(base || model) = Σ_i p_base,i (log p_base,i - log p_i), summed over the tokens whose base log-probability
is above -16 (the rest carry less than 1e-7 of probability each); whether the two argmaxes agree ("same top
p"); and Δp = p(actual next token) - p_base(same token). Its statistics: the mean with llama-perplexity's
uncertainty, percentiles of the per-position KLD and Δp, the RMS of Δp, and PPL of both models (the base's
recovered from the saved log-probabilities).

The file is byte-compatible with llama-perplexity's: a base saved by either can be compared by either.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import NibbleError
from .perplexity import Perplexity, chunks, scored_logits

MAGIC = b"_logits_"


def row_width(n_vocab: int) -> int:
    """u16 values per saved row: 4 (two float32) + n_vocab rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def _nearest_int(v: np.ndarray) -> np.ndarray:
    bits = (v.astype(np.float32) + np.float32(12582912.0)).astype(np.float32).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _softmax_stats(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, V) float32 -> (max logit, log Σ exp(logit - max)) per row, as float32; the sum in double as
    llama-perplexity accumulates it."""
    max_logit = logits.max(axis=1)
    sum_exp = np.exp(logits - max_logit[:, None]).sum(axis=1, dtype=np.float64)
    return max_logit, np.log(sum_exp).astype(np.float32)


def compress_log_probs(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, V) float32 logits -> ((rows, nv) uint16 saved rows, (rows,) float64 NLL of the targets):
    llama-perplexity's log_softmax that writes the base file."""
    rows, n_vocab = logits.shape
    max_logit, log_sum_exp = _softmax_stats(logits)
    min_logit = np.maximum(logits.min(axis=1), max_logit - np.float32(16))
    min_log_prob = min_logit - max_logit - log_sum_exp
    scale = (max_logit - min_logit) / np.float32(65535)
    out = np.zeros((rows, row_width(n_vocab)), np.uint16)
    out[:, 0:4] = np.stack([scale, min_log_prob], axis=1).astype(np.float32).view(np.uint16)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(scale != 0, np.float32(1) / scale, np.float32(0))
        q = _nearest_int(inv_scale[:, None] * (logits - min_logit[:, None]))
    q = np.where((logits > min_logit[:, None]) & (scale != 0)[:, None], q, 0)
    out[:, 4:4 + n_vocab] = q.astype(np.uint16)
    nll = (max_logit + log_sum_exp - logits[np.arange(rows), targets]).astype(np.float64)
    return out, nll


@dataclass
class _Sums:
    """kl_divergence_result: running sums over every scored position."""
    nll: float = 0.0
    nll2: float = 0.0
    nll_base: float = 0.0
    nll_base2: float = 0.0
    nll_nll_base: float = 0.0
    kld: float = 0.0
    kld2: float = 0.0
    p_diff: float = 0.0
    p_diff2: float = 0.0
    p_diff4: float = 0.0
    max_p_diff: float = 0.0
    n_same_top: int = 0
    count: int = 0


def compare_rows(logits: np.ndarray, base: np.ndarray, targets: np.ndarray, sums: _Sums) -> tuple[np.ndarray, np.ndarray]:
    """One block of scored positions: the model's (rows, V) logits against the base's saved rows. Adds to
    `sums`; returns the per-position (KLD, Δp), float32."""
    rows, n_vocab = logits.shape
    f32 = np.float32
    idx = np.arange(rows)
    max_logit, log_sum_exp = _softmax_stats(logits)
    imax = logits.argmax(axis=1)
    header = np.ascontiguousarray(base[:, 0:4]).view(np.float32)
    scale, min_log_prob = header[:, 0], header[:, 1]
    q = base[:, 4:4 + n_vocab]
    nll = max_logit + log_sum_exp - logits[idx, targets]
    nll_base = -(scale * q[idx, targets].astype(f32) + min_log_prob)
    log_base = scale[:, None] * q.astype(f32) + min_log_prob[:, None]       # (rows, V) log p_base
    imax_base = log_base.argmax(axis=1)
    top = max_logit + log_sum_exp                                           # log p_i = logit_i - top
    terms = np.where(log_base > f32(-16), np.exp(log_base) * (log_base - logits + top[:, None]), f32(0))
    kld = terms.sum(axis=1, dtype=np.float64)
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    nll64, nll_base64, p_diff64 = nll.astype(np.float64), nll_base.astype(np.float64), p_diff.astype(np.float64)
    sums.nll += nll64.sum()
    sums.nll2 += (nll64 * nll64).sum()
    sums.nll_base += nll_base64.sum()
    sums.nll_base2 += (nll_base64 * nll_base64).sum()
    sums.nll_nll_base += (nll64 * nll_base64).sum()
    sums.kld += kld.sum()
    sums.kld2 += (kld * kld).sum()
    sums.p_diff += p_diff64.sum()
    sums.p_diff2 += (p_diff64 * p_diff64).sum()
    sums.p_diff4 += (p_diff64 ** 4).sum()
    sums.max_p_diff = max(sums.max_p_diff, float(np.abs(p_diff).max(initial=0)))
    sums.n_same_top += int((imax == imax_base).sum())
    sums.count += rows
    return kld.astype(np.float32), p_diff.astype(np.float32)


@dataclass(frozen=True)
class KLDivergence:
    """What llama-perplexity --kl-divergence prints. Values with `_err` are its ± uncertainties; Δp and
    same-top-p are fractions (llama-perplexity prints them as percentages)."""
    n_chunks: int
    n_ctx: int
    count: int
    ppl: float
    ppl_err: float
    ppl_base: float
    ppl_base_err: float
    cor_ln_ppl: float
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    ppl_diff: float
    ppl_diff_err: float
    kld: float
    kld_err: float
    kld_max: float
    kld_99_9: float
    kld_99: float
    kld_95: float
    kld_90: float
    kld_median: float
    kld_10: float
    kld_5: float
    kld_1: float
    kld_0_1: float
    kld_min: float
    dp_mean: float
    dp_mean_err: float
    dp_max: float
    dp_99_9: float
    dp_99: float
    dp_95: float
    dp_90: float
    dp_75: float
    dp_median: float
    dp_25: float
    dp_10: float
    dp_5: float
    dp_1: float
    dp_0_1: float
    dp_min: float
    rms_dp: float
    rms_dp_err: float
    same_top_p: float
    same_top_p_err: float

    def as_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        """llama-perplexity's closing statistics, line for line."""
        s = self
        lines = ["====== Perplexity statistics ======",
                 f"Mean PPL(Q)                   : {s.ppl:10.6f} ± {s.ppl_err:10.6f}",
                 f"Mean PPL(base)                : {s.ppl_base:10.6f} ± {s.ppl_base_err:10.6f}",
                 f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s.cor_ln_ppl:6.2f}%",
                 f"Mean ln(PPL(Q)/PPL(base))     : {s.ln_ppl_ratio:10.6f} ± {s.ln_ppl_ratio_err:10.6f}",
                 f"Mean PPL(Q)/PPL(base)         : {s.ppl_ratio:10.6f} ± {s.ppl_ratio_err:10.6f}",
                 f"Mean PPL(Q)-PPL(base)         : {s.ppl_diff:10.6f} ± {s.ppl_diff_err:10.6f}",
                 "",
                 "====== KL divergence statistics ======",
                 f"Mean    KLD: {s.kld:10.6f} ± {s.kld_err:10.6f}",
                 f"Maximum KLD: {s.kld_max:10.6f}"]
        for label, v in (("99.9%", s.kld_99_9), ("99.0%", s.kld_99), ("95.0%", s.kld_95), ("90.0%", s.kld_90)):
            lines.append(f"{label}   KLD: {v:10.6f}")
        lines.append(f"Median  KLD: {s.kld_median:10.6f}")
        for label, v in (("10.0%", s.kld_10), (" 5.0%", s.kld_5), (" 1.0%", s.kld_1), (" 0.1%", s.kld_0_1)):
            lines.append(f"{label}   KLD: {v:10.6f}")
        lines += [f"Minimum KLD: {s.kld_min:10.6f}", "", "====== Token probability statistics ======",
                  f"Mean    Δp: {100 * s.dp_mean:6.3f} ± {100 * s.dp_mean_err:5.3f} %",
                  f"Maximum Δp: {100 * s.dp_max:6.3f}%"]
        for label, v in (("99.9%", s.dp_99_9), ("99.0%", s.dp_99), ("95.0%", s.dp_95), ("90.0%", s.dp_90),
                         ("75.0%", s.dp_75)):
            lines.append(f"{label}   Δp: {100 * v:6.3f}%")
        lines.append(f"Median  Δp: {100 * s.dp_median:6.3f}%")
        for label, v in (("25.0%", s.dp_25), ("10.0%", s.dp_10), (" 5.0%", s.dp_5), (" 1.0%", s.dp_1),
                         (" 0.1%", s.dp_0_1)):
            lines.append(f"{label}   Δp: {100 * v:6.3f}%")
        lines += [f"Minimum Δp: {100 * s.dp_min:6.3f}%",
                  f"RMS Δp    : {100 * s.rms_dp:6.3f} ± {100 * s.rms_dp_err:5.3f} %",
                  f"Same top p: {100 * s.same_top_p:6.3f} ± {100 * s.same_top_p_err:5.3f} %"]
        return "\n".join(lines)


def _mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def _covariance(a: float, b: float, ab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (ab / count - (a / count) * (b / count)) / (count - 1)


def _percentile(values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's linear interpolation between the sorted values."""
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = fraction * (len(values) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)])


def _median(values: np.ndarray) -> float:
    n = len(values)
    return float(0.5 * (values[n // 2] + values[n // 2 - 1])) if n % 2 == 0 else float(values[n // 2])


def _statistics(sums: _Sums, klds: np.ndarray, p_diffs: np.ndarray, n_chunks: int, n_ctx: int) -> KLDivergence:
    if sums.count < 100:
        raise NibbleError(f"only {sums.count} positions were scored; KL divergence statistics need at least 100 "
                          f"(use a longer text or a smaller n_ctx)")
    n = sums.count
    log_ppl, log_ppl_err = _mean_and_uncertainty(sums.nll, sums.nll2, n)
    log_base, log_base_err = _mean_and_uncertainty(sums.nll_base, sums.nll_base2, n)
    cov = _covariance(sums.nll, sums.nll_base, sums.nll_nll_base, n)
    ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
    ppl_err, ppl_base_err = ppl * log_ppl_err, ppl_base * log_base_err
    ratio = log_ppl - log_base
    ratio_err = math.sqrt(max(log_ppl_err ** 2 + log_base_err ** 2 - 2 * cov, 0.0))
    ppl_cov = ppl * ppl_base * cov
    kld, kld_err = _mean_and_uncertainty(sums.kld, sums.kld2, n)
    dp, dp_err = _mean_and_uncertainty(sums.p_diff, sums.p_diff2, n)
    mse, mse_err = _mean_and_uncertainty(sums.p_diff2, sums.p_diff4, n)
    rms = math.sqrt(mse)
    same = sums.n_same_top / n
    k, d = np.sort(klds), np.sort(p_diffs)
    pk, pd = (lambda f: _percentile(k, f)), (lambda f: _percentile(d, f))
    return KLDivergence(
        n_chunks=n_chunks, n_ctx=n_ctx, count=n, ppl=ppl, ppl_err=ppl_err, ppl_base=ppl_base,
        ppl_base_err=ppl_base_err,
        cor_ln_ppl=cov / (log_ppl_err * log_base_err) if log_ppl_err and log_base_err else 0.0,
        ln_ppl_ratio=ratio, ln_ppl_ratio_err=ratio_err, ppl_ratio=math.exp(ratio),
        ppl_ratio_err=math.exp(ratio) * ratio_err, ppl_diff=ppl - ppl_base,
        ppl_diff_err=math.sqrt(max(ppl_err ** 2 + ppl_base_err ** 2 - 2 * ppl_cov, 0.0)),
        kld=kld, kld_err=kld_err, kld_max=float(k[-1]), kld_99_9=pk(0.999), kld_99=pk(0.99), kld_95=pk(0.95),
        kld_90=pk(0.9), kld_median=_median(k), kld_10=pk(0.1), kld_5=pk(0.05), kld_1=pk(0.01),
        kld_0_1=pk(0.001), kld_min=float(k[0]),
        dp_mean=dp, dp_mean_err=dp_err, dp_max=float(d[-1]), dp_99_9=pd(0.999), dp_99=pd(0.99), dp_95=pd(0.95),
        dp_90=pd(0.9), dp_75=pd(0.75), dp_median=_median(d), dp_25=pd(0.25), dp_10=pd(0.1), dp_5=pd(0.05),
        dp_1=pd(0.01), dp_0_1=pd(0.001), dp_min=float(d[0]),
        rms_dp=rms, rms_dp_err=0.5 / rms * mse_err if rms else 0.0,
        same_top_p=same, same_top_p_err=math.sqrt(same * (1 - same) / (n - 1)))


# ---- evaluating chunks ----

def _tokens(model, text: str, n_ctx: int) -> np.ndarray:
    tokens = np.array(model.tokenize(text, add_special=True), np.int32)
    if len(tokens) < 2 * n_ctx:
        raise NibbleError(f"the text has {len(tokens)} tokens; KL divergence with n_ctx={n_ctx} needs at least "
                          f"{2 * n_ctx} (two chunks)")
    return tokens[:len(tokens) // n_ctx * n_ctx]


def save_base(model, text: str, path: str | os.PathLike, n_ctx: int = 512,
              progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Evaluate `text` with the base `model` and save its log-probabilities to `path` in llama-perplexity's
    format (written to a temporary name, renamed when complete). Returns the base's perplexity."""
    tokens = _tokens(model, text, n_ctx)
    n_chunks = len(tokens) // n_ctx
    n_vocab = model.n_vocab
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    nll = nll2 = 0.0
    count = 0
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + np.array([n_ctx, n_vocab, n_chunks], np.int32).tobytes() + tokens.tobytes())
            for c, chunk in chunks(model, tokens, n_ctx, "KL divergence"):
                targets = chunk[n_ctx // 2 + 1:]
                parts = []

                def consume(index, logits, targets=targets, parts=parts):
                    nonlocal nll, nll2, count
                    rows, v = compress_log_probs(logits, targets[index:index + len(logits)])
                    parts.append(rows)
                    nll += v.sum()
                    nll2 += (v * v).sum()
                    count += len(v)
                scored_logits(model, chunk, consume)
                for rows in parts:
                    f.write(rows.tobytes())
                if progress:
                    progress(c + 1, n_chunks)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        model.reset(0)
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    return Perplexity(ppl, math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0,
                      n_chunks, n_ctx, count)


def read_base_header(path: str | os.PathLike) -> tuple[int, int, int, np.ndarray]:
    """(n_ctx, n_vocab, n_chunks, tokens) of a saved base file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(8) != MAGIC:
                raise NibbleError(f"{path} does not look like a file of log-probabilities (no '_logits_' header)")
            n_ctx, n_vocab, n_chunks = (int(v) for v in np.frombuffer(f.read(12), np.int32))
            tokens = np.frombuffer(f.read(4 * n_ctx * n_chunks), np.int32)
    except OSError as e:
        raise NibbleError(f"cannot read {path}: {e.strerror or e}") from None
    if len(tokens) != n_ctx * n_chunks:
        raise NibbleError(f"{path} is truncated: it holds {len(tokens)} of {n_ctx * n_chunks} tokens")
    return n_ctx, n_vocab, n_chunks, tokens


def kl_divergence_from_file(model, base_path: str | os.PathLike,
                            progress: Callable[[int, int], None] | None = None) -> KLDivergence:
    """Compare `model` with the base saved in `base_path` (by `save_base` or llama-perplexity), over the
    tokens stored there."""
    n_ctx, n_vocab, n_chunks, tokens = read_base_header(base_path)
    if n_vocab != model.n_vocab:
        raise NibbleError(f"{base_path} was saved for a vocabulary of {n_vocab} tokens; {model.name} has "
                          f"{model.n_vocab}")
    nv = row_width(n_vocab)
    n_scored = n_ctx - 1 - n_ctx // 2
    offset = 8 + 12 + 4 * len(tokens)
    data = np.memmap(base_path, np.uint16, mode="r", offset=offset)
    if data.size < n_chunks * n_scored * nv:
        raise NibbleError(f"{base_path} is truncated: it holds {data.size} of {n_chunks * n_scored * nv} values")
    base = data[:n_chunks * n_scored * nv].reshape(n_chunks, n_scored, nv)
    return _compare(model, tokens, n_ctx, lambda c: np.asarray(base[c]), progress)


def kl_divergence(base_model, model, text: str, n_ctx: int = 512,
                  progress: Callable[[int, int], None] | None = None) -> KLDivergence:
    """Compare `model` with `base_model` on `text`, chunk by chunk, without a file (the base's rows are
    compressed exactly as the file would hold them, so the figures are those of the two-run method)."""
    tokens = _tokens(base_model, text, n_ctx)
    if model.n_vocab != base_model.n_vocab:
        raise NibbleError(f"{model.name} has {model.n_vocab} tokens in its vocabulary, {base_model.name} "
                          f"{base_model.n_vocab}: their distributions cannot be compared")
    base_chunks = dict(chunks(base_model, tokens, n_ctx, "KL divergence"))

    def base_rows(c):
        chunk = base_chunks[c]
        targets = chunk[n_ctx // 2 + 1:]
        parts = []
        scored_logits(base_model, chunk,
                       lambda index, logits: parts.append(compress_log_probs(logits, targets[index:index + len(logits)])[0]))
        base_model.reset(0)
        return np.concatenate(parts)
    return _compare(model, tokens, n_ctx, base_rows, progress)


def _compare(model, tokens: np.ndarray, n_ctx: int, base_rows: Callable[[int], np.ndarray],
             progress: Callable[[int, int], None] | None) -> KLDivergence:
    n_chunks = len(tokens) // n_ctx
    sums = _Sums()
    klds, p_diffs = [], []
    try:
        for c, chunk in chunks(model, tokens, n_ctx, "KL divergence"):
            base = base_rows(c)
            targets = tokens[c * n_ctx + n_ctx // 2 + 1:(c + 1) * n_ctx]

            def consume(index, logits, base=base, targets=targets):
                k, d = compare_rows(logits, base[index:index + len(logits)], targets[index:index + len(logits)], sums)
                klds.append(k)
                p_diffs.append(d)
            scored_logits(model, chunk, consume)
            if progress:
                progress(c + 1, n_chunks)
    finally:
        model.reset(0)
    return _statistics(sums, np.concatenate(klds), np.concatenate(p_diffs), n_chunks, n_ctx)
