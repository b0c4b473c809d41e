import pytest
import torch

from conftest import DEVICE, DTYPES, assert_close, non_contiguous
from ligerzoo.kernels.swiglu import swiglu, swiglu_packed

# Width 1, odd widths, leading dims, more than one tile. Contiguous rows run as one long row.
SHAPES = [(1, 1), (1, 37), (5, 100), (3, 7, 64), (2, 4099), (300, 37)]


def reference(gate, up):
    g = gate.double()
    return g * torch.sigmoid(g) * up.double()


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_float64(kernel_path, dtype, shape):
    # Scaled so gate spans sigmoid's saturated tails as well as its middle.
    gate = torch.randn(shape, device=DEVICE, dtype=dtype) * 4
    up = torch.randn(shape, device=DEVICE, dtype=dtype)
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    gate, up = leaves(gate, up)
    y = swiglu(gate, up)
    y.backward(dy)

    g64, u64 = leaves(gate.double(), up.double())
    y64 = reference(g64, u64)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == gate.shape
    assert_close(y, y64, dtype, what="y")
    assert_close(gate.grad, g64.grad, dtype, what="dgate")
    assert_close(up.grad, u64.grad, dtype, what="dup")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 25, 37), (3, 4099)])
def test_views_of_a_fused_gate_up_projection(kernel_path, dtype, shape):
    """gate and up as the two halves of one [..., 2I] output: rows strided by 2I, so tiles span
    several short rows (75 rows of 37) or a long row spans several tiles (4099)."""
    *lead, width = shape
    fused = torch.randn(*lead, 2 * width, device=DEVICE, dtype=dtype).requires_grad_()
    gate, up = fused.chunk(2, dim=-1)
    dy = non_contiguous(torch.randn(shape, device=DEVICE, dtype=dtype))
    y = swiglu(gate, up)
    y.backward(dy)

    fused64 = fused.detach().double().requires_grad_()
    g64, u64 = fused64.chunk(2, dim=-1)
    y64 = reference(g64, u64)
    y64.backward(dy.double())
    assert y.is_contiguous()
    assert_close(y, y64, dtype, what="y")
    assert_close(fused.grad, fused64.grad, dtype, what="dfused")


def test_transposed_and_padded_inputs(kernel_path):
    """One operand with a non-unit column stride, the other with padded rows."""
    gate = torch.randn(100, 6, device=DEVICE).t().requires_grad_()
    up = non_contiguous(torch.randn(6, 100, device=DEVICE)).requires_grad_()
    dy = torch.randn(6, 100, device=DEVICE)
    swiglu(gate, up).backward(dy)
    g64, u64 = leaves(gate.double(), up.double())
    reference(g64, u64).backward(dy.double())
    assert_close(gate.grad, g64.grad, torch.float32, what="dgate")
    assert_close(up.grad, u64.grad, torch.float32, what="dup")


def test_backward_leaves_inputs_untouched(kernel_path):
    """The MLP's gate and up may be needed elsewhere (e.g. recomputation): no in-place gradient."""
    gate = torch.randn(4, 33, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(4, 33, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    gate_before, up_before = gate.detach().clone(), up.detach().clone()
    swiglu(gate, up).float().square().sum().backward()
    assert torch.equal(gate.detach(), gate_before) and torch.equal(up.detach(), up_before)


@pytest.mark.parametrize("shape", [(0, 37), (2, 0, 8), (4, 0)])
def test_empty(kernel_path, shape):
    gate = torch.randn(shape, device=DEVICE, requires_grad=True)
    up = torch.randn(shape, device=DEVICE, requires_grad=True)
    y = swiglu(gate, up)
    y.sum().backward()
    assert y.shape == gate.shape and gate.grad.shape == gate.shape and up.grad.shape == up.shape


def test_deterministic(kernel_path):
    gate = torch.randn(300, 257, device=DEVICE, dtype=torch.bfloat16)
    up = torch.randn_like(gate)

    def run():
        g, u = leaves(gate, up)
        y = swiglu(g, u)
        y.float().square().sum().backward()
        return y, g.grad, u.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_traces_as_one_graph(monkeypatch):
    """fullgraph=True fails on any graph break in forward or backward (the PyTorch path here;
    tests/test_compile.py runs the Triton kernels compiled on the GPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    gate, up = leaves(torch.randn(5, 24), torch.randn(5, 24))
    compiled = torch.compile(swiglu, fullgraph=True, backend="aot_eager")
    compiled(gate, up).square().sum().backward()
    g64, u64 = leaves(gate.double(), up.double())
    reference(g64, u64).square().sum().backward()
    assert_close(gate.grad, g64.grad, torch.float32)
    assert_close(up.grad, u64.grad, torch.float32)


def test_bad_arguments():
    gate = torch.randn(4, 8)
    with pytest.raises(ValueError, match="up must have gate's shape"):
        swiglu(gate, torch.randn(4, 9))
    with pytest.raises(ValueError, match="up must have gate's dtype"):
        swiglu(gate, torch.randn(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="gate must be"):
        swiglu(gate.long(), torch.randn(4, 8))
    with pytest.raises(ValueError, match="up must be"):
        swiglu(gate, torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="gate must be a torch.Tensor"):
        swiglu([1.0], torch.randn(1))
    with pytest.raises(ValueError, match="at least one dimension"):
        swiglu(torch.tensor(1.0), torch.tensor(2.0))


def packed_reference(gate_up):
    return reference(*gate_up.double().chunk(2, dim=-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (1, 74), (5, 200), (3, 7, 128), (2, 8198), (300, 74)])
def test_swiglu_packed_matches_float64(kernel_path, dtype, shape):
    """gate and up as the halves of one tensor; the gradient comes back as one tensor of that
    layout (poisoned memory: a half the backward forgot to write fails)."""
    gate_up = torch.randn(shape, device=DEVICE, dtype=dtype) * 2
    dy = non_contiguous(torch.randn(*shape[:-1], shape[-1] // 2, device=DEVICE, dtype=dtype))
    (gate_up,) = leaves(gate_up)
    y = swiglu_packed(gate_up)
    y.backward(dy)

    (gate_up64,) = leaves(gate_up.double())
    y64 = packed_reference(gate_up64)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == (*shape[:-1], shape[-1] // 2) and y.is_contiguous()
    assert gate_up.grad.shape == gate_up.shape
    assert_close(y, y64, dtype, what="y")
    assert_close(gate_up.grad, gate_up64.grad, dtype, what="dgate_up")


def test_swiglu_packed_equals_swiglu_of_the_halves(kernel_path):
    gate_up = torch.randn(6, 5, 66, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(6, 5, 33, device=DEVICE, dtype=torch.bfloat16)
    (packed,), (split,) = leaves(gate_up), leaves(gate_up)
    y_packed = swiglu_packed(packed)
    y_packed.backward(dy)
    y_split = swiglu(*split.chunk(2, dim=-1))
    y_split.backward(dy)
    assert torch.equal(y_packed, y_split)
    assert torch.equal(packed.grad, split.grad)


def test_swiglu_packed_strided_input_and_empty(kernel_path):
    gate_up = non_contiguous(torch.randn(9, 20, device=DEVICE)).requires_grad_()
    swiglu_packed(gate_up).square().sum().backward()
    (gate_up64,) = leaves(gate_up.double())
    packed_reference(gate_up64).square().sum().backward()
    assert_close(gate_up.grad, gate_up64.grad, torch.float32, what="dgate_up")
    for shape in [(0, 8), (3, 0)]:
        empty = torch.randn(shape, device=DEVICE, requires_grad=True)
        y = swiglu_packed(empty)
        y.sum().backward()
        assert y.shape == (shape[0], shape[1] // 2) and empty.grad.shape == empty.shape


def test_swiglu_packed_traces_as_one_graph(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    (gate_up,) = leaves(torch.randn(5, 48))
    compiled = torch.compile(swiglu_packed, fullgraph=True, backend="aot_eager")
    compiled(gate_up).square().sum().backward()
    (gate_up64,) = leaves(gate_up.double())
    packed_reference(gate_up64).square().sum().backward()
    assert_close(gate_up.grad, gate_up64.grad, torch.float32)


def test_swiglu_packed_bad_arguments():
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu_packed(torch.randn(4, 7))
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu_packed(torch.tensor(1.0))
    with pytest.raises(ValueError, match="gate_up must be float32"):
        swiglu_packed(torch.ones(4, 8, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_packed_in_place_backward(kernel_path, dtype):
    """The gradient written over gate_up equals the one in a new tensor; gate_up, an MLP's
    projection output, is what it overwrites, and a second backward is refused."""
    x = torch.randn(40, 24, device=DEVICE, dtype=dtype)
    w13 = (torch.randn(70, 24, device=DEVICE, dtype=dtype) * 0.3).requires_grad_()
    dy = torch.randn(40, 35, device=DEVICE, dtype=dtype)
    gradients = []
    for in_place in (False, True):
        w13.grad = None
        gate_up = x @ w13.t()
        before = gate_up.detach().clone()
        y = swiglu_packed(gate_up, in_place_backward=in_place)
        y.backward(dy, retain_graph=True)
        gradients.append(w13.grad.clone())
        assert torch.equal(gate_up.detach(), before) != in_place
    assert torch.equal(gradients[0], gradients[1])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


def test_swiglu_packed_in_place_backward_compiles(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    x = torch.randn(6, 16)
    (w13,) = leaves(torch.randn(48, 16) * 0.3)

    def mlp(x, w13):
        return swiglu_packed(x @ w13.t(), in_place_backward=True)

    torch.compile(mlp, fullgraph=True, backend="aot_eager")(x, w13).square().sum().backward()
    (w13_64,) = leaves(w13.double())
    packed_reference(x.double() @ w13_64.t()).square().sum().backward()
    assert_close(w13.grad, w13_64.grad, torch.float32)
