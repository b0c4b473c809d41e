"""The producers fused with their FP8 linear layer (ligerzoo/kernels/float8_fused.py) against the
composition they replace: the producer's public op, then float8_linear given the FP8 rows of its
output. Every output and gradient is the same bits: the producer's FP8 launcher writes
quantize_rows of its plain output bit for bit (tests/test_float8_kernels.py), and the rest is
float8_linear.py's products and the producer's own backward, on the same operands in the same order."""

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F
from conftest import DEVICE

from ligerzoo.kernels import (add_rms_norm, add_rms_norm_linear, float8_linear, quantize_rows, rms_norm,
                              rms_norm_linear, swiglu_linear, swiglu_packed)
from ligerzoo.kernels.float8 import E4M3

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


def fused_norm(x, residual, norm_weight, weight, bias):
    if residual is None:
        return rms_norm_linear(x, norm_weight, EPS, weight, bias)
    return add_rms_norm_linear(x, residual, norm_weight, EPS, weight, bias)


def composed_norm(x, residual, norm_weight, weight, bias):
    if residual is None:
        h = rms_norm(x, norm_weight, EPS)
        return float8_linear(h, weight, bias, x_fp8=quantize_rows(h))
    h, summed = add_rms_norm(x, residual, norm_weight, EPS)
    return float8_linear(h, weight, bias, x_fp8=quantize_rows(h)), summed


def fused_swiglu(gate_up, weight, bias, in_place_backward=False):
    # A copy of the leaf: the in-place backward overwrites the tensor it is given.
    return swiglu_linear(gate_up.clone(), weight, bias, in_place_backward=in_place_backward)


def composed_swiglu(gate_up, weight, bias):
    h = swiglu_packed(gate_up.clone())
    return float8_linear(h, weight, bias, x_fp8=quantize_rows(h))


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
    """The three fused Functions one after another, as a block calls them."""
    gate_up, summed = add_rms_norm_linear(x, residual, norm_weight, EPS, w13, b13)
    out = swiglu_linear(gate_up, w2, b2, in_place_backward=True)
    return rms_norm_linear(out, norm_weight, EPS, wq), summed


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_gives_the_same_results(backend, monkeypatch):
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
              tensor(2 * inner, seed=21), tensor(k, inner, scale=inner**-0.5, seed=22), None,
              tensor(n, k, scale=k**-0.5, seed=23))
    expected = outputs_and_grads(chain, *inputs)
    # config.patch, not monkeypatch: pytest 9.2's undo deletes a config module's entry, which
    # breaks every later compile in the session.
    with torch._inductor.config.patch(emulate_precision_casts=True):
        got = outputs_and_grads(torch.compile(chain, fullgraph=True, backend=backend), *inputs)
    names = ["y", "x + residual", "dx", "dresidual", "dnorm_weight", "dw13", "db13", "dw2", "db2", "dwq"]
    if backend == "aot_eager" or not got[0].is_cuda:
        bias_grads = [names.index("db13")] if backend == "inductor" else []
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
            assert error < 2.0**-5, (name, error)


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
