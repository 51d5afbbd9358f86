"""llama.cpp's own arithmetic for Q4_1, Q5_0, Q8_0, Q4_K and Q6_K matmuls, reproduced bit for bit (its x86
AVX2 + FMA build, the kernels it picks on such a CPU).

Why bit for bit. SmolLM2's activations are large enough that one 8-bit activation block whose rounding flips
moves the logits by NMSE ~5e-3, ten times the bar; Gemma 3's greedy continuations flip on such differences
too. So we do what ggml does, in ggml's order:

    activations  quantize_row_q8_1 / q8_0 (x86): per 32-block d = amax / 127 (f32), q = round-half-even(x *
                 (127 / amax)); d is stored as fp16, and Q8_1's s = fp16(d * Σ q) (f32 d, before rounding).
                 q8_K (K-quants): per 256-block, see `quantize_q8_k` (two roundings, by kernel).
    Q4_1 · Q8_1  ggml_vec_dot_q4_1_q8_1: 8 f32 lanes, lane j the exact integer sum over block elements
                 4j..4j+3; per block in order acc = fma(f32(d_w * d_x), isum, acc), summs = fma(m_w, s_x, summs);
                 result hsum(acc) + summs.
    Q8_0, Q5_0   ggml_vec_dot_q8_0_q8_0 / q5_0_q8_0 (one row) and tinyBLAS_Q0_AVX (batches) do the same:
                 lanes and fma as above, no summs (Q5_0's q = nibble | fifth bit << 4, minus 16).
    Q4_K · Q8_K  repacked at load (q4_K_8x8_q8_K): exact integers per super-block (gemv) or per 64 values
                 (gemm: activation rows in groups of 4), folded in by one scalar fma each (`_rows_q4_k`).
    Q6_K · Q8_K  ggml_vec_dot_q6_K_q8_K below 8 activation rows (8 int lanes), ggml's tiled kernel from 8
                 (an exact integer per super-block) (`_rows_q6_k`).
    hsum(a)      hsum_float_8: ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3)).

So an output row's bits depend on the batch size only where ggml's kernel choice does (Q4_K, Q6_K); `gemm`
takes the batch into account. The kernels here are compiled without fast-math: reassociation or contraction
would change the order that makes them exact. Other helpers here (`fma1`, `round_f16`, `v_expf`) serve
`runtime.ops`, which reproduces the non-matmul kernels the same way.

    matvec(out, x, xq, xs, w, qtype, m, k)     out[m] = W @ x          qtype one of EXACT_TYPES
    gemm(out, x, xq, xs, w, qtype, m, k)       out[n, m] = x @ W.T

Scratch: xq int8 (k,) / (n, k) and xs f32 (k // 16,) / (n, k // 16) as in `quant.kernels`; for 32-blocks
xs[2b] is the fp16-rounded scale of block b and xs[2b + 1] the fp16-rounded Q8_1 sum; for q8_K see
`quantize_q8_k`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import exact_kernel, exact_parallel_kernel
from .simd import (USE_PMADDUBSW, F32x8, I32x8, bits32, bytes32, dot_i8, dot_u8, load_f16, load_f32x8, load_i8,
                   load_u8, load_u32, nibbles16, splat, to_f32, zeros)

f32 = np.float32
Q4_1, Q5_0, Q8_0, Q4_K, Q6_K = 3, 6, 8, 12, 14
EXACT_TYPES = (Q4_1, Q5_0, Q8_0, Q4_K, Q6_K)
QK_K = 256
TILED_MIN_ROWS = 8           # ggml's tiled K-quant matmul takes batches of 8+ rows (ggml_tiled_min_batch)

# nibble's options with fast-math off: the order of every f32 operation is the point of this module.
SERIAL_WEIGHTS = 1 << 16     # a matvec below this many weights runs on the calling thread
TASK_ROWS = 16               # weight rows per parallel task
X_BLOCK_BYTES = 3 << 18      # gemm: activation bytes (int8) per parallel task, to stay in L2

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


_V8I = ir.VectorType(_I32, 8)


def _splat_i32(builder, v):
    vec = builder.insert_element(ir.Constant(_V8I, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(_V8I, ir.Undefined), ir.Constant(_V8I, [0] * 8))


@intrinsic
def izeros(typingctx):
    """I32x8 of zeros."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_V8I, [0] * 8)
    return I32x8(), codegen


@intrinsic
def iadd(typingctx, a, b):
    """a + b per int32 lane (exact: every sum here stays far inside int32)."""
    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])
    return I32x8(I32x8, I32x8), codegen


@intrinsic
def imul_halves(typingctx, v, a, b):
    """v * [a, a, a, a, b, b, b, b] per int32 lane: a scale per 16-value half, as the lanes of `dot_u8` lie."""
    def codegen(context, builder, sig, args):
        lo = _splat_i32(builder, context.cast(builder, args[1], sig.args[1], types.int32))
        hi = _splat_i32(builder, context.cast(builder, args[2], sig.args[2], types.int32))
        s = builder.shuffle_vector(lo, hi, ir.Constant(_V8I, [0, 1, 2, 3, 8, 9, 10, 11]))
        return builder.mul(args[0], s)
    return I32x8(I32x8, a, b), codegen


@intrinsic
def imul(typingctx, v, a):
    """v * a per int32 lane."""
    def codegen(context, builder, sig, args):
        return builder.mul(args[0], _splat_i32(builder, context.cast(builder, args[1], sig.args[1], types.int32)))
    return I32x8(I32x8, a), codegen


@intrinsic
def isub_lanes(typingctx, v, arr):
    """v - arr[0:8] per int32 lane, arr an int32 array."""
    def codegen(context, builder, sig, args):
        ptr = cgutils.create_struct_proxy(sig.args[1])(context, builder, value=args[1]).data
        vp = builder.bitcast(ptr, _V8I.as_pointer())
        return builder.sub(args[0], builder.load(vp, align=4))
    return I32x8(I32x8, arr), codegen


@intrinsic
def isum(typingctx, v):
    """Σ of the 8 int32 lanes (exact: the sums here stay inside int32), as int64."""
    def codegen(context, builder, sig, args):
        v = args[0]
        for width in (4, 2, 1):
            v = builder.add(v, builder.shuffle_vector(v, v, ir.Constant(_V8I, [(j + width) % 8 for j in range(8)])))
        return builder.sext(_lane(builder, v, 0), ir.IntType(64))
    return types.int64(I32x8), codegen


@intrinsic
def isum4(typingctx, v0, v1, v2, v3):
    """F32x8 [Σv0, Σv1, Σv2, Σv3] * 2: each vector's 8 int32 lanes summed exactly (the sums stay inside int32),
    then converted to float32 (rounding as cvtdq2ps does)."""
    def codegen(context, builder, sig, args):
        def pairs(a, b):
            ev = builder.shuffle_vector(a, b, ir.Constant(_V8I, list(range(0, 16, 2))))
            od = builder.shuffle_vector(a, b, ir.Constant(_V8I, list(range(1, 16, 2))))
            return builder.add(ev, od)
        t01, t23 = pairs(args[0], args[1]), pairs(args[2], args[3])     # [v0 pairs, v1 pairs], [v2.., v3..]
        u = pairs(t01, t23)                                              # quads: v0 v0 v1 v1 v2 v2 v3 v3
        w = pairs(u, u)                                                  # v0 v1 v2 v3 v0 v1 v2 v3
        return builder.sitofp(w, _V8)
    return F32x8(I32x8, I32x8, I32x8, I32x8), codegen


@intrinsic
def f32x4(typingctx, a, b, c, d):
    """F32x8 [a, b, c, d, a, b, c, d]."""
    def codegen(context, builder, sig, args):
        v = ir.Constant(_V8, ir.Undefined)
        for j in range(8):
            x = context.cast(builder, args[j % 4], sig.args[j % 4], types.float32)
            v = builder.insert_element(v, x, ir.Constant(_I32, j))
        return v
    return F32x8(a, b, c, d), codegen


@intrinsic
def isum8(typingctx, v0, v1, v2, v3, v4, v5, v6, v7):
    """F32x8 [Σv0, ..., Σv7]: each vector's 8 int32 lanes summed exactly (the sums stay inside int32), then
    converted to float32 (rounding as cvtdq2ps does); `isum4` for eight rows."""
    def codegen(context, builder, sig, args):
        def pairs(a, b):
            ev = builder.shuffle_vector(a, b, ir.Constant(_V8I, list(range(0, 16, 2))))
            od = builder.shuffle_vector(a, b, ir.Constant(_V8I, list(range(1, 16, 2))))
            return builder.add(ev, od)
        t = [pairs(args[2 * i], args[2 * i + 1]) for i in range(4)]     # [v0 pairs, v1 pairs], ...
        u0, u1 = pairs(t[0], t[1]), pairs(t[2], t[3])                    # quads: v0 v0 v1 v1 v2 v2 v3 v3, ...
        return builder.sitofp(pairs(u0, u1), _V8)                        # v0 .. v7
    return F32x8(I32x8, I32x8, I32x8, I32x8, I32x8, I32x8, I32x8, I32x8), codegen


@intrinsic
def half_join(typingctx, a, b):
    """F32x8 [a0, a1, a2, a3, b0, b1, b2, b3]."""
    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], args[1], ir.Constant(_V8I, [0, 1, 2, 3, 8, 9, 10, 11]))
    return F32x8(F32x8, F32x8), codegen


@intrinsic
def get_lane(typingctx, v, j):
    """Lane j of an F32x8."""
    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], context.cast(builder, args[1], sig.args[1], types.int32))
    return types.float32(F32x8, j), codegen


@intrinsic
def f32x8_of(typingctx, a, b, c, d, e, f, g, h):
    """F32x8 [a, b, c, d, e, f, g, h]."""
    def codegen(context, builder, sig, args):
        v = ir.Constant(_V8, ir.Undefined)
        for j in range(8):
            v = builder.insert_element(v, context.cast(builder, args[j], sig.args[j], types.float32),
                                       ir.Constant(_I32, j))
        return v
    return F32x8(a, b, c, d, e, f, g, h), codegen


@intrinsic
def pair_sums_t(typingctx, p0, p1, p2, p3):
    """For F32x8 p_r (lanes j = 0..7): four F32x8 T_c = [p0[2c] + p0[2c+1], ..., p3[2c] + p3[2c+1]] * 2,
    c = 0..3 (plain f32 adds)."""
    def codegen(context, builder, sig, args):
        def pairs(a, b):
            ev = builder.shuffle_vector(a, b, ir.Constant(_V8I, list(range(0, 16, 2))))
            od = builder.shuffle_vector(a, b, ir.Constant(_V8I, list(range(1, 16, 2))))
            return builder.fadd(ev, od)
        q01, q23 = pairs(args[0], args[1]), pairs(args[2], args[3])     # [p0 c0..c3, p1 c0..c3], [p2.., p3..]
        out = [builder.shuffle_vector(q01, q23, ir.Constant(_V8I, [c, 4 + c, 8 + c, 12 + c] * 2)) for c in range(4)]
        return context.make_tuple(builder, sig.return_type, out)
    return types.UniTuple(F32x8, 4)(F32x8, F32x8, F32x8, F32x8), codegen


def _scaled_dot(context, builder, sig, args, signed):
    # lane l = s_{l // 4} · Σ_{j=4l}^{4l+3} q_j · xq[i + j], s_0 = sa, s_1 = sb: as ggml's K-quant kernels do it
    # on x86 (pmaddubsw to i16 pairs, then pmaddwd by the i16 scales; exact for the ranges used here)
    i8v, i16v = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16)
    arr = context.make_array(sig.args[1])(context, builder, args[1])
    x = builder.load(builder.bitcast(builder.gep(arr.data, [args[2]]), i8v.as_pointer()), align=1)
    q = args[0]
    lo = context.cast(builder, args[3], sig.args[3], types.int16)
    hi = context.cast(builder, args[4], sig.args[4], types.int16)
    scales = ir.Constant(i16v, ir.Undefined)
    for j in range(16):
        scales = builder.insert_element(scales, lo if j < 8 else hi, ir.Constant(_I32, j))
    if USE_PMADDUBSW:
        if signed:
            x = _call(builder, "llvm.x86.avx2.psign.b", i8v, [x, q])
            q = _call(builder, "llvm.abs.v32i8", i8v, [q, ir.Constant(ir.IntType(1), 0)])
        pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", i16v, [q, x])
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I, [pairs, scales])
    wq = builder.sext(q, ir.VectorType(_I32, 32)) if signed else builder.zext(q, ir.VectorType(_I32, 32))
    prod = builder.mul(wq, builder.sext(x, ir.VectorType(_I32, 32)))
    ev = lambda v, n, o: builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n // 2), list(range(o, n, 2))))
    pairs = builder.add(ev(prod, 32, 0), ev(prod, 32, 1))
    quads = builder.add(ev(pairs, 16, 0), ev(pairs, 16, 1))
    return builder.mul(quads, builder.sext(builder.shuffle_vector(scales, scales, ir.Constant(_V8I, list(range(0, 16, 2)))), _V8I))


@intrinsic
def dot_u8s(typingctx, q, xq, i, sa, sb):
    """I32x8: lane l = s · Σ_{j=4l}^{4l+3} q[j] · xq[i + j], s = sa for lanes 0..3 and sb for 4..7; q unsigned
    below 64 (pmaddubsw's pair sums stay below 2^15), xq int8."""
    def codegen(context, builder, sig, args):
        return _scaled_dot(context, builder, sig, args, False)
    return I32x8(q, xq, types.intp, sa, sb), codegen


@intrinsic
def dot_i8s(typingctx, q, xq, i, sa, sb):
    """`dot_u8s` with q signed (|q| <= 32)."""
    def codegen(context, builder, sig, args):
        return _scaled_dot(context, builder, sig, args, True)
    return I32x8(q, xq, types.intp, sa, sb), codegen


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


@exact_kernel
def _pack_bsums(a, b):
    # two 16-value sums (|Σ| <= 16 * 127 < 2048) in one float32, exactly: (a + 2048) * 4096 + (b + 2048) < 2^24
    return f32((a + 2048) * 4096 + (b + 2048))


@exact_kernel
def quantize_q8_k(x, xq, xs, fused, sums32):
    """x f32[k] -> xq int8[k] and, per 256-value super-block s, xs[16s] = d and the block sums the dot
    products need: with `sums32` (Q4_K) xs[16s + 1 + j] = Σ of 32-value group j, as float32 (exact); else
    (Q6_K) xs[16s + 1 + i] the 16-value sums of groups 2i and 2i + 1 packed for `bsum_pair`.
    quantize_row_q8_K_ref: max is the first value of largest |x|, iscale = -127 / max,
    q = min(127, nearest(iscale * x)), d = 1 / iscale. GCC contracts nearest_int's `iscale * x + 1.5 * 2^23`
    into one fma, so q rounds the exact product (`fused`); the AVX2 quantize_mat_q8_K_4x8 (4 rows at a time,
    repacked Q4_K) multiplies, rounds to f32, then rounds to an integer (`fused` False). k a multiple of 256."""
    for s in range(x.size // QK_K):
        o = QK_K * s
        amax = f32(0)
        mx = f32(0)
        for j in range(QK_K):
            a = abs(x[o + j])
            if a > amax:
                amax = a
                mx = x[o + j]
        if amax == f32(0):
            xq[o:o + QK_K] = 0
            xs[16 * s] = 0
        else:
            iscale = f32(-127) / mx
            for j in range(QK_K):
                if fused:
                    v = np.rint(np.float64(iscale) * np.float64(x[o + j]))
                else:
                    v = np.rint(iscale * x[o + j])
                xq[o + j] = np.int8(min(127, int(v)))
            xs[16 * s] = f32(1) / iscale
        for i in range(8):
            a = 0
            b = 0
            for j in range(16):
                a += xq[o + 32 * i + j]
                b += xq[o + 32 * i + 16 + j]
            xs[16 * s + 1 + i] = f32(a + b) if sums32 else _pack_bsums(a, b)


@exact_kernel
def bsum_pair(xs, i):
    """The two 16-value sums packed in xs[i] by `quantize_q8_k`."""
    v = np.int64(xs[i])
    return (v >> 12) - 2048, (v & 4095) - 2048


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
def _rows_q5_0(out, xq, xs, w, r0, r1, nb):
    # block: d f16 | qh u32 (bit j: the fifth bit of element j) | 16 bytes of nibbles: 22 bytes.
    # ggml_vec_dot_q5_0_q8_0 and tinyBLAS_Q0_AVX: q = (nibble | fifth bit << 4) - 16, then as Q8_0.
    # One row at a time: two interleaved rows measured 2x slower on weights streamed from memory (decode).
    for r in range(r0, r1):
        p = r * nb * 22
        acc = zeros()
        for b in range(nb):
            q = (nibbles16(w, p + 6) | (bits32(load_u32(w, p + 2)) << 4)) - 16
            acc = fma8(splat(load_f16(w, p) * xs[2 * b]), to_f32(dot_i8(q, xq, 32 * b)), acc)
            p += 22
        out[r] = hsum8(acc)


@exact_kernel
def _scale_min_k4(w, p, j):
    """Scale and min j (0..7) of a Q4_K super-block whose 12 scale bytes start at w[p] (get_scale_min_k4)."""
    if j < 4:
        return np.int32(load_u8(w, p + j) & 63), np.int32(load_u8(w, p + j + 4) & 63)
    sc = (load_u8(w, p + j + 4) & 15) | ((load_u8(w, p + j - 4) >> 6) << 4)
    mn = (load_u8(w, p + j + 4) >> 4) | ((load_u8(w, p + j) >> 6) << 4)
    return np.int32(sc), np.int32(mn)


@exact_kernel
def _rows_q4_k(out, xq, xs, w, r0, r1, nsb, per_64):
    # block: d f16 | dmin f16 | 12 bytes of 6-bit scales and mins | 128 bytes of nibbles: 144 bytes; byte
    # 32c + l holds element 64c + l (low nibble) and 64c + 32 + l (high nibble).
    # Repacked Q4_K (q4_K_8x8_q8_K, AVX2) sums exact integers isum = Σ_j sc_j Σ q·q8 and msum = Σ_j m_j bsum_j
    # and folds them in as acc = fma(f32(isum), d·d8, acc), accm = fma(f32(msum), dmin·d8, accm); the result
    # acc - accm. ggml_gemv (rows outside a group of 4) folds once per super-block; ggml_gemm (activation
    # rows in groups of 4, `per_64`) once per 64 values (a pair of sub-blocks).
    for r in range(r0, r1):
        p = r * nsb * 144
        acc = f32(0)
        accm = f32(0)
        for s in range(nsb):
            dd = load_f16(w, p) * xs[16 * s]
            dm = load_f16(w, p + 2) * xs[16 * s]
            iv = izeros()
            msum = f32(0)
            for c in range(4):
                q = bytes32(w, p + 16 + 32 * c)
                sc0, mn0 = _scale_min_k4(w, p + 4, 2 * c)
                sc1, mn1 = _scale_min_k4(w, p + 4, 2 * c + 1)
                base = QK_K * s + 64 * c
                iv = iadd(iv, imul(dot_u8(q & 15, xq, base), sc0))
                iv = iadd(iv, imul(dot_u8(q >> 4, xq, base + 32), sc1))
                msum += f32(mn0) * xs[16 * s + 1 + 2 * c] + f32(mn1) * xs[16 * s + 2 + 2 * c]  # exact
                if per_64:
                    acc = fma1(f32(isum(iv)), dd, acc)
                    accm = fma1(f32(msum), dm, accm)
                    iv = izeros()
                    msum = f32(0)
            if not per_64:
                acc = fma1(f32(isum(iv)), dd, acc)
                accm = fma1(f32(msum), dm, accm)
            p += 144
        out[r] = acc - accm


@exact_kernel
def _rows_q6_k(out, xq, xs, w, r0, r1, nsb, tiled, sub):
    # block: ql 128 bytes (low 4 bits) | qh 64 bytes (high 2 bits) | 16 int8 scales | d f16: 210 bytes.
    # In each 128-value half h: ql[64h + l] low nibbles are elements 128h + l (l < 64), high nibbles
    # 128h + 64 + l; qh[32h + l] bits 0-1, 2-3, 4-5, 6-7 top elements 128h + l, +32, +64, +96.
    # tiled (batches of 8+, ggml-cpu/tiled): isum = Σ sc_j Σ (q - 32)·q8 exactly, acc = fma(f32(d·f32(isum)),
    # d8, acc). Otherwise ggml_vec_dot_q6_K_q8_K (AVX2): 8 int lanes, lane l = Σ over the 8 32-value chunks C
    # of sc[2C + l//4] Σ_{t<4} q[32C + 4l + t]·q8 (q unsigned, 0..63), minus 32·(bsum_2l·sc_2l +
    # bsum_2l+1·sc_2l+1); acc = fma(d8·d, f32(lanes), acc); the result hsum_float_8(acc).
    for r in range(r0, r1):
        p = r * nsb * 210
        acc = zeros()
        acc1 = f32(0)
        for s in range(nsb):
            iv = izeros()
            for h in range(2):
                ql0 = bytes32(w, p + 64 * h)
                ql1 = bytes32(w, p + 64 * h + 32)
                qh = bytes32(w, p + 128 + 32 * h)
                base = QK_K * s + 128 * h
                c = 8 * h                                  # scale index of this half's first 16 values
                q = (ql0 & 15) | ((qh & 3) << 4)
                iv = iadd(iv, imul_halves(dot_u8(q, xq, base), load_i8(w, p + 192 + c), load_i8(w, p + 193 + c)))
                q = (ql1 & 15) | (((qh >> 2) & 3) << 4)
                iv = iadd(iv, imul_halves(dot_u8(q, xq, base + 32), load_i8(w, p + 194 + c), load_i8(w, p + 195 + c)))
                q = (ql0 >> 4) | (((qh >> 4) & 3) << 4)
                iv = iadd(iv, imul_halves(dot_u8(q, xq, base + 64), load_i8(w, p + 196 + c), load_i8(w, p + 197 + c)))
                q = (ql1 >> 4) | (((qh >> 6) & 3) << 4)
                iv = iadd(iv, imul_halves(dot_u8(q, xq, base + 96), load_i8(w, p + 198 + c), load_i8(w, p + 199 + c)))
            # the -32 offset: per lane l, 32 · (bsum_2l · sc_2l + bsum_2l+1 · sc_2l+1)
            for l in range(8):
                a, b = bsum_pair(xs, 16 * s + 1 + l)
                sub[l] = 32 * (a * np.int32(load_i8(w, p + 192 + 2 * l)) + b * np.int32(load_i8(w, p + 193 + 2 * l)))
            iv = isub_lanes(iv, sub)
            dw = load_f16(w, p + 208)
            if tiled:
                acc1 = fma1(dw * f32(isum(iv)), xs[16 * s], acc1)
            else:
                acc = fma8(splat(xs[16 * s] * dw), to_f32(iv), acc)
            p += 210
        out[r] = acc1 if tiled else hsum8(acc)


@exact_kernel
def _rows(out, xq, xs, w, qtype, r0, r1, k, n_batch, row):
    """Rows r0..r1 of W times activation row `row` of n_batch, quantized in (xq, xs); the batch picks
    ggml's kernel where that depends on it (Q4_K: groups of 4 rows; Q6_K: 8+ rows)."""
    if qtype == Q4_1:
        _rows_q4_1(out, xq, xs, w, r0, r1, k // 32)
    elif qtype == Q5_0:
        _rows_q5_0(out, xq, xs, w, r0, r1, k // 32)
    elif qtype == Q8_0:
        _rows_q8_0(out, xq, xs, w, r0, r1, k // 32)
    elif qtype == Q4_K:
        _rows_q4_k(out, xq, xs, w, r0, r1, k // QK_K, row < n_batch - n_batch % 4)
    else:
        sub = np.empty(8, np.int32)
        _rows_q6_k(out, xq, xs, w, r0, r1, k // QK_K, n_batch >= TILED_MIN_ROWS, sub)


@exact_kernel
def _quantize(x, xq, xs, qtype, row, n_batch):
    """Activation row `row` of a batch of n_batch, as ggml quantizes it for this weight type: q8_1/q8_0
    for the 32-blocks; q8_K for the K-quants, where the repacked Q4_K quantizes whole groups of 4 rows
    with quantize_mat_q8_K_4x8 and the rest (and every Q6_K row) with quantize_row_q8_K."""
    if qtype == Q4_K or qtype == Q6_K:
        quantize_q8_k(x, xq, xs, not (qtype == Q4_K and row < n_batch - n_batch % 4), qtype == Q4_K)
    else:
        quantize_q8(x, xq, xs)


@exact_parallel_kernel
def matvec(out, x, xq, xs, w, qtype, m, k):
    """out f32[m] = W @ x for W the (m, k) tensor in bytes `w` (a type of EXACT_TYPES), as llama.cpp's
    kernel for one activation row computes each output. xq int8[k], xs f32[k // 16]: scratch."""
    _quantize(x, xq, xs, qtype, 0, 1)
    if m * k <= SERIAL_WEIGHTS:
        _rows(out, xq, xs, w, qtype, 0, m, k, 1, 0)
        return
    for t in prange((m + TASK_ROWS - 1) // TASK_ROWS):
        _rows(out, xq, xs, w, qtype, t * TASK_ROWS, min(m, (t + 1) * TASK_ROWS), k, 1, 0)


# ---- gemm: four activation rows against one weight row, so each weight block is decoded once for four ----
#
# The same arithmetic per output as the one-row kernels above (each output keeps its own accumulator, in the
# same order); only the loops are arranged so that the decode and the loads are shared. xq, xs are the flat
# (n * k,) and (n * k // 16,) scratch; activation row i starts at xq[i * k] and xs[i * ns].

@exact_kernel
def _x4_q5_0(xq, xs, w, r, i0, i1, i2, i3, k, ns, s8):
    """Q5_0, or Q8_0 when s8 (the same arithmetic on bytes stored as they are)."""
    nb = k // 32
    p = r * nb * (34 if s8 else 22)
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    for b in range(nb):
        if s8:
            q = bytes32(w, p + 2)
            d = load_f16(w, p)
            p += 34
        else:
            q = (nibbles16(w, p + 6) | (bits32(load_u32(w, p + 2)) << 4)) - 16
            d = load_f16(w, p)
            p += 22
        a0 = fma8(splat(d * xs[i0 * ns + 2 * b]), to_f32(dot_i8(q, xq, i0 * k + 32 * b)), a0)
        a1 = fma8(splat(d * xs[i1 * ns + 2 * b]), to_f32(dot_i8(q, xq, i1 * k + 32 * b)), a1)
        a2 = fma8(splat(d * xs[i2 * ns + 2 * b]), to_f32(dot_i8(q, xq, i2 * k + 32 * b)), a2)
        a3 = fma8(splat(d * xs[i3 * ns + 2 * b]), to_f32(dot_i8(q, xq, i3 * k + 32 * b)), a3)
    return hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)


@exact_kernel
def _x8_q5_0(out, xq, xs, w, r, g, n, k, ns, s8):
    """As `_x4_q5_0` for activation rows g..g+7 (those below n; the others repeat row g), storing to out."""
    i1 = g + 1 if g + 1 < n else g
    i2 = g + 2 if g + 2 < n else g
    i3 = g + 3 if g + 3 < n else g
    i4 = g + 4 if g + 4 < n else g
    i5 = g + 5 if g + 5 < n else g
    i6 = g + 6 if g + 6 < n else g
    i7 = g + 7 if g + 7 < n else g
    nb = k // 32
    p = r * nb * (34 if s8 else 22)
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    a4, a5, a6, a7 = zeros(), zeros(), zeros(), zeros()
    for b in range(nb):
        if s8:
            q = bytes32(w, p + 2)
            d = load_f16(w, p)
            p += 34
        else:
            q = (nibbles16(w, p + 6) | (bits32(load_u32(w, p + 2)) << 4)) - 16
            d = load_f16(w, p)
            p += 22
        e = 32 * b
        a0 = fma8(splat(d * xs[g * ns + 2 * b]), to_f32(dot_i8(q, xq, g * k + e)), a0)
        a1 = fma8(splat(d * xs[i1 * ns + 2 * b]), to_f32(dot_i8(q, xq, i1 * k + e)), a1)
        a2 = fma8(splat(d * xs[i2 * ns + 2 * b]), to_f32(dot_i8(q, xq, i2 * k + e)), a2)
        a3 = fma8(splat(d * xs[i3 * ns + 2 * b]), to_f32(dot_i8(q, xq, i3 * k + e)), a3)
        a4 = fma8(splat(d * xs[i4 * ns + 2 * b]), to_f32(dot_i8(q, xq, i4 * k + e)), a4)
        a5 = fma8(splat(d * xs[i5 * ns + 2 * b]), to_f32(dot_i8(q, xq, i5 * k + e)), a5)
        a6 = fma8(splat(d * xs[i6 * ns + 2 * b]), to_f32(dot_i8(q, xq, i6 * k + e)), a6)
        a7 = fma8(splat(d * xs[i7 * ns + 2 * b]), to_f32(dot_i8(q, xq, i7 * k + e)), a7)
    out[g, r] = hsum8(a0)
    if g + 1 < n:
        out[g + 1, r] = hsum8(a1)
    if g + 2 < n:
        out[g + 2, r] = hsum8(a2)
    if g + 3 < n:
        out[g + 3, r] = hsum8(a3)
    if g + 4 < n:
        out[g + 4, r] = hsum8(a4)
    if g + 5 < n:
        out[g + 5, r] = hsum8(a5)
    if g + 6 < n:
        out[g + 6, r] = hsum8(a6)
    if g + 7 < n:
        out[g + 7, r] = hsum8(a7)


@exact_kernel
def _x4_q4_k(xq, xs, w, r, i0, i1, i2, i3, k, ns, per_64):
    # the four rows' scalar fma chains side by side in lanes 0..3 (each lane's arithmetic is its row's)
    nsb = k // QK_K
    p = r * nsb * 144
    acc, accm = zeros(), zeros()
    for s in range(nsb):
        o0, o1, o2, o3 = i0 * ns + 16 * s, i1 * ns + 16 * s, i2 * ns + 16 * s, i3 * ns + 16 * s
        dx = f32x4(xs[o0], xs[o1], xs[o2], xs[o3])
        dd = splat(load_f16(w, p)) * dx
        dm = splat(load_f16(w, p + 2)) * dx
        sc0, mn0 = _scale_min_k4(w, p + 4, 0)
        sc1, mn1 = _scale_min_k4(w, p + 4, 1)
        sc2, mn2 = _scale_min_k4(w, p + 4, 2)
        sc3, mn3 = _scale_min_k4(w, p + 4, 3)
        sc4, mn4 = _scale_min_k4(w, p + 4, 4)
        sc5, mn5 = _scale_min_k4(w, p + 4, 5)
        sc6, mn6 = _scale_min_k4(w, p + 4, 6)
        sc7, mn7 = _scale_min_k4(w, p + 4, 7)
        # min_j · bsum_j per row, then summed by pairs of sub-blocks: exact in f32 (< 2^22)
        mins = f32x8_of(mn0, mn1, mn2, mn3, mn4, mn5, mn6, mn7)
        t0, t1, t2, t3 = pair_sums_t(mins * load_f32x8(xs, o0 + 1), mins * load_f32x8(xs, o1 + 1),
                                     mins * load_f32x8(xs, o2 + 1), mins * load_f32x8(xs, o3 + 1))
        v0, v1, v2, v3 = izeros(), izeros(), izeros(), izeros()
        for c in range(4):
            qb = bytes32(w, p + 16 + 32 * c)
            lo = qb & 15
            hi = qb >> 4
            if c == 0:
                sa, sb, mc = sc0, sc1, t0
            elif c == 1:
                sa, sb, mc = sc2, sc3, t1
            elif c == 2:
                sa, sb, mc = sc4, sc5, t2
            else:
                sa, sb, mc = sc6, sc7, t3
            e = QK_K * s + 64 * c
            v0 = iadd(v0, iadd(dot_u8s(lo, xq, i0 * k + e, sa, sa), dot_u8s(hi, xq, i0 * k + e + 32, sb, sb)))
            v1 = iadd(v1, iadd(dot_u8s(lo, xq, i1 * k + e, sa, sa), dot_u8s(hi, xq, i1 * k + e + 32, sb, sb)))
            v2 = iadd(v2, iadd(dot_u8s(lo, xq, i2 * k + e, sa, sa), dot_u8s(hi, xq, i2 * k + e + 32, sb, sb)))
            v3 = iadd(v3, iadd(dot_u8s(lo, xq, i3 * k + e, sa, sa), dot_u8s(hi, xq, i3 * k + e + 32, sb, sb)))
            if per_64:
                acc = fma8(isum4(v0, v1, v2, v3), dd, acc)
                accm = fma8(mc, dm, accm)
                v0, v1, v2, v3 = izeros(), izeros(), izeros(), izeros()
        if not per_64:
            acc = fma8(isum4(v0, v1, v2, v3), dd, acc)
            accm = fma8((t0 + t1) + (t2 + t3), dm, accm)
        p += 144
    res = acc - accm
    return get_lane(res, 0), get_lane(res, 1), get_lane(res, 2), get_lane(res, 3)


@exact_kernel
def _x8_q4_k(out, xq, xs, w, r, g, k, ns):
    """`_x4_q4_k` (per 64 values) for activation rows g..g+7, two whole groups of 4: row g + j in lane j."""
    nsb = k // QK_K
    p = r * nsb * 144
    acc, accm = zeros(), zeros()
    for s in range(nsb):
        o = g * ns + 16 * s
        dx = f32x8_of(xs[o], xs[o + ns], xs[o + 2 * ns], xs[o + 3 * ns],
                      xs[o + 4 * ns], xs[o + 5 * ns], xs[o + 6 * ns], xs[o + 7 * ns])
        dd = splat(load_f16(w, p)) * dx
        dm = splat(load_f16(w, p + 2)) * dx
        sc0, mn0 = _scale_min_k4(w, p + 4, 0)
        sc1, mn1 = _scale_min_k4(w, p + 4, 1)
        sc2, mn2 = _scale_min_k4(w, p + 4, 2)
        sc3, mn3 = _scale_min_k4(w, p + 4, 3)
        sc4, mn4 = _scale_min_k4(w, p + 4, 4)
        sc5, mn5 = _scale_min_k4(w, p + 4, 5)
        sc6, mn6 = _scale_min_k4(w, p + 4, 6)
        sc7, mn7 = _scale_min_k4(w, p + 4, 7)
        mins = f32x8_of(mn0, mn1, mn2, mn3, mn4, mn5, mn6, mn7)
        t0, t1, t2, t3 = pair_sums_t(mins * load_f32x8(xs, o + 1), mins * load_f32x8(xs, o + ns + 1),
                                     mins * load_f32x8(xs, o + 2 * ns + 1), mins * load_f32x8(xs, o + 3 * ns + 1))
        u0, u1, u2, u3 = pair_sums_t(mins * load_f32x8(xs, o + 4 * ns + 1), mins * load_f32x8(xs, o + 5 * ns + 1),
                                     mins * load_f32x8(xs, o + 6 * ns + 1), mins * load_f32x8(xs, o + 7 * ns + 1))
        x0 = g * k + QK_K * s
        for c in range(4):
            qb = bytes32(w, p + 16 + 32 * c)
            lo = qb & 15
            hi = qb >> 4
            if c == 0:
                sa, sb, mc = sc0, sc1, half_join(t0, u0)
            elif c == 1:
                sa, sb, mc = sc2, sc3, half_join(t1, u1)
            elif c == 2:
                sa, sb, mc = sc4, sc5, half_join(t2, u2)
            else:
                sa, sb, mc = sc6, sc7, half_join(t3, u3)
            e = x0 + 64 * c
            v0 = iadd(dot_u8s(lo, xq, e, sa, sa), dot_u8s(hi, xq, e + 32, sb, sb))
            v1 = iadd(dot_u8s(lo, xq, e + k, sa, sa), dot_u8s(hi, xq, e + k + 32, sb, sb))
            v2 = iadd(dot_u8s(lo, xq, e + 2 * k, sa, sa), dot_u8s(hi, xq, e + 2 * k + 32, sb, sb))
            v3 = iadd(dot_u8s(lo, xq, e + 3 * k, sa, sa), dot_u8s(hi, xq, e + 3 * k + 32, sb, sb))
            v4 = iadd(dot_u8s(lo, xq, e + 4 * k, sa, sa), dot_u8s(hi, xq, e + 4 * k + 32, sb, sb))
            v5 = iadd(dot_u8s(lo, xq, e + 5 * k, sa, sa), dot_u8s(hi, xq, e + 5 * k + 32, sb, sb))
            v6 = iadd(dot_u8s(lo, xq, e + 6 * k, sa, sa), dot_u8s(hi, xq, e + 6 * k + 32, sb, sb))
            v7 = iadd(dot_u8s(lo, xq, e + 7 * k, sa, sa), dot_u8s(hi, xq, e + 7 * k + 32, sb, sb))
            acc = fma8(isum8(v0, v1, v2, v3, v4, v5, v6, v7), dd, acc)
            accm = fma8(mc, dm, accm)
        p += 144
    res = acc - accm
    for j in range(8):
        out[g + j, r] = get_lane(res, j)


@exact_kernel
def _x8_q6_k(out, xq, xs, w, r, g, n, k, ns):
    """`_x4_q6_k`'s tiled arithmetic for activation rows g..g+7 (those below n; the others repeat row g):
    row g + j's scalar fma chain in lane j."""
    i1 = g + 1 if g + 1 < n else g
    i2 = g + 2 if g + 2 < n else g
    i3 = g + 3 if g + 3 < n else g
    i4 = g + 4 if g + 4 < n else g
    i5 = g + 5 if g + 5 < n else g
    i6 = g + 6 if g + 6 < n else g
    i7 = g + 7 if g + 7 < n else g
    nsb = k // QK_K
    p = r * nsb * 210
    tacc = zeros()
    for s in range(nsb):
        v0, v1, v2, v3 = izeros(), izeros(), izeros(), izeros()
        v4, v5, v6, v7 = izeros(), izeros(), izeros(), izeros()
        for h in range(2):
            ql0 = bytes32(w, p + 64 * h)
            ql1 = bytes32(w, p + 64 * h + 32)
            qh = bytes32(w, p + 128 + 32 * h)
            for part in range(4):
                if part == 0:
                    q = (ql0 & 15) | ((qh & 3) << 4)
                elif part == 1:
                    q = (ql1 & 15) | (((qh >> 2) & 3) << 4)
                elif part == 2:
                    q = (ql0 >> 4) | (((qh >> 4) & 3) << 4)
                else:
                    q = (ql1 >> 4) | (((qh >> 6) & 3) << 4)
                q = q - 32     # only the exact total matters: take the offset in the weights
                sa = load_i8(w, p + 192 + 8 * h + 2 * part)
                sb = load_i8(w, p + 193 + 8 * h + 2 * part)
                e = QK_K * s + 128 * h + 32 * part
                v0 = iadd(v0, dot_i8s(q, xq, g * k + e, sa, sb))
                v1 = iadd(v1, dot_i8s(q, xq, i1 * k + e, sa, sb))
                v2 = iadd(v2, dot_i8s(q, xq, i2 * k + e, sa, sb))
                v3 = iadd(v3, dot_i8s(q, xq, i3 * k + e, sa, sb))
                v4 = iadd(v4, dot_i8s(q, xq, i4 * k + e, sa, sb))
                v5 = iadd(v5, dot_i8s(q, xq, i5 * k + e, sa, sb))
                v6 = iadd(v6, dot_i8s(q, xq, i6 * k + e, sa, sb))
                v7 = iadd(v7, dot_i8s(q, xq, i7 * k + e, sa, sb))
        dw = load_f16(w, p + 208)
        o = 16 * s
        dx = f32x8_of(xs[g * ns + o], xs[i1 * ns + o], xs[i2 * ns + o], xs[i3 * ns + o],
                      xs[i4 * ns + o], xs[i5 * ns + o], xs[i6 * ns + o], xs[i7 * ns + o])
        tacc = fma8(splat(dw) * isum8(v0, v1, v2, v3, v4, v5, v6, v7), dx, tacc)
        p += 210
    for j in range(8):
        if g + j < n:
            out[g + j, r] = get_lane(tacc, j)


@exact_kernel
def _offset_q6_k(sub, xs, o, w, sc):
    """sub[0:8] = 32 · (bsum_2l · sc_2l + bsum_2l+1 · sc_2l+1): the -32 offset of ggml_vec_dot_q6_K_q8_K's lanes."""
    for l in range(8):
        a, b = bsum_pair(xs, o + 1 + l)
        sub[l] = 32 * (a * np.int32(load_i8(w, sc + 2 * l)) + b * np.int32(load_i8(w, sc + 2 * l + 1)))


@exact_kernel
def _x4_q6_k(xq, xs, w, r, i0, i1, i2, i3, k, ns, tiled, sub):
    nsb = k // QK_K
    p = r * nsb * 210
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    tacc = zeros()
    for s in range(nsb):
        v0, v1, v2, v3 = izeros(), izeros(), izeros(), izeros()
        for h in range(2):
            ql0 = bytes32(w, p + 64 * h)
            ql1 = bytes32(w, p + 64 * h + 32)
            qh = bytes32(w, p + 128 + 32 * h)
            for part in range(4):
                if part == 0:
                    q = (ql0 & 15) | ((qh & 3) << 4)
                elif part == 1:
                    q = (ql1 & 15) | (((qh >> 2) & 3) << 4)
                elif part == 2:
                    q = (ql0 >> 4) | (((qh >> 4) & 3) << 4)
                else:
                    q = (ql1 >> 4) | (((qh >> 6) & 3) << 4)
                sa = load_i8(w, p + 192 + 8 * h + 2 * part)
                sb = load_i8(w, p + 193 + 8 * h + 2 * part)
                e = QK_K * s + 128 * h + 32 * part
                if tiled:     # only the exact total matters: take the offset in the weights
                    q = q - 32
                    v0 = iadd(v0, dot_i8s(q, xq, i0 * k + e, sa, sb))
                    v1 = iadd(v1, dot_i8s(q, xq, i1 * k + e, sa, sb))
                    v2 = iadd(v2, dot_i8s(q, xq, i2 * k + e, sa, sb))
                    v3 = iadd(v3, dot_i8s(q, xq, i3 * k + e, sa, sb))
                else:
                    v0 = iadd(v0, dot_u8s(q, xq, i0 * k + e, sa, sb))
                    v1 = iadd(v1, dot_u8s(q, xq, i1 * k + e, sa, sb))
                    v2 = iadd(v2, dot_u8s(q, xq, i2 * k + e, sa, sb))
                    v3 = iadd(v3, dot_u8s(q, xq, i3 * k + e, sa, sb))
        dw = load_f16(w, p + 208)
        o0, o1, o2, o3 = i0 * ns + 16 * s, i1 * ns + 16 * s, i2 * ns + 16 * s, i3 * ns + 16 * s
        if tiled:     # the four rows' scalar fma chains in lanes 0..3
            tacc = fma8(splat(dw) * isum4(v0, v1, v2, v3), f32x4(xs[o0], xs[o1], xs[o2], xs[o3]), tacc)
        else:
            _offset_q6_k(sub, xs, o0, w, p + 192)
            a0 = fma8(splat(xs[o0] * dw), to_f32(isub_lanes(v0, sub)), a0)
            _offset_q6_k(sub, xs, o1, w, p + 192)
            a1 = fma8(splat(xs[o1] * dw), to_f32(isub_lanes(v1, sub)), a1)
            _offset_q6_k(sub, xs, o2, w, p + 192)
            a2 = fma8(splat(xs[o2] * dw), to_f32(isub_lanes(v2, sub)), a2)
            _offset_q6_k(sub, xs, o3, w, p + 192)
            a3 = fma8(splat(xs[o3] * dw), to_f32(isub_lanes(v3, sub)), a3)
        p += 210
    if tiled:
        return get_lane(tacc, 0), get_lane(tacc, 1), get_lane(tacc, 2), get_lane(tacc, 3)
    return hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)


@exact_kernel
def _x4(out, xq, xs, w, qtype, r0, r1, g, n, k, sub):
    """Weight rows r0..r1 against activation rows g..g+3 (those below n; the others repeat row g)."""
    ns = k // 16
    i1 = g + 1 if g + 1 < n else g
    i2 = g + 2 if g + 2 < n else g
    i3 = g + 3 if g + 3 < n else g
    for r in range(r0, r1):
        if qtype == Q5_0 or qtype == Q8_0:
            y0, y1, y2, y3 = _x4_q5_0(xq, xs, w, r, g, i1, i2, i3, k, ns, qtype == Q8_0)
        elif qtype == Q4_K:
            y0, y1, y2, y3 = _x4_q4_k(xq, xs, w, r, g, i1, i2, i3, k, ns, g + 4 <= n - n % 4)
        else:
            y0, y1, y2, y3 = _x4_q6_k(xq, xs, w, r, g, i1, i2, i3, k, ns, n >= TILED_MIN_ROWS, sub)
        out[g, r] = y0
        if g + 1 < n:
            out[g + 1, r] = y1
        if g + 2 < n:
            out[g + 2, r] = y2
        if g + 3 < n:
            out[g + 3, r] = y3


@exact_parallel_kernel
def gemm(out, x, xq, xs, w, qtype, m, k):
    """out f32[n, m] = x @ W.T, each element as llama.cpp's kernel for a batch of n rows computes it.
    xq int8[n, k], xs f32[n, k // 16]: scratch. Parallel over tiles of weight rows x blocks of activation
    rows: a tile (a few KiB) stays in L1 while the block's rows pass over it eight at a time (Q5_0, Q8_0,
    Q4_K, tiled Q6_K), and the block stays in L2 while the thread's tiles pass over it."""
    n = x.shape[0]
    for i in prange(n):
        _quantize(x[i], xq[i], xs[i], qtype, i, n)
    n_tiles = (m + TASK_ROWS - 1) // TASK_ROWS
    # activation rows in blocks of about X_BLOCK_BYTES, so that a block stays in L2 while a thread's tiles
    # pass over it (all n rows per tile fell out of L2 for k >= 2048); a task is one tile x one block
    # (blocks of equal size: the threads take equal shares of the tasks)
    n_blocks = max(1, min((n + 7) // 8, (n * k + X_BLOCK_BYTES - 1) // X_BLOCK_BYTES))
    rows = ((n + n_blocks - 1) // n_blocks + 7) // 8 * 8
    n_blocks = (n + rows - 1) // rows
    xqf = xq.reshape(-1)
    xsf = xs.reshape(-1)
    for t in prange(n_blocks * n_tiles):
        a0 = (t // n_tiles) * rows
        a1 = min(n, a0 + rows)
        r0 = (t % n_tiles) * TASK_ROWS
        r1 = min(m, r0 + TASK_ROWS)
        if qtype == Q4_1:
            for i in range(a0, a1):
                _rows(out[i], xq[i], xs[i], w, qtype, r0, r1, k, n, i)
        elif qtype == Q5_0 or qtype == Q8_0:
            for g in range(a0, a1, 8):
                for r in range(r0, r1):
                    _x8_q5_0(out, xqf, xsf, w, r, g, n, k, k // 16, qtype == Q8_0)
        elif qtype == Q6_K and n >= TILED_MIN_ROWS:
            for g in range(a0, a1, 8):
                for r in range(r0, r1):
                    _x8_q6_k(out, xqf, xsf, w, r, g, n, k, k // 16)
        elif qtype == Q4_K:
            full = n - n % 4          # rows in whole groups of 4 (ggml's per-64 arithmetic); the rest as _x4 does
            sub = np.empty(8, np.int32)
            for g in range(a0, a1, 8):
                if g + 8 <= full:
                    for r in range(r0, r1):
                        _x8_q4_k(out, xqf, xsf, w, r, g, k, k // 16)
                else:
                    _x4(out, xqf, xsf, w, qtype, r0, r1, g, n, k, sub)
                    if g + 4 < n:
                        _x4(out, xqf, xsf, w, qtype, r0, r1, g + 4, n, k, sub)
        else:
            sub = np.empty(8, np.int32)
            for g in range(a0, a1, 4):
                _x4(out, xqf, xsf, w, qtype, r0, r1, g, n, k, sub)
