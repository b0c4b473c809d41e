"""The producers fused with their FP8 linear layer (ligerzoo/kernels/float8_fused.py) against the
composition they replace: the producer's public op, then float8_linear given the FP8 rows of its
output. Every output and gradient is the same bits: the producer's FP8 launcher writes
quantize_rows of its plain output bit for bit (tests/test_float8_kernels.py), and the rest is
float8_linear.py's products and the producer's own backward, on the same operands in the same order.
Given W's rows already cast (weight_fp8): the same bits as float8_linear given those rows and W's
columns made from them, which are those of casting W itself where no value of W is an FP8 subnormal."""

import importlib

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F
from conftest import DEVICE

from ligerzoo.kernels import (
    add_rms_norm,
    add_rms_norm_linear,
    add_rms_norm_mlp,
    float8_linear,
    quantize_rows,
    rms_norm,
    rms_norm_linear,
    swiglu_linear,
    swiglu_packed,
)
from ligerzoo.kernels._utils import interpreting
from ligerzoo.kernels.float8 import E4M3, E5M2, Float8Rows, has_scaled_mm, quantize_tensor
from ligerzoo.kernels.float8_columns import quantize_columns
from ligerzoo.kernels.float8_linear import Float8Weight, float8_backward_products

# The modules themselves: the package exports functions of the same names.
float8_fused = importlib.import_module("ligerzoo.kernels.float8_fused")
swiglu_module = importlib.import_module("ligerzoo.kernels.swiglu")

EPS = 1e-6


def tensor(*shape, scale=1.0, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def norm_inputs(lead=(2, 32), k=64, n=48, residual=True, bias=True, dtype=torch.bfloat16):
    """(x, residual or None, norm_weight, weight, bias or None)."""
    return (tensor(*lead, k, dtype=dtype, seed=1), tensor(*lead, k, dtype=dtype, seed=2) if residual else None,
            1 + tensor(k, scale=0.1, dtype=dtype, seed=3), tensor(n, k, scale=k**-0.5, dtype=dtype, seed=4),
            tensor(n, dtype=dtype, seed=5) if bias else None)


def swiglu_inputs(lead=(2, 32), k=64, n=48, bias=True, dtype=torch.bfloat16):
    """(gate_up [..., 2K], weight [N, K], bias or None)."""
    return (tensor(*lead, 2 * k, scale=2, dtype=dtype, seed=6), tensor(n, k, scale=k**-0.5, dtype=dtype, seed=7),
            tensor(n, dtype=dtype, seed=8) if bias else None)


def outputs_and_grads(fn, *inputs):
    """fn's outputs and the gradients of its tensor inputs (None where an input is None), for
    random output gradients (the same for every fn given outputs of the same shapes)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = [tensor(*o.shape, dtype=o.dtype, seed=10 + i) for i, o in enumerate(outputs)]
    torch.autograd.backward(outputs, grads)
    return [o.detach() for o in outputs] + [t.grad if t is not None else None for t in leaves]


def assert_same_bits(got, expected, names):
    assert len(got) == len(expected) == len(names)
    for name, g, e in zip(names, got, expected):
        if e is None:
            assert g is None, name
        else:
            assert g.dtype == e.dtype and g.shape == e.shape, name
            assert torch.equal(g.view(-1).view(torch.uint8), e.view(-1).view(torch.uint8)), name


# The fused Functions and what they replace.


def fused_norm(x, residual, norm_weight, weight, bias, weight_fp8=None):
    if residual is None:
        return rms_norm_linear(x, norm_weight, EPS, weight, bias, weight_fp8=weight_fp8)
    return add_rms_norm_linear(x, residual, norm_weight, EPS, weight, bias, weight_fp8=weight_fp8)


def composed_norm(x, residual, norm_weight, weight, bias, weight_fp8=None):
    """weight_fp8: a Float8Weight, as float8_linear takes it."""
    if residual is None:
        h = rms_norm(x, norm_weight, EPS)
        return float8_linear(h, weight, bias, x_fp8=quantize_rows(h), weight_fp8=weight_fp8)
    h, summed = add_rms_norm(x, residual, norm_weight, EPS)
    return float8_linear(h, weight, bias, x_fp8=quantize_rows(h), weight_fp8=weight_fp8), summed


def fused_swiglu(gate_up, weight, bias, in_place_backward=False, weight_fp8=None):
    # A copy of the leaf: the in-place backward overwrites the tensor it is given.
    return swiglu_linear(gate_up.clone(), weight, bias, in_place_backward=in_place_backward,
                         weight_fp8=weight_fp8)


def composed_swiglu(gate_up, weight, bias, weight_fp8=None):
    h = swiglu_packed(gate_up.clone())
    return float8_linear(h, weight, bias, x_fp8=quantize_rows(h), weight_fp8=weight_fp8)


NORM_NAMES = ["y", "x + residual", "dx", "dresidual", "dnorm_weight", "dweight", "dbias"]


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_norm_linear_equals_the_norm_then_float8_linear(kernel_path, residual, bias):
    inputs = norm_inputs(residual=residual, bias=bias)
    names = NORM_NAMES if residual else [n for n in NORM_NAMES if n != "x + residual"]
    assert_same_bits(outputs_and_grads(fused_norm, *inputs), outputs_and_grads(composed_norm, *inputs), names)


def test_norm_linear_in_float32():
    inputs = norm_inputs(lead=(48,), dtype=torch.float32)
    assert_same_bits(outputs_and_grads(fused_norm, *inputs), outputs_and_grads(composed_norm, *inputs),
                     NORM_NAMES)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_place_backward", [True, False])
def test_swiglu_linear_equals_swiglu_then_float8_linear(kernel_path, bias, in_place_backward):
    inputs = swiglu_inputs(bias=bias)
    got = outputs_and_grads(lambda *t: fused_swiglu(*t, in_place_backward=in_place_backward), *inputs)
    assert_same_bits(got, outputs_and_grads(composed_swiglu, *inputs), ["y", "dgate_up", "dweight", "dbias"])


def test_swiglu_linear_in_place_backward_overwrites_gate_up():
    gate_up, weight, _ = swiglu_inputs(bias=False)
    leaf = gate_up.clone().requires_grad_()
    grads = []
    for in_place in (False, True):
        leaf.grad = None
        source = leaf.clone()  # as w13's output: a tensor nothing else reads
        swiglu_linear(source, weight, in_place_backward=in_place).sum().backward()
        assert torch.equal(source.detach(), gate_up) != in_place
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


# add_rms_norm_mlp: the FFN in one Function, SwiGLU's backward writing gate_up's gradient in FP8.


def mlp_inputs(lead=(2, 32), k=64, inner=80, biases=False):
    """(x, residual, norm_weight, w13 [2 inner, k], w2 [k, inner], b13, b2)."""
    x, residual, norm_weight, _, _ = norm_inputs(lead=lead, k=k, bias=False)
    return (x, residual, norm_weight, tensor(2 * inner, k, scale=k**-0.5, seed=20),
            tensor(k, inner, scale=inner**-0.5, seed=21), tensor(2 * inner, seed=22) if biases else None,
            tensor(k, seed=23) if biases else None)


def fused_mlp(x, residual, norm_weight, w13, w2, b13=None, b2=None, **weights_fp8):
    return add_rms_norm_mlp(x, residual, norm_weight, EPS, w13, w2, b13, b2, **weights_fp8)


def chained_mlp(x, residual, norm_weight, w13, w2, b13=None, b2=None, gate_up_grads=None):
    """The two fused Functions one after the other; gate_up's gradient appended to gate_up_grads."""
    gate_up, summed = add_rms_norm_linear(x, residual, norm_weight, EPS, w13, b13)
    if gate_up_grads is not None:
        gate_up.register_hook(lambda grad: gate_up_grads.append(grad.clone()))
    return swiglu_linear(gate_up, w2, b2, in_place_backward=True), summed


MLP_NAMES = ["y", "x + residual", "dx", "dresidual", "dnorm_weight", "dw13", "dw2", "db13", "db2"]


def test_mlp_equals_the_two_functions_but_for_w13s_gradient_columns(kernel_path):
    """Everything the same bits as the two Functions chained (gate_up's gradient rows are its cast
    bit for bit, tests/test_float8_kernels.py), but w13's weight gradient, whose dy columns are
    made from those rows: exactly the product of those columns with h's, and within FP8's
    rounding of the chain's, which casts the bf16 gradient along M itself."""
    inputs = mlp_inputs()
    gate_up_grads = []
    got = outputs_and_grads(fused_mlp, *inputs)
    expected = outputs_and_grads(lambda *t: chained_mlp(*t, gate_up_grads=gate_up_grads), *inputs)
    dw13 = MLP_NAMES.index("dw13")
    same = [i for i in range(len(MLP_NAMES)) if i != dw13]
    assert_same_bits([got[i] for i in same], [expected[i] for i in same], [MLP_NAMES[i] for i in same])
    x, residual, norm_weight = inputs[:3]
    h = add_rms_norm(x, residual, norm_weight, EPS)[0].reshape(-1, x.shape[-1])
    (gate_up_grad,) = gate_up_grads
    rows = quantize_rows(gate_up_grad.reshape(-1, gate_up_grad.shape[-1]))
    _, from_rows, _ = float8_backward_products(rows, quantize_rows(h), None, "rowwise", out_dtype=torch.bfloat16)
    assert_same_bits([got[dw13]], [from_rows], ["dw13"])
    error = (got[dw13].float() - expected[dw13].float()).norm() / expected[dw13].float().norm()
    assert 0 < error < 2.0**-5


def test_mlp_writes_gate_ups_gradient_over_w2s_input_gradient_where_a_row_fits(kernel_path, monkeypatch):
    """gate/up's gradient rows go over the memory of w2's input gradient (the same bytes a row)
    where SwiGLU's kernel holds a row, into a buffer of their own where it takes two passes: the
    same bits either way."""
    written_over = []
    over_dy = float8_fused.swiglu_packed_backward_float8_over_dy

    def spy(dy, gate_up):
        written_over.append(tuple(dy.shape))
        return over_dy(dy, gate_up)

    monkeypatch.setattr(float8_fused, "swiglu_packed_backward_float8_over_dy", spy)
    inputs = mlp_inputs()
    got = outputs_and_grads(fused_mlp, *inputs)
    assert written_over == [(64, 80)]
    if interpreting():
        monkeypatch.setattr(swiglu_module, "FLOAT8_ROW_IN_REGISTERS", 0)
        monkeypatch.setattr(swiglu_module, "FLOAT8_PASS_BLOCK", 64)
        assert_same_bits(outputs_and_grads(fused_mlp, *inputs), got, MLP_NAMES)
        assert written_over == [(64, 80)]


def test_mlp_with_biases_or_shapes_the_fp8_product_cannot_take_is_the_two_functions(kernel_path):
    for inputs in (mlp_inputs(biases=True), mlp_inputs(lead=(5, 3)), mlp_inputs(inner=40)):
        assert_same_bits(outputs_and_grads(fused_mlp, *inputs), outputs_and_grads(chained_mlp, *inputs), MLP_NAMES)


def test_mlp_given_weight_rows_is_the_two_functions_given_them(kernel_path):
    inputs = mlp_inputs()
    inputs = (*inputs[:3], weight_with_subnormals(160, 64, seed=4), weight_with_subnormals(64, 80, seed=5),
              None, None)
    w13_fp8, w2_fp8 = quantize_rows(inputs[3]), quantize_rows(inputs[4])
    got = outputs_and_grads(lambda *t: fused_mlp(*t, w13_fp8=w13_fp8, w2_fp8=w2_fp8), *inputs)

    def chained(x, residual, norm_weight, w13, w2, b13, b2):
        gate_up, summed = add_rms_norm_linear(x, residual, norm_weight, EPS, w13, b13, weight_fp8=w13_fp8)
        return swiglu_linear(gate_up, w2, b2, in_place_backward=True, weight_fp8=w2_fp8), summed

    expected = outputs_and_grads(chained, *inputs)
    same = [i for i, name in enumerate(MLP_NAMES) if name != "dw13"]
    assert_same_bits([got[i] for i in same], [expected[i] for i in same], [MLP_NAMES[i] for i in same])


def test_mlp_saves_gate_up_and_fp8_rows_and_frozen_weights_skip_their_products():
    """The two Functions' saved tensors, once each: the sum, the norm's weight and rstd, gate_up,
    both weights, h's and SwiGLU's FP8 rows. Frozen weights: no dW, and no rows saved for it."""
    bf16, m, k, inner = torch.bfloat16, 64, 64, 80
    expected = [(bf16, (m, k)), (bf16, (k,)), (torch.float32, (m,)), (bf16, (2 * inner, k)),
                (E4M3, (m, k)), (torch.float32, (m, 1)), (bf16, (m, 2 * inner)), (bf16, (k, inner)),
                (E4M3, (m, inner)), (torch.float32, (m, 1))]
    assert saved(fused_mlp, *mlp_inputs()[:5]) == sorted(expected, key=str)
    x, residual, norm_weight, w13, w2, _, _ = mlp_inputs()
    expected = outputs_and_grads(fused_mlp, x, residual, norm_weight, w13, w2)
    x_, r_, n_ = (t.clone().requires_grad_() for t in (x, residual, norm_weight))
    y, summed = add_rms_norm_mlp(x_, r_, n_, EPS, w13, w2)
    torch.autograd.backward([y, summed], [tensor(*y.shape, seed=10), tensor(*summed.shape, seed=11)])
    assert_same_bits([x_.grad, r_.grad, n_.grad], expected[2:5], ["dx", "dresidual", "dnorm_weight"])
    assert all(dtype != E4M3 for dtype, _ in saved(lambda *t: fused_mlp(*t, w13, w2), x, residual, norm_weight))


def test_mlp_errors_say_what_was_wrong():
    x, residual, norm_weight, w13, w2, _, _ = mlp_inputs()
    with pytest.raises(ValueError, match=r"w13 must have an even number of rows \(gate, then up\), got shape "
                                         r"\[159, 64\]"):
        add_rms_norm_mlp(x, residual, norm_weight, EPS, w13[:-1], w2)
    with pytest.raises(ValueError, match=r"w2 must have shape \[N, 80\] to multiply SwiGLU's output \(half of "
                                         r"w13's 160 rows\), got \[80, 64\]"):
        add_rms_norm_mlp(x, residual, norm_weight, EPS, w13, w2.t())
    with pytest.raises(ValueError, match=r"weight must have shape \[N, 64\] to multiply x's output"):
        add_rms_norm_mlp(x, residual, norm_weight, EPS, w13[:, :32], w2)
    with pytest.raises(ValueError, match=r"weight_fp8.data must be .* got torch.float8_e4m3fn \[80, 64\]"):
        add_rms_norm_mlp(x, residual, norm_weight, EPS, w13, w2, w2_fp8=quantize_rows(w2.t()))


def test_dy_given_as_fp8_rows_needs_the_rowwise_recipe():
    rows = quantize_rows(tensor(32, 48))
    with pytest.raises(ValueError, match="dy as FP8 rows needs the rowwise recipe and out_dtype"):
        float8_backward_products(rows, None, tensor(48, 64), "tensorwise", out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dy as FP8 rows needs the rowwise recipe and out_dtype"):
        float8_backward_products(rows, None, tensor(48, 64), "rowwise")


@pytest.mark.parametrize("lead,k,n", [((5, 3), 64, 48), ((32,), 40, 48), ((32,), 64, 24), ((0,), 64, 48)])
def test_shapes_the_fp8_product_cannot_take_run_the_exact_ops(lead, k, n):
    inputs = norm_inputs(lead=lead, k=k, n=n)

    def exact(x, residual, norm_weight, weight, bias):
        h, summed = add_rms_norm(x, residual, norm_weight, EPS)
        return F.linear(h, weight, bias), summed

    assert_same_bits(outputs_and_grads(fused_norm, *inputs), outputs_and_grads(exact, *inputs), NORM_NAMES)
    inputs = swiglu_inputs(lead=lead, k=k, n=n)
    assert_same_bits(outputs_and_grads(fused_swiglu, *inputs),
                     outputs_and_grads(lambda g, w, b: F.linear(swiglu_packed(g.clone()), w, b), *inputs),
                     ["y", "dgate_up", "dweight", "dbias"])


def saved(fn, *inputs):
    """(dtype, shape) of every tensor fn's autograd graph saves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    found = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append((t.dtype, tuple(t.shape))) or t,
                                                  lambda t: t):
        fn(*leaves)
    return sorted(found, key=str)


def test_saved_for_backward_is_the_producers_input_and_the_fp8_rows():
    """Never the producer's output h in bf16: its FP8 rows (1 byte an element) instead."""
    bf16 = torch.bfloat16
    m, k, n = 64, 64, 48
    expected = [(bf16, (m, k)), (bf16, (k,)), (torch.float32, (m,)), (bf16, (n, k)),
                (E4M3, (m, k)), (torch.float32, (m, 1))]  # x (or x + residual), norm, rstd, W, h's rows
    assert saved(fused_norm, *norm_inputs(residual=False, bias=False)) == sorted(expected, key=str)
    assert saved(fused_norm, *norm_inputs(residual=True, bias=False)) == sorted(expected, key=str)
    # gate_up as SwiGLU's backward reads it, W, h's rows
    expected = [(bf16, (m, 2 * k)), (bf16, (n, k)), (E4M3, (m, k)), (torch.float32, (m, 1))]
    assert saved(lambda g, w: swiglu_linear(g, w), *swiglu_inputs(bias=False)[:2]) == sorted(expected, key=str)


def test_frozen_weights_skip_their_products():
    """A frozen projection saves no FP8 rows and makes no dW; the inputs' gradients are unchanged."""
    x, residual, norm_weight, weight, bias = norm_inputs()
    expected = outputs_and_grads(fused_norm, x, residual, norm_weight, weight, bias)
    x_, r_, n_ = (t.clone().requires_grad_() for t in (x, residual, norm_weight))
    y, summed = add_rms_norm_linear(x_, r_, n_, EPS, weight, bias)
    torch.autograd.backward([y, summed], [tensor(*y.shape, seed=10), tensor(*summed.shape, seed=11)])
    assert_same_bits([x_.grad, r_.grad, n_.grad], expected[2:5], ["dx", "dresidual", "dnorm_weight"])
    assert all(dtype != E4M3 for dtype, _ in saved(lambda *t: fused_norm(*t[:3], weight, bias), x, residual,
                                                   norm_weight))


def chain(x, residual, norm_weight, w13, b13, w2, b2, wq):
    """The fused functions one after another, as a block calls them: with b13, the MLP is
    add_rms_norm_linear then swiglu_linear; without, one Function."""
    out, summed = add_rms_norm_mlp(x, residual, norm_weight, EPS, w13, w2, b13, b2)
    return rms_norm_linear(out, norm_weight, EPS, wq), summed


@pytest.mark.parametrize("biases", [True, False])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_gives_the_same_results(backend, biases, monkeypatch):
    """One graph, no branch on values, no host sync, and the same bits but for the bias gradients,
    float32 sums over M that Inductor may order its own way (one bf16 rounding apart), as in
    tests/test_float8.py. On the CPU Inductor compiles the kernels' PyTorch path, and would by
    default keep the producer's output h in float32 where the kernel rounds it to bf16 before the
    cast: emulate_precision_casts makes it round as written (on the GPU the Triton kernels are
    scheduled as they are)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a triton_op is traced through the PyTorch path here
    torch._dynamo.reset()
    k, inner, n = 64, 64, 48
    inputs = (*norm_inputs(k=k, bias=False)[:3], tensor(2 * inner, k, scale=k**-0.5, seed=20),
              tensor(2 * inner, seed=21) if biases else None, tensor(k, inner, scale=inner**-0.5, seed=22), None,
              tensor(n, k, scale=k**-0.5, seed=23))
    expected = outputs_and_grads(chain, *inputs)
    # config.patch, not monkeypatch: pytest 9.2's undo deletes a config module's entry, which
    # breaks every later compile in the session.
    with torch._inductor.config.patch(emulate_precision_casts=True):
        got = outputs_and_grads(torch.compile(chain, fullgraph=True, backend=backend), *inputs)
    names = ["y", "x + residual", "dx", "dresidual", "dnorm_weight", "dw13", "db13", "dw2", "db2", "dwq"]
    # torch 2.11's CPU emulates the rowwise product (its _scaled_mm takes no row scales), and
    # Inductor adds the bias to the emulated product before its rounding: gate/up one bf16 unit
    # apart moves FP8 values downstream, as on the GPU, by up to a step of their own.
    emulated = not got[0].is_cuda and not has_scaled_mm(got[0].device, True, torch.bfloat16)
    if backend == "aot_eager" or not (got[0].is_cuda or emulated):
        bias_grads = [names.index("db13")] if backend == "inductor" and biases else []
        for i in bias_grads:
            torch.testing.assert_close(got[i], expected[i], rtol=2.0**-8, atol=0)
        keep = [i for i in range(len(names)) if i not in bias_grads]
        assert_same_bits([got[i] for i in keep], [expected[i] for i in keep], [names[i] for i in keep])
    else:
        # On the GPU Inductor compiles the Triton kernels itself: the norm's rstd may come out one
        # float32 unit apart from eager's (seen on the H100), which moves some FP8 values one step;
        # everything downstream then stays within FP8's own rounding of the eager result.
        for name, g, e in zip(names, got, expected, strict=True):
            if e is None:
                assert g is None, name
                continue
            error = (g.float() - e.float()).norm() / e.float().norm()
            assert error < (2.0**-4 if emulated else 2.0**-5), (name, error)


def test_errors_say_what_was_wrong():
    x, residual, norm_weight, weight, bias = norm_inputs()
    with pytest.raises(ValueError, match=r"weight must have shape \[N, 64\] to multiply x's output, got \[48, 32\]"):
        rms_norm_linear(x, norm_weight, EPS, weight[:, :32])
    with pytest.raises(ValueError, match="weight must have x's dtype torch.bfloat16, got torch.float32"):
        add_rms_norm_linear(x, residual, norm_weight, EPS, weight.float())
    with pytest.raises(ValueError, match=r"bias must have shape \[48\], got \[47\]"):
        rms_norm_linear(x, norm_weight, EPS, weight, bias[:47])
    with pytest.raises(ValueError, match=r"residual must have x's shape"):
        add_rms_norm_linear(x, residual[:1], norm_weight, EPS, weight)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[64\]"):
        rms_norm_linear(x, norm_weight[:8], EPS, weight)
    gate_up, weight, _ = swiglu_inputs()
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu_linear(gate_up[..., :-1], weight)
    with pytest.raises(ValueError, match=r"weight must have shape \[N, 64\] to multiply gate_up's output"):
        swiglu_linear(gate_up, weight.t())


# ---------------------------------------------------------------------------------------------
# weight_fp8: W's rows cast already (as FSDP2 gathers them, ligerzoo/models/float8_gather.py)

FUSED = ["rms_norm_linear", "add_rms_norm_linear", "swiglu_linear"]


def weight_without_subnormals(n, k, seed):
    """W [N, K] whose magnitudes lie within a factor 16 of one another: no value is under 2**-14 of
    its row's or its column's largest, so none is an FP8 subnormal in either cast."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n, k), generator=g) * 2 - 1
    return (sign * 2 ** -(4 * torch.rand(n, k, generator=g)) * k**-0.5).to(DEVICE, torch.bfloat16)


def weight_with_subnormals(n, k, seed):
    """W [N, K] whose every fifth row has an outlier 2**16 times its others: those are FP8
    subnormals in their row's cast and normal numbers in their column's."""
    w = tensor(n, k, scale=k**-0.5, seed=seed)
    w[::5, 0] *= 2.0**16
    return w


def case(name, weight=None, lead=(2, 32), k=64, n=48):
    """(the fused function's test wrapper, its inputs, the names of its outputs and gradients,
    the weight's index among the inputs) for `name`, with `weight` if given."""
    if name == "swiglu_linear":
        gate_up, w, bias = swiglu_inputs(lead=lead, k=k, n=n)
        names = ["y", "dgate_up", "dweight", "dbias"]
        return fused_swiglu, [gate_up, w if weight is None else weight, bias], names, 1
    with_residual = name == "add_rms_norm_linear"
    x, residual, norm_weight, w, bias = norm_inputs(lead=lead, k=k, n=n, residual=with_residual)
    names = NORM_NAMES if residual is not None else [n for n in NORM_NAMES if n != "x + residual"]
    return fused_norm, [x, residual, norm_weight, w if weight is None else weight, bias], names, 3


@pytest.mark.parametrize("name", FUSED)
def test_given_weight_rows_the_fused_functions_give_the_same_bits(kernel_path, name):
    """The forward multiplies by the same rows, and dW reads no W. dx (and the norm's gradients)
    read W's columns made from the rows: W's columns cast, wherever a value lies in both casts'
    normal range (a power-of-two scale does not move where a 3-bit mantissa rounds, and the
    product's power-of-two scales are exact), so on a W with no value elsewhere every output and
    gradient is the same bits. A Gaussian W mostly gives them too, but not for certain: a value
    under 2**-14 of its row's largest may round otherwise (the next test)."""
    fn, inputs, names, w_index = case(name, weight_without_subnormals(48, 64, seed=4))
    got = outputs_and_grads(lambda *t: fn(*t, weight_fp8=quantize_rows(t[w_index])), *inputs)
    assert_same_bits(got, outputs_and_grads(fn, *inputs), names)


@pytest.mark.parametrize("name", FUSED)
def test_given_weight_rows_dx_reads_the_columns_made_from_them(kernel_path, name):
    """Where W's columns made from its rows are not W's columns cast (FP8 subnormals), every output
    and gradient is float8_linear's given the rows and those columns, bit for bit; the forward and
    dW are still the fused function's casting W itself."""
    weight = weight_with_subnormals(48, 64, seed=4)
    rows = quantize_rows(weight)
    given = Float8Weight(rows, Float8Rows(*quantize_columns(rows.data, rows.scale)))
    fn, inputs, names, _ = case(name, weight)
    composed = composed_swiglu if fn is fused_swiglu else composed_norm
    got = outputs_and_grads(lambda *t: fn(*t, weight_fp8=rows), *inputs)
    assert_same_bits(got, outputs_and_grads(lambda *t: composed(*t, weight_fp8=given), *inputs), names)
    casting = outputs_and_grads(fn, *inputs)
    same = [i for i, n in enumerate(names) if n in ("y", "x + residual", "dweight", "dbias")]
    assert_same_bits([got[i] for i in same], [casting[i] for i in same], [names[i] for i in same])
    dinput = names.index("dgate_up" if fn is fused_swiglu else "dx")
    assert not torch.equal(got[dinput], casting[dinput])  # the columns do differ here


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("lead", [(2, 32), (5, 3)], ids=["fp8", "exact"])
def test_given_weight_rows_the_weights_values_are_not_read(name, lead):
    """A weight of NaNs beside its rows gives what the weight itself does: outputs and gradients
    (dW too), in FP8 and in the exact fallback."""
    fn, inputs, names, w_index = case(name, lead=lead)
    rows = quantize_rows(inputs[w_index])
    expected = outputs_and_grads(lambda *t: fn(*t, weight_fp8=rows), *inputs)
    inputs[w_index] = torch.full_like(inputs[w_index], float("nan"))
    assert_same_bits(outputs_and_grads(lambda *t: fn(*t, weight_fp8=rows), *inputs), expected, names)


@pytest.mark.parametrize("lead,k,n", [((5, 3), 64, 48), ((32,), 40, 48), ((32,), 64, 24), ((0,), 64, 48)])
def test_given_weight_rows_shapes_the_fp8_product_cannot_take_multiply_by_their_values(lead, k, n):
    """The exact fallback multiplies by the rows' values (dequantized exactly), not W's; W gets
    the gradient those values would."""

    def exact_norm(x, residual, norm_weight, weight, bias):
        h, summed = add_rms_norm(x, residual, norm_weight, EPS)
        return F.linear(h, weight, bias), summed

    def exact_swiglu(gate_up, weight, bias):
        return F.linear(swiglu_packed(gate_up.clone()), weight, bias)

    for name, exact in [("add_rms_norm_linear", exact_norm), ("swiglu_linear", exact_swiglu)]:
        fn, inputs, names, w_index = case(name, lead=lead, k=k, n=n)
        rows = quantize_rows(inputs[w_index])
        values = (rows.data.float() * rows.scale).to(torch.bfloat16)
        assert not torch.equal(values, inputs[w_index])  # W itself would give other bits
        got = outputs_and_grads(lambda *t: fn(*t, weight_fp8=rows), *inputs)
        inputs[w_index] = values  # as a leaf: its gradient is what W's must be
        assert_same_bits(got, outputs_and_grads(exact, *inputs), names)


def test_given_weight_rows_the_backward_saves_them_not_the_weight():
    """W's rows (1 byte an element and 4 a row; under FSDP2 the gathered buffers, freed and
    filled again) take the place of the parameter among what the backward keeps."""
    bf16 = torch.bfloat16
    m, k, n = 64, 64, 48
    x, _, norm_weight, weight, _ = norm_inputs(residual=False, bias=False)
    rows = quantize_rows(weight)
    expected = [(bf16, (m, k)), (bf16, (k,)), (torch.float32, (m,)), (E4M3, (n, k)), (torch.float32, (n, 1)),
                (E4M3, (m, k)), (torch.float32, (m, 1))]  # x, norm, rstd, W's rows, h's rows
    got = saved(lambda x, nw, w: rms_norm_linear(x, nw, EPS, w, weight_fp8=rows), x, norm_weight, weight)
    assert got == sorted(expected, key=str)
    gate_up, weight, _ = swiglu_inputs(bias=False)
    rows = quantize_rows(weight)
    expected = [(bf16, (m, 2 * k)), (E4M3, (n, k)), (torch.float32, (n, 1)),
                (E4M3, (m, k)), (torch.float32, (m, 1))]  # gate_up, W's rows, h's rows
    got = saved(lambda g, w: swiglu_linear(g, w, weight_fp8=rows), gate_up, weight)
    assert got == sorted(expected, key=str)


def test_weight_fp8_errors_say_what_was_wrong():
    x, residual, norm_weight, weight, _ = norm_inputs()
    rows = quantize_rows(weight)
    with pytest.raises(TypeError, match=r"weight_fp8 must be a Float8Rows, quantize_rows\(weight\), got a "
                                        r"tuple"):
        rms_norm_linear(x, norm_weight, EPS, weight, weight_fp8=tuple(rows))
    with pytest.raises(ValueError, match=r"weight_fp8.data must be torch.float8_e4m3fn of weight's shape "
                                         r"\[48, 64\], contiguous, got torch.float8_e5m2 \[48, 64\], "
                                         r"contiguous"):
        add_rms_norm_linear(x, residual, norm_weight, EPS, weight, weight_fp8=quantize_rows(weight, E5M2))
    with pytest.raises(ValueError, match=r"got torch.float8_e4m3fn \[32, 64\], contiguous"):
        rms_norm_linear(x, norm_weight, EPS, weight, weight_fp8=quantize_rows(weight[:32]))
    transposed = Float8Rows(quantize_rows(weight.t().contiguous()).data.t(), rows.scale)  # [48, 64], strided
    with pytest.raises(ValueError, match=r"got torch.float8_e4m3fn \[48, 64\], not contiguous"):
        rms_norm_linear(x, norm_weight, EPS, weight, weight_fp8=transposed)
    with pytest.raises(ValueError, match=r"weight_fp8.scale must be torch.float32 of shape \[48, 1\], one "
                                         r"per row of weight, got torch.float32 \[\]"):
        rms_norm_linear(x, norm_weight, EPS, weight, weight_fp8=quantize_tensor(weight))
    with pytest.raises(ValueError, match=r"got torch.float64 \[48, 1\]"):
        rms_norm_linear(x, norm_weight, EPS, weight, weight_fp8=Float8Rows(rows.data, rows.scale.double()))
    with pytest.raises(ValueError, match=r"tensors must be on one device: weight on \S+, "
                                         r"weight_fp8.data on meta"):
        rms_norm_linear(x, norm_weight, EPS, weight, weight_fp8=Float8Rows(rows.data.to("meta"), rows.scale))
    gate_up, weight, _ = swiglu_inputs()
    with pytest.raises(ValueError, match=r"weight_fp8.data must be .* got torch.float8_e4m3fn \[64, 48\]"):
        swiglu_linear(gate_up, weight, weight_fp8=quantize_rows(weight.t()))
    # Checked for shapes the FP8 product cannot take too, which read the rows' values.
    with pytest.raises(ValueError, match=r"weight_fp8.scale must be torch.float32 of shape \[48, 1\]"):
        swiglu_linear(gate_up[:3], weight, weight_fp8=quantize_tensor(weight))
