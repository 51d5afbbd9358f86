"""Fixed-width vectors inside Numba kernels: the few operations the quantized dot products need.

Why this exists. Plain Numba loops over quantized blocks run at 1-5 GB/s, far from memory bandwidth, for two
reasons that no loop rewrite fixes: Numba types every integer operation as int64 (so an int8 × int8 product
is computed in 64-bit lanes), and LLVM will not keep per-lane accumulators in registers across the loop over
blocks (it reduces each 32-value block horizontally instead). These intrinsics give kernels three vector
value types that live in registers,

    F32x8   8 × float32        I32x8   8 × int32        U8x32   32 × uint8 (or int8, per operation)

and the operations on them, written as portable LLVM vector IR: LLVM lowers them to AVX2, AVX-512 or NEON
for whatever machine compiles them. The one exception is the int8 dot product, where generic IR cannot
express x86's saturating `pmaddubsw`; on x86 with AVX2 that instruction is used directly (its saturation
never triggers: see `dot_u8`), elsewhere the generic form.

Operators: U8x32 supports & | >> << + - with another U8x32 or a Python int (a per-byte constant);
F32x8 supports + - * / with another F32x8 or a float32 scalar (broadcast), rounded exactly as numpy rounds
them, so vectorised dequantization is bit-exact with the references; `fma(a, b, c)` is the fused form the
dot products use.
"""

from __future__ import annotations

import operator

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, config, errors
from numba.extending import intrinsic, models, overload, register_model

from .jit import LLVM_FASTMATH, exact_kernel

_F32, _I8, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _vec(t, n):
    return ir.VectorType(t, n)


def _const(t, n, values):
    return ir.Constant(_vec(t, n), values if isinstance(values, (list, tuple)) else [values] * n)


def _shuffle(builder, a, b, indices):
    return builder.shuffle_vector(a, b, _const(_I32, len(indices), list(indices)))


class _VectorType(types.Type):
    def __init__(self, name, llvm_type):
        self.llvm_type = llvm_type
        super().__init__(name=name)


class F32x8Type(_VectorType):
    def __init__(self):
        super().__init__("F32x8", _vec(_F32, 8))


class I32x8Type(_VectorType):
    def __init__(self):
        super().__init__("I32x8", _vec(_I32, 8))


class U8x32Type(_VectorType):
    def __init__(self):
        super().__init__("U8x32", _vec(_I8, 32))


F32x8, I32x8, U8x32 = F32x8Type(), I32x8Type(), U8x32Type()


for _cls in (F32x8Type, I32x8Type, U8x32Type):
    @register_model(_cls)
    class _Model(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            super().__init__(dmm, fe_type, fe_type.llvm_type)


_IS_X86 = llvm.get_process_triple().startswith(("x86_64", "i686", "i386"))


def _cpu_has(feature: str) -> bool:
    """Whether the CPU Numba compiles for has this x86 feature: NUMBA_CPU_FEATURES if set, the host's
    features if Numba targets the host, and False (the portable IR) for any other NUMBA_CPU_NAME."""
    if not _IS_X86:
        return False
    if config.CPU_FEATURES:
        return f"+{feature}" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME not in (None, "", "host"):
        return False
    return bool(llvm.get_host_cpu_features().get(feature, False))


USE_PMADDUBSW = _cpu_has("avx2")
# AVX-512 VNNI (with VL for 256-bit vectors): vpdpbusd sums each lane's four u8 x i8 products in one
# instruction, the same exact integers as pmaddubsw + pmaddwd (whose int16 pair sums never saturate here)
USE_VNNI = USE_PMADDUBSW and _cpu_has("avx512vnni") and _cpu_has("avx512vl")
# 32 vector registers (AVX-512, also for 256-bit vectors) or 16 (AVX2): how many accumulators a kernel can keep
WIDE_REGISTERS = _cpu_has("avx512f")


# ---- pointers into arrays ----

def _element_ptr(context, builder, array_type, array, index, as_type):
    """Pointer to `array[index]`, cast to `as_type*` (no bounds or wraparound checks)."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), as_type.as_pointer())


def _load(context, builder, sig, args, as_type, align=1):
    return builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1], as_type), align=align)


def _check_array(array, dtype_names):
    if not (isinstance(array, types.Array) and str(array.dtype) in dtype_names):
        raise errors.TypingError(f"expected an array of {'/'.join(dtype_names)}, got {array}")


_BYTES = ("uint8", "int8")


# ---- scalar loads from byte arrays (block headers) ----

_F16C = _cpu_has("f16c")
if _F16C:
    llvm.initialize_native_asmparser()  # Numba initialises the printer only; inline asm needs the parser


def _half_to_float(builder, bits):
    """f32 of an i16 (or <n x i16>) holding IEEE halves, rounded as F16C's vcvtph2ps does.

    Scalars on x86 with F16C: `vmovd` from a general register then `vcvtph2ps`. Left to itself LLVM loads a
    lone half with `vpinsrw`, which merges into whatever the register held before and so can chain each
    block's scale to the previous block's arithmetic (a loop-carried dependency that halved Q4_0's speed).
    Vectors with F16C: LLVM's own `fpext` is one vcvtph2ps. Without F16C, where LLVM would call a runtime
    function Numba does not link: place exponent and mantissa in an f32 and rescale by 2^112 (exact for
    normal and subnormal halves), with infinities and NaNs (quietened) patched in."""
    vector = isinstance(bits.type, ir.VectorType)
    n = bits.type.count if vector else 1

    def const(t, value):
        return _const(t, n, value) if vector else ir.Constant(t, value)

    i32, f32 = (_vec(_I32, n), _vec(_F32, n)) if vector else (_I32, _F32)
    h = builder.zext(bits, i32)
    if _F16C and not vector:
        asm = ir.InlineAsm(ir.FunctionType(_F32, [_I32]), "vmovd $1, $0\n\tvcvtph2ps $0, $0", "=x,r")
        return builder.call(asm, [h])
    if _F16C:
        return builder.fpext(builder.bitcast(bits, _vec(ir.HalfType(), n)), f32)
    magnitude = builder.shl(builder.and_(h, const(_I32, 0x7FFF)), const(_I32, 13))
    sign = builder.shl(builder.and_(h, const(_I32, 0x8000)), const(_I32, 16))
    value = builder.fmul(builder.bitcast(builder.or_(magnitude, sign), f32), const(_F32, 2.0 ** 112))
    special = builder.icmp_unsigned(">=", magnitude, const(_I32, 0x0F800000))
    quiet = builder.select(builder.icmp_unsigned(">", magnitude, const(_I32, 0x0F800000)),
                           const(_I32, 0x00400000), const(_I32, 0))
    special_bits = builder.or_(builder.or_(builder.or_(magnitude, const(_I32, 0x70000000)), quiet), sign)
    return builder.select(special, builder.bitcast(special_bits, f32), value)


@intrinsic
def load_f16(typingctx, w, i):
    """float32 of the little-endian IEEE half at byte `i` of a byte array (F16C's vcvtph2ps on x86)."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        return _half_to_float(builder, _load(context, builder, sig, args, _I16))
    return types.float32(w, types.intp), codegen


@intrinsic
def load_u8(typingctx, w, i):
    """The byte `w[i]` as uint8 (no wraparound check for negative indices, unlike `w[i]` in Numba)."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig, args, _I8)
    return types.uint8(w, types.intp), codegen


@intrinsic
def load_i8(typingctx, w, i):
    """The byte `w[i]` as int8."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig, args, _I8)
    return types.int8(w, types.intp), codegen


@intrinsic
def load_u32(typingctx, w, i):
    """The little-endian uint32 at byte `i` of a byte array."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig, args, _I32)
    return types.uint32(w, types.intp), codegen


@intrinsic
def load_f32(typingctx, w, i):
    """The little-endian float32 at byte `i` of a byte array."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig, args, _F32)
    return types.float32(w, types.intp), codegen


@intrinsic
def load_bf16(typingctx, w, i):
    """float32 of the little-endian bfloat16 at byte `i` of a byte array."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        bits = builder.shl(builder.zext(_load(context, builder, sig, args, _I16), _I32), _I32(16))
        return builder.bitcast(bits, _F32)
    return types.float32(w, types.intp), codegen


@intrinsic
def halves8(typingctx, a, i):
    """F32x8 of the 8 IEEE halves a[i:i + 8] of a uint16 array (the f16 KV cache); exact."""
    _check_array(a, ("uint16",))

    def codegen(context, builder, sig, args):
        return _half_to_float(builder, _load(context, builder, sig, args, _vec(_I16, 8)))
    return F32x8(a, types.intp), codegen


@intrinsic
def half_to_float(typingctx, bits):
    """float32 value of the IEEE half with these 16 bits."""
    def codegen(context, builder, sig, args):
        return _half_to_float(builder, args[0])
    return types.float32(types.uint16), codegen


def _four_loads(context, builder, sig, args, elem, n):
    """<n x elem>: lanes 0..3 the elements at the four byte offsets args[1:5] of the array args[0], the rest 0."""
    v = _const(elem, n, 0)
    for lane_, i in enumerate(args[1:]):
        value = builder.load(_element_ptr(context, builder, sig.args[0], args[0], i, elem), align=1)
        v = builder.insert_element(v, value, _I32(lane_))
    return v


@intrinsic
def half_pairs(typingctx, w, i0, i1, i2, i3):
    """F32x8 [h(i0), h(i0 + 2), h(i1), h(i1 + 2), ..., h(i3 + 2)]: the two IEEE halves at each of four byte
    offsets of a byte array (Q4_1's d and m of four blocks), exact, eight conversions in one (one vcvtph2ps
    with F16C)."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        words = _four_loads(context, builder, sig, args, _I32, 4)
        return _half_to_float(builder, builder.bitcast(words, _vec(_I16, 8)))
    return F32x8(w, types.intp, types.intp, types.intp, types.intp), codegen


@intrinsic
def prefetch(typingctx, w, i):
    """Ask for the cache line holding byte `i` of a byte array ahead of its use (a hint: never faults, even
    past the array's end)."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], _I8)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32]),
                                            "llvm.prefetch." + ("p0" if getattr(ptr.type, "is_opaque", False) else "p0i8"))
        builder.call(fn, [ptr, _I32(0), _I32(3), _I32(1)])
        return context.get_dummy_value()
    return types.none(w, types.intp), codegen


@intrinsic
def half_quads(typingctx, w, i0, i1, i2, i3):
    """F32x8 [h(i0), h(i1), h(i2), h(i3), 0, 0, 0, 0]: the IEEE halves at four byte offsets of a byte array (the
    scales of four rows' blocks), exact, converted together."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        return _half_to_float(builder, _four_loads(context, builder, sig, args, _I16, 8))
    return F32x8(w, types.intp, types.intp, types.intp, types.intp), codegen


@intrinsic
def dot_u8_less(typingctx, q, xq, i, c, j):
    """I32x8 `dot_u8(q, xq, i)` - c[j:j + 8] (c int32): with c[l] = 16 Σ of xq's four values of lane l, the
    lanes of `dot_i8(q - 16, xq, i)`, exact, without the sign flips that a signed q costs on AVX2."""
    _check_array(xq, ("int8",))
    _check_array(c, ("int32",))

    def codegen(context, builder, sig, args):
        x = builder.load(_element_ptr(context, builder, sig.args[1], args[1], args[2], _vec(_I8, 32)), align=1)
        less = builder.load(_element_ptr(context, builder, sig.args[3], args[3], args[4], _vec(_I32, 8)), align=4)
        dot = _dot_pmaddubsw(builder, args[0], x) if USE_PMADDUBSW else _dot_generic(builder, args[0], x, False)
        return builder.sub(dot, less)
    return I32x8(U8x32, xq, types.intp, c, types.intp), codegen


@intrinsic
def pairs_at(typingctx, a, i):
    """F32x8 [a[i], a[i + 1]] four times, a float32 array (an activation block's scale and sum, once per
    weight row of four)."""
    _check_array(a, ("float32",))

    def codegen(context, builder, sig, args):
        v = _load(context, builder, sig, args, _vec(_F32, 2), align=4)
        return _shuffle(builder, v, v, [0, 1] * 4)
    return F32x8(a, types.intp), codegen


@intrinsic
def lane_value(typingctx, v, j):
    """float32 v[j] (`j` a constant 0..7)."""
    _require_literals(j)

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], _I32(sig.args[1].literal_value))
    return types.float32(F32x8, j), codegen


# ---- byte vectors ----

@intrinsic
def bytes32(typingctx, w, i):
    """U8x32 of the 32 bytes at `w[i:i + 32]`."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig, args, _vec(_I8, 32))
    return U8x32(w, types.intp), codegen


@intrinsic
def store_bytes32(typingctx, w, i, v):
    """w[i:i + 32] = the 32 bytes of v (a uint8/int8 array)."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        builder.store(args[2], _element_ptr(context, builder, sig.args[0], args[0], args[1], _vec(_I8, 32)), align=1)
        return context.get_dummy_value()
    return types.none(w, types.intp, U8x32), codegen


@intrinsic
def nibbles16(typingctx, w, i):
    """U8x32 of the 16 bytes at `w[i:i + 16]` split into nibbles: lanes 0..15 the low nibbles, 16..31 the
    high nibbles (the Q4_0/Q4_1/Q5_0/Q5_1 element order)."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        q = _load(context, builder, sig, args, _vec(_I8, 16))
        lo = builder.and_(q, _const(_I8, 16, 0x0F))
        hi = builder.lshr(q, _const(_I8, 16, 4))
        return _shuffle(builder, lo, hi, range(32))
    return U8x32(w, types.intp), codegen


@intrinsic
def bits32(typingctx, word):
    """U8x32 whose lane j is bit j (0 or 1) of a uint32 (Q5 formats' fifth bits)."""
    def codegen(context, builder, sig, args):
        word = context.cast(builder, args[0], sig.args[0], types.uint32)
        # as a <32 x i1> mask: kmov + vpmovm2b on AVX-512, broadcast/shuffle/compare on AVX2
        return builder.zext(builder.bitcast(word, _vec(ir.IntType(1), 32)), _vec(_I8, 32))
    return U8x32(word), codegen


def _u8_binary(llvm_op):
    @intrinsic
    def op(typingctx, a, b):
        def codegen(context, builder, sig, args):
            lhs, rhs = args
            if sig.args[1] != U8x32:
                byte = context.cast(builder, rhs, sig.args[1], types.uint8)
                rhs = _shuffle(builder, builder.insert_element(ir.Constant(_vec(_I8, 32), ir.Undefined), byte,
                                                               _I32(0)), ir.Constant(_vec(_I8, 32), ir.Undefined),
                               [0] * 32)
            return getattr(builder, llvm_op)(lhs, rhs)
        return U8x32(a, b), codegen
    return op


for _pyop, _llvm_op in ((operator.and_, "and_"), (operator.or_, "or_"), (operator.rshift, "lshr"),
                        (operator.lshift, "shl"), (operator.add, "add"), (operator.sub, "sub")):
    _impl = _u8_binary(_llvm_op)

    def _make(impl):
        def typer(a, b):
            if a == U8x32 and (b == U8x32 or isinstance(b, types.Integer)):
                return lambda a, b: impl(a, b)
        return typer
    overload(_pyop)(_make(_impl))


# ---- int8 dot products ----

def _pairwise_add(builder, v, n):
    """<n x i32> -> <n/2 x i32>: lane l = v[2l] + v[2l + 1]."""
    return builder.add(_shuffle(builder, v, v, range(0, n, 2)), _shuffle(builder, v, v, range(1, n, 2)))


def _dot_generic(builder, a, b, a_signed):
    """Σ over groups of 4 of a_j * b_j -> <8 x i32> (LLVM matches the first pairwise add to pmaddwd)."""
    wa = builder.sext(a, _vec(_I32, 32)) if a_signed else builder.zext(a, _vec(_I32, 32))
    wb = builder.sext(b, _vec(_I32, 32))
    return _pairwise_add(builder, _pairwise_add(builder, builder.mul(wa, wb), 32), 16)


def _x86(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _dot_pmaddubsw(builder, unsigned, signed):
    """x86 AVX2: pmaddubsw (u8 × i8, adjacent pairs summed to i16) then pmaddwd by ones (pairs to i32); with
    VNNI, vpdpbusd (groups of four summed to i32 at once)."""
    if USE_VNNI:
        as_i32 = lambda v: builder.bitcast(v, _vec(_I32, 8))
        return _x86(builder, "llvm.x86.avx512.vpdpbusd.256", _vec(_I32, 8),
                    [_const(_I32, 8, 0), as_i32(unsigned), as_i32(signed)])
    pairs = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [unsigned, signed])
    return _x86(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [pairs, _const(_I16, 16, 1)])


@intrinsic
def dot_u8(typingctx, q, xq, i):
    """I32x8: lane l = Σ_{j=4l}^{4l+3} q[j] * xq[i + j], `q` read as unsigned and below 128 (4-, 5-, 6-bit
    quants), `xq` int8 activations in -127..127. Lanes 0..3 cover values 0..15, lanes 4..7 values 16..31.
    (pmaddubsw saturates a pair sum at 32767; 2 * 127 * 127 stays below it.)"""
    _check_array(xq, ("int8",))

    def codegen(context, builder, sig, args):
        x = builder.load(_element_ptr(context, builder, sig.args[1], args[1], args[2], _vec(_I8, 32)), align=1)
        if USE_PMADDUBSW:
            return _dot_pmaddubsw(builder, args[0], x)
        return _dot_generic(builder, args[0], x, a_signed=False)
    return I32x8(U8x32, xq, types.intp), codegen


@intrinsic
def dot_i8(typingctx, q, xq, i):
    """I32x8 as `dot_u8`, with `q` read as signed int8 (Q8_0, and quants stored with their offset removed)."""
    _check_array(xq, ("int8",))

    def codegen(context, builder, sig, args):
        x = builder.load(_element_ptr(context, builder, sig.args[1], args[1], args[2], _vec(_I8, 32)), align=1)
        return _dot_signed(builder, args[0], x)
    return I32x8(U8x32, xq, types.intp), codegen


def _dot_signed(builder, q, x):
    if USE_PMADDUBSW:
        # |q| × (x with q's sign) keeps the product while making the first operand unsigned.
        absq = _x86(builder, "llvm.abs.v32i8", _vec(_I8, 32), [q, ir.Constant(ir.IntType(1), 0)])
        return _dot_pmaddubsw(builder, absq, _x86(builder, "llvm.x86.avx2.psign.b", _vec(_I8, 32), [x, q]))
    return _dot_generic(builder, q, x, a_signed=True)


# Signed weights against activations stored offset by 128 (xq ^ 0x80, as unsigned bytes): with VNNI,
# vpdpbusd(base, x + 128, q) = base + Σ x·q + 128 Σ q, so starting from base = -128 Σ q (once per weight block,
# `offset_base`) one instruction per activation row gives the exact lanes `dot_i8` gives, without `dot_i8`'s
# per-row sign flip. Without VNNI (pmaddubsw would saturate on 255 × 127 pairs) the activations are not
# offset and these are `dot_i8` (`OFFSET_ACTIVATIONS` says which).

OFFSET_ACTIVATIONS = USE_VNNI


@intrinsic
def offset_base(typingctx, q):
    """I32x8: lane l = -128 Σ_{j=4l}^{4l+3} q[j] (q signed) with OFFSET_ACTIVATIONS, else zeros."""
    def codegen(context, builder, sig, args):
        if not OFFSET_ACTIVATIONS:
            return _const(_I32, 8, 0)
        as_i32 = lambda v: builder.bitcast(v, _vec(_I32, 8))
        sums = _x86(builder, "llvm.x86.avx512.vpdpbusd.256", _vec(_I32, 8),
                    [_const(_I32, 8, 0), as_i32(_const(_I8, 32, 128)), as_i32(args[0])])
        return builder.sub(_const(_I32, 8, 0), sums)
    return I32x8(U8x32), codegen


@intrinsic
def dot_offset(typingctx, q, xq, i, base):
    """I32x8 `dot_i8(q, xq, i)` for activations stored as `OFFSET_ACTIVATIONS` says, `base` from
    `offset_base(q)`."""
    _check_array(xq, ("int8",))

    def codegen(context, builder, sig, args):
        x = builder.load(_element_ptr(context, builder, sig.args[1], args[1], args[2], _vec(_I8, 32)), align=1)
        if not OFFSET_ACTIVATIONS:
            return _dot_signed(builder, args[0], x)
        as_i32 = lambda v: builder.bitcast(v, _vec(_I32, 8))
        return _x86(builder, "llvm.x86.avx512.vpdpbusd.256", _vec(_I32, 8), [args[3], as_i32(x), as_i32(args[0])])
    return I32x8(U8x32, xq, types.intp, I32x8), codegen


@intrinsic
def to_f32(typingctx, v):
    """F32x8 of an I32x8."""
    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _vec(_F32, 8))
    return F32x8(I32x8), codegen


# ---- float vectors ----

@intrinsic
def zeros(typingctx):
    def codegen(context, builder, sig, args):
        return _const(_F32, 8, 0.0)
    return F32x8(), codegen


def _splat_f32(builder, value):
    v = _vec(_F32, 8)
    return _shuffle(builder, builder.insert_element(ir.Constant(v, ir.Undefined), value, _I32(0)),
                    ir.Constant(v, ir.Undefined), [0] * 8)


@intrinsic
def splat(typingctx, s):
    """F32x8 with every lane `s`."""
    def codegen(context, builder, sig, args):
        return _as_f32x8(context, builder, args[0], sig.args[0])
    return F32x8(s), codegen


@intrinsic
def halves(typingctx, a, b):
    """F32x8 [a, a, a, a, b, b, b, b]: one scale per 16-value sub-block, matching the lanes of `dot_u8`."""
    def codegen(context, builder, sig, args):
        lo = _splat_f32(builder, context.cast(builder, args[0], sig.args[0], types.float32))
        hi = _splat_f32(builder, context.cast(builder, args[1], sig.args[1], types.float32))
        return _shuffle(builder, lo, hi, [0, 1, 2, 3, 8, 9, 10, 11])
    return F32x8(a, b), codegen


@intrinsic
def at(typingctx, a, i):
    """a[i] for a 1-d float32 array and an index known to be in range: a plain load. (Numba's `a[i]` with a
    signed index adds a negative-index wraparound, five scalar instructions, which in the batched kernels'
    inner loops cost more than the dot products.)"""
    _check_array(a, ("float32",))

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig, args, _F32, align=4)
    return types.float32(a, types.intp), codegen


@intrinsic
def load_f32x8(typingctx, a, i):
    """F32x8 of `a[i:i + 8]`, a float32 array."""
    _check_array(a, ("float32",))

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig, args, _vec(_F32, 8), align=4)
    return F32x8(a, types.intp), codegen


@intrinsic
def store_f32x8(typingctx, a, i, v):
    """a[i:i + 8] = v, a float32 array."""
    _check_array(a, ("float32",))

    def codegen(context, builder, sig, args):
        builder.store(args[2], _element_ptr(context, builder, sig.args[0], args[0], args[1], _vec(_F32, 8)),
                      align=4)
        return context.get_dummy_value()
    return types.none(a, types.intp, F32x8), codegen


@intrinsic
def f32x8_at(typingctx, w, i):
    """F32x8 of the 8 little-endian float32 at byte `i` of a byte array (F32 weights)."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig, args, _vec(_F32, 8))
    return F32x8(w, types.intp), codegen


@intrinsic
def f16x8_at(typingctx, w, i):
    """F32x8 of the 8 halves at byte `i` of a byte array (F16 weights)."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        return _half_to_float(builder, _load(context, builder, sig, args, _vec(_I16, 8)))
    return F32x8(w, types.intp), codegen


@intrinsic
def bf16x8_at(typingctx, w, i):
    """F32x8 of the 8 bfloat16 at byte `i` of a byte array (BF16 weights): each is the top half of an f32."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        h = _load(context, builder, sig, args, _vec(_I16, 8))
        bits = builder.shl(builder.zext(h, _vec(_I32, 8)), _const(_I32, 8, 16))
        return builder.bitcast(bits, _vec(_F32, 8))
    return F32x8(w, types.intp), codegen


@intrinsic
def u8_to_f32(typingctx, q, part):
    """F32x8 of bytes 8*part .. 8*part + 7 of a U8x32 read as unsigned (`part` a constant 0..3)."""
    if not isinstance(part, types.IntegerLiteral):
        raise errors.RequireLiteralValue(part)

    def codegen(context, builder, sig, args):
        p = sig.args[1].literal_value
        return builder.uitofp(_shuffle(builder, args[0], args[0], range(8 * p, 8 * p + 8)), _vec(_F32, 8))
    return F32x8(U8x32, part), codegen


@intrinsic
def i8x8_at(typingctx, w, i):
    """F32x8 of the 8 bytes at `w[i:i + 8]` read as signed int8 (exact)."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        return builder.sitofp(_load(context, builder, sig, args, _vec(_I8, 8)), _vec(_F32, 8))
    return F32x8(w, types.intp), codegen


@intrinsic
def i8_to_f32(typingctx, q, part):
    """F32x8 of bytes 8*part .. 8*part + 7 of a U8x32 read as signed int8 (`part` a constant 0..3)."""
    if not isinstance(part, types.IntegerLiteral):
        raise errors.RequireLiteralValue(part)

    def codegen(context, builder, sig, args):
        p = sig.args[1].literal_value
        return builder.sitofp(_shuffle(builder, args[0], args[0], range(8 * p, 8 * p + 8)), _vec(_F32, 8))
    return F32x8(U8x32, part), codegen


def _as_f32x8(context, builder, value, value_type):
    if value_type == F32x8:
        return value
    return _splat_f32(builder, context.cast(builder, value, value_type, types.float32))


def _f32_binary(llvm_op):
    @intrinsic
    def op(typingctx, a, b):
        def codegen(context, builder, sig, args):
            lhs = _as_f32x8(context, builder, args[0], sig.args[0])
            rhs = _as_f32x8(context, builder, args[1], sig.args[1])
            return getattr(builder, llvm_op)(lhs, rhs)  # strict IEEE: dequantization stays bit-exact
        return F32x8(a, b), codegen
    return op


for _pyop, _llvm_op in ((operator.add, "fadd"), (operator.sub, "fsub"), (operator.mul, "fmul"),
                         (operator.truediv, "fdiv")):
    _impl = _f32_binary(_llvm_op)

    def _make(impl):
        def typer(a, b):
            if (a == F32x8 and (b == F32x8 or isinstance(b, types.Float))) or \
                    (b == F32x8 and isinstance(a, types.Float)):
                return lambda a, b: impl(a, b)
        return typer
    overload(_pyop)(_make(_impl))


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c per lane, fused where the CPU has FMA (llvm.fmuladd); any operand may be a float32 scalar."""
    def codegen(context, builder, sig, args):
        ops = [_as_f32x8(context, builder, v, t) for v, t in zip(args, sig.args)]
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_vec(_F32, 8), [_vec(_F32, 8)] * 3), "llvm.fmuladd.v8f32")
        return builder.call(fn, ops)
    return F32x8(a, b, c), codegen


@intrinsic
def hsum(typingctx, v):
    """Σ of the 8 lanes, as float32."""
    def codegen(context, builder, sig, args):
        v = args[0]
        for width in (4, 2, 1):
            upper = _shuffle(builder, v, v, [width + j if j < width else j for j in range(8)])
            v = builder.fadd(v, upper, flags=LLVM_FASTMATH)
        return builder.extract_element(v, _I32(0))
    return types.float32(F32x8), codegen


# ---- per-super-block scales as vectors (K formats) ----

def _require_literals(*values):
    for v in values:
        if not isinstance(v, types.IntegerLiteral):
            raise errors.RequireLiteralValue(v)


@intrinsic
def lane(typingctx, v, j):
    """F32x8 with every lane v[j] (`j` a constant 0..7)."""
    _require_literals(j)

    def codegen(context, builder, sig, args):
        return _shuffle(builder, args[0], args[0], [sig.args[1].literal_value] * 8)
    return F32x8(F32x8, j), codegen


@intrinsic
def lanes(typingctx, v, a, b):
    """F32x8 [v[a] × 4, v[b] × 4] (`a`, `b` constants): one scale per 16-value half, matching `dot_u8`."""
    _require_literals(a, b)

    def codegen(context, builder, sig, args):
        a, b = sig.args[1].literal_value, sig.args[2].literal_value
        return _shuffle(builder, args[0], args[0], [a] * 4 + [b] * 4)
    return F32x8(F32x8, a, b), codegen


@intrinsic
def quad_twice(typingctx, v, a):
    """F32x8 [v[a .. a + 3], v[a .. a + 3]] (`a` a constant): four values for each of two weight rows."""
    _require_literals(a)

    def codegen(context, builder, sig, args):
        a = sig.args[1].literal_value
        return _shuffle(builder, args[0], args[0], [a, a + 1, a + 2, a + 3] * 2)
    return F32x8(F32x8, a), codegen


_PAIR = types.UniTuple(F32x8, 2)


def _pair(context, builder, a, b):
    return context.make_tuple(builder, _PAIR, [a, b])


@intrinsic
def deinterleave(typingctx, a, i):
    """(a[i], a[i+2], ..., a[i+14]) and (a[i+1], ..., a[i+15]) of a float32 array: the 8 scales and the
    8 sums of 8 consecutive activation blocks."""
    _check_array(a, ("float32",))

    def codegen(context, builder, sig, args):
        v = _load(context, builder, sig, args, _vec(_F32, 16), align=4)
        return _pair(context, builder, _shuffle(builder, v, v, range(0, 16, 2)), _shuffle(builder, v, v, range(1, 16, 2)))
    return _PAIR(a, types.intp), codegen


def _bytes_at(context, builder, sig, args, n):
    return _load(context, builder, sig, args, _vec(_I8, n))


@intrinsic
def k4_scales(typingctx, w, i):
    """Q4_K/Q5_K: the 8 six-bit scales and 8 six-bit mins packed in the 12 bytes at w[i], as F32x8 each.

        sc[j] = s[j] & 63,                          m[j] = s[j + 4] & 63                       (j < 4)
        sc[j] = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4,  m[j] = (s[j + 4] >> 4) | (s[j] >> 6) << 4   (j >= 4)
    """
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        s = _bytes_at(context, builder, sig, args, 12)
        pick = lambda idx: _shuffle(builder, s, s, idx)          # noqa: E731
        a = pick([0, 1, 2, 3, 8, 9, 10, 11])                      # s[j] | s[j + 4]
        b = pick([0, 1, 2, 3, 0, 1, 2, 3])                        # (unused) | s[j - 4]
        c = pick([4, 5, 6, 7, 8, 9, 10, 11])                      # s[j + 4]
        d = pick([4, 5, 6, 7, 4, 5, 6, 7])                        # (unused) | s[j]
        low = ir.Constant(_vec(ir.IntType(1), 8), [1, 1, 1, 1, 0, 0, 0, 0])
        k = lambda v: _const(_I8, 8, v)                           # noqa: E731
        high_bits = lambda v: builder.shl(builder.lshr(v, k(6)), k(4))  # noqa: E731
        sc = builder.select(low, builder.and_(a, k(63)), builder.or_(builder.and_(a, k(15)), high_bits(b)))
        mn = builder.select(low, builder.and_(c, k(63)), builder.or_(builder.lshr(c, k(4)), high_bits(d)))
        return _pair(context, builder, builder.uitofp(sc, _vec(_F32, 8)), builder.uitofp(mn, _vec(_F32, 8)))
    return _PAIR(w, types.intp), codegen


@intrinsic
def k3_scales(typingctx, w, i):
    """Q3_K: the 16 six-bit scales (minus 32) in the 12 bytes at w[i] as two F32x8: scale j has its low 4
    bits in nibble j // 8 of byte j % 8 and its high 2 bits at bits 2 * (j // 4) of byte 8 + j % 4."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        s = _bytes_at(context, builder, sig, args, 12)
        k = lambda v: _const(_I8, 16, v)                          # noqa: E731
        low_src = _shuffle(builder, s, s, [j % 8 for j in range(16)])
        low = builder.and_(builder.lshr(low_src, k([4 * (j // 8) for j in range(16)])), k(15))
        high_src = _shuffle(builder, s, s, [8 + j % 4 for j in range(16)])
        high = builder.and_(builder.lshr(high_src, k([2 * (j // 4) for j in range(16)])), k(3))
        value = builder.sub(builder.or_(low, builder.shl(high, k(4))), k(32))
        f = builder.sitofp(value, _vec(_F32, 16))
        return _pair(context, builder, _shuffle(builder, f, f, range(8)), _shuffle(builder, f, f, range(8, 16)))
    return _PAIR(w, types.intp), codegen


@intrinsic
def k2_scales(typingctx, w, i):
    """Q2_K: the 16 scale bytes at w[i] (scale in the low nibble, min in the high) as four F32x8:
    scales of sub-blocks 0..7, 8..15, then mins of 0..7, 8..15."""
    _check_array(w, _BYTES)

    def codegen(context, builder, sig, args):
        s = _bytes_at(context, builder, sig, args, 16)
        sc = builder.uitofp(builder.and_(s, _const(_I8, 16, 15)), _vec(_F32, 16))
        mn = builder.uitofp(builder.lshr(s, _const(_I8, 16, 4)), _vec(_F32, 16))
        parts = [_shuffle(builder, v, v, r) for v in (sc, mn) for r in (range(8), range(8, 16))]
        return context.make_tuple(builder, types.UniTuple(F32x8, 4), parts)
    return types.UniTuple(F32x8, 4)(w, types.intp), codegen


@intrinsic
def repeat2(typingctx, v, half):
    """F32x8 [v[4h], v[4h], v[4h+1], v[4h+1], ..., v[4h+3], v[4h+3]] for the constant h = `half`: the scale
    of each 32-value x block repeated for its two 16-value sub-blocks."""
    _require_literals(half)

    def codegen(context, builder, sig, args):
        h = sig.args[1].literal_value
        return _shuffle(builder, args[0], args[0], [4 * h + j // 2 for j in range(8)])
    return F32x8(F32x8, half), codegen


@intrinsic
def quantize32(typingctx, x, i, xq):
    """Quantize x[i:i + 32] (float32) to int8 xq[i:i + 32] with scale d = max|x| / 127, rounding to nearest
    even; returns (d, d * Σ q). An all-zero block gets d = 0 and q = 0."""
    _check_array(x, ("float32",))
    _check_array(xq, ("int8",))
    rt = types.UniTuple(types.float32, 2)

    def codegen(context, builder, sig, args):
        v32 = _vec(_F32, 32)
        v = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1], v32), align=4)
        module = builder.module
        fabs = cgutils.get_or_insert_function(module, ir.FunctionType(v32, [v32]), "llvm.fabs.v32f32")
        rint = cgutils.get_or_insert_function(module, ir.FunctionType(v32, [v32]), "llvm.rint.v32f32")
        iadd = cgutils.get_or_insert_function(module, ir.FunctionType(_I32, [_vec(_I32, 32)]),
                                              "llvm.vector.reduce.add.v32i32")
        # max |x| as a tree of compare-and-select (plain maxps; reduce.fmax would add NaN handling)
        m = builder.call(fabs, [v])
        for width in (16, 8, 4, 2, 1):
            a = _shuffle(builder, m, m, range(width))
            b = _shuffle(builder, m, m, range(width, 2 * width))
            m = builder.select(builder.fcmp_ordered(">", a, b), a, b)
        amax = builder.extract_element(m, _I32(0))
        d = builder.fdiv(amax, ir.Constant(_F32, 127.0))
        positive = builder.fcmp_ordered(">", d, ir.Constant(_F32, 0.0))
        inv = builder.select(positive, builder.fdiv(ir.Constant(_F32, 1.0), d), ir.Constant(_F32, 0.0))
        q = builder.fptosi(builder.call(rint, [builder.fmul(v, _splat_n(builder, inv, 32))]), _vec(_I8, 32))
        builder.store(q, _element_ptr(context, builder, sig.args[2], args[2], args[1], _vec(_I8, 32)), align=1)
        total = builder.sitofp(builder.call(iadd, [builder.sext(q, _vec(_I32, 32))]), _F32)
        return context.make_tuple(builder, rt, [d, builder.fmul(d, total)])
    return rt(x, types.intp, xq), codegen


def _splat_n(builder, value, n):
    v = _vec(value.type, n)
    return _shuffle(builder, builder.insert_element(ir.Constant(v, ir.Undefined), value, _I32(0)),
                    ir.Constant(v, ir.Undefined), [0] * n)


# ---- exact arithmetic: operations whose rounding is fixed (for the kernels that reproduce llama.cpp) ----

_V8 = ir.VectorType(_F32, 8)
f32 = np.float32


def llvm_call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def extract_lane(builder, v, i):
    return builder.extract_element(v, ir.Constant(_I32, i))


@intrinsic
def fma8(typingctx, a, b, c):
    """a * b + c per lane with one rounding (llvm.fma: vfmadd on x86, a correct software fma elsewhere).
    simd.fma is llvm.fmuladd, which LLVM may leave unfused; exactness needs the fused form."""
    def codegen(context, builder, sig, args):
        return llvm_call(builder, "llvm.fma.v8f32", _V8, list(args))
    return F32x8(F32x8, F32x8, F32x8), codegen


@intrinsic
def fma1(typingctx, a, b, c):
    """float32 a * b + c with one rounding."""
    def codegen(context, builder, sig, args):
        ops = [context.cast(builder, v, t, types.float32) for v, t in zip(args, sig.args)]
        return llvm_call(builder, "llvm.fma.f32", _F32, ops)
    return types.float32(a, b, c), codegen


@intrinsic
def hsum8(typingctx, v):
    """ggml's hsum_float_8, in its order: ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3)), plain f32 adds."""
    def codegen(context, builder, sig, args):
        a = [extract_lane(builder, args[0], i) for i in range(8)]
        r = [builder.fadd(a[4 + i], a[i]) for i in range(4)]
        return builder.fadd(builder.fadd(r[0], r[2]), builder.fadd(r[1], r[3]))
    return types.float32(F32x8), codegen


@intrinsic
def hsum8_hadd(typingctx, v):
    """The last steps of GGML_F32x8_REDUCE (ggml_vec_dot_f16): t_l = a_l + a_{l+4}, then two hadds:
    (t0 + t1) + (t2 + t3)."""
    def codegen(context, builder, sig, args):
        a = [extract_lane(builder, args[0], i) for i in range(8)]
        t = [builder.fadd(a[i], a[4 + i]) for i in range(4)]
        return builder.fadd(builder.fadd(t[0], t[1]), builder.fadd(t[2], t[3]))
    return types.float32(F32x8), codegen


def _transposed_sums(builder, vs, hadd):
    """<8 x float>, lane j the horizontal sum of vs[j] in hsum8's order (hadd False) or hsum8_hadd's: the
    same f32 additions of the same operands, eight vectors at a time (shuffles in between)."""
    # t_l = a_l + a_l+4 for two vectors at once: [t of vs[2m], t of vs[2m + 1]]
    t = [builder.fadd(_shuffle(builder, vs[2 * m], vs[2 * m + 1], [4, 5, 6, 7, 12, 13, 14, 15]),
                      _shuffle(builder, vs[2 * m], vs[2 * m + 1], [0, 1, 2, 3, 8, 9, 10, 11])) for m in range(4)]
    # the two middle sums of each vector: (t0 + t2), (t1 + t3) for hsum8; (t0 + t1), (t2 + t3) for the hadds
    first, second = ([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]) if not hadd else \
        ([0, 2, 8, 10, 4, 6, 12, 14], [1, 3, 9, 11, 5, 7, 13, 15])
    u = [builder.fadd(_shuffle(builder, t[2 * m], t[2 * m + 1], first),
                      _shuffle(builder, t[2 * m], t[2 * m + 1], second)) for m in range(2)]
    # u[m] = [v0 x, v0 y, v2 x, v2 y, v1 x, v1 y, v3 x, v3 y] (v = vs[4m..]): the last sum, lanes in order
    return builder.fadd(_shuffle(builder, u[0], u[1], [0, 4, 2, 6, 8, 12, 10, 14]),
                        _shuffle(builder, u[0], u[1], [1, 5, 3, 7, 9, 13, 11, 15]))


@intrinsic
def hsum8x8(typingctx, v0, v1, v2, v3, v4, v5, v6, v7):
    """F32x8 whose lane j is hsum8(v_j), bit for bit (eight reductions side by side)."""
    def codegen(context, builder, sig, args):
        return _transposed_sums(builder, list(args), hadd=False)
    return F32x8(*([F32x8] * 8)), codegen


@intrinsic
def hadd8x8(typingctx, v0, v1, v2, v3, v4, v5, v6, v7):
    """F32x8 whose lane j is hsum8_hadd(v_j), bit for bit."""
    def codegen(context, builder, sig, args):
        return _transposed_sums(builder, list(args), hadd=True)
    return F32x8(*([F32x8] * 8)), codegen


@intrinsic
def max8(typingctx, a, b):
    """Lane-wise max (b where b > a, else a): `max` per lane for ordered values."""
    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[1], args[0]), args[1], args[0])
    return F32x8(F32x8, F32x8), codegen


@intrinsic
def round_f16x8(typingctx, v):
    """`round_f16` of each lane: vcvtps2ph + vcvtph2ps where the CPU has F16C, else round_f16's integer
    arithmetic in lanes."""
    def codegen(context, builder, sig, args):
        x = args[0]
        if _F16C:
            return builder.fpext(builder.fptrunc(x, _vec(ir.HalfType(), 8)), _V8)
        i32 = lambda value: _const(_I32, 8, value)
        bits = builder.bitcast(x, _vec(_I32, 8))
        a = builder.and_(bits, i32(0x7FFFFFFF))
        sign = builder.and_(bits, i32(-0x80000000))
        odd = builder.and_(builder.lshr(a, i32(13)), i32(1))
        normal = builder.and_(builder.add(builder.add(a, i32(0xFFF)), odd), i32(~0x1FFF))
        small = builder.fsub(builder.fadd(builder.bitcast(a, _V8), _const(_F32, 8, 0.5)), _const(_F32, 8, 0.5))
        r = builder.select(builder.icmp_unsigned("<", a, i32(0x38800000)), builder.bitcast(small, _vec(_I32, 8)),
                           normal)
        r = builder.select(builder.icmp_unsigned(">=", a, i32(0x477FF000)), i32(0x7F800000), r)
        r = builder.or_(r, sign)
        r = builder.select(builder.icmp_unsigned(">=", a, i32(0x7F800000)), bits, r)
        return builder.bitcast(r, _V8)
    return F32x8(F32x8), codegen


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


@intrinsic
def v_expf8(typingctx, x):
    """ggml_v_expf (AVX2 + FMA) on 8 lanes: `v_expf` of each lane, the out-of-range lanes by its blends."""
    def codegen(context, builder, sig, args):
        c = lambda value: _const(_F32, 8, float(value))
        i32 = lambda value: _const(_I32, 8, value)
        as_i = lambda v: builder.bitcast(v, _vec(_I32, 8))
        as_f = lambda v: builder.bitcast(v, _V8)
        fma_ = lambda a, b, d: llvm_call(builder, "llvm.fma.v8f32", _V8, [a, b, d])
        x = args[0]
        z = fma_(x, c(_EXP_LOG2E), c(_EXP_R))
        n = builder.fsub(z, c(_EXP_R))
        neg_n = builder.fneg(n)
        b = fma_(neg_n, c(_EXP_LN2_LO), fma_(neg_n, c(_EXP_LN2_HI), x))
        e = builder.shl(as_i(z), i32(23))
        k = as_f(builder.add(e, i32(0x3F800000)))
        u = builder.fmul(b, b)
        j = fma_(fma_(fma_(c(_EXP_C0), b, c(_EXP_C1)), u, fma_(c(_EXP_C2), b, c(_EXP_C3))), u,
                 builder.fmul(c(_EXP_C4), b))
        fast = fma_(k, j, k)
        abs_n = as_f(builder.and_(as_i(n), i32(0x7FFFFFFF)))
        out_of_range = builder.fcmp_ordered(">", abs_n, c(126))
        g = builder.select(builder.fcmp_ordered("<=", n, c(0)), i32(-0x7E000000), i32(0))
        s1 = as_f(builder.add(g, i32(0x7F000000)))
        s2 = as_f(builder.sub(e, g))
        scaled = builder.fmul(fma_(s2, j, s2), s1)
        result = builder.select(out_of_range, scaled, fast)
        return builder.select(builder.fcmp_ordered(">", abs_n, c(192)), builder.fmul(s1, s1), result)
    return F32x8(F32x8), codegen


@exact_kernel
def half_bits(x):
    """The IEEE half nearest to float32 x (ties to even, as round_f16 and F16C's vcvtps2ph), as its 16 bits in
    an int: plain integer arithmetic, so the f16 KV cache needs no F16C and no runtime library."""
    r = round_f16(x)
    bits = f32_bits(r)
    sign = (bits >> 16) & 0x8000
    e = (bits >> 23) & 0xFF
    if e == 0xFF:                                            # inf, nan (kept quiet)
        return sign | 0x7C00 | (0x200 if bits & 0x7FFFFF else 0)
    if e >= 113:                                             # a normal half: rebias 127 -> 15
        return sign | ((e - 112) << 10) | ((bits >> 13) & 0x3FF)
    return sign | np.int64(abs(r) * f32(16777216.0))         # subnormal or zero: a multiple of 2^-24
