"""FP8 rows written by the kernels that compute them: float8.py's rowwise e4m3 cast, in Triton.

A kernel that holds a row of values v (float32, the activation already rounded to its dtype, so
the very values the plain kernel would store) casts it as `quantize_rows` does, bit for bit:

    amax_bits  = abs_max_bits(v)                      largest |v| as float32 bits (NaN, inf above)
    q, scale   = power_of_two_scales(amax_bits)       2**e and 2**-e, e from the bits (float8.py)
    data       = cast_e4m3(v, q, EMULATE)             fp8(clamp(v * q, -448, 448)), nearest even

On float32 bits an integer max orders |v| as the float max would, with NaN's bits above inf's:
the row's amax propagates NaN without `tl.max`'s NaN-dropping float compare, and the exponent needs
the bits anyway. A row wider than a block takes the `tl.maximum` of its blocks' `abs_max_bits`.

EMULATE: Triton's interpreter (CI's CPU mode; Triton 3.6 and 3.9 alike) does not round float32 to
fp8e4nv to nearest even: ties go away from zero (1.0625 -> 1.125), a carry out of the mantissa is
lost (1.9375 -> 1.0), subnormals come out wrong (3 * 2**-10 -> 2**-9) and NaN becomes 384. The
launchers pass `interpreting()`, and the cast is then done on the bits here. On the GPU the
native conversion (`cvt.rn.satfinite.e4m3x2.f32`) rounds to nearest even, as torch's cast does.
"""

import math
import struct

import triton
import triton.language as tl

from ligerzoo.kernels.float8 import AMAX_FLOOR, E4M3, FP8_MAX


def _float32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


# float8.py's constants as the bits the kernels compare: FP8_MAX = 1.75 * 2**_MAX_EXPONENT.
_E4M3_MAX = tl.constexpr(FP8_MAX[E4M3])
_MAX_EXPONENT = tl.constexpr(math.frexp(FP8_MAX[E4M3])[1] - 1)
_MANTISSA_1_75 = tl.constexpr(_float32_bits(1.75) & 0x7FFFFF)
_AMAX_FLOOR_BITS = tl.constexpr(_float32_bits(AMAX_FLOOR))
_INF_BITS = tl.constexpr(0x7F800000)
_NAN_BITS = tl.constexpr(0x7FC00000)  # torch's NaN, so a non-finite row's scale has its bits
_E4M3_MIN_NORMAL_BITS = tl.constexpr(_float32_bits(2.0**-6))
_E4M3_NAN = tl.constexpr(0x7F)


@triton.jit
def abs_max_bits(v):
    """The largest |v| of a row (v float32 [BLOCK], masked lanes 0) as int32 float bits."""
    return tl.max(v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=0)


@triton.jit
def power_of_two_scales(amax_bits):
    """(2**e, 2**-e) as float32 for e = floor(log2(448 / max(amax, AMAX_FLOOR))), from amax's
    bits as `quantizing_exponent` computes it; NaN both (torch's NaN bits) for a non-finite amax."""
    bits = tl.maximum(amax_bits, _AMAX_FLOOR_BITS)
    exponent = _MAX_EXPONENT - ((bits >> 23) - 127) - ((bits & 0x7FFFFF) > _MANTISSA_1_75).to(tl.int32)
    finite = amax_bits < _INF_BITS
    quantize = tl.where(finite, (exponent + 127) << 23, _NAN_BITS)
    dequantize = tl.where(finite, (127 - exponent) << 23, _NAN_BITS)
    return quantize.to(tl.float32, bitcast=True), dequantize.to(tl.float32, bitcast=True)


@triton.jit
def cast_e4m3(v, quantize, EMULATE: tl.constexpr):
    """fp8e4nv(clamp(v * quantize, -448, 448)), rounded to nearest even; NaN stays NaN.

    The clamp changes nothing in a finite row (amax * 2**e <= 448 by e's definition); it is
    float8.py's, and it must pass NaN (a non-finite row's quantize is NaN)."""
    scaled = tl.clamp(v * quantize, -_E4M3_MAX, _E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    if EMULATE:
        return _e4m3_bits(scaled).to(tl.float8e4nv, bitcast=True)
    return scaled.to(tl.float8e4nv)


@triton.jit
def _e4m3_bits(v):
    """The e4m3fn byte of float32 v (|v| <= 448 or NaN), nearest even, from v's bits. Normal
    results (|v| >= 2**-6): float32's 23-bit mantissa rounded to 3 bits on the integer bits, a
    carry moving into the exponent; then float32's exponent bias 127 becomes e4m3's 7. Subnormal
    results, multiples of 2**-9 (the code is the multiple, 8 meaning 2**-6): float32's own
    addition rounds |v| + 2**14 to a multiple of 2**-9, nearest even."""
    bits = v.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    sign = (bits >> 24) & 0x80
    rounded = (magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20
    normal = rounded - ((127 - 7) << 3)
    is_normal = magnitude >= _E4M3_MIN_NORMAL_BITS
    small = tl.where(is_normal, 0.0, tl.abs(v))  # NaN kept out of the float-to-int conversion
    subnormal = (((small + 16384.0) - 16384.0) * 512.0).to(tl.int32)
    code = tl.where(is_normal, normal, subnormal)
    code = tl.where(magnitude > _INF_BITS, _E4M3_NAN, code)
    return (code | sign).to(tl.uint8)
