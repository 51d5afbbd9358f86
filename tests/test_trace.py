"""`model.trace` and `nibble trace`: the intermediate tensors of a forward under llama.cpp's node names, and
their comparison (fast path against forward_reference, two quantizations, two thread counts)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import nibble
from nibble.runtime import trace as tr

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(pulled):
    with nibble.load(pulled("smollm2-135m"), n_ctx=256) as m:
        yield m


def test_names_follow_llama_cpp_in_forward_order(smollm2):
    ids = smollm2.tokenize(PROMPT)
    t = smollm2.trace(ids)
    names = list(t)
    layer0 = ["attn_norm-0", "Qcur-0", "Kcur-0", "Vcur-0", "kqv_out-0", "attn_out-0", "ffn_inp-0", "ffn_norm-0",
              "ffn_out-0", "l_out-0"]
    assert names[:11] == ["inp_embd"] + layer0
    assert names[-2:] == ["result_norm", "result_output"]
    assert len(names) == 1 + 10 * smollm2.args.n_layers + 2
    a = smollm2.args
    assert t["Qcur-3"].shape == (len(ids), a.q_dim) and t["Kcur-3"].shape == (len(ids), a.kv_dim)
    assert t["result_output"].shape == (len(ids), a.n_vocab)
    assert all(x.dtype == np.float32 for x in t.values())
    # the reference forward records the same names with the same shapes
    ref = smollm2.trace(ids, reference=True)
    assert list(ref) == names
    assert all(ref[k].shape == t[k].shape for k in names)


def test_traced_forward_gives_the_untraced_logits_bit_for_bit(smollm2):
    ids = smollm2.tokenize("Once upon a time, in a small village by the sea,")
    t = smollm2.trace(ids)
    assert np.array_equal(t["result_output"], smollm2.logits(ids))
    # and tracing leaves the model as an evaluation would: slot 0 holds the ids
    assert smollm2.cached_tokens() == ids


def test_fast_path_against_reference(smollm2):
    """Layer by layer (each reference layer started from the fast path's input to it), every tensor of the
    fast path is within NMSE 1e-3 of the float64 reference; run freely, the reference also carries what
    every earlier layer's rounding left, which compounds past 1e-3 by the middle layers."""
    ids = smollm2.tokenize("The capital of France is Paris, and the capital of Germany is")
    fast = smollm2.trace(ids)
    rows = tr.diff(fast, smollm2.trace(ids, reference=True))
    assert all(r.nmse is not None for r in rows)
    assert rows[0].name == "inp_embd" and rows[0].nmse == 0          # the same embedding rows
    worst = tr.largest(rows)
    assert worst.nmse == max(r.nmse for r in rows) < 1e-3 and tr.first_over(rows) is None
    free = tr.diff(fast, smollm2.trace(ids, reference=True, per_layer=False))
    assert tr.first_over(free) is not None and tr.largest(free).nmse > worst.nmse


def test_reference_rounds_activations_as_the_kernels_do(smollm2):
    """`quant.round_activations` is the reference's model of the kernels' 8-bit activations: a matmul
    through it agrees with the fast kernel for every weight type in the model (to float32 rounding for
    Q8_0; Q4_1 also rounds each block's sum to fp16, ~1e-6), fifty times closer than the unrounded product."""
    from nibble import quant
    layer = smollm2.engine.weights.layers[0]
    x = smollm2.trace(smollm2.tokenize(PROMPT))["attn_norm-0"]
    for lin in (layer.wq, layer.ffn_up, smollm2.engine.weights.output):
        w = lin.dequantize().astype(np.float64)
        fast = quant.matmul(x, lin.data, lin.qtype, (lin.m, lin.k))
        err = lambda ref: float(((fast - ref) ** 2).sum() / (ref ** 2).sum())
        rounded, unrounded = err(quant.round_activations(x, lin.qtype) @ w.T), err(x.astype(np.float64) @ w.T)
        assert rounded < 1e-5 and 50 * rounded < unrounded, (lin.name, rounded, unrounded)


def test_thread_count_does_not_change_a_bit(pulled):
    path = pulled("smollm2-135m")
    with nibble.load(path, n_ctx=64, threads=1) as one, nibble.load(path, n_ctx=64, threads=2) as two:
        ids = one.tokenize(PROMPT)
        a, b = one.trace(ids), two.trace(ids)
    assert list(a) == list(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert all(r.nmse == 0 and r.max_abs == 0 for r in tr.diff(a, b))


def requantize_q4_0(src, dst):
    """Copy a GGUF with every layer matrix re-quantized to Q4_0 from its dequantized values (metadata, norms
    and the embedding copied as they are)."""
    import gguf
    from nibble import quant
    from nibble.formats.gguf import ARRAY, GGUFFile

    g = GGUFFile(src)
    w = gguf.GGUFWriter(str(dst), g.architecture)
    for key, f in g.fields.items():
        if key == "general.architecture":
            continue
        if f.type == ARRAY:
            value = f.value.tolist() if isinstance(f.value, np.ndarray) else f.value
            w.add_key_value(key, value, gguf.GGUFValueType(f.type), gguf.GGUFValueType(f.item_type))
        else:
            w.add_key_value(key, f.value, gguf.GGUFValueType(f.type))
    for name, t in g.tensors.items():
        if name.startswith("blk.") and len(t.shape) == 2:
            values = quant.dequantize(t.data, t.qtype, t.shape)
            w.add_tensor(name, quant.quantize(values, gguf.GGMLQuantizationType.Q4_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor(name, np.array(t.data).reshape(*t.shape[:-1], -1),
                         raw_dtype=gguf.GGMLQuantizationType(t.qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_cli_trace_and_diff_of_two_quantizations(pulled, cli, tmp_path):
    src = pulled("smollm2-135m")
    q4_0 = requantize_q4_0(src, tmp_path / "smollm2-q4_0.gguf")
    a, b = tmp_path / "q4_1.npz", tmp_path / "q4_0.npz"
    for model, out in [(src, a), (q4_0, b)]:
        r = cli("trace", str(model), PROMPT, "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert out.exists() and str(out) in r.stdout
    tensors, meta = tr.load(a)
    assert meta["tokens"] == tr.load(b)[1]["tokens"] and meta["path"] == str(src)
    assert "result_output" in tensors

    r = cli("trace", "--diff", str(a), str(b), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report) == {"a", "b", "threshold", "tensors", "first_over", "largest"}
    names = [t["name"] for t in report["tensors"]]
    assert names[0] == "inp_embd" and names[-1] == "result_output"
    assert report["tensors"][0]["nmse"] == 0                         # the embedding was not re-quantized
    first = report["first_over"]
    assert first is not None and first != "inp_embd"
    assert names.index(first) < names.index("l_out-0") + 10          # the first layers already diverge

    r = cli("trace", "--diff", str(a), str(b))
    assert r.returncode == 0, r.stderr
    assert f"first over" in r.stdout and first in r.stdout


def test_cli_fast_path_against_reference_names_the_largest(pulled, cli, tmp_path):
    src = pulled("smollm2-135m")
    fast, ref = tmp_path / "fast.npz", tmp_path / "ref.npz"
    assert cli("trace", str(src), PROMPT, "--out", str(fast)).returncode == 0
    r = cli("trace", str(src), PROMPT, "--out", str(ref), "--reference")
    assert r.returncode == 0, r.stderr
    r = cli("trace", "--diff", str(fast), str(ref), "--json")          # the default threshold, 1e-3
    report = json.loads(r.stdout)
    assert report["threshold"] == 1e-3 and report["first_over"] is None
    assert report["largest"] == max(report["tensors"], key=lambda t: t["nmse"])["name"]
    r = cli("trace", "--diff", str(fast), str(ref))
    assert f"largest NMSE: {report['largest']}" in r.stdout


def test_cli_trace_errors(cli, tmp_path, pulled):
    r = cli("trace", "--diff", str(tmp_path / "missing.npz"), str(tmp_path / "also.npz"))
    assert r.returncode == 1 and "error:" in r.stderr
    r = cli("trace", str(pulled("smollm2-135m")), PROMPT)
    assert r.returncode != 0 and "--out" in r.stderr


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_every_architecture_traces_both_forwards(tiny_gguf, arch):
    with nibble.load(tiny_gguf(arch), n_ctx=32) as m:
        ids = list(range(7))
        fast, ref = m.trace(ids), m.trace(ids, reference=True)
        assert np.array_equal(fast["result_output"], m.logits(ids))
    assert list(fast) == list(ref)
    assert list(fast)[0] == ("inp_scaled" if arch == "gemma3" else "inp_embd")
    assert "l_out-1" in fast and list(fast)[-2:] == ["result_norm", "result_output"]
    assert max(r.nmse for r in tr.diff(fast, ref)) < 1e-3
