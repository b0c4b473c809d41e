"""FP8 casts and the scaled product: the reference definition of the math of FP8 training.

The FP8-emitting kernels (the norms and SwiGLU writing their output as FP8) must equal the
quantizers here bit for bit, values and scales; `float8_linear` builds on them.

Formats (`float8_e4m3fn` and `float8_e5m2`, as torch and the H100's tensor cores name them):
    e4m3: 3 mantissa bits, largest 448   = 1.75 * 2**8,  relative rounding error <= 2**-4
    e5m2: 2 mantissa bits, largest 57344 = 1.75 * 2**15, relative rounding error <= 2**-3
Recipes (how `float8_linear` uses the formats):
    rowwise     every operand e4m3, one float32 scale per row along the contracted dimension.
                Gradients are e4m3 too: a scale per row gives each row its own range, so the
                extra exponent bit of e5m2 buys nothing and costs a bit of precision (torchao's
                rowwise recipe makes the same choice).
    tensorwise  one float32 scale per tensor; activations and weights e4m3, the output gradient
                e5m2 (torchao's default): one scale fits the largest value of the whole gradient,
                whose rows spread over many more powers of two than an activation's, so it needs
                e5m2's range (normal numbers over 2**30) more than e4m3's extra mantissa bit
                (2**15); with e4m3 its small rows would sink into subnormals and zeros.

The cast of a tensor x with absolute maximum amax (over a row, or over the whole tensor):

    e     = floor(log2(FP8_MAX / max(amax, AMAX_FLOOR)))      an integer
    data  = fp8(clamp(x * 2**e, -FP8_MAX, FP8_MAX))           x * 2**e computed in float32
    scale = 2**-e  (float32)                                  x ~= data * scale

Powers of two because multiplying by one is exact (barring float32 underflow, far below any FP8
number), so the cast's round-to-nearest-even is the only rounding, and the inverse is exact too:
the same bits on every device. `e` comes from amax's float32 bits (exponent, and whether its
mantissa passes FP8_MAX's 1.75), not from a division and a log2, whose rounding a GPU may do
differently; this is what a Triton kernel reproduces with `bitcast`. AMAX_FLOOR keeps an all-zero
row finite (its data is zeros, its scale 2**-48 for e4m3). A row whose amax is not finite (inf or
NaN) gets data and scale NaN, so the product's row is NaN and a step's non-finite check sees it
(a clamp would have turned inf into FP8_MAX silently); a kernel computing amax must propagate
NaN (`tl.max(..., propagate_nan=...)`).

`scaled_mm(a, b, scale_a, scale_b, out_dtype)` = out_dtype((a @ b in float32) * scale_a * scale_b):
`torch._scaled_mm` where this torch has it for the device and dtypes, otherwise
`emulated_scaled_mm`, the same math in PyTorch. On the CPU, with power-of-two scales, the two
agree bit for bit row-wise; tensor-wise torch's kernel sums in another order (float32 results a
few units of the last place apart, bfloat16 ones rarely one unit), both within the float32 sums'
bound (tests/test_float8.py).
"""

from typing import NamedTuple

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
# Each maximum is 1.75 * 2**MAX_EXPONENT, which `quantizing_exponent` relies on.
_MAX_EXPONENT = {E4M3: 8, E5M2: 15}
# float32's mantissa bits of 1.75: an amax whose mantissa passes 1.75 needs one power less.
_MANTISSA_1_75 = 0x600000
# Close to torchao's 1e-12 and a power of two: smaller amaxes are zeros to an FP8 product.
AMAX_FLOOR = 2.0**-40

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Float8Rows(NamedTuple):
    """An FP8 tensor and its float32 dequantizing scale: x ~= data.float() * scale.

    data: contiguous, x's shape. scale: [..., 1] (one per row of the last dimension) or []
    (one for the tensor).
    """
    data: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """data.float() * scale in `dtype`: exact in float32 (a power-of-two scale), and in any
        float dtype whose range holds the values."""
        return (self.data.float() * self.scale).to(dtype)


def quantizing_exponent(amax: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """floor(log2(FP8_MAX / max(amax, AMAX_FLOOR))) exactly, as int32; amax float32.

    With amax = m * 2**k (1 <= m < 2) and FP8_MAX = 1.75 * 2**E: log2(FP8_MAX / amax) =
    E - k + log2(1.75 / m), whose floor is E - k when m <= 1.75 and E - k - 1 above.
    Non-finite amax gives a meaningless exponent; `power_of_two_scales` masks it.
    """
    bits = amax.clamp(min=AMAX_FLOOR).view(torch.int32)
    k = (bits >> 23) - 127  # floor(log2(amax)): amax is normal, at least AMAX_FLOOR
    above_1_75 = ((bits & 0x7FFFFF) > _MANTISSA_1_75).to(torch.int32)
    return _MAX_EXPONENT[fp8_dtype] - k - above_1_75


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2**exponent as float32, from its bits; exponent within float32's normal range."""
    return ((exponent + 127) << 23).view(torch.float32)


def power_of_two_scales(amax: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(2**e, 2**-e) for the cast of values whose absolute maximum is amax (float32 tensor): the
    quantizing scale and the dequantizing one; NaN where amax is not finite.

    e lies in [-120, 48] for e4m3 and [-113, 55] for e5m2 (amax from AMAX_FLOOR to float32's
    largest), so both are normal float32 numbers."""
    exponent = quantizing_exponent(amax, fp8_dtype)
    finite = torch.isfinite(amax)
    nan = torch.full_like(amax, float("nan"))
    return (torch.where(finite, _power_of_two(exponent), nan),
            torch.where(finite, _power_of_two(-exponent), nan))


def _cast(x: torch.Tensor, amax: torch.Tensor, fp8_dtype: torch.dtype) -> Float8Rows:
    if fp8_dtype not in FP8_MAX:
        raise ValueError(f"fp8_dtype is {fp8_dtype}, expected torch.float8_e4m3fn or torch.float8_e5m2")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"cannot cast a {x.dtype} tensor to FP8: expected one of {_FLOAT_DTYPES}")
    # A cast has no gradient: it builds no autograd graph even from a parameter.
    x, amax = x.detach(), amax.detach()
    quantize, dequantize = power_of_two_scales(amax.float(), fp8_dtype)
    fp8_max = FP8_MAX[fp8_dtype]
    data = (x.float() * quantize).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return Float8Rows(data.contiguous(), dequantize)


def quantize_rows(x: torch.Tensor, fp8_dtype: torch.dtype = E4M3) -> Float8Rows:
    """x [..., K] cast to FP8 with one scale per row of its last dimension (scale [..., 1]).

    x may be any float dtype and any layout (a transposed view casts its columns); data comes
    back contiguous. An empty last dimension is refused: a row with no values has no scale."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}: quantize_rows needs a last dimension of 1 or more")
    return _cast(x, x.abs().amax(dim=-1, keepdim=True), fp8_dtype)


def quantize_tensor(x: torch.Tensor, fp8_dtype: torch.dtype = E4M3) -> Float8Rows:
    """x cast to FP8 with one scale for the whole tensor (scale shape [])."""
    if x.numel() == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}: quantize_tensor needs at least one value")
    return _cast(x, x.abs().amax(), fp8_dtype)


# ---------------------------------------------------------------------------------------------
# The scaled product.


def _check_scaled_mm(a, b, scale_a, scale_b, out_dtype) -> None:
    """The operands `torch._scaled_mm` takes on the H100, checked on every device so that a
    product that runs on the CPU runs on the GPU."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a {tuple(a.shape)} @ b {tuple(b.shape)}: expected [M, K] @ [K, N]")
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in FP8_MAX:
            raise ValueError(f"{name} is {t.dtype}, expected torch.float8_e4m3fn or torch.float8_e5m2")
    if a.dtype == E5M2 and b.dtype == E5M2:
        raise ValueError("a and b are both float8_e5m2: the FP8 tensor cores take at most one e5m2 operand")
    (m, k), n = a.shape, b.shape[1]
    if m % 16 or k % 16 or n % 16:
        raise ValueError(f"a {tuple(a.shape)} @ b {tuple(b.shape)}: every dimension must be a multiple of 16")
    if a.stride(1) != 1 or a.stride(0) < k:
        raise ValueError(f"a has strides {a.stride()}: expected row-major, e.g. a contiguous [M, K]")
    if b.stride(0) != 1 or b.stride(1) < k:
        raise ValueError(f"b has strides {b.stride()}: expected column-major, e.g. b_t.t() of a "
                         f"contiguous [N, K]")
    if scale_a.dtype != torch.float32 or scale_b.dtype != torch.float32:
        raise ValueError(f"scales are {scale_a.dtype} and {scale_b.dtype}, expected torch.float32")
    tensorwise = scale_a.shape == () and scale_b.shape == ()
    if not tensorwise and (scale_a.shape != (m, 1) or scale_b.shape != (1, n)):
        raise ValueError(f"scale_a {tuple(scale_a.shape)} and scale_b {tuple(scale_b.shape)}: expected "
                         f"both [] (tensorwise) or [{m}, 1] and [1, {n}] (rowwise)")
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype is {out_dtype}, expected one of {_FLOAT_DTYPES}")


def emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype: torch.dtype) -> torch.Tensor:
    """`scaled_mm` in PyTorch: FP8 values to float32 (exact), float32 products and sums, the
    scales applied to the float32 result, one rounding to out_dtype."""
    _check_scaled_mm(a, b, scale_a, scale_b, out_dtype)
    return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)


def _cpu_scaled_mm_takes_row_scales() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes a scale a row: torch 2.11's (oneDNN) takes one
    scale a tensor only and fails an internal assert otherwise. Probed once, on 16 x 16 ones."""
    ones = torch.ones(16, 16).to(torch.float8_e4m3fn)
    scale = torch.ones(16, 1)
    try:
        torch._scaled_mm(ones, ones.t(), scale, scale.t(), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


_CPU_HAS_SCALED_MM = torch._C._dispatch_has_kernel_for_dispatch_key("aten::_scaled_mm", "CPU")
_CPU_SCALED_MM_ROWWISE = _CPU_HAS_SCALED_MM and _cpu_scaled_mm_takes_row_scales()


def nvidia_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of an NVIDIA GPU; None elsewhere (the CPU, ROCm, whose
    FP8 formats differ: fnuz)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    props = torch.cuda.get_device_properties(device)
    return props.major, props.minor


def has_scaled_mm(device: torch.device, rowwise: bool, out_dtype: torch.dtype) -> bool:
    """Whether `torch._scaled_mm` runs this product here: the CPU where this torch has its
    kernel (row-wise, where that kernel takes row scales); NVIDIA GPUs from sm89 (Ada) tensor-wise
    and from sm90 (Hopper) row-wise, where the row-wise kernel writes bfloat16 only. ROCm's FP8
    formats differ (fnuz), so it emulates."""
    if device.type == "cpu":
        return _CPU_SCALED_MM_ROWWISE if rowwise else _CPU_HAS_SCALED_MM
    capability = nvidia_capability(device)
    if capability is None:
        return False
    if rowwise:
        return capability >= (9, 0) and out_dtype == torch.bfloat16
    return capability >= (8, 9)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = False) -> torch.Tensor:
    """out_dtype((a @ b) * scale_a * scale_b), products and sums in float32.

    a: [M, K] FP8, row-major. b: [K, N] FP8, column-major (`b_t.t()` of a contiguous [N, K]).
    M, K and N multiples of 16; at most one operand e5m2. scale_a [M, 1] and scale_b [1, N]
    (rowwise) or both [] (tensorwise), float32 dequantizing scales.

    On the H100 the tensor cores keep about 13 bits in their partial sums before cuBLAS adds them
    in float32 (measured: at most 2**-12 of sum |a||b| at K = 64, 2**-14.6 at K = 1024).
    fast_accum: let them sum all of K themselves (`use_fast_accum`): the rowwise product of a
    16,384-token w13 (K 2048, N 16384) took 0.75 ms instead of 0.90, its sums within 2**-11.6 of
    sum |a||b| at K = 1024, still well under the FP8 casts' own error (2**-4 of each value).
    float8_linear.py's forward products take it, as torchao's recipes do by default; the
    gradients' do not (the weight gradient's K is the step's tokens). The CPU's emulation sums
    in float32 either way.
    """
    _check_scaled_mm(a, b, scale_a, scale_b, out_dtype)
    if has_scaled_mm(a.device, scale_a.dim() == 2, out_dtype):
        return torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype)
