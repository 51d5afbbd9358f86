"""llama.cpp's own arithmetic for Q4_1 and Q8_0 matmuls, reproduced bit for bit (its x86 AVX2 + FMA build).

Why bit for bit. SmolLM2's activations are large enough that one 8-bit activation block whose rounding flips
moves the logits by NMSE ~5e-3, ten times the bar; an exact float64 forward misses llama.cpp's logits by more
than llama.cpp's own rounding does. So for the formats SmolLM2 uses we do what ggml does, in ggml's order:

    activations  quantize_row_q8_1 / q8_0 (x86): per 32-block d = amax / 127 (f32), q = round-half-even(x *
                 (127 / amax)); d is stored as fp16, and Q8_1's s = fp16(d * Σ q) (f32 d, before rounding).
    Q4_1 · Q8_1  ggml_vec_dot_q4_1_q8_1: 8 f32 lanes, lane j the exact integer sum over block elements
                 4j..4j+3; per block in order acc = fma(f32(d_w * d_x), isum, acc), summs = fma(m_w, s_x, summs);
                 result hsum(acc) + summs.
    Q8_0 · Q8_0  ggml_vec_dot_q8_0_q8_0 (decode) and tinyBLAS_Q0_AVX (prefill) do the same: lanes and fma as
                 above, no summs.
    hsum(a)      hsum_float_8: ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3)).

Every output row is that one dot product whatever the batch size (ggml's generic mul_mat for Q4_1 calls the
vec_dot per (row, column); tinyBLAS keeps one accumulator per output), so `matvec` and `gemm` give the same
bits for the same row. The kernels here are compiled without fast-math: reassociation or contraction would
change the order that makes them exact. Other helpers here (`fma1`, `round_f16`, `v_expf`) serve
`runtime.ops`, which reproduces the non-matmul kernels the same way.

    matvec(out, x, xq, xs, w, qtype, m, k)     out[m] = W @ x          qtype Q4_1 or Q8_0
    gemm(out, x, xq, xs, w, qtype, m, k)       out[n, m] = x @ W.T

Scratch: xq int8 (k,) / (n, k) and xs f32 (k // 16,) / (n, k // 16) as in `quant.kernels`; here xs[2b] is the
fp16-rounded scale of block b and xs[2b + 1] the fp16-rounded Q8_1 sum.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import exact_kernel, exact_parallel_kernel
from .simd import F32x8, bytes32, dot_i8, dot_u8, load_f16, nibbles16, splat, to_f32, zeros

f32 = np.float32
Q4_1, Q8_0 = 3, 8
EXACT_TYPES = (Q4_1, Q8_0)

# nibble's options with fast-math off: the order of every f32 operation is the point of this module.
SERIAL_WEIGHTS = 1 << 16     # a matvec below this many weights runs on the calling thread
TASK_ROWS = 16               # weight rows per parallel task

# ---- intrinsics: fused multiply-add that is always fused, a horizontal sum in ggml's order, bit casts ----

_F32, _I32 = ir.FloatType(), ir.IntType(32)
_V8 = ir.VectorType(_F32, 8)


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


@intrinsic
def fma8(typingctx, a, b, c):
    """a * b + c per lane with one rounding (llvm.fma: vfmadd on x86, a correct software fma elsewhere).
    simd.fma is llvm.fmuladd, which LLVM may leave unfused; exactness needs the fused form."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.v8f32", _V8, list(args))
    return F32x8(F32x8, F32x8, F32x8), codegen


@intrinsic
def fma1(typingctx, a, b, c):
    """float32 a * b + c with one rounding."""
    def codegen(context, builder, sig, args):
        ops = [context.cast(builder, v, t, types.float32) for v, t in zip(args, sig.args)]
        return _call(builder, "llvm.fma.f32", _F32, ops)
    return types.float32(a, b, c), codegen


def _lane(builder, v, i):
    return builder.extract_element(v, ir.Constant(_I32, i))


@intrinsic
def hsum8(typingctx, v):
    """ggml's hsum_float_8, in its order: ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3)), plain f32 adds."""
    def codegen(context, builder, sig, args):
        a = [_lane(builder, args[0], i) for i in range(8)]
        r = [builder.fadd(a[4 + i], a[i]) for i in range(4)]
        return builder.fadd(builder.fadd(r[0], r[2]), builder.fadd(r[1], r[3]))
    return types.float32(F32x8), codegen


@intrinsic
def hsum8_hadd(typingctx, v):
    """The last steps of GGML_F32x8_REDUCE (ggml_vec_dot_f16): t_l = a_l + a_{l+4}, then two hadds:
    (t0 + t1) + (t2 + t3)."""
    def codegen(context, builder, sig, args):
        a = [_lane(builder, args[0], i) for i in range(8)]
        t = [builder.fadd(a[i], a[4 + i]) for i in range(4)]
        return builder.fadd(builder.fadd(t[0], t[1]), builder.fadd(t[2], t[3]))
    return types.float32(F32x8), codegen


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of a float32, as int64 in 0 .. 2**32 - 1."""
    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        return builder.zext(builder.bitcast(v, _I32), ir.IntType(64))
    return types.int64(x), codegen


@intrinsic
def bits_f32(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of an integer."""
    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.int64)
        return builder.bitcast(builder.trunc(v, _I32), _F32)
    return types.float32(bits), codegen


@exact_kernel
def round_f16(x):
    """x rounded to the nearest IEEE half (ties to even), returned as float32: GGML_FP32_TO_FP16 then back,
    as F16C's vcvtps2ph does it. Plain integer arithmetic, so no F16C and no runtime library is needed."""
    bits = f32_bits(x)
    a = bits & 0x7FFFFFFF
    sign = bits & 0x80000000
    if a >= 0x7F800000:                      # inf, nan
        return x
    if a >= 0x477FF000:                      # rounds past the largest half (65504)
        return bits_f32(sign | 0x7F800000)
    if a < 0x38800000:                       # below 2^-14: a half subnormal, a multiple of 2^-24
        y = bits_f32(a)
        # f32 addition rounds to nearest even; in [0.5, 1) the f32 spacing is exactly 2^-24
        r = (y + f32(0.5)) - f32(0.5)
        return bits_f32(f32_bits(r) | sign)
    # normal: keep 10 of the 23 mantissa bits, round half to even (a carry may bump the exponent)
    a = (a + 0xFFF + ((a >> 13) & 1)) & ~0x1FFF
    return bits_f32(a | sign)


# ggml_v_expf (ggml-cpu/vec.h, AVX2 + FMA): ARM's optimized-routines expf, elementwise
_EXP_R = f32(float.fromhex("0x1.8p23"))
_EXP_LOG2E = f32(float.fromhex("0x1.715476p+0"))
_EXP_LN2_HI = f32(float.fromhex("0x1.62e4p-1"))
_EXP_LN2_LO = f32(float.fromhex("0x1.7f7d1cp-20"))
_EXP_C0 = f32(float.fromhex("0x1.0e4020p-7"))
_EXP_C1 = f32(float.fromhex("0x1.573e2ep-5"))
_EXP_C2 = f32(float.fromhex("0x1.555e66p-3"))
_EXP_C3 = f32(float.fromhex("0x1.fffdb6p-2"))
_EXP_C4 = f32(float.fromhex("0x1.ffffecp-1"))


@exact_kernel
def v_expf(x):
    """e^x for float32 x exactly as one lane of ggml_v_expf computes it (each lane is independent of the
    others: the vector's "any lane out of range" branch gives in-range lanes the same fma(k, j, k))."""
    z = fma1(x, _EXP_LOG2E, _EXP_R)
    n = z - _EXP_R
    b = fma1(-n, _EXP_LN2_LO, fma1(-n, _EXP_LN2_HI, x))
    e = (f32_bits(z) << 23) & 0xFFFFFFFF
    k = bits_f32(e + 0x3F800000)
    u = b * b
    j = fma1(fma1(fma1(_EXP_C0, b, _EXP_C1), u, fma1(_EXP_C2, b, _EXP_C3)), u, _EXP_C4 * b)
    if not abs(n) > f32(126):
        return fma1(k, j, k)
    g = 0x82000000 if n <= f32(0) else 0
    s1 = bits_f32(g + 0x7F000000)
    s2 = bits_f32(e - g)
    if abs(n) > f32(192):
        return s1 * s1
    return fma1(s2, j, s2) * s1


# ---- activations ----

@exact_kernel
def quantize_q8(x, xq, xs):
    """x f32[k] -> xq int8[k], xs[2b] = fp16(d), xs[2b + 1] = fp16(d * Σ q): quantize_row_q8_1 (x86), whose
    quants and d are also quantize_row_q8_0's. k a multiple of 32."""
    for b in range(x.size // 32):
        amax = f32(0)
        for j in range(32):
            amax = max(amax, abs(x[32 * b + j]))
        d = amax / f32(127)
        inv = f32(127) / amax if amax != f32(0) else f32(0)
        total = 0
        for j in range(32):
            q = np.int32(np.rint(x[32 * b + j] * inv))
            xq[32 * b + j] = np.int8(q)
            total += q
        xs[2 * b] = round_f16(d)
        xs[2 * b + 1] = round_f16(d * f32(total))


# ---- dot products: one output row at a time, two rows interleaved so their fma chains overlap ----

@exact_kernel
def _rows_q4_1(out, xq, xs, w, r0, r1, nb):
    # block: d f16 | m f16 | 16 bytes of nibbles (low nibbles elements 0..15, high 16..31): 20 bytes
    r = r0
    while r < r1:
        two = r + 1 < r1
        p0 = r * nb * 20
        p1 = p0 + nb * 20 if two else p0
        a0, a1 = zeros(), zeros()
        s0, s1 = f32(0), f32(0)
        for b in range(nb):
            dx, sx = xs[2 * b], xs[2 * b + 1]
            a0 = fma8(splat(load_f16(w, p0) * dx), to_f32(dot_u8(nibbles16(w, p0 + 4), xq, 32 * b)), a0)
            s0 = fma1(load_f16(w, p0 + 2), sx, s0)
            a1 = fma8(splat(load_f16(w, p1) * dx), to_f32(dot_u8(nibbles16(w, p1 + 4), xq, 32 * b)), a1)
            s1 = fma1(load_f16(w, p1 + 2), sx, s1)
            p0 += 20
            p1 += 20
        out[r] = hsum8(a0) + s0
        if two:
            out[r + 1] = hsum8(a1) + s1
        r += 2


@exact_kernel
def _rows_q8_0(out, xq, xs, w, r0, r1, nb):
    # block: d f16 | 32 int8: 34 bytes. One row at a time: the output matrix (tied to the 30 MB embedding)
    # streams from memory, and interleaving rows measured 3x slower there.
    for r in range(r0, r1):
        p = r * nb * 34
        acc = zeros()
        for b in range(nb):
            acc = fma8(splat(load_f16(w, p) * xs[2 * b]), to_f32(dot_i8(bytes32(w, p + 2), xq, 32 * b)), acc)
            p += 34
        out[r] = hsum8(acc)


@exact_kernel
def _rows(out, xq, xs, w, qtype, r0, r1, k):
    if qtype == Q4_1:
        _rows_q4_1(out, xq, xs, w, r0, r1, k // 32)
    else:
        _rows_q8_0(out, xq, xs, w, r0, r1, k // 32)


@exact_parallel_kernel
def matvec(out, x, xq, xs, w, qtype, m, k):
    """out f32[m] = W @ x for W the (m, k) Q4_1 or Q8_0 tensor in bytes `w`, as ggml_vec_dot_q4_1_q8_1 /
    ggml_vec_dot_q8_0_q8_0 compute each row. xq int8[k], xs f32[k // 16]: scratch."""
    quantize_q8(x, xq, xs)
    if m * k <= SERIAL_WEIGHTS:
        _rows(out, xq, xs, w, qtype, 0, m, k)
        return
    for t in prange((m + TASK_ROWS - 1) // TASK_ROWS):
        _rows(out, xq, xs, w, qtype, t * TASK_ROWS, min(m, (t + 1) * TASK_ROWS), k)


@exact_parallel_kernel
def gemm(out, x, xq, xs, w, qtype, m, k):
    """out f32[n, m] = x @ W.T, each element the same dot product `matvec` computes (ggml's results do not
    depend on the batch). xq int8[n, k], xs f32[n, k // 16]: scratch. Parallel over tiles of weight rows;
    a tile (a few KiB) stays in L1 while every activation row passes over it."""
    n = x.shape[0]
    for i in prange(n):
        quantize_q8(x[i], xq[i], xs[i])
    n_tiles = (m + TASK_ROWS - 1) // TASK_ROWS
    for t in prange(n_tiles):
        r0 = t * TASK_ROWS
        r1 = min(m, r0 + TASK_ROWS)
        for i in range(n):
            _rows(out[i], xq[i], xs[i], w, qtype, r0, r1, k)
