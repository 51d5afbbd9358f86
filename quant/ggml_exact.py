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
                 (gemm: activation rows in groups of 4), folded in by one scalar fma each (`_rows_q4_k`,
                 `_four_rows_q4_k`).
    Q6_K · Q8_K  ggml_vec_dot_q6_K_q8_K below 8 activation rows (8 int lanes, `_rows_q6_k`), ggml's tiled
                 kernel from 8 (an exact integer per super-block, `_eight_rows_q6_k_tiled`).
    hsum(a)      hsum_float_8: ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3)).

So an output row's bits depend on its batch only where ggml's kernel choice does (Q4_K, Q6_K): through the
row's *kind* (see `batch_kinds`), which `gemm` takes per row. The kernels here are compiled without fast-math: reassociation or contraction
would change the order that makes them exact. The exact scalar helpers they share with `models.ops` (which
reproduces the non-matmul kernels the same way) are in `quant.simd`: `fma1`, `fma8`, `hsum8`, `round_f16`,
`v_expf`.

    matvec(out, x, xq, xs, w, qtype, m, k)     out[m] = W @ x          qtype one of EXACT_TYPES
    gemm(out, x, xq, xs, w, qtype, m, k, kinds)  out[n, m] = x @ W.T, row i of kind kinds[i]

Scratch: xq int8 (k,) / (n, k) and xs f32 (k // 16,) / (n, k // 16); for 32-blocks
xs[2b] is the fp16-rounded scale of block b and xs[2b + 1] the fp16-rounded Q8_1 sum; for q8_K see
`quantize_q8_k`.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .jit import exact_kernel, exact_parallel_kernel, inlined
from .simd import (OFFSET_ACTIVATIONS, USE_PMADDUBSW, _element_ptr, at, dot_i8, dot_offset, dot_u8, extract_lane,
                   llvm_call, offset_base, F32x8, I32x8, bits32, bytes32, fma1, fma8, hsum8, load_f16, load_f32x8,
                   load_i8, load_u32, nibbles16, round_f16, splat, store_bytes32, to_f32, zeros, half_pairs,
                   lane, lane_value, lanes, pairs_at, prefetch, half_quads, dot_u8_less, quad_twice, store_f32x8,
                   WIDE_REGISTERS)

f32 = np.float32
Q4_1, Q5_0, Q8_0, Q4_K, Q6_K = 3, 6, 8, 12, 14
EXACT_TYPES = (Q4_1, Q5_0, Q8_0, Q4_K, Q6_K)
QK_K = 256
TILED_MIN_ROWS = 8           # ggml's tiled K-quant matmul takes batches of 8+ rows (ggml_tiled_min_batch)

# nibble's options with fast-math off: the order of every f32 operation is the point of this module.
SERIAL_WEIGHTS = 1 << 16     # a matvec of up to this many weights takes each matrix as one task
TASK_ROWS = 16               # weight rows per parallel task
FEW_ROWS_TASK_ROWS = 64      # ... in a gemm of fewer than DECODED_MIN_GROUPS groups (a decode step's rows)
PREFETCH_BYTES = 1024       # how far ahead of a one-row kernel's reads it asks for the weights' cache lines
X_BLOCK_BYTES = 3 << 18      # gemm: activation bytes (int8) per parallel task, to stay in L2
SERIAL_QUANTIZE_ROWS = 16    # gemm quantizes this many activation rows or fewer on the calling thread
DECODED_MIN_GROUPS = 4       # Q4_1/Q5_0/Q8_0 gemm: from this many groups of 8 rows, weights decoded once per task

# ---- intrinsics: exact integer lanes, lane shuffles ----

_F32, _I32 = ir.FloatType(), ir.IntType(32)
_V8 = ir.VectorType(_F32, 8)


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
def isub(typingctx, a, b):
    """a - b per int32 lane."""
    def codegen(context, builder, sig, args):
        return builder.sub(args[0], args[1])
    return I32x8(I32x8, I32x8), codegen


@intrinsic
def q6_k_offsets(typingctx, xs, o, w, sc):
    """I32x8, lane l = 32 · (bsum_2l · sc_2l + bsum_2l+1 · sc_2l+1): the -32 offset of
    ggml_vec_dot_q6_K_q8_K's lanes for the super-block whose q8_K scale is xs[o] (its 16-value sums packed
    in pairs in xs[o + 1 : o + 9], see `quantize_q8_k`) and whose 16 int8 scales start at w[sc]. Exact
    integers, computed in vector lanes (a scalar loop here cost more than the dot products)."""
    def codegen(context, builder, sig, args):
        i16 = ir.VectorType(ir.IntType(8), 16)
        v16 = ir.VectorType(_I32, 16)
        one = context.get_constant(types.intp, 1)
        packed = builder.load(_element_ptr(context, builder, sig.args[0], args[0], builder.add(args[1], one),
                                           _V8), align=4)
        v = builder.fptosi(packed, _V8I)
        a = builder.sub(builder.ashr(v, _splat_const(12)), _splat_const(2048))
        b = builder.sub(builder.and_(v, _splat_const(4095)), _splat_const(2048))
        scales = builder.sext(builder.load(_element_ptr(context, builder, sig.args[2], args[2], args[3], i16),
                                           align=1), v16)
        even = builder.shuffle_vector(scales, scales, ir.Constant(_V8I, list(range(0, 16, 2))))
        odd = builder.shuffle_vector(scales, scales, ir.Constant(_V8I, list(range(1, 16, 2))))
        return builder.shl(builder.add(builder.mul(a, even), builder.mul(b, odd)), _splat_const(5))
    return I32x8(xs, types.intp, w, types.intp), codegen


def _splat_const(value: int):
    return ir.Constant(_V8I, [value] * 8)


@intrinsic
def k4_scales_mins(typingctx, w, p):
    """(I32x8 scales, F32x8 mins) of a Q4_K super-block whose 12 scale bytes start at w[p] (ggml's
    get_scale_min_k4 for j = 0..7), unpacked with 32-bit masks and shifts: scales 0..3 are the low six bits
    of bytes 0..3, mins 0..3 of bytes 4..7; scales 4..7 the low nibbles of bytes 8..11 with the top two bits
    of bytes 0..3 above them, mins 4..7 the high nibbles with the top two bits of bytes 4..7."""
    def codegen(context, builder, sig, args):
        u = [builder.load(_element_ptr(context, builder, sig.args[0], args[0],
                                       builder.add(args[1], context.get_constant(types.intp, 4 * j)), _I32),
                          align=1) for j in range(3)]
        k = lambda v: ir.Constant(_I32, v)
        six, nibble, two = k(0x3F3F3F3F), k(0x0F0F0F0F), k(0x03030303)
        top = lambda v: builder.shl(builder.and_(builder.lshr(v, k(6)), two), k(4))
        sc_hi = builder.or_(builder.and_(u[2], nibble), top(u[0]))
        mn_hi = builder.or_(builder.and_(builder.lshr(u[2], k(4)), nibble), top(u[1]))

        def widen(lo, hi):
            pair = builder.insert_element(builder.insert_element(ir.Constant(ir.VectorType(_I32, 2), ir.Undefined),
                                                                 lo, k(0)), hi, k(1))
            return builder.zext(builder.bitcast(pair, ir.VectorType(ir.IntType(8), 8)), _V8I)
        scales = widen(builder.and_(u[0], six), sc_hi)
        mins = builder.sitofp(widen(builder.and_(u[1], six), mn_hi), _V8)
        return context.make_tuple(builder, sig.return_type, [scales, mins])
    return types.Tuple((I32x8, F32x8))(w, types.intp), codegen


@intrinsic
def ilane(typingctx, v, j):
    """Lane j of an I32x8, as int32."""
    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], context.cast(builder, args[1], sig.args[1], types.int32))
    return types.int32(I32x8, j), codegen


@intrinsic
def isum(typingctx, v):
    """Σ of the 8 int32 lanes (exact: the sums here stay inside int32), as int64."""
    def codegen(context, builder, sig, args):
        v = args[0]
        for width in (4, 2, 1):
            v = builder.add(v, builder.shuffle_vector(v, v, ir.Constant(_V8I, [(j + width) % 8 for j in range(8)])))
        return builder.sext(extract_lane(builder, v, 0), ir.IntType(64))
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
            x = llvm_call(builder, "llvm.x86.avx2.psign.b", i8v, [x, q])
            q = llvm_call(builder, "llvm.abs.v32i8", i8v, [q, ir.Constant(ir.IntType(1), 0)])
        pairs = llvm_call(builder, "llvm.x86.avx2.pmadd.ub.sw", i16v, [q, x])
        return llvm_call(builder, "llvm.x86.avx2.pmadd.wd", _V8I, [pairs, scales])
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
    (Q6_K) xs[16s + 1 + i] the 16-value sums of groups 2i and 2i + 1 packed for `q6_k_offsets`.
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


# ---- one activation row: several weight rows at a time, so that their fma chains overlap ----

@inlined
def _four_rows_at(r, r1, row):
    """Byte offsets of weight rows r .. r + 3 (rows of `row` bytes), those at or past r1 replaced by row r's
    (computed again, not stored)."""
    p0 = r * row
    return (p0, p0 + row if r + 1 < r1 else p0, p0 + 2 * row if r + 2 < r1 else p0,
            p0 + 3 * row if r + 3 < r1 else p0)


@exact_kernel
def _rows_q4_1(out, xq, xs, w, r0, r1, nb):
    # block: d f16 | m f16 | 16 bytes of nibbles (low nibbles elements 0..15, high 16..31): 20 bytes.
    # Four rows at a time (four independent accumulations), their blocks' d and m converted and scaled
    # together: lanes 2i, 2i + 1 of hm are row i's d and m, of hm * [dx sx] x 4 its d·dx and m·sx, and lane
    # 2i + 1 of `sm` accumulates row i's Σ m·sx with one fma per block, as the scalar sum would.
    row = nb * 20
    r = r0
    while r < r1:
        p0, p1, p2, p3 = _four_rows_at(r, r1, row)
        a0, a1, a2, a3, sm = zeros(), zeros(), zeros(), zeros(), zeros()
        ahead = p0 + 4 * row             # the next four rows, 80 bytes a block, prefetched as we go
        for b in range(nb):
            prefetch(w, ahead)
            prefetch(w, ahead + 64)
            ahead += 80
            hm = half_pairs(w, p0, p1, p2, p3)
            dsx = pairs_at(xs, 2 * b)
            dd = hm * dsx
            sm = fma8(hm, dsx, sm)
            a0 = fma8(lane(dd, 0), to_f32(dot_u8(nibbles16(w, p0 + 4), xq, 32 * b)), a0)
            a1 = fma8(lane(dd, 2), to_f32(dot_u8(nibbles16(w, p1 + 4), xq, 32 * b)), a1)
            a2 = fma8(lane(dd, 4), to_f32(dot_u8(nibbles16(w, p2 + 4), xq, 32 * b)), a2)
            a3 = fma8(lane(dd, 6), to_f32(dot_u8(nibbles16(w, p3 + 4), xq, 32 * b)), a3)
            p0 += 20
            p1 += 20
            p2 += 20
            p3 += 20
        out[r] = hsum8(a0) + lane_value(sm, 1)
        if r + 1 < r1:
            out[r + 1] = hsum8(a1) + lane_value(sm, 3)
        if r + 2 < r1:
            out[r + 2] = hsum8(a2) + lane_value(sm, 5)
        if r + 3 < r1:
            out[r + 3] = hsum8(a3) + lane_value(sm, 7)
        r += 4


@exact_kernel
def _rows_q8_0(out, xq, xs, w, r0, r1, nb):
    # block: d f16 | 32 int8: 34 bytes. One row at a time: the output matrix (tied to the 30 MB embedding)
    # streams from memory, and interleaving rows measured 3x slower there.
    for r in range(r0, r1):
        p = r * nb * 34
        acc = zeros()
        for b in range(nb):
            prefetch(w, p + PREFETCH_BYTES)
            acc = fma8(splat(load_f16(w, p) * at(xs, 2 * b)), to_f32(dot_i8(bytes32(w, p + 2), xq, 32 * b)), acc)
            p += 34
        out[r] = hsum8(acc)


@exact_kernel
def _rows_q5_0(out, xq, xs, w, r0, r1, nb, sums16):
    # block: d f16 | qh u32 (bit j: the fifth bit of element j) | 16 bytes of nibbles: 22 bytes.
    # ggml_vec_dot_q5_0_q8_0 and tinyBLAS_Q0_AVX: q = (nibble | fifth bit << 4) - 16, then as Q8_0. The
    # integer lanes are computed as Σ u·x - 16 Σ x with u = q + 16 unsigned (`dot_u8_less`, `sums16` from
    # `_sums16`): the same integers. Four rows at a time (four independent accumulations), the next four
    # rows' bytes prefetched as we go.
    row = nb * 22
    r = r0
    while r < r1:
        p0, p1, p2, p3 = _four_rows_at(r, r1, row)
        a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
        ahead = p0 + 4 * row
        for b in range(nb):
            prefetch(w, ahead)
            prefetch(w, ahead + 64)
            ahead += 88
            dd = half_quads(w, p0, p1, p2, p3) * at(xs, 2 * b)
            u0 = nibbles16(w, p0 + 6) | (bits32(load_u32(w, p0 + 2)) << 4)
            u1 = nibbles16(w, p1 + 6) | (bits32(load_u32(w, p1 + 2)) << 4)
            u2 = nibbles16(w, p2 + 6) | (bits32(load_u32(w, p2 + 2)) << 4)
            u3 = nibbles16(w, p3 + 6) | (bits32(load_u32(w, p3 + 2)) << 4)
            a0 = fma8(lane(dd, 0), to_f32(dot_u8_less(u0, xq, 32 * b, sums16, 8 * b)), a0)
            a1 = fma8(lane(dd, 1), to_f32(dot_u8_less(u1, xq, 32 * b, sums16, 8 * b)), a1)
            a2 = fma8(lane(dd, 2), to_f32(dot_u8_less(u2, xq, 32 * b, sums16, 8 * b)), a2)
            a3 = fma8(lane(dd, 3), to_f32(dot_u8_less(u3, xq, 32 * b, sums16, 8 * b)), a3)
            p0 += 22
            p1 += 22
            p2 += 22
            p3 += 22
        out[r] = hsum8(a0)
        if r + 1 < r1:
            out[r + 1] = hsum8(a1)
        if r + 2 < r1:
            out[r + 2] = hsum8(a2)
        if r + 3 < r1:
            out[r + 3] = hsum8(a3)
        r += 4


@exact_kernel
def _sums16(xq, sums16):
    """sums16[l] = 16 Σ xq[4l .. 4l + 3]: the correction `_rows_q5_0` subtracts, once per activation row."""
    for l in range(sums16.shape[0]):
        sums16[l] = 16 * (np.int32(xq[4 * l]) + np.int32(xq[4 * l + 1]) + np.int32(xq[4 * l + 2])
                          + np.int32(xq[4 * l + 3]))


@exact_kernel
def _rows_q4_k(out, xq, xs, w, r0, r1, nsb):
    # block: d f16 | dmin f16 | 12 bytes of 6-bit scales and mins | 128 bytes of nibbles: 144 bytes; byte
    # 32c + l holds element 64c + l (low nibble) and 64c + 32 + l (high nibble).
    # Repacked Q4_K (q4_K_8x8_q8_K, AVX2) sums exact integers isum = Σ_j sc_j Σ q·q8 and msum = Σ_j m_j bsum_j
    # and folds them in as acc = fma(f32(isum), d·d8, acc), accm = fma(f32(msum), dmin·d8, accm); the result
    # acc - accm. This is ggml_gemv's fold, once per super-block (a row outside a group of 4; ggml_gemm's
    # rows in groups of 4 fold once per 64 values: `_four_rows_q4_k`, `_eight_rows_q4_k`).
    for r in range(r0, r1):
        p = r * nsb * 144
        acc = f32(0)
        accm = f32(0)
        for s in range(nsb):
            for line in range(0, 144, 64):
                prefetch(w, p + PREFETCH_BYTES + line)
            dd = load_f16(w, p) * at(xs, 16 * s)
            dm = load_f16(w, p + 2) * at(xs, 16 * s)
            scales, mins = k4_scales_mins(w, p + 4)
            iv = izeros()
            for c in range(4):
                q = bytes32(w, p + 16 + 32 * c)
                base = QK_K * s + 64 * c
                iv = iadd(iv, imul(dot_u8(q & 15, xq, base), ilane(scales, 2 * c)))
                iv = iadd(iv, imul(dot_u8(q >> 4, xq, base + 32), ilane(scales, 2 * c + 1)))
            msum = hsum8(mins * load_f32x8(xs, 16 * s + 1))   # integers below 2^22: exact in any order
            acc = fma1(f32(isum(iv)), dd, acc)
            accm = fma1(msum, dm, accm)
            p += 144
        out[r] = acc - accm


@exact_kernel
def _rows_q6_k(out, xq, xs, w, r0, r1, nsb):
    # block: ql 128 bytes (low 4 bits) | qh 64 bytes (high 2 bits) | 16 int8 scales | d f16: 210 bytes.
    # In each 128-value half h: ql[64h + l] low nibbles are elements 128h + l (l < 64), high nibbles
    # 128h + 64 + l; qh[32h + l] bits 0-1, 2-3, 4-5, 6-7 top elements 128h + l, +32, +64, +96.
    # ggml_vec_dot_q6_K_q8_K (AVX2): 8 int lanes, lane l = Σ over the 8 32-value chunks C of
    # sc[2C + l//4] Σ_{t<4} q[32C + 4l + t]·q8 (q unsigned, 0..63), minus 32·(bsum_2l·sc_2l +
    # bsum_2l+1·sc_2l+1); acc = fma(d8·d, f32(lanes), acc); the result hsum_float_8(acc). (Batches of 8+
    # rows take ggml's tiled kernel instead: `_eight_rows_q6_k_tiled`.)
    for r in range(r0, r1):
        p = r * nsb * 210
        acc = zeros()
        for s in range(nsb):
            for line in range(0, 210, 64):
                prefetch(w, p + PREFETCH_BYTES + line)
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
            iv = isub(iv, q6_k_offsets(xs, 16 * s, w, p + 192))      # the -32 offset of every quant
            acc = fma8(splat(at(xs, 16 * s) * load_f16(w, p + 208)), to_f32(iv), acc)
            p += 210
        out[r] = hsum8(acc)


# ---- row kinds: where llama.cpp's arithmetic for a row depends on the batch it came in ----
#
# For Q4_1, Q5_0 and Q8_0 it never does; for attention (models.ops) through the lane count. For Q4_K, ggml's repacked gemm takes activation rows in groups of
# 4 (quantize_mat_q8_K_4x8, folding once per 64 values) and the rows past the last whole group one at a
# time (ggml_gemv); for Q6_K, batches of 8+ rows take the tiled kernel. A batch that mixes rows from
# several requests (a server's decode step, a verification of draft tokens) gives every row its own kind,
# so that each row's bits are what it would get in the batch it stands for.

ROW_GROUP4 = 1       # Q4_K: a row inside a whole group of 4 of its batch
ROW_TILED = 2        # Q6_K: a row of a batch of 8 or more
ROW_BATCHED = 4      # attention (models.ops): a row of a batch of 2 or more (tinyBLAS's 8 lanes, not vec_dot's 32)


@exact_kernel
def batch_kinds_into(kinds, n):
    """kinds[0:n] = the kinds llama.cpp gives the rows of one batch of n rows."""
    full = n - n % 4
    for i in range(n):
        kind = ROW_GROUP4 if i < full else 0
        if n >= TILED_MIN_ROWS:
            kind |= ROW_TILED
        if n >= 2:
            kind |= ROW_BATCHED
        kinds[i] = kind


def batch_kinds(n: int) -> np.ndarray:
    """The kinds llama.cpp gives the rows of one batch of n rows, int8 (n,)."""
    kinds = np.zeros(n, np.int8)
    batch_kinds_into(kinds, n)
    return kinds


# ---- gemm: several activation rows against one or two weight rows, each weight block decoded once for all ----
#
# The same arithmetic per output as the one-row kernels above (each output keeps its own accumulator, in the
# same order); only the loops are arranged so that the decode and the loads are shared. xq, xs are the flat
# (n * k,) and (n * k // 16,) scratch; activation row i starts at xq[i * k] and xs[i * xs_row]. The rows
# come as indices into them (`rows`), so that one call serves rows of different kinds in any order.

@exact_kernel
def _scales_side_by_side(xs, rows, nb, xs_row, xst, t):
    """xst[t + 8 b : t + 8 b + 8] = [dx of rows[0:4] | sx of rows[0:4]] of block b, for b < nb: the activation
    scales and sums of four rows side by side (one vector load per block in `_two_rows_q4_1`; `_two_rows_q5_0`
    reads the scales)."""
    for b in range(nb):
        for j in range(4):
            xst[t + 8 * b + j] = xs[rows[j] * xs_row + 2 * b]
            xst[t + 8 * b + 4 + j] = xs[rows[j] * xs_row + 2 * b + 1]


@inlined
def _two_rows_main(out, xq, qbuf, dd8, r, pair, rows, k, n, sm, qtype):
    """The main loop of `_two_rows_q4_1` / `_two_rows_q5_0`: per block, the two weight rows' quants from qbuf
    (64 bytes a block) against the activation rows rows[0:4] (rows[0:2] when n is 2 or less), each product
    with its d · dx from dd8 (lanes 0..3 weight row r, 4..7 row r + 1): eight independent fma chains; then
    each output, with a Q4_1 row's Σ m·sx from lane i (row r) or 4 + i (row r + 1) of sm."""
    i0, i1, i2, i3 = rows[0], rows[1], rows[2], rows[3]
    o0, o1, o2, o3 = i0 * k, i1 * k, i2 * k, i3 * k
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    c0, c1, c2, c3 = zeros(), zeros(), zeros(), zeros()
    for b in range(k // 32):
        q0, q1 = bytes32(qbuf, 64 * b), bytes32(qbuf, 64 * b + 32)
        base0, base1 = offset_base(q0), offset_base(q1)
        e, s = 32 * b, 8 * b
        a0 = fma8(splat(at(dd8, s)), to_f32(_dot_unpacked(q0, xq, o0 + e, base0, qtype)), a0)
        c0 = fma8(splat(at(dd8, s + 4)), to_f32(_dot_unpacked(q1, xq, o0 + e, base1, qtype)), c0)
        a1 = fma8(splat(at(dd8, s + 1)), to_f32(_dot_unpacked(q0, xq, o1 + e, base0, qtype)), a1)
        c1 = fma8(splat(at(dd8, s + 5)), to_f32(_dot_unpacked(q1, xq, o1 + e, base1, qtype)), c1)
        if n > 2:
            a2 = fma8(splat(at(dd8, s + 2)), to_f32(_dot_unpacked(q0, xq, o2 + e, base0, qtype)), a2)
            c2 = fma8(splat(at(dd8, s + 6)), to_f32(_dot_unpacked(q1, xq, o2 + e, base1, qtype)), c2)
            a3 = fma8(splat(at(dd8, s + 3)), to_f32(_dot_unpacked(q0, xq, o3 + e, base0, qtype)), a3)
            c3 = fma8(splat(at(dd8, s + 7)), to_f32(_dot_unpacked(q1, xq, o3 + e, base1, qtype)), c3)
    out[i0, r] = _row_result(a0, sm, 0, qtype)
    out[i1, r] = _row_result(a1, sm, 1, qtype)
    if n > 2:
        out[i2, r] = _row_result(a2, sm, 2, qtype)
        out[i3, r] = _row_result(a3, sm, 3, qtype)
    if pair:
        out[i0, r + 1] = _row_result(c0, sm, 4, qtype)
        out[i1, r + 1] = _row_result(c1, sm, 5, qtype)
        if n > 2:
            out[i2, r + 1] = _row_result(c2, sm, 6, qtype)
            out[i3, r + 1] = _row_result(c3, sm, 7, qtype)


@inlined
def _row_result(acc, sm, j, qtype):
    """An output from its accumulator: a Q4_1 row's hsum plus its Σ m·sx (lane j of sm), the others' the
    hsum alone (not + 0.0, which would turn a -0.0 into +0.0)."""
    if qtype == Q4_1:
        return hsum8(acc) + lane_value(sm, j)
    return hsum8(acc)


@exact_kernel
def _two_rows_q4_1(out, xq, xst, w, r, pair, rows, k, t, n, qbuf, dd8):
    """Weight rows r and r + 1 (only r when not `pair`: row r again in the second chains, not stored) against
    the activation rows rows[0:4] (rows[0:2] when n is 2 or less), `_rows_q4_1`'s arithmetic per row. A
    first pass over the blocks unpacks the two rows' quants into qbuf and forms the block's eight products
    d · dx with one vector multiply into dd8 (the activation scales and sums side by side from
    `_scales_side_by_side`'s xst[t:]) and each row's Σ m·sx in one lane of sm (one fma per block, as the
    scalar sum); the main loop (`_two_rows_main`) is then, per block and row, the integer dot, its conversion
    and one fma with a broadcast load. The next two rows are prefetched as the first pass goes."""
    nb = k // 32
    p0 = r * nb * 20
    p1 = p0 + nb * 20 if pair else p0
    sm = zeros()
    ahead = p1 + nb * 20                # the next two rows, 40 bytes a block
    for b in range(nb):
        prefetch(w, ahead)
        ahead += 40
        hm = half_pairs(w, p0, p1, p0, p1)          # [d0 m0 d1 m1] twice
        xt = load_f32x8(xst, t + 8 * b)              # [dx of rows[0:4] | sx of rows[0:4]]
        store_f32x8(dd8, 8 * b, lanes(hm, 0, 2) * quad_twice(xt, 0))
        sm = fma8(lanes(hm, 1, 3), quad_twice(xt, 4), sm)
        store_bytes32(qbuf, 64 * b, nibbles16(w, p0 + 4))
        store_bytes32(qbuf, 64 * b + 32, nibbles16(w, p1 + 4))
        p0 += 20
        p1 += 20
    _two_rows_main(out, xq, qbuf, dd8, r, pair, rows, k, n, sm, Q4_1)


@exact_kernel
def _scales_eight(xs, rows, nb, xs_row, xst, t):
    """xst[t + 16 b : t + 16 b + 16] = [dx of rows[0:8] | sx of rows[0:8]] of block b, for b < nb: the
    activation scales and sums of a group's eight rows side by side (`_eight_rows_unpacked`)."""
    for b in range(nb):
        for j in range(8):
            xst[t + 16 * b + j] = xs[rows[j] * xs_row + 2 * b]
            xst[t + 16 * b + 8 + j] = xs[rows[j] * xs_row + 2 * b + 1]


@exact_kernel
def _decode_q4_1_rows(w, r0, r1, nb, qd, dm):
    """The blocks of Q4_1 weight rows r0..r1 unpacked: qd[32 c : 32 c + 32] the 32 quants (0..15, element
    order) and dm[2 c], dm[2 c + 1] the scale d and the minimum m of block c = (r - r0) * nb + b."""
    for r in range(r0, r1):
        p = r * nb * 20
        for b in range(nb):
            c = (r - r0) * nb + b
            store_bytes32(qd, 32 * c, nibbles16(w, p + 4))
            dm[2 * c] = load_f16(w, p)
            dm[2 * c + 1] = load_f16(w, p + 2)
            p += 20


@exact_kernel
def _one_row_q4_1(out, xq, xst, w, r, rows, k, t):
    """`_two_rows_q4_1` for weight row r alone against four activation rows (rows[0:4]): four accumulators and
    one for the Σ m·sx, which AVX2's sixteen registers hold with the block's quants and scales (two weight
    rows' eight accumulators spill there)."""
    i0, i1, i2, i3 = rows[0], rows[1], rows[2], rows[3]
    nb = k // 32
    p = r * nb * 20
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    sm = zeros()
    o0, o1, o2, o3 = i0 * k, i1 * k, i2 * k, i3 * k
    ahead = p + nb * 20                 # the next row, prefetched as we go
    for b in range(nb):
        prefetch(w, ahead)
        ahead += 20
        d = splat(load_f16(w, p))
        sm = fma8(splat(load_f16(w, p + 2)), load_f32x8(xst, t), sm)
        q = nibbles16(w, p + 4)
        e = 32 * b
        a0 = fma8(d * splat(at(xst, t)), to_f32(dot_u8(q, xq, o0 + e)), a0)
        a1 = fma8(d * splat(at(xst, t + 1)), to_f32(dot_u8(q, xq, o1 + e)), a1)
        a2 = fma8(d * splat(at(xst, t + 2)), to_f32(dot_u8(q, xq, o2 + e)), a2)
        a3 = fma8(d * splat(at(xst, t + 3)), to_f32(dot_u8(q, xq, o3 + e)), a3)
        p += 20
        t += 8
    out[i0, r] = hsum8(a0) + lane_value(sm, 4)
    out[i1, r] = hsum8(a1) + lane_value(sm, 5)
    out[i2, r] = hsum8(a2) + lane_value(sm, 6)
    out[i3, r] = hsum8(a3) + lane_value(sm, 7)


@exact_kernel
def _block_q5_0_q8_0(w, p, is_q8_0):
    """The 32 signed quants and the scale of the Q8_0 (d f16 | 32 int8) or Q5_0 block at byte p."""
    if is_q8_0:
        return bytes32(w, p + 2), load_f16(w, p)
    return (nibbles16(w, p + 6) | (bits32(load_u32(w, p + 2)) << 4)) - 16, load_f16(w, p)


@exact_kernel
def _one_row_q5_0(out, xq, xst, w, r, rows, k, t, is_q8_0):
    """`_two_rows_q5_0` for weight row r alone against four activation rows (rows[0:4]), as `_one_row_q4_1`."""
    i0, i1, i2, i3 = rows[0], rows[1], rows[2], rows[3]
    nb = k // 32
    size = 34 if is_q8_0 else 22
    p = r * nb * size
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    o0, o1, o2, o3 = i0 * k, i1 * k, i2 * k, i3 * k
    ahead = p + nb * size               # the next row, prefetched as we go
    for b in range(nb):
        prefetch(w, ahead)
        ahead += size
        q, d = _block_q5_0_q8_0(w, p, is_q8_0)
        base = offset_base(q)
        s = splat(d)
        e = 32 * b
        a0 = fma8(s * splat(at(xst, t)), to_f32(dot_offset(q, xq, o0 + e, base)), a0)
        a1 = fma8(s * splat(at(xst, t + 1)), to_f32(dot_offset(q, xq, o1 + e, base)), a1)
        a2 = fma8(s * splat(at(xst, t + 2)), to_f32(dot_offset(q, xq, o2 + e, base)), a2)
        a3 = fma8(s * splat(at(xst, t + 3)), to_f32(dot_offset(q, xq, o3 + e, base)), a3)
        p += size
        t += 8
    out[i0, r] = hsum8(a0)
    out[i1, r] = hsum8(a1)
    out[i2, r] = hsum8(a2)
    out[i3, r] = hsum8(a3)


@exact_kernel
def _two_rows_q5_0(out, xq, xst, w, r, pair, rows, k, t, is_q8_0, n, qbuf, dd8):
    """`_two_rows_q4_1` for Q5_0, or Q8_0 when is_q8_0 (`_eight_rows_q5_0`'s arithmetic per row): the first
    pass decodes the two rows' blocks (`_block_q5_0_q8_0`) into qbuf and forms the products d · dx (the
    activation scales from `_scales_side_by_side`'s xst[t:]) into dd8."""
    nb = k // 32
    size = 34 if is_q8_0 else 22
    p0 = r * nb * size
    p1 = p0 + nb * size if pair else p0
    ahead = p1 + nb * size
    for b in range(nb):
        prefetch(w, ahead)
        if is_q8_0:
            prefetch(w, ahead + 64)
        ahead += 2 * size
        q0, d0 = _block_q5_0_q8_0(w, p0, is_q8_0)
        q1, d1 = _block_q5_0_q8_0(w, p1, is_q8_0)
        store_f32x8(dd8, 8 * b, f32x8_of(d0, d0, d0, d0, d1, d1, d1, d1) * quad_twice(load_f32x8(xst, t + 8 * b), 0))
        store_bytes32(qbuf, 64 * b, q0)
        store_bytes32(qbuf, 64 * b + 32, q1)
        p0 += size
        p1 += size
    _two_rows_main(out, xq, qbuf, dd8, r, pair, rows, k, n, zeros(), Q8_0 if is_q8_0 else Q5_0)


@exact_kernel
def _eight_rows_q5_0(out, xq, xs, w, r, rows, k, xs_row, is_q8_0):
    """Weight row r against the activation rows rows[0:8]: Q5_0, or Q8_0 when is_q8_0 (the same arithmetic
    on bytes stored as they are)."""
    i0, i1, i2, i3, i4, i5, i6, i7 = rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7]
    nb = k // 32
    p = r * nb * (34 if is_q8_0 else 22)
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    a4, a5, a6, a7 = zeros(), zeros(), zeros(), zeros()
    for b in range(nb):
        q, d = _block_q5_0_q8_0(w, p, is_q8_0)
        base = offset_base(q)
        p += 34 if is_q8_0 else 22
        e = 32 * b
        a0 = fma8(splat(d * at(xs, i0 * xs_row + 2 * b)), to_f32(dot_offset(q, xq, i0 * k + e, base)), a0)
        a1 = fma8(splat(d * at(xs, i1 * xs_row + 2 * b)), to_f32(dot_offset(q, xq, i1 * k + e, base)), a1)
        a2 = fma8(splat(d * at(xs, i2 * xs_row + 2 * b)), to_f32(dot_offset(q, xq, i2 * k + e, base)), a2)
        a3 = fma8(splat(d * at(xs, i3 * xs_row + 2 * b)), to_f32(dot_offset(q, xq, i3 * k + e, base)), a3)
        a4 = fma8(splat(d * at(xs, i4 * xs_row + 2 * b)), to_f32(dot_offset(q, xq, i4 * k + e, base)), a4)
        a5 = fma8(splat(d * at(xs, i5 * xs_row + 2 * b)), to_f32(dot_offset(q, xq, i5 * k + e, base)), a5)
        a6 = fma8(splat(d * at(xs, i6 * xs_row + 2 * b)), to_f32(dot_offset(q, xq, i6 * k + e, base)), a6)
        a7 = fma8(splat(d * at(xs, i7 * xs_row + 2 * b)), to_f32(dot_offset(q, xq, i7 * k + e, base)), a7)
    out[i0, r] = hsum8(a0)
    out[i1, r] = hsum8(a1)
    out[i2, r] = hsum8(a2)
    out[i3, r] = hsum8(a3)
    out[i4, r] = hsum8(a4)
    out[i5, r] = hsum8(a5)
    out[i6, r] = hsum8(a6)
    out[i7, r] = hsum8(a7)


@inlined
def _dot_unpacked(q, xq, i, base, qtype):
    """The integer lanes of an unpacked block: Q4_1's quants (0..15) as they are, Q5_0/Q8_0's signed ones
    against the activations as `dot_offset` reads them."""
    if qtype == Q4_1:
        return dot_u8(q, xq, i)
    return dot_offset(q, xq, i, base)


@inlined
def _eight_rows_unpacked(out, xq, xst, qd, dd, rl, r, rows, k, t, dd8, qtype):
    """Weight row r, unpacked by `_decode_q4_1_rows` (Q4_1: d and m per block in dd) or `_decode_q5_0_rows`
    (Q5_0/Q8_0: d per block) as row rl of the tile, against the activation rows rows[0:8], each row's
    arithmetic its one-row kernel's (`_rows_q4_1`, `_eight_rows_q5_0`). A first pass over the blocks forms
    the eight products d · dx of each block with one vector multiply (into dd8; dx side by side from
    `_scales_eight`'s xst[t:]) and, for Q4_1, each row's Σ m·sx in lane i of one vector (one fma per block,
    as the scalar sum); the main loop is then, per block and row, the integer dot, its conversion and one
    fma with a broadcast load: eight accumulators, which AVX2's sixteen registers hold with the weights and
    the constants (two weight rows' sixteen, `_eight_rows_decoded`, need AVX-512's thirty-two). Inlined
    with the type a constant, so that each type compiles only its own branches."""
    nb = k // 32
    c = rl * nb
    sm = zeros()
    for b in range(nb):
        if qtype == Q4_1:
            store_f32x8(dd8, 8 * b, splat(at(dd, 2 * (c + b))) * load_f32x8(xst, t + 16 * b))
            sm = fma8(splat(at(dd, 2 * (c + b) + 1)), load_f32x8(xst, t + 16 * b + 8), sm)
        else:
            store_f32x8(dd8, 8 * b, splat(at(dd, c + b)) * load_f32x8(xst, t + 16 * b))
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    a4, a5, a6, a7 = zeros(), zeros(), zeros(), zeros()
    o0, o1, o2, o3 = rows[0] * k, rows[1] * k, rows[2] * k, rows[3] * k
    o4, o5, o6, o7 = rows[4] * k, rows[5] * k, rows[6] * k, rows[7] * k
    q_at = 32 * c
    for b in range(nb):
        q = bytes32(qd, q_at)
        base = offset_base(q)
        e = 32 * b
        s = 8 * b
        a0 = fma8(splat(at(dd8, s)), to_f32(_dot_unpacked(q, xq, o0 + e, base, qtype)), a0)
        a1 = fma8(splat(at(dd8, s + 1)), to_f32(_dot_unpacked(q, xq, o1 + e, base, qtype)), a1)
        a2 = fma8(splat(at(dd8, s + 2)), to_f32(_dot_unpacked(q, xq, o2 + e, base, qtype)), a2)
        a3 = fma8(splat(at(dd8, s + 3)), to_f32(_dot_unpacked(q, xq, o3 + e, base, qtype)), a3)
        a4 = fma8(splat(at(dd8, s + 4)), to_f32(_dot_unpacked(q, xq, o4 + e, base, qtype)), a4)
        a5 = fma8(splat(at(dd8, s + 5)), to_f32(_dot_unpacked(q, xq, o5 + e, base, qtype)), a5)
        a6 = fma8(splat(at(dd8, s + 6)), to_f32(_dot_unpacked(q, xq, o6 + e, base, qtype)), a6)
        a7 = fma8(splat(at(dd8, s + 7)), to_f32(_dot_unpacked(q, xq, o7 + e, base, qtype)), a7)
        q_at += 32
    if qtype == Q4_1:       # a Q4_1 row's result is hsum + Σ m·sx; the others' the hsum alone
        out[rows[0], r] = hsum8(a0) + lane_value(sm, 0)
        out[rows[1], r] = hsum8(a1) + lane_value(sm, 1)
        out[rows[2], r] = hsum8(a2) + lane_value(sm, 2)
        out[rows[3], r] = hsum8(a3) + lane_value(sm, 3)
        out[rows[4], r] = hsum8(a4) + lane_value(sm, 4)
        out[rows[5], r] = hsum8(a5) + lane_value(sm, 5)
        out[rows[6], r] = hsum8(a6) + lane_value(sm, 6)
        out[rows[7], r] = hsum8(a7) + lane_value(sm, 7)
    else:
        out[rows[0], r] = hsum8(a0)
        out[rows[1], r] = hsum8(a1)
        out[rows[2], r] = hsum8(a2)
        out[rows[3], r] = hsum8(a3)
        out[rows[4], r] = hsum8(a4)
        out[rows[5], r] = hsum8(a5)
        out[rows[6], r] = hsum8(a6)
        out[rows[7], r] = hsum8(a7)


@exact_kernel
def _decode_q5_0_rows(w, r0, r1, k, is_q8_0, qd, dd):
    """The blocks of weight rows r0..r1 as `_block_q5_0_q8_0` gives them: qd[32 c : 32 c + 32] the signed
    quants and dd[c] the scale of block c = (r - r0) * (k // 32) + b."""
    nb = k // 32
    size = 34 if is_q8_0 else 22
    for r in range(r0, r1):
        p = r * nb * size
        for b in range(nb):
            q, d = _block_q5_0_q8_0(w, p, is_q8_0)
            c = (r - r0) * nb + b
            store_bytes32(qd, 32 * c, q)
            dd[c] = d
            p += size


@exact_kernel
def _repeat_scales(xs8, xs, nb):
    """xs8[8 b : 8 b + 8] = the scale of activation block b (xs[2 b]), for `_eight_rows_decoded`."""
    for b in range(nb):
        v = xs[2 * b]
        for t in range(8):
            xs8[8 * b + t] = v


@exact_kernel
def _eight_rows_decoded(out, xq, xs8, qd, dd, r, rl, rows, k, xs8_row):
    """`_eight_rows_q5_0` for the weight rows r and r + 1, whose blocks `_decode_q5_0_rows` decoded (rows rl
    and rl + 1 of the tile), with each activation block's scale repeated in eight lanes (xs8[i * xs8_row +
    8 b :][:8]) so that d · dx is one vector multiply (the same f32 product in every lane). Two weight rows
    share each activation load."""
    i0, i1, i2, i3, i4, i5, i6, i7 = rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7]
    nb = k // 32
    c, c2 = rl * nb, (rl + 1) * nb
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    a4, a5, a6, a7 = zeros(), zeros(), zeros(), zeros()
    b0, b1, b2, b3 = zeros(), zeros(), zeros(), zeros()
    b4, b5, b6, b7 = zeros(), zeros(), zeros(), zeros()
    for b in range(nb):
        q, q2 = bytes32(qd, 32 * (c + b)), bytes32(qd, 32 * (c2 + b))
        d, d2 = splat(at(dd, c + b)), splat(at(dd, c2 + b))
        base, base2 = offset_base(q), offset_base(q2)
        e, o = 32 * b, 8 * b
        s = load_f32x8(xs8, i0 * xs8_row + o)
        a0 = fma8(d * s, to_f32(dot_offset(q, xq, i0 * k + e, base)), a0)
        b0 = fma8(d2 * s, to_f32(dot_offset(q2, xq, i0 * k + e, base2)), b0)
        s = load_f32x8(xs8, i1 * xs8_row + o)
        a1 = fma8(d * s, to_f32(dot_offset(q, xq, i1 * k + e, base)), a1)
        b1 = fma8(d2 * s, to_f32(dot_offset(q2, xq, i1 * k + e, base2)), b1)
        s = load_f32x8(xs8, i2 * xs8_row + o)
        a2 = fma8(d * s, to_f32(dot_offset(q, xq, i2 * k + e, base)), a2)
        b2 = fma8(d2 * s, to_f32(dot_offset(q2, xq, i2 * k + e, base2)), b2)
        s = load_f32x8(xs8, i3 * xs8_row + o)
        a3 = fma8(d * s, to_f32(dot_offset(q, xq, i3 * k + e, base)), a3)
        b3 = fma8(d2 * s, to_f32(dot_offset(q2, xq, i3 * k + e, base2)), b3)
        s = load_f32x8(xs8, i4 * xs8_row + o)
        a4 = fma8(d * s, to_f32(dot_offset(q, xq, i4 * k + e, base)), a4)
        b4 = fma8(d2 * s, to_f32(dot_offset(q2, xq, i4 * k + e, base2)), b4)
        s = load_f32x8(xs8, i5 * xs8_row + o)
        a5 = fma8(d * s, to_f32(dot_offset(q, xq, i5 * k + e, base)), a5)
        b5 = fma8(d2 * s, to_f32(dot_offset(q2, xq, i5 * k + e, base2)), b5)
        s = load_f32x8(xs8, i6 * xs8_row + o)
        a6 = fma8(d * s, to_f32(dot_offset(q, xq, i6 * k + e, base)), a6)
        b6 = fma8(d2 * s, to_f32(dot_offset(q2, xq, i6 * k + e, base2)), b6)
        s = load_f32x8(xs8, i7 * xs8_row + o)
        a7 = fma8(d * s, to_f32(dot_offset(q, xq, i7 * k + e, base)), a7)
        b7 = fma8(d2 * s, to_f32(dot_offset(q2, xq, i7 * k + e, base2)), b7)
    out[i0, r], out[i0, r + 1] = hsum8(a0), hsum8(b0)
    out[i1, r], out[i1, r + 1] = hsum8(a1), hsum8(b1)
    out[i2, r], out[i2, r + 1] = hsum8(a2), hsum8(b2)
    out[i3, r], out[i3, r + 1] = hsum8(a3), hsum8(b3)
    out[i4, r], out[i4, r + 1] = hsum8(a4), hsum8(b4)
    out[i5, r], out[i5, r + 1] = hsum8(a5), hsum8(b5)
    out[i6, r], out[i6, r + 1] = hsum8(a6), hsum8(b6)
    out[i7, r], out[i7, r + 1] = hsum8(a7), hsum8(b7)


@exact_kernel
def _four_rows_q4_k(out, xq, xs, w, r, rows, k, xs_row, per_64):
    """Weight row r against the activation rows rows[0:4], the four rows' scalar fma chains side by side in
    lanes 0..3 (each lane's arithmetic is its row's): ggml_gemv's fold once per super-block, or with
    `per_64` ggml_gemm's once per 64 values (rows in groups of 4)."""
    i0, i1, i2, i3 = rows[0], rows[1], rows[2], rows[3]
    nsb = k // QK_K
    p = r * nsb * 144
    acc, accm = zeros(), zeros()
    for s in range(nsb):
        o0, o1, o2, o3 = i0 * xs_row + 16 * s, i1 * xs_row + 16 * s, i2 * xs_row + 16 * s, i3 * xs_row + 16 * s
        dx = f32x4(at(xs, o0), at(xs, o1), at(xs, o2), at(xs, o3))
        dd = splat(load_f16(w, p)) * dx
        dm = splat(load_f16(w, p + 2)) * dx
        scales, mins = k4_scales_mins(w, p + 4)
        # min_j · bsum_j per row, then summed by pairs of sub-blocks: exact in f32 (< 2^22)
        t0, t1, t2, t3 = pair_sums_t(mins * load_f32x8(xs, o0 + 1), mins * load_f32x8(xs, o1 + 1),
                                     mins * load_f32x8(xs, o2 + 1), mins * load_f32x8(xs, o3 + 1))
        v0, v1, v2, v3 = izeros(), izeros(), izeros(), izeros()
        for c in range(4):
            qb = bytes32(w, p + 16 + 32 * c)
            lo = qb & 15
            hi = qb >> 4
            sa, sb = ilane(scales, 2 * c), ilane(scales, 2 * c + 1)
            if c == 0:
                mc = t0
            elif c == 1:
                mc = t1
            elif c == 2:
                mc = t2
            else:
                mc = t3
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
    out[i0, r] = get_lane(res, 0)
    out[i1, r] = get_lane(res, 1)
    out[i2, r] = get_lane(res, 2)
    out[i3, r] = get_lane(res, 3)


@exact_kernel
def _eight_rows_q4_k(out, xq, xs, w, r, rows, k, xs_row, per_64):
    """`_four_rows_q4_k` for the activation rows rows[0:8]: row rows[j]'s arithmetic in lane j."""
    i0, i1, i2, i3, i4, i5, i6, i7 = rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7]
    nsb = k // QK_K
    p = r * nsb * 144
    acc, accm = zeros(), zeros()
    for s in range(nsb):
        o0, o1, o2, o3 = i0 * xs_row + 16 * s, i1 * xs_row + 16 * s, i2 * xs_row + 16 * s, i3 * xs_row + 16 * s
        o4, o5, o6, o7 = i4 * xs_row + 16 * s, i5 * xs_row + 16 * s, i6 * xs_row + 16 * s, i7 * xs_row + 16 * s
        dx = f32x8_of(at(xs, o0), at(xs, o1), at(xs, o2), at(xs, o3),
                      at(xs, o4), at(xs, o5), at(xs, o6), at(xs, o7))
        dd = splat(load_f16(w, p)) * dx
        dm = splat(load_f16(w, p + 2)) * dx
        scales, mins = k4_scales_mins(w, p + 4)
        t0, t1, t2, t3 = pair_sums_t(mins * load_f32x8(xs, o0 + 1), mins * load_f32x8(xs, o1 + 1),
                                     mins * load_f32x8(xs, o2 + 1), mins * load_f32x8(xs, o3 + 1))
        u0, u1, u2, u3 = pair_sums_t(mins * load_f32x8(xs, o4 + 1), mins * load_f32x8(xs, o5 + 1),
                                     mins * load_f32x8(xs, o6 + 1), mins * load_f32x8(xs, o7 + 1))
        v0, v1, v2, v3 = izeros(), izeros(), izeros(), izeros()
        v4, v5, v6, v7 = izeros(), izeros(), izeros(), izeros()
        for c in range(4):
            qb = bytes32(w, p + 16 + 32 * c)
            lo = qb & 15
            hi = qb >> 4
            sa, sb = ilane(scales, 2 * c), ilane(scales, 2 * c + 1)
            if c == 0:
                mc = half_join(t0, u0)
            elif c == 1:
                mc = half_join(t1, u1)
            elif c == 2:
                mc = half_join(t2, u2)
            else:
                mc = half_join(t3, u3)
            e = QK_K * s + 64 * c
            v0 = iadd(v0, iadd(dot_u8s(lo, xq, i0 * k + e, sa, sa), dot_u8s(hi, xq, i0 * k + e + 32, sb, sb)))
            v1 = iadd(v1, iadd(dot_u8s(lo, xq, i1 * k + e, sa, sa), dot_u8s(hi, xq, i1 * k + e + 32, sb, sb)))
            v2 = iadd(v2, iadd(dot_u8s(lo, xq, i2 * k + e, sa, sa), dot_u8s(hi, xq, i2 * k + e + 32, sb, sb)))
            v3 = iadd(v3, iadd(dot_u8s(lo, xq, i3 * k + e, sa, sa), dot_u8s(hi, xq, i3 * k + e + 32, sb, sb)))
            v4 = iadd(v4, iadd(dot_u8s(lo, xq, i4 * k + e, sa, sa), dot_u8s(hi, xq, i4 * k + e + 32, sb, sb)))
            v5 = iadd(v5, iadd(dot_u8s(lo, xq, i5 * k + e, sa, sa), dot_u8s(hi, xq, i5 * k + e + 32, sb, sb)))
            v6 = iadd(v6, iadd(dot_u8s(lo, xq, i6 * k + e, sa, sa), dot_u8s(hi, xq, i6 * k + e + 32, sb, sb)))
            v7 = iadd(v7, iadd(dot_u8s(lo, xq, i7 * k + e, sa, sa), dot_u8s(hi, xq, i7 * k + e + 32, sb, sb)))
            if per_64:
                acc = fma8(isum8(v0, v1, v2, v3, v4, v5, v6, v7), dd, acc)
                accm = fma8(mc, dm, accm)
                v0, v1, v2, v3 = izeros(), izeros(), izeros(), izeros()
                v4, v5, v6, v7 = izeros(), izeros(), izeros(), izeros()
        if not per_64:
            acc = fma8(isum8(v0, v1, v2, v3, v4, v5, v6, v7), dd, acc)
            accm = fma8(half_join((t0 + t1) + (t2 + t3), (u0 + u1) + (u2 + u3)), dm, accm)
        p += 144
    res = acc - accm
    for j in range(8):
        out[rows[j], r] = get_lane(res, j)


@exact_kernel
def _q6_k_quants(ql0, ql1, qh, part):
    """The 32 6-bit quants (0..63) of part `part` (0..3) of a Q6_K half whose ql and qh bytes are given."""
    if part == 0:
        return (ql0 & 15) | ((qh & 3) << 4)
    if part == 1:
        return (ql1 & 15) | (((qh >> 2) & 3) << 4)
    if part == 2:
        return (ql0 >> 4) | (((qh >> 4) & 3) << 4)
    return (ql1 >> 4) | (((qh >> 6) & 3) << 4)


@exact_kernel
def _eight_rows_q6_k_tiled(out, xq, xs, w, r, rows, k, xs_row):
    """Weight row r against the activation rows rows[0:8] as ggml's tiled Q6_K kernel (batches of 8+):
    isum = Σ sc_j Σ (q - 32)·q8 exactly per super-block, acc = fma(f32(d · f32(isum)), d8, acc); row
    rows[j]'s scalar fma chain in lane j."""
    i0, i1, i2, i3, i4, i5, i6, i7 = rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7]
    nsb = k // QK_K
    p = r * nsb * 210
    acc = zeros()
    for s in range(nsb):
        v0, v1, v2, v3 = izeros(), izeros(), izeros(), izeros()
        v4, v5, v6, v7 = izeros(), izeros(), izeros(), izeros()
        for h in range(2):
            ql0 = bytes32(w, p + 64 * h)
            ql1 = bytes32(w, p + 64 * h + 32)
            qh = bytes32(w, p + 128 + 32 * h)
            for part in range(4):
                q = _q6_k_quants(ql0, ql1, qh, part) - 32    # only the exact total matters: the offset in q
                sa = load_i8(w, p + 192 + 8 * h + 2 * part)
                sb = load_i8(w, p + 193 + 8 * h + 2 * part)
                e = QK_K * s + 128 * h + 32 * part
                v0 = iadd(v0, dot_i8s(q, xq, i0 * k + e, sa, sb))
                v1 = iadd(v1, dot_i8s(q, xq, i1 * k + e, sa, sb))
                v2 = iadd(v2, dot_i8s(q, xq, i2 * k + e, sa, sb))
                v3 = iadd(v3, dot_i8s(q, xq, i3 * k + e, sa, sb))
                v4 = iadd(v4, dot_i8s(q, xq, i4 * k + e, sa, sb))
                v5 = iadd(v5, dot_i8s(q, xq, i5 * k + e, sa, sb))
                v6 = iadd(v6, dot_i8s(q, xq, i6 * k + e, sa, sb))
                v7 = iadd(v7, dot_i8s(q, xq, i7 * k + e, sa, sb))
        dw = load_f16(w, p + 208)
        o = 16 * s
        dx = f32x8_of(at(xs, i0 * xs_row + o), at(xs, i1 * xs_row + o), at(xs, i2 * xs_row + o), at(xs, i3 * xs_row + o),
                      at(xs, i4 * xs_row + o), at(xs, i5 * xs_row + o), at(xs, i6 * xs_row + o), at(xs, i7 * xs_row + o))
        acc = fma8(splat(dw) * isum8(v0, v1, v2, v3, v4, v5, v6, v7), dx, acc)
        p += 210
    for j in range(8):
        out[rows[j], r] = get_lane(acc, j)


@exact_kernel
def _four_rows_q6_k(out, xq, xs, w, r, rows, k, xs_row):
    """Weight row r against the activation rows rows[0:4] with `_rows_q6_k`'s arithmetic
    (ggml_vec_dot_q6_K_q8_K), the weight block decoded once for the four."""
    i0, i1, i2, i3 = rows[0], rows[1], rows[2], rows[3]
    nsb = k // QK_K
    p = r * nsb * 210
    a0, a1, a2, a3 = zeros(), zeros(), zeros(), zeros()
    for s in range(nsb):
        v0, v1, v2, v3 = izeros(), izeros(), izeros(), izeros()
        for h in range(2):
            ql0 = bytes32(w, p + 64 * h)
            ql1 = bytes32(w, p + 64 * h + 32)
            qh = bytes32(w, p + 128 + 32 * h)
            for part in range(4):
                q = _q6_k_quants(ql0, ql1, qh, part)
                sa = load_i8(w, p + 192 + 8 * h + 2 * part)
                sb = load_i8(w, p + 193 + 8 * h + 2 * part)
                e = QK_K * s + 128 * h + 32 * part
                v0 = iadd(v0, dot_u8s(q, xq, i0 * k + e, sa, sb))
                v1 = iadd(v1, dot_u8s(q, xq, i1 * k + e, sa, sb))
                v2 = iadd(v2, dot_u8s(q, xq, i2 * k + e, sa, sb))
                v3 = iadd(v3, dot_u8s(q, xq, i3 * k + e, sa, sb))
        dw = load_f16(w, p + 208)
        o0, o1, o2, o3 = i0 * xs_row + 16 * s, i1 * xs_row + 16 * s, i2 * xs_row + 16 * s, i3 * xs_row + 16 * s
        a0 = fma8(splat(at(xs, o0) * dw), to_f32(isub(v0, q6_k_offsets(xs, o0, w, p + 192))), a0)
        a1 = fma8(splat(at(xs, o1) * dw), to_f32(isub(v1, q6_k_offsets(xs, o1, w, p + 192))), a1)
        a2 = fma8(splat(at(xs, o2) * dw), to_f32(isub(v2, q6_k_offsets(xs, o2, w, p + 192))), a2)
        a3 = fma8(splat(at(xs, o3) * dw), to_f32(isub(v3, q6_k_offsets(xs, o3, w, p + 192))), a3)
        p += 210
    out[i0, r] = hsum8(a0)
    out[i1, r] = hsum8(a1)
    out[i2, r] = hsum8(a2)
    out[i3, r] = hsum8(a3)


@exact_kernel
def _variant(qtype, kind):
    """Which of a type's two row arithmetics `kind` selects (1: Q4_K's groups of 4, Q6_K's tiled kernel)."""
    if qtype == Q4_K:
        return 1 if kind & ROW_GROUP4 else 0
    if qtype == Q6_K:
        return 1 if kind & ROW_TILED else 0
    return 0


@exact_kernel
def _group_rows(qtype, kinds, order):
    """Fill `order` (n + 16 entries) with the row indices grouped by variant, each variant's run padded with
    -1 to a multiple of 8; returns the used length. Every group of 8 entries is then of one variant."""
    n = kinds.shape[0]
    used = 0
    for variant in range(2):
        start = used
        for i in range(n):
            if _variant(qtype, kinds[i]) == variant:
                order[used] = i
                used += 1
        while (used - start) % 8:
            order[used] = -1
            used += 1
    return used


@exact_kernel
def _group(rows, order, g):
    """rows[0:8] = order[g:g+8] with padding (-1) replaced by the group's first row; returns how many of the
    eight are real rows."""
    real = 0
    for j in range(8):
        i = order[g + j]
        if i >= 0:
            real += 1
        rows[j] = i if i >= 0 else order[g]
    return real


@exact_kernel
def _offset_grouped_rows(xq, order, used):
    """Store the activation rows that the Q5_0/Q8_0 group kernels will read offset by 128 (`simd.dot_offset`);
    a group of one real row goes to `_rows_one`, which reads them as they are."""
    for g in range(0, used, 8):
        if order[g + 1] < 0:
            continue
        for j in range(8):
            i = order[g + j]
            if i >= 0:
                for e in range(xq.shape[1]):
                    xq[i, e] ^= np.int8(-128)


@inlined
def _quantize(x, xq, xs, qtype, kind):
    """One activation row as ggml quantizes it for this weight type: q8_1/q8_0 for the 32-blocks; q8_K for the
    K-quants, where the repacked Q4_K quantizes whole groups of 4 rows with quantize_mat_q8_K_4x8 and every
    other row (and every Q6_K row) with quantize_row_q8_K."""
    if qtype == Q4_K or qtype == Q6_K:
        quantize_q8_k(x, xq, xs, not (qtype == Q4_K and kind & ROW_GROUP4), qtype == Q4_K)
    else:
        quantize_q8(x, xq, xs)


@inlined
def _rows_one(out, xq, xs, w, qtype, r0, r1, k, sums16):
    """Rows r0..r1 of W times one activation row of the single-row kind: what llama.cpp computes for a batch
    of one row."""
    if qtype == Q4_1:
        _rows_q4_1(out, xq, xs, w, r0, r1, k // 32)
    elif qtype == Q5_0:
        _rows_q5_0(out, xq, xs, w, r0, r1, k // 32, sums16)
    elif qtype == Q8_0:
        _rows_q8_0(out, xq, xs, w, r0, r1, k // 32)
    elif qtype == Q4_K:
        _rows_q4_k(out, xq, xs, w, r0, r1, k // QK_K)
    else:
        _rows_q6_k(out, xq, xs, w, r0, r1, k // QK_K)


@inlined
def _pick(i, out0, out1, out2, w0, w1, w2, m0, m1, m2):
    """(out_i, w_i, m_i)."""
    if i == 0:
        return out0, w0, m0
    if i == 1:
        return out1, w1, m1
    return out2, w2, m2


@functools.cache
def _typed(qtype: int):
    """(matvec, gemm) for one weight type. The type is a constant in their code (not an argument), so Numba
    prunes the other types' branches (in `_quantize` and `_rows_one` too, inlined) and compiles only this
    type's kernels: a model holds two or three of the five types, and compiling all of them was most of a
    cold start. (The closures hold only the int: Numba's cache keys them on it, and they load from the cache
    like any kernel.)"""
    QT = qtype
    DECODED_TYPE = qtype in (Q5_0, Q8_0)

    @exact_parallel_kernel
    def matvec_t(out0, out1, out2, x, xq, xs, w0, w1, w2, m0, m1, m2, k):
        """out_i = W_i @ x for the matrices i with m_i > 0 (one to three of this type with k columns: q, k
        and v, or gate and up), the activation row quantized once, in one parallel region."""
        _quantize(x, xq, xs, QT, 0)
        sums16 = np.empty(k // 4 if QT == Q5_0 else 0, np.int32)
        if QT == Q5_0:
            _sums16(xq, sums16)
        # tasks of TASK_ROWS rows, or one task a matrix when they are small (a parallel region with work
        # for one thread costs little more than a serial loop; one call site compiles faster than two)
        rows = TASK_ROWS if (m0 + m1 + m2) * k > SERIAL_WEIGHTS else max(m0, m1, m2, 1)
        n0 = (m0 + rows - 1) // rows
        n1 = (m1 + rows - 1) // rows
        for t in prange(n0 + n1 + (m2 + rows - 1) // rows):
            i = 0 if t < n0 else (1 if t < n0 + n1 else 2)
            r0 = (t - (0 if i == 0 else (n0 if i == 1 else n0 + n1))) * rows
            out, w, m = _pick(i, out0, out1, out2, w0, w1, w2, m0, m1, m2)
            _rows_one(out, xq, xs, w, QT, r0, min(m, r0 + rows), k, sums16)

    @exact_parallel_kernel
    def gemm_t(out0, out1, out2, x, xq, xs, w0, w1, w2, m0, m1, m2, k, kinds):
        """out_i = x @ W_i.T for the matrices i with m_i > 0 (one to three of this type with k columns: q, k
        and v, or gate and up), the rows quantized and grouped once, the tiles of all of them in one parallel
        region."""
        n = x.shape[0]
        order = np.empty(n + 16, np.int64)
        used = _group_rows(QT, kinds, order)
        n_groups = used // 8
        # Q5_0/Q8_0 batches of several groups: each task decodes its weight rows once for all its groups,
        # and the activation scales are repeated in 8 lanes (xs8) so that d · dx is one vector multiply
        decoded = False
        xs8 = np.empty((0, 8), np.float32)
        if DECODED_TYPE:
            if n_groups >= DECODED_MIN_GROUPS:
                decoded = True
                if WIDE_REGISTERS:
                    xs8 = np.empty((n, k // 4), np.float32)
        elif QT == Q4_1:          # Q4_1 likewise: each task unpacks its weight rows once for all its groups
            decoded = n_groups >= DECODED_MIN_GROUPS
        # Q5_0: the rows alone in their group go to `_rows_one`, which subtracts 16 Σ x (`_sums16`) per lane
        lone = 0
        if QT == Q5_0:
            for g in range(0, used, 8):
                if order[g + 1] < 0:
                    lone += 1
        sums16 = np.empty((n, k // 4 if lone else 0), np.int32)
        if n <= SERIAL_QUANTIZE_ROWS:  # a few decode rows: a parallel region costs more than quantizing them
            for i in range(n):
                _quantize(x[i], xq[i], xs[i], QT, kinds[i])
                if DECODED_TYPE and WIDE_REGISTERS:
                    if decoded:
                        _repeat_scales(xs8[i], xs[i], k // 32)
        else:
            for i in prange(n):
                _quantize(x[i], xq[i], xs[i], QT, kinds[i])
                if DECODED_TYPE and WIDE_REGISTERS:
                    if decoded:
                        _repeat_scales(xs8[i], xs[i], k // 32)
        if lone:
            for g in range(0, used, 8):
                if order[g + 1] < 0:
                    _sums16(xq[order[g]], sums16[order[g]])
        if OFFSET_ACTIVATIONS and (QT == Q5_0 or QT == Q8_0):
            _offset_grouped_rows(xq, order, used)
        # the activation scales (and sums) of four rows side by side (`_scales_side_by_side`), for the two-row
        # kernels: Q4_1's groups, and Q5_0/Q8_0's groups of 2 to 4 rows; of eight (`_scales_eight`) for the
        # one-row kernels of unpacked weights: Q4_1's, and Q5_0/Q8_0's on 16 registers
        nb = k // 32
        xqf = xq.reshape(-1)
        xsf = xs.reshape(-1)
        xs_row = k // 16
        SIDE = QT == Q4_1 or QT == Q5_0 or QT == Q8_0
        xst = np.empty(16 * nb * n_groups if SIDE else 0, np.float32)
        if SIDE:
            grp_rows = np.empty(8, np.int64)
            for grp in range(n_groups):
                real = _group(grp_rows, order, 8 * grp)
                if decoded and (QT == Q4_1 or (real > 4 and not WIDE_REGISTERS)):
                    _scales_eight(xsf, grp_rows, nb, xs_row, xst, 16 * nb * grp)
                    continue
                if QT == Q4_1 or 1 < real <= 4:
                    _scales_side_by_side(xsf, grp_rows[0:4], nb, xs_row, xst, 16 * nb * grp)
                if QT == Q4_1 and real > 4:
                    _scales_side_by_side(xsf, grp_rows[4:8], nb, xs_row, xst, 16 * nb * grp + 8 * nb)
        variants = np.empty(n_groups, np.int8)
        for t in range(n_groups):
            variants[t] = _variant(QT, kinds[order[8 * t]])
        # weight rows per task: a gemm of a few rows (a decode step) takes longer tiles (measured faster on the
        # 2-vCPU machines; not measured with many cores, where they leave a small matrix fewer tasks than
        # threads), a prompt's tiles stay small enough for L1 with their unpacked weights
        tile = TASK_ROWS if n_groups >= DECODED_MIN_GROUPS else FEW_ROWS_TASK_ROWS
        nt0 = (m0 + tile - 1) // tile
        nt1 = (m1 + tile - 1) // tile
        n_tiles = nt0 + nt1 + (m2 + tile - 1) // tile      # matrix 0's tiles, then 1's, then 2's
        # activation rows in blocks of about X_BLOCK_BYTES, so that a block stays in L2 while a thread's tiles
        # pass over it (all n rows per tile fell out of L2 for k >= 2048); a task is one tile x one block
        # (blocks of equal size: the threads take equal shares of the tasks)
        row_bytes = 2 * k if decoded and DECODED_TYPE and WIDE_REGISTERS else k
        n_blocks = max(1, min(n_groups, (n * row_bytes + X_BLOCK_BYTES - 1) // X_BLOCK_BYTES))
        per_block = (n_groups + n_blocks - 1) // n_blocks
        n_blocks = (n_groups + per_block - 1) // per_block
        xs8f = xs8.reshape(-1)
        # whether any group goes to `_two_rows_q4_1` / `_two_rows_q5_0` (Q5_0/Q8_0: a group of 2 to 4 rows)
        two_rows = QT == Q4_1 and not decoded
        if DECODED_TYPE:
            for g in range(0, used, 8):
                if order[g + 1] >= 0 and order[g + 4] < 0:
                    two_rows = True
        # the empty arrays of tasks that decode nothing, made once (an allocation in a task costs as much as
        # a few weight rows of a small batch's work; the row list stays the task's own: a view into one
        # array for all tasks measured 13% slower on Gemma's prompts)
        no_qd = np.empty(0, np.uint8)
        no_dd = np.empty(0, np.float32)
        for t in prange(n_blocks * n_tiles):
            g0 = (t // n_tiles) * per_block
            g1 = min(n_groups, g0 + per_block)
            tt = t % n_tiles
            i = 0 if tt < nt0 else (1 if tt < nt0 + nt1 else 2)
            r0 = (tt - (0 if i == 0 else (nt0 if i == 1 else nt0 + nt1))) * tile
            out, w, m = _pick(i, out0, out1, out2, w0, w1, w2, m0, m1, m2)
            r1 = min(m, r0 + tile)
            # one allocation for the task's row list and the two-row kernels' scratch (a block's quants of two
            # weight rows, their products d · dx): a step of a few rows has some ten thousand tasks
            buf = np.empty(64 + (96 * nb if two_rows else 0), np.uint8)
            rows = buf[0:64].view(np.int64)
            two_q = buf[64:64 + 64 * nb] if two_rows else no_qd
            two_d = buf[64 + 64 * nb:].view(np.float32) if two_rows else no_dd
            qd = no_qd
            dd = no_dd
            dd8 = no_dd
            if DECODED_TYPE:
                if decoded:
                    qd = np.empty((r1 - r0) * k, np.uint8)
                    dd = np.empty((r1 - r0) * (k // 32), np.float32)
                    if not WIDE_REGISTERS:
                        dd8 = np.empty(8 * nb, np.float32)
                    _decode_q5_0_rows(w, r0, r1, k, QT == Q8_0, qd, dd)
            elif QT == Q4_1:
                if decoded:
                    qd = np.empty((r1 - r0) * k, np.uint8)
                    dd = np.empty((r1 - r0) * (k // 16), np.float32)     # d, m of each block
                    dd8 = np.empty(8 * nb, np.float32)
                    _decode_q4_1_rows(w, r0, r1, nb, qd, dd)
            for grp in range(g0, g1):
                real = _group(rows, order, 8 * grp)
                variant = variants[grp]
                if real == 1 and variant == 0 and QT != Q4_1:   # one single-row-kind row: nothing to share
                    # (Q4_1's two-row kernel gives any row the same bits; a prompt's gemm then does not
                    # compile the one-row kernel, which a cold start's first token would wait for)
                    i = rows[0]
                    _rows_one(out[i], xq[i], xs[i], w, QT, r0, r1, k, sums16[i])
                elif QT == Q4_1 and decoded:
                    for r in range(r0, r1):
                        _eight_rows_unpacked(out, xqf, xst, qd, dd, r - r0, r, rows, k, 16 * nb * grp, dd8, QT)
                elif QT == Q4_1 and real > 2 and not WIDE_REGISTERS:
                    t0 = 16 * nb * grp
                    for r in range(r0, r1):
                        _one_row_q4_1(out, xqf, xst, w, r, rows[0:4], k, t0)
                        if real > 4:
                            _one_row_q4_1(out, xqf, xst, w, r, rows[4:8], k, t0 + 8 * nb)
                elif QT == Q4_1:
                    # weight rows two at a time (an odd last one alone, `pair` false), each half of the
                    # group's rows with its scales side by side in xst
                    t0 = 16 * nb * grp
                    for r in range(r0, r1, 2):
                        _two_rows_q4_1(out, xqf, xst, w, r, r + 1 < r1, rows[0:4], k, t0, min(real, 4),
                                       two_q, two_d)
                        if real > 4:
                            _two_rows_q4_1(out, xqf, xst, w, r, r + 1 < r1, rows[4:8], k, t0 + 8 * nb, 4,
                                           two_q, two_d)
                elif QT == Q5_0 or QT == Q8_0:
                    if 2 < real <= 4 and not WIDE_REGISTERS:
                        for r in range(r0, r1):
                            _one_row_q5_0(out, xqf, xst, w, r, rows[0:4], k, 16 * nb * grp, QT == Q8_0)
                    elif real <= 4:
                        for r in range(r0, r1, 2):
                            _two_rows_q5_0(out, xqf, xst, w, r, r + 1 < r1, rows[0:4], k, 16 * nb * grp, QT == Q8_0,
                                           real, two_q, two_d)
                    elif decoded and not WIDE_REGISTERS:
                        for r in range(r0, r1):
                            _eight_rows_unpacked(out, xqf, xst, qd, dd, r - r0, r, rows, k, 16 * nb * grp, dd8, QT)
                    elif decoded:
                        for r in range(r0, r1 - 1, 2):
                            _eight_rows_decoded(out, xqf, xs8f, qd, dd, r, r - r0, rows, k, k // 4)
                        if (r1 - r0) % 2:                # an odd last row: as it is stored
                            _eight_rows_q5_0(out, xqf, xsf, w, r1 - 1, rows, k, xs_row, QT == Q8_0)
                    else:
                        for r in range(r0, r1):
                            _eight_rows_q5_0(out, xqf, xsf, w, r, rows, k, xs_row, QT == Q8_0)
                elif QT == Q4_K:
                    if real > 4:
                        for r in range(r0, r1):
                            _eight_rows_q4_k(out, xqf, xsf, w, r, rows, k, xs_row, variant == 1)
                    else:
                        for r in range(r0, r1):
                            _four_rows_q4_k(out, xqf, xsf, w, r, rows[0:4], k, xs_row, variant == 1)
                elif variant == 1:
                    for r in range(r0, r1):
                        _eight_rows_q6_k_tiled(out, xqf, xsf, w, r, rows, k, xs_row)
                else:
                    for r in range(r0, r1):
                        _four_rows_q6_k(out, xqf, xsf, w, r, rows[0:4], k, xs_row)
                        if real > 4:
                            _four_rows_q6_k(out, xqf, xsf, w, r, rows[4:8], k, xs_row)

    return matvec_t, gemm_t


def matvec_kernel(qtype: int):
    """The compiled kernel behind `matvec` for this weight type, None for a type outside EXACT_TYPES. Called
    as kernel(out0, out1, out2, x, xq, xs, w0, w1, w2, m0, m1, m2, k): out_i = W_i @ x for the matrices with
    m_i > 0 (unused ones: any arrays of the right types and m_i = 0)."""
    return _typed(int(qtype))[0] if int(qtype) in EXACT_TYPES else None


def gemm_kernel(qtype: int):
    """The compiled kernel behind `gemm` for this weight type, None for a type outside EXACT_TYPES. Called as
    kernel(out0, out1, out2, x, xq, xs, w0, w1, w2, m0, m1, m2, k, kinds): out_i = x @ W_i.T for the matrices
    with m_i > 0, as `gemm` computes each (unused ones: any arrays of the right types and m_i = 0)."""
    return _typed(int(qtype))[1] if int(qtype) in EXACT_TYPES else None


def matvec(out, x, xq, xs, w, qtype, m, k) -> None:
    """out f32[m] = W @ x for W the (m, k) tensor in bytes `w` (a type of EXACT_TYPES), as llama.cpp's
    kernel for one activation row computes each output. xq int8[k], xs f32[k // 16]: scratch."""
    _typed(int(qtype))[0](out, out, out, x, xq, xs, w, w, w, m, 0, 0, k)


def gemm(out, x, xq, xs, w, qtype, m, k, kinds) -> None:
    """out f32[n, m] = x @ W.T, row i with the arithmetic llama.cpp gives a row of kind kinds[i] (see
    `batch_kinds`). xq int8[n, k], xs f32[n, k // 16]: scratch. Parallel over tiles of weight rows x blocks
    of activation rows: a tile (a few KiB) stays in L1 while the block's rows pass over it eight at a time,
    and the block stays in L2 while the thread's tiles pass over it."""
    _typed(int(qtype))[1](out, out, out, x, xq, xs, w, w, w, m, 0, 0, k, kinds)
