"""FP8 casts, the scaled product and the FP8 linear layer (ligerzoo/kernels/float8.py and
float8_linear.py) against float64 computations written independently of them: the cast's
exponent from log2 and its rounding on the format's grid, the products from float64 matmuls."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, non_contiguous

from ligerzoo.kernels.float8 import (
    AMAX_FLOOR,
    E4M3,
    E5M2,
    FP8_MAX,
    Float8Rows,
    emulated_scaled_mm,
    has_scaled_mm,
    quantize_rows,
    quantize_tensor,
    scaled_mm,
)
from ligerzoo.kernels.float8_columns import quantize_columns
from ligerzoo.kernels.float8_linear import Float8Weight, float8_linear, quantize_weight

# The module itself: the package exports a function of the same name.
float8_linear_module = importlib.import_module("ligerzoo.kernels.float8_linear")

MANTISSA_BITS = {E4M3: 3, E5M2: 2}
MIN_NORMAL_EXPONENT = {E4M3: -6, E5M2: -14}
# Cast error: half a unit in the last place relative to the value (3 or 2 mantissa bits), and half
# the smallest subnormal absolute, in the scaled units the cast rounds in.
UNIT_ROUNDOFF = {E4M3: 2.0**-4, E5M2: 2.0**-3}
HALF_SUBNORMAL = {E4M3: 2.0**-10, E5M2: 2.0**-17}
# The H100's FP8 tensor cores keep about 13 bits in their partial sums before cuBLAS adds them in
# float32: measured, at most 2**-12 of sum |a||b| at K = 64 (2**-14.6 at K = 1024), and when they
# sum all of K themselves (the forward's `fast_accum`) 2**-11.6 at K = 1024; so 2**-10.
SUM_ERROR_GPU = 2.0**-10
# The output gradient's format in each recipe (the documented choice, written here independently).
GRAD_FORMAT = {"rowwise": E4M3, "tensorwise": E5M2}
# One rounding to the output: 8 significant bits in bfloat16, 24 in float32.
OUT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def reference_cast(x: torch.Tensor, fp8_dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(values on the FP8 grid, dequantizing scale), float64 on the CPU: e = floor(log2(MAX /
    amax)), x * 2**e rounded to nearest even on the format's grid (normal and subnormal). On the
    CPU because CUDA's float64 log2 is not exact at powers of two (measured on the H100: 4096
    gave 11.99..., an exponent one short)."""
    x64 = x.detach().double().cpu()
    amax = x64.abs().amax(dim=-1, keepdim=True) if rowwise else x64.abs().amax()
    e = torch.floor(torch.log2(FP8_MAX[fp8_dtype] / amax.clamp(min=AMAX_FLOOR)))
    v = x64 * torch.exp2(e)
    binade = torch.floor(torch.log2(v.abs())).clamp(min=MIN_NORMAL_EXPONENT[fp8_dtype])
    quantum = torch.exp2(binade - MANTISSA_BITS[fp8_dtype])
    q = torch.round(v / quantum) * quantum  # torch.round: half to even
    return q, torch.exp2(-e)


def assert_cast_equal(cast: Float8Rows, x: torch.Tensor, fp8_dtype, rowwise: bool):
    values, scale = reference_cast(x, fp8_dtype, rowwise)
    assert cast.data.dtype == fp8_dtype and cast.data.shape == x.shape and cast.data.is_contiguous()
    assert cast.scale.dtype == torch.float32
    assert cast.scale.shape == (x.shape[:-1] + (1,) if rowwise else ())
    # Bytes, so that the sign of a zero counts; the reference's values lie on the grid, exactly.
    assert torch.equal(cast.data.view(torch.uint8).cpu(), values.to(fp8_dtype).view(torch.uint8))
    assert torch.equal(cast.scale.double().cpu(), scale)


def spread_rows(shape, dtype, low=-100, high=100):
    """Random rows whose magnitudes span 2**low to 2**high, with the cases the exponent and the
    rounding can get wrong written into the first rows."""
    x = torch.randn(shape, dtype=torch.float64) * torch.exp2(torch.randint(low, high, shape[:-1] + (1,)))
    x[0] = 0.0                                           # no amax: the floor's scale, data zeros
    x[1] = -0.0                                          # zeros keep their sign
    x[2:6] = torch.randn(4, shape[-1])
    x[2, 0] = 1.75 * 2.0**3                              # amax exactly 1.75 * 2**k: e = E - k
    x[3, 0] = -1.75 * 2.0**3 * (1 + 2.0**-7)             # just past 1.75 (bf16's next): e = E - k - 1
    x[4] *= torch.exp2(torch.randint(-26, 0, (shape[-1],)))  # many values under FP8's normal range
    x[5] *= 2.0**-70                                     # amax under AMAX_FLOOR
    return x.to(dtype)


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_equals_float64_cast(fp8_dtype, dtype):
    low, high = (-12, 12) if dtype == torch.float16 else (-100, 100)  # float16's own range
    x = spread_rows((40, 96), dtype, low, high).to(DEVICE)
    assert_cast_equal(quantize_rows(x, fp8_dtype), x, fp8_dtype, rowwise=True)


def test_quantize_rows_of_non_contiguous_and_transposed_inputs():
    x = spread_rows((48, 80), torch.bfloat16).to(DEVICE)
    strided = non_contiguous(x)
    assert_cast_equal(quantize_rows(strided), strided, E4M3, rowwise=True)
    # A transposed view casts the columns: the layout of dW's operands.
    assert_cast_equal(quantize_rows(x.t()), x.t(), E4M3, rowwise=True)
    three_d = x.view(6, 8, 80)
    assert_cast_equal(quantize_rows(three_d), three_d, E4M3, rowwise=True)


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
def test_quantize_tensor_equals_float64_cast(fp8_dtype):
    # Tensor-wide: many values fall under the normal range of the largest one's scale.
    x = spread_rows((32, 64), torch.bfloat16, -12, 12).to(DEVICE)
    assert_cast_equal(quantize_tensor(x, fp8_dtype), x, fp8_dtype, rowwise=False)
    assert_cast_equal(quantize_tensor(x.t(), fp8_dtype), x.t(), fp8_dtype, rowwise=False)
    zeros = torch.zeros(16, 16, device=DEVICE)
    assert_cast_equal(quantize_tensor(zeros, fp8_dtype), zeros, fp8_dtype, rowwise=False)


def test_extreme_magnitudes_keep_finite_normal_scales():
    big = torch.full((2, 16), torch.finfo(torch.float32).max, device=DEVICE)
    tiny = torch.full((2, 16), torch.finfo(torch.float32).smallest_normal / 8, device=DEVICE)  # subnormal
    for x in (big, tiny, -big):
        for fp8_dtype in (E4M3, E5M2):
            cast = quantize_rows(x, fp8_dtype)
            assert_cast_equal(cast, x, fp8_dtype, rowwise=True)
            smallest_normal = torch.finfo(torch.float32).smallest_normal
            assert torch.isfinite(cast.scale).all() and (cast.scale >= smallest_normal).all()


def test_a_non_finite_row_casts_to_nan_and_leaves_the_others():
    x = torch.randn(4, 32, device=DEVICE)
    x[1, 3], x[2, 5] = float("inf"), float("nan")
    cast = quantize_rows(x)
    for row in (1, 2):
        assert cast.scale[row].isnan().all() and cast.data[row].float().isnan().all()
    clean = x[[0, 3]]
    assert torch.equal(cast.data[[0, 3]].view(torch.uint8), quantize_rows(clean).data.view(torch.uint8))
    assert quantize_tensor(x).scale.isnan()


# ---------------------------------------------------------------------------------------------
# The scaled product.


def random_operand(rows, cols, fp8_dtype):
    return (torch.randn(rows, cols, device=DEVICE) * 8).to(fp8_dtype)


def power_of_two_scale(*shape):
    return torch.exp2(torch.randint(-20, 20, shape, device=DEVICE).float())


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the GPU's FP8 tensor cores sum in their own order")
@pytest.mark.parametrize("a_dtype,b_dtype", [(E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rowwise", [True, False])
def test_emulated_scaled_mm_agrees_with_torch_scaled_mm(a_dtype, b_dtype, out_dtype, rowwise):
    """Row-wise, torch's CPU kernel scales the operands and sums in float32 as the emulation does:
    with power-of-two scales (the only ones the casts make) that is the same exact multiplication,
    so the results are the same bits. Tensor-wise it sums in another order (measured: float32
    results a few units apart, bfloat16 ones 3 in 819,200 one unit apart): both within the
    float32 sums' bound of the exact product, K 2**-24 sum |a||b|, plus the output's rounding."""
    if not has_scaled_mm(DEVICE, rowwise, out_dtype):
        pytest.skip("this torch's CPU _scaled_mm takes one scale a tensor only (torch 2.11)")
    m, k, n = 48, 1024, 32
    a, b_t = random_operand(m, k, a_dtype), random_operand(n, k, b_dtype)
    scale_a, scale_b = (power_of_two_scale(m, 1), power_of_two_scale(1, n)) if rowwise else \
        (power_of_two_scale(), power_of_two_scale())
    expected = torch._scaled_mm(a, b_t.t(), scale_a, scale_b, out_dtype=out_dtype)
    assert torch.equal(scaled_mm(a, b_t.t(), scale_a, scale_b, out_dtype), expected)
    emulated = emulated_scaled_mm(a, b_t.t(), scale_a, scale_b, out_dtype)
    if rowwise:
        assert torch.equal(emulated, expected)
        return
    scales = scale_a.double() * scale_b.double()
    sum_bound = 2 * k * 2.0**-24 * (a.double().abs() @ b_t.double().abs().t()) * scales
    rounding = OUT_ROUNDOFF[out_dtype] * 2 * expected.double().abs()
    assert_within(emulated, expected.double(), sum_bound + rounding, "emulated vs torch._scaled_mm")


def test_scaled_mm_sums_exactly_what_float64_sums():
    """FP8 products are exact in float32; with small integers the float32 sums are exact too, so
    the result is the float64 product scaled (a wrong layout or scale broadcast fails this)."""
    m, k, n = 32, 64, 48
    a = torch.randint(-8, 9, (m, k), device=DEVICE).float().to(E4M3)
    b_t = torch.randint(-8, 9, (n, k), device=DEVICE).float().to(E4M3)
    scale_a, scale_b = power_of_two_scale(m, 1), power_of_two_scale(1, n)
    expected = (a.double() @ b_t.double().t()) * scale_a.double() * scale_b.double()
    assert torch.equal(scaled_mm(a, b_t.t(), scale_a, scale_b, torch.float32).double(), expected)


def test_scaled_mm_refuses_what_the_gpu_would():
    a, b_t = random_operand(32, 64, E4M3), random_operand(48, 64, E4M3)
    one = torch.ones((), device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 16"):
        scaled_mm(a[:, :40], b_t[:, :40].t(), one, one)
    with pytest.raises(ValueError, match="column-major"):
        scaled_mm(a, b_t.t().contiguous(), one, one)
    with pytest.raises(ValueError, match="both float8_e5m2"):
        scaled_mm(a.to(torch.float32).to(E5M2), b_t.float().to(E5M2).t(), one, one)
    with pytest.raises(ValueError, match=r"\[32, 1\] and \[1, 48\]"):
        scaled_mm(a, b_t.t(), torch.ones(32, 1, device=DEVICE), one)
    with pytest.raises(ValueError, match="expected torch.float8"):
        scaled_mm(a.float(), b_t.t(), one, one)
    with pytest.raises(ValueError, match="scales are torch.float64"):
        scaled_mm(a, b_t.t(), one.double(), one)


# ---------------------------------------------------------------------------------------------
# The FP8 linear layer.


def cast_operand(v, fp8_dtype, rowwise):
    """v [R, C] cast along C: (float64 values a product reads, bound on their distance from v).
    A cast errs by at most u |v| + eta, eta = half the smallest subnormal times the scale."""
    values, scale = reference_cast(v, fp8_dtype, rowwise)
    bound = UNIT_ROUNDOFF[fp8_dtype] * v.double().cpu().abs() + HALF_SUBNORMAL[fp8_dtype] * scale
    return values * scale, bound


def recast_columns(x, rowwise):
    """dW's x operand, x^T [K, M] along M, from x's forward cast along K: rowwise cast again along
    M (the same values wherever both casts are normal, so the errors add only their etas);
    tensorwise the same values transposed."""
    x_hat, err = cast_operand(x, E4M3, rowwise)
    if not rowwise:
        return x_hat.t(), err.t()
    values, scale = reference_cast(x_hat.t(), E4M3, rowwise)
    return values * scale, err.t() + HALF_SUBNORMAL[E4M3] * scale


def product_bounds(a, a_cast, b_t, b_cast):
    """For a [M, K] @ b_t [N, K]^T and the casts the product reads: (float64 product of the casts,
    bound on its float32 sums' error, bound on its distance from the exact product of a and b).

    |a_hat b_hat - a b| <= E_a |b| + |a| E_b + E_a E_b, summed over K; the float32 sums of K exact
    FP8 products err by at most K 2**-24 sum |a_hat||b_hat|, plus on the GPU SUM_ERROR_GPU."""
    (a_hat, err_a), (b_hat, err_b) = a_cast, b_cast
    abs_a, abs_b = a.double().cpu().abs(), b_t.double().cpu().abs()
    cast_bound = err_a @ abs_b.t() + abs_a @ err_b.t() + err_a @ err_b.t()
    sum_error = a.shape[1] * 2.0**-24 + (SUM_ERROR_GPU if DEVICE.type == "cuda" else 0.0)
    sum_bound = sum_error * (a_hat.abs() @ b_hat.abs().t())
    return a_hat @ b_hat.t(), sum_bound, cast_bound + sum_bound


def assert_within(actual, expected, bound, what):
    err = (actual.double().cpu() - expected.cpu()).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.3g} times its bound"


def make_layer(dtype, lead=(2, 32), k=64, n=48, bias=True):
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    weight = torch.randn(n, k, device=DEVICE, dtype=dtype) * k**-0.5
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    dy = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    return x, weight, b, dy


def run_layer(fn, x, weight, b, dy, **kwargs):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, b)]
    y = fn(*leaves, **kwargs)
    y.backward(dy)
    return y, *(t.grad if t is not None else None for t in leaves)


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_float8_linear_is_the_recipe_and_within_the_fp8_bound(recipe, dtype, bias):
    """Each product against (1) the float64 product of the recipe's own casts, within float32 sums
    and the output's rounding: the recipe exactly; (2) the float64 product of the unrounded
    operands, within the FP8 error bound derived from the formats' precision and K."""
    x, weight, b, dy = make_layer(dtype, bias=bias)
    y, dx, dw, db = run_layer(float8_linear, x, weight, b, dy, recipe=recipe)
    rowwise, grad_dtype, out_u = recipe == "rowwise", GRAD_FORMAT[recipe], OUT_ROUNDOFF[dtype]
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    products = {  # what: (result, a, its cast, b_t, its cast)
        "y": (y.reshape(-1, y.shape[-1]), x2, cast_operand(x2, E4M3, rowwise),
              weight, cast_operand(weight, E4M3, rowwise)),
        "dx": (dx.reshape(-1, dx.shape[-1]), dy2, cast_operand(dy2, grad_dtype, rowwise),
               weight.t(), cast_operand(weight.t(), E4M3, rowwise)),
        "dW": (dw, dy2.t(), cast_operand(dy2.t(), grad_dtype, rowwise), x2.t(), recast_columns(x2, rowwise)),
    }
    for what, (actual, a, a_cast, b_t, b_cast) in products.items():
        recipe_product, sum_bound, fp8_bound = product_bounds(a, a_cast, b_t, b_cast)
        exact = a.double().cpu() @ b_t.double().cpu().t()
        if what == "y" and bias:
            # Rounded to the output dtype, then the bias added and rounded again.
            b64 = b.double().cpu()
            recipe_product, exact = recipe_product + b64, exact + b64
            sum_bound = sum_bound + out_u * (recipe_product - b64).abs()
            fp8_bound = fp8_bound + out_u * (recipe_product - b64).abs()
        rounding = out_u * recipe_product.abs()
        assert_within(actual, recipe_product, (sum_bound + rounding) * (1 + 2 * out_u), f"{what} vs recipe")
        assert_within(actual, exact, (fp8_bound + rounding) * (1 + 2 * out_u), f"{what} vs FP8 bound")
    if bias:
        # float32 sum of M values, rounded once to dtype.
        dy64 = dy2.double().cpu()
        expected = dy64.sum(0)
        sum_bound = dy2.shape[0] * 2.0**-24 * dy64.abs().sum(0)
        assert_within(db, expected, out_u * expected.abs() + sum_bound, "db")
    else:
        assert db is None


def test_float8_linear_is_not_the_exact_product():
    """The layer really runs in FP8: its error is of the FP8 formats' size, not bf16's."""
    x, weight, _, _ = make_layer(torch.float32, bias=False)
    y = float8_linear(x, weight)
    rel = ((y.double() - F.linear(x.double(), weight.double())).norm() / y.double().norm()).item()
    assert 2.0**-9 < rel < 2.0**-3, rel


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_only_the_forward_product_sums_in_the_tensor_cores(recipe, monkeypatch):
    """The forward product leaves its sums to the tensor cores (fast_accum, K the layer's width);
    the gradients' keep float32 sums (the weight gradient's K is every token of the step)."""
    calls = []

    def spy(a, b, scale_a, scale_b, out_dtype=torch.bfloat16, fast_accum=False):
        calls.append((tuple(a.shape), fast_accum))
        return scaled_mm(a, b, scale_a, scale_b, out_dtype, fast_accum)

    monkeypatch.setattr(float8_linear_module, "scaled_mm", spy)
    x, weight, b, dy = make_layer(torch.bfloat16)  # x [2, 32, 64], weight [48, 64]
    run_layer(float8_linear, x, weight, b, dy, recipe=recipe)
    assert sorted(calls) == sorted([((64, 64), True), ((64, 48), False), ((48, 64), False)])


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_precast_input_and_weight_give_the_same_results(recipe):
    """x_fp8 (what an FP8-emitting kernel will hand over) and weight_fp8 (cast once a step)
    replace the layer's own casts bit for bit; the gradients still reach x and weight."""
    x, weight, b, dy = make_layer(torch.bfloat16)
    expected = run_layer(float8_linear, x, weight, b, dy, recipe=recipe)
    cast = quantize_rows if recipe == "rowwise" else quantize_tensor
    x_fp8, weight_fp8 = cast(x), quantize_weight(weight, recipe)
    got = run_layer(float8_linear, x, weight, b, dy, recipe=recipe, x_fp8=x_fp8, weight_fp8=weight_fp8)
    for what, g, e in zip(("y", "dx", "dW", "db"), got, expected):
        assert torch.equal(g, e), what


def test_weight_rows_alone_stand_for_the_weight_with_columns_made_from_them():
    """Rowwise, weight_fp8 may be W's rows alone (kept once a step, or gathered by FSDP2): the
    backward makes W's columns from them, bit for bit what Float8Weight with those columns gives."""
    x, weight, b, dy = make_layer(torch.bfloat16)
    rows = quantize_rows(weight)
    both = Float8Weight(rows, Float8Rows(*quantize_columns(rows.data, rows.scale)))
    expected = run_layer(float8_linear, x, weight, b, dy, weight_fp8=both)
    got = run_layer(float8_linear, x, weight, b, dy, weight_fp8=rows)
    for what, g, e in zip(("y", "dx", "dW", "db"), got, expected):
        assert torch.equal(g, e), what
    plain = run_layer(float8_linear, x, weight, b, dy)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[2], plain[2])  # the same forward and dW


def saved_dtypes(recipe, cast_weight=False):
    x, weight, _, _ = make_layer(torch.bfloat16, bias=False)
    x.requires_grad_(); weight.requires_grad_()
    casts = {False: None, True: quantize_weight(weight, recipe), "rows": quantize_rows(weight)}
    weight_fp8 = casts[cast_weight]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t,
                                                  lambda t: t):
        float8_linear(x, weight, recipe=recipe, weight_fp8=weight_fp8)
    return sorted(saved, key=str)


def test_saved_tensors_are_what_the_backward_reads():
    n, k, m = 48, 64, 64
    # x's FP8 cast, never x, and the weight (a parameter: no memory).
    assert saved_dtypes("rowwise") == sorted([(E4M3, (m, k)), (torch.float32, (m, 1)),
                                              (torch.bfloat16, (n, k))], key=str)
    assert saved_dtypes("tensorwise") == sorted([(E4M3, (m, k)), (torch.float32, ()),
                                                 (torch.bfloat16, (n, k))], key=str)
    # A weight cast once a step: its columns' cast, not the parameter.
    assert saved_dtypes("rowwise", cast_weight=True) == \
        sorted([(E4M3, (m, k)), (torch.float32, (m, 1)), (E4M3, (k, n)), (torch.float32, (k, 1))], key=str)
    # Its rows alone: those, whose columns the backward makes.
    assert saved_dtypes("rowwise", cast_weight="rows") == \
        sorted([(E4M3, (m, k)), (torch.float32, (m, 1)), (E4M3, (n, k)), (torch.float32, (n, 1))], key=str)


@pytest.mark.parametrize("lead,k,n", [((5, 3), 64, 48), ((32,), 40, 48), ((32,), 64, 24), ((0,), 64, 48)])
def test_shapes_the_fp8_product_cannot_take_run_the_exact_product(lead, k, n):
    x, weight, b, dy = make_layer(torch.bfloat16, lead=lead, k=k, n=n)
    got = run_layer(float8_linear, x, weight, b, dy)
    expected = run_layer(F.linear, x, weight, b, dy)
    for what, g, e in zip(("y", "dx", "dW", "db"), got, expected):
        assert torch.equal(g, e), what


def test_non_finite_input_gives_non_finite_rows():
    x, weight, _, _ = make_layer(torch.bfloat16, bias=False)
    x[0, 3, 7] = float("inf")
    y = float8_linear(x, weight)
    assert y[0, 3].isnan().all() and torch.isfinite(y[0, :3]).all()


@pytest.mark.parametrize("recipe,backend", [("rowwise", "aot_eager"), ("tensorwise", "aot_eager"),
                                            ("rowwise", "inductor")])
def test_fullgraph_compile_gives_the_same_results(recipe, backend, monkeypatch):
    """No graph break, no branch on values, and the same bits (the bias gradient's float32 sum
    may be ordered differently by Inductor: one rounding of dtype)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the column casts' triton_ops traced through the PyTorch path
    torch._dynamo.reset()
    x, weight, b, dy = make_layer(torch.bfloat16)
    expected = run_layer(float8_linear, x, weight, b, dy, recipe=recipe)
    compiled = torch.compile(float8_linear, fullgraph=True, backend=backend)
    got = run_layer(compiled, x, weight, b, dy, recipe=recipe)
    fused_bias = backend == "inductor" and not has_scaled_mm(DEVICE, recipe == "rowwise", torch.bfloat16)
    if fused_bias:
        # The emulated product is plain ops, and Inductor adds the bias to its float32 result
        # before the one rounding to bf16 (torch 2.11's CPU _scaled_mm takes no row scales): y
        # differs from eager's product-rounded-then-added by the product's rounding at most.
        error = (got[0].float() - expected[0].float()).abs()
        assert (error <= 2.0**-7 * (expected[0].float().abs() + b.float().abs())).all()
    for what, g, e in zip(("y", "dx", "dW"), got, expected):
        assert (what == "y" and fused_bias) or torch.equal(g, e), what
    torch.testing.assert_close(got[3], expected[3], rtol=2.0**-8, atol=0)

    def with_casts(x, weight, b):
        cast = quantize_rows if recipe == "rowwise" else quantize_tensor
        return float8_linear(x, weight, b, recipe, x_fp8=cast(x), weight_fp8=quantize_weight(weight, recipe))

    got = run_layer(torch.compile(with_casts, fullgraph=True, backend=backend), x, weight, b, dy)
    for what, g, e in zip(("y", "dx", "dW"), got, expected):
        assert (what == "y" and fused_bias) or torch.equal(g, e), f"{what} with casts given"


def test_float8_linear_errors_say_what_was_wrong():
    x, weight, b, _ = make_layer(torch.bfloat16)
    with pytest.raises(ValueError, match="recipe is 'columnwise'"):
        float8_linear(x, weight, recipe="columnwise")
    with pytest.raises(ValueError, match=r"x \(2, 32, 64\) and weight \(48, 32\)"):
        float8_linear(x, weight[:, :32])
    with pytest.raises(ValueError, match="x is torch.float32 and weight torch.bfloat16"):
        float8_linear(x.float(), weight)
    with pytest.raises(ValueError, match=r"bias is torch.bfloat16 \(47,\)"):
        float8_linear(x, weight, b[:47])
    with pytest.raises(ValueError, match=r"x_fp8.scale .* expected torch.float32 \(2, 32, 1\)"):
        float8_linear(x, weight, x_fp8=quantize_tensor(x))
    with pytest.raises(ValueError, match=r"x_fp8.data is torch.float8_e5m2"):
        float8_linear(x, weight, recipe="tensorwise", x_fp8=quantize_tensor(x, E5M2))
    with pytest.raises(TypeError, match=r"expected a Float8Weight \(from quantize_weight\) or, rowwise"):
        float8_linear(x, weight, weight_fp8=(weight, weight))
    with pytest.raises(TypeError, match=r"expected a Float8Weight \(from quantize_weight\)$"):
        float8_linear(x, weight, recipe="tensorwise", weight_fp8=quantize_rows(weight))
    with pytest.raises(ValueError, match=r"weight_fp8.data is torch.float8_e4m3fn \(47, 64\)"):
        float8_linear(x, weight, weight_fp8=quantize_rows(weight[:47]))
    with pytest.raises(ValueError, match=r"weight_fp8.rows.scale .* expected torch.float32 \(\)"):
        float8_linear(x, weight, recipe="tensorwise", weight_fp8=quantize_weight(weight, "rowwise"))
    with pytest.raises(ValueError, match="last dimension of 1 or more"):
        quantize_rows(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="fp8_dtype is torch.float16"):
        quantize_rows(x, torch.float16)
    assert isinstance(quantize_weight(weight), Float8Weight)
