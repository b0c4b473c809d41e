import pytest
import torch

from conftest import DEVICE, DTYPES, assert_close, non_contiguous
from ligerzoo.kernels.rms_norm import RMSNorm, add_rms_norm, rms_norm

SHAPES = [(1, 1), (1, 37), (5, 100), (3, 7, 64), (40, 4099)]


def reference(x, weight, eps, residual=None):
    h = x.double() if residual is None else (x + residual).double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_float64(kernel_path, dtype, shape):
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 3
    weight = torch.randn(shape[-1], device=DEVICE, dtype=dtype)
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    x, weight = leaves(x, weight)
    y = rms_norm(x, weight, 1e-5)
    y.backward(dy)

    x64, w64 = leaves(x.double(), weight.double())
    y64 = reference(x64, w64, 1e-5)
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype, what="y")
    if shape[-1] == 1:
        # One element per row normalises to about +-1 whatever x is: dx is a cancellation
        # (1 - x_hat^2) that only eps keeps from zero, ill-conditioned in any precision.
        assert torch.isfinite(x.grad).all()
    else:
        assert_close(x.grad, x64.grad, dtype, what="dx")
    assert_close(weight.grad, w64.grad, dtype, scale=2, what="dweight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_add_rms_norm_matches_float64(kernel_path, dtype, shape):
    x, residual, dy, dsum = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(4))
    weight = torch.randn(shape[-1], device=DEVICE, dtype=dtype)
    x, residual, weight = leaves(x, residual, weight)
    y, summed = add_rms_norm(x, residual, weight, 1e-6)
    torch.autograd.backward((y, summed), (dy, dsum))

    x64, r64, w64 = leaves(x.double(), residual.double(), weight.double())
    s64 = x64 + r64
    y64 = reference(s64, w64, 1e-6)
    torch.autograd.backward((y64, s64), (dy.double(), dsum.double()))
    assert_close(summed, s64, dtype, what="sum")
    # The kernel normalises the sum rounded to dtype (what it returns), so compare y with a
    # reference built on that same rounded sum.
    assert_close(y, reference(summed.detach().double(), w64.detach(), 1e-6), dtype, what="y")
    assert_close(x.grad, x64.grad, dtype, what="dx")
    assert_close(residual.grad, r64.grad, dtype, what="dresidual")
    assert_close(weight.grad, w64.grad, dtype, scale=2, what="dweight")


def test_add_rms_norm_with_only_normed_output_used(kernel_path):
    x, residual = leaves(torch.randn(6, 33, device=DEVICE), torch.randn(6, 33, device=DEVICE))
    weight = torch.ones(33, device=DEVICE, requires_grad=True)
    y, _ = add_rms_norm(x, residual, weight)
    y.sum().backward()
    x64 = x.detach().double().requires_grad_()
    reference(x64, weight.detach(), 1e-6, residual.detach().double()).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32)
    assert torch.equal(x.grad, residual.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_input_and_grad(kernel_path, dtype):
    base = torch.randn(9, 130, device=DEVICE, dtype=dtype)
    x = non_contiguous(base).requires_grad_()
    weight = torch.randn(130, device=DEVICE, dtype=dtype, requires_grad=True)
    dy = non_contiguous(torch.randn(9, 130, device=DEVICE, dtype=dtype))
    rms_norm(x, weight, 1e-6).backward(dy)
    x64, w64 = leaves(base.double(), weight.double())
    reference(x64, w64, 1e-6).backward(dy.double())
    assert_close(x.grad, x64.grad, dtype)
    assert_close(weight.grad, w64.grad, dtype, scale=2)


def test_mixed_precision_weight(kernel_path):
    """float32 weight (as FSDP keeps master weights) with bfloat16 activations."""
    x = torch.randn(8, 96, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(96, device=DEVICE, dtype=torch.float32, requires_grad=True)
    y = rms_norm(x, weight)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    assert_close(y, reference(x.detach(), weight.detach(), 1e-6), torch.bfloat16)


def test_zero_rows(kernel_path):
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    weight = torch.randn(64, device=DEVICE, requires_grad=True)
    y = rms_norm(x, weight)
    y.sum().backward()
    assert y.shape == (0, 64)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_deterministic(kernel_path):
    x = torch.randn(300, 257, device=DEVICE, dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.randn(257, device=DEVICE, dtype=torch.bfloat16)

    def run():
        xs, rs, ws = leaves(x, residual, weight)
        y, s = add_rms_norm(xs, rs, ws)
        (y.float().square().sum() + s.float().sum()).backward()
        return y, s, xs.grad, ws.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_module(kernel_path):
    norm = RMSNorm(48, eps=1e-5).to(DEVICE)
    x = torch.randn(2, 3, 48, device=DEVICE)
    assert_close(norm(x), reference(x, norm.weight.detach(), 1e-5), torch.float32)
    y, s = norm(x, x)
    assert torch.equal(s, x + x)
    assert "48, eps=1e-05" in repr(norm)


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(9))
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(x.long(), torch.ones(8))
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.randn(4, 9), torch.ones(8))
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.randn(4, 8, dtype=torch.float16), torch.ones(8))
