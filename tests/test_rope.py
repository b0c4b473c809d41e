import pytest
import torch

from conftest import DEVICE, DTYPES, assert_close
from ligerzoo.kernels.rope import apply_rope, apply_rope_qkv

# (B, T, Hq, Hk, D): one token and one head, GQA, D/2 not a power of two, more heads than one
# tile holds, and one wide head.
SHAPES = [(1, 1, 1, 1, 2), (2, 5, 4, 2, 8), (1, 7, 3, 3, 6), (2, 3, 20, 5, 100), (1, 2, 2, 1, 4098)]


def hf_cos_sin(positions, head_dim, base=10000.0):
    """cos, sin as Hugging Face's rotary module builds them from integer positions ([T] or [B, T]):
    float32, duplicated halves."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference(x, cos, sin):
    """x [B, T, H, D] in float64 by the textbook formula; cos/sin broadcast over heads."""
    cos, sin = cos.double().unsqueeze(-2), sin.double().unsqueeze(-2)
    x = x.double()
    return x * cos + rotate_half(x) * sin


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def random_qk(B, T, Hq, Hk, D, dtype=torch.float32):
    q = torch.randn(B, T, Hq, D, device=DEVICE, dtype=dtype)
    return leaves(q, torch.randn(B, T, Hk, D, device=DEVICE, dtype=dtype))


def check_rope(q, k, cos, sin, dtype):
    """apply_rope forward and backward on the leaves q, k against the float64 reference computed
    on the same rounded values."""
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    dq_rot, dk_rot = torch.randn_like(q_rot), torch.randn_like(k_rot)
    torch.autograd.backward((q_rot, k_rot), (dq_rot, dk_rot))

    q64, k64 = leaves(q.double(), k.double())
    q_rot64, k_rot64 = reference(q64, cos, sin), reference(k64, cos, sin)
    torch.autograd.backward((q_rot64, k_rot64), (dq_rot.double(), dk_rot.double()))
    assert q_rot.dtype == dtype and k_rot.dtype == dtype
    assert q_rot.is_contiguous() and k_rot.is_contiguous()
    assert_close(q_rot, q_rot64, dtype, what="q_rot")
    assert_close(k_rot, k_rot64, dtype, what="k_rot")
    assert_close(q.grad, q64.grad, dtype, what="dq")
    assert_close(k.grad, k64.grad, dtype, what="dk")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_float64(kernel_path, dtype, shape):
    B, T, Hq, Hk, D = shape
    q, k = random_qk(B, T, Hq, Hk, D, dtype)
    cos, sin = hf_cos_sin(torch.arange(T, device=DEVICE) * 37, D)  # large angles too
    check_rope(q, k, cos, sin, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_row_positions_that_restart(kernel_path, dtype):
    """[B, T, D] cos/sin from per-row positions, as for packed sequences: each row restarts at 0
    where a new document begins."""
    B, T, Hq, Hk, D = 3, 9, 4, 2, 16
    positions = torch.tensor(
        [[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 0, 1, 2, 3, 0, 1], [5, 6, 0, 1, 2, 3, 4, 5, 6]], device=DEVICE
    )
    cos, sin = hf_cos_sin(positions, D)
    q, k = random_qk(B, T, Hq, Hk, D, dtype)
    check_rope(q, k, cos, sin, dtype)


@pytest.mark.parametrize("cos_dtype", DTYPES)
@pytest.mark.parametrize("batch_dim", [False, True])
def test_cos_sin_layouts_and_dtypes(kernel_path, cos_dtype, batch_dim):
    """[T, D], [1, T, D] (HF's shape for shared positions) and [B, T, D] broadcast alike; cos/sin
    in any float dtype with bf16 q/k (math in float32 either way)."""
    B, T, Hq, Hk, D = 2, 6, 4, 1, 32
    cos, sin = hf_cos_sin(torch.arange(T, device=DEVICE), D)
    if batch_dim:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.to(cos_dtype), sin.to(cos_dtype)
    q, k = random_qk(B, T, Hq, Hk, D, torch.bfloat16)
    check_rope(q, k, cos, sin, torch.bfloat16)
    if batch_dim:
        check_rope(*leaves(q, k), cos.expand(B, T, D), sin.expand(B, T, D), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_views_of_a_fused_qkv_projection(kernel_path, dtype):
    """q and k sliced out of one [B, T, (Hq + 2Hk) * D] projection output: strided tokens, k not
    at the start of its buffer."""
    B, T, Hq, Hk, D = 2, 5, 6, 2, 24
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, device=DEVICE, dtype=dtype).requires_grad_()
    q, k, _ = qkv.view(B, T, Hq + 2 * Hk, D).split([Hq, Hk, Hk], dim=2)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = hf_cos_sin(torch.arange(T, device=DEVICE), D)

    q_rot, k_rot = apply_rope(q, k, cos, sin)
    dq_rot, dk_rot = torch.randn_like(q_rot), torch.randn_like(k_rot)
    torch.autograd.backward((q_rot, k_rot), (dq_rot, dk_rot))
    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, _ = qkv64.view(B, T, Hq + 2 * Hk, D).split([Hq, Hk, Hk], dim=2)
    q_rot64, k_rot64 = reference(q64, cos, sin), reference(k64, cos, sin)
    torch.autograd.backward((q_rot64, k_rot64), (dq_rot.double(), dk_rot.double()))
    assert_close(q_rot, q_rot64, dtype, what="q_rot")
    assert_close(k_rot, k_rot64, dtype, what="k_rot")
    assert_close(qkv.grad, qkv64.grad, dtype, what="dqkv")


def test_every_stride_honoured(kernel_path):
    """q in the [B, H, T, D] layout transposed to [B, T, H, D], k with a head-dim stride of 2,
    cos/sin sliced with a padded row stride, and gradients arriving non-contiguous."""
    B, T, Hq, Hk, D = 2, 5, 3, 2, 10
    q = torch.randn(B, Hq, T, D, device=DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hk, D, 2, device=DEVICE)[..., 0].requires_grad_()
    cos, sin = hf_cos_sin(torch.arange(T, device=DEVICE), D)
    padded = torch.randn(2, T, D + 3, device=DEVICE)
    padded[0, :, :D], padded[1, :, :D] = cos, sin
    cos_view, sin_view = padded[0, :, :D], padded[1, :, :D]
    q_rot, k_rot = apply_rope(q, k, cos_view, sin_view)
    dq_rot = torch.randn(B, Hq, T, D, device=DEVICE).transpose(1, 2)
    dk_rot = torch.randn(B, T, Hk, D, 2, device=DEVICE)[..., 1]
    torch.autograd.backward((q_rot, k_rot), (dq_rot, dk_rot))

    q64, k64 = leaves(q.double(), k.double())
    q_rot64, k_rot64 = reference(q64, cos, sin), reference(k64, cos, sin)
    torch.autograd.backward((q_rot64, k_rot64), (dq_rot.double(), dk_rot.double()))
    assert_close(q_rot, q_rot64, torch.float32, what="q_rot")
    assert_close(k_rot, k_rot64, torch.float32, what="k_rot")
    assert_close(q.grad, q64.grad, torch.float32, what="dq")
    assert_close(k.grad, k64.grad, torch.float32, what="dk")


def test_backward_is_the_inverse_rotation(kernel_path):
    """Rotating the output's gradient back by -angle recovers q exactly (up to float32)."""
    q = torch.randn(1, 4, 2, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 4, 1, 8, device=DEVICE).requires_grad_()
    cos, sin = hf_cos_sin(torch.arange(4, device=DEVICE), 8)
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    torch.autograd.backward((q_rot, k_rot), (q_rot.detach(), k_rot.detach()))
    assert_close(q.grad, q.detach().double(), torch.float32)
    assert_close(k.grad, k.detach().double(), torch.float32)


@pytest.mark.parametrize("shape", [(0, 4, 2, 1, 8), (2, 0, 2, 1, 8)])
def test_no_tokens(kernel_path, shape):
    B, T, Hq, Hk, D = shape
    q, k = random_qk(B, T, Hq, Hk, D)
    cos, sin = hf_cos_sin(torch.arange(T, device=DEVICE), D)
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    (q_rot.sum() + k_rot.sum()).backward()
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_deterministic(kernel_path):
    B, T, Hq, Hk, D = 2, 16, 8, 2, 64
    q = torch.randn(B, T, Hq, D, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(B, T, Hk, D, device=DEVICE, dtype=torch.bfloat16)
    cos, sin = hf_cos_sin(torch.arange(T, device=DEVICE), D)

    def run():
        qs, ks = leaves(q, k)
        q_rot, k_rot = apply_rope(qs, ks, cos, sin)
        (q_rot.float().square().sum() + k_rot.float().sum()).backward()
        return q_rot, k_rot, qs.grad, ks.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_traces_as_one_graph(monkeypatch):
    """fullgraph=True fails on any graph break in forward or backward (the PyTorch path here;
    tests/test_compile.py runs the Triton kernels compiled on the GPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    q, k = random_qk(2, 3, 4, 2, 8)
    cos, sin = hf_cos_sin(torch.arange(3, device=DEVICE), 8)
    compiled = torch.compile(apply_rope, fullgraph=True, backend="aot_eager")
    q_rot, k_rot = compiled(q, k, cos, sin)
    (q_rot.square().sum() + k_rot.square().sum()).backward()
    q64, k64 = leaves(q.double(), k.double())
    (reference(q64, cos, sin).square().sum() + reference(k64, cos, sin).square().sum()).backward()
    assert_close(q.grad, q64.grad, torch.float32)
    assert_close(k.grad, k64.grad, torch.float32)


def test_bad_arguments():
    B, T, Hq, Hk, D = 2, 3, 4, 2, 8
    q, k = torch.randn(B, T, Hq, D), torch.randn(B, T, Hk, D)
    cos, sin = hf_cos_sin(torch.arange(T), D)
    with pytest.raises(ValueError, match="even head dim"):
        apply_rope(q[..., :7], k[..., :7], cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match="q must be"):
        apply_rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="k must be"):
        apply_rope(q, k[:, :2], cos, sin)
    with pytest.raises(ValueError, match="k must be"):
        apply_rope(q, torch.randn(B, T, Hk, D + 2), cos, sin)
    with pytest.raises(ValueError, match="k must have q's dtype"):
        apply_rope(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="cos must be"):
        apply_rope(q, k, cos[:2], sin[:2])
    with pytest.raises(ValueError, match="cos must be"):
        apply_rope(q, k, cos.expand(3, T, D), sin.expand(3, T, D))
    with pytest.raises(ValueError, match="sin must have cos's shape"):
        apply_rope(q, k, cos, sin[None])
    with pytest.raises(ValueError, match="cos must be"):
        apply_rope(q, k, cos.long(), sin)
    with pytest.raises(ValueError, match="q must be"):
        apply_rope(q.to(torch.int32), k, cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_qkv_rotated_and_v_copied_with_one_gradient(kernel_path, dtype, shape):
    """apply_rope_qkv on a fused projection's output: q and k as the float64 reference, v its
    exact copy, all contiguous; the backward, from gradients in attention's [B, H, T, D] layout,
    qkv's whole gradient: q's and k's parts the reference's, v's exactly dv."""
    B, T, Hq, Hk, D = shape
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, device=DEVICE, dtype=dtype).requires_grad_()
    cos, sin = hf_cos_sin(torch.arange(T, device=DEVICE) * 37, D)
    q_rot, k_rot, v = apply_rope_qkv(qkv.view(B, T, Hq + 2 * Hk, D), Hq, cos, sin)
    # In attention's [B, H, T, D] layout, transposed to [B, T, H, D]:
    grads = [torch.randn(B, heads, T, D, device=DEVICE, dtype=dtype).transpose(1, 2)
             for heads in (Hq, Hk, Hk)]
    torch.autograd.backward((q_rot, k_rot, v), grads)

    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = qkv64.view(B, T, Hq + 2 * Hk, D).split([Hq, Hk, Hk], dim=2)
    q_rot64, k_rot64 = reference(q64, cos, sin), reference(k64, cos, sin)
    torch.autograd.backward((q_rot64, k_rot64, v64), [g.double() for g in grads])
    assert all(t.is_contiguous() and t.dtype == dtype for t in (q_rot, k_rot, v))
    assert_close(q_rot, q_rot64, dtype, what="q_rot")
    assert_close(k_rot, k_rot64, dtype, what="k_rot")
    assert torch.equal(v, qkv.detach().view(B, T, Hq + 2 * Hk, D)[:, :, Hq + Hk:])
    assert qkv.grad.shape == qkv.shape
    assert_close(qkv.grad, qkv64.grad, dtype, what="dqkv")
    assert torch.equal(qkv.grad.view(B, T, Hq + 2 * Hk, D)[:, :, Hq + Hk:], grads[2])


def test_qkv_in_any_layout_and_its_gradient_the_same_as_apply_ropes(kernel_path):
    """qkv with heads and tokens transposed in memory and a head-dim stride of 2: the outputs and
    qkv's gradient equal `apply_rope` on the split views bit for bit (the same kernel's math)."""
    B, T, Hq, Hk, D = 2, 5, 4, 2, 12
    qkv = torch.randn(B, Hq + 2 * Hk, T, D, 2, device=DEVICE)[..., 0].transpose(1, 2).requires_grad_()
    cos, sin = hf_cos_sin(torch.arange(T, device=DEVICE), D)
    outputs = apply_rope_qkv(qkv, Hq, cos, sin)
    grads = [torch.randn_like(t) for t in outputs]
    (dqkv,) = torch.autograd.grad(outputs, qkv, grads)

    split = leaves(qkv.detach())[0]
    q, k, v = split.split([Hq, Hk, Hk], dim=2)
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    (expected,) = torch.autograd.grad((q_rot, k_rot, v), split, grads)
    assert torch.equal(outputs[0], q_rot) and torch.equal(outputs[1], k_rot) and torch.equal(outputs[2], v)
    assert torch.equal(dqkv, expected)


def test_qkv_head_counts_checked():
    qkv = torch.randn(1, 2, 7, 4, device=DEVICE)
    cos, sin = hf_cos_sin(torch.arange(2, device=DEVICE), 4)
    with pytest.raises(ValueError, match="qkv has 7 heads: expected 4 query heads"):
        apply_rope_qkv(qkv, 4, cos, sin)
    with pytest.raises(ValueError, match="qkv has 7 heads: expected 7 query heads"):
        apply_rope_qkv(qkv, 7, cos, sin)
    with pytest.raises(ValueError, match=r"qkv must be \[B, T, Hq \+ 2 Hk, D\]"):
        apply_rope_qkv(qkv[0], 3, cos, sin)
