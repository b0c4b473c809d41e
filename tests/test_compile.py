"""Every kernel inside torch.compile(fullgraph=True): no graph break, no host sync, same numbers
as eager. GPU only: under the interpreter a triton_op cannot be traced (fake tensors carry no
data for the interpreted kernel)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, assert_close
from ligerzoo.kernels import (add_rms_norm, apply_rope, apply_rope_qkv, cross_entropy, linear_cross_entropy,
                              rms_norm, swiglu, swiglu_packed)

pytestmark = pytest.mark.skipif(DEVICE.type != "cuda", reason="triton_op tracing needs a GPU")


def block(x, residual, norm_w, wq, wk, w13, w_down, cos, sin, n_heads, n_kv_heads):
    """A decoder block's skeleton: fused add-norm, rope on q/k, attention, swiglu MLP (both
    forms: the packed one the models use, and gate and up as two tensors)."""
    B, T, H = x.shape
    h, residual = add_rms_norm(x, residual, norm_w, 1e-6)
    q = (h @ wq.t()).view(B, T, n_heads, -1)
    k = (h @ wk.t()).view(B, T, n_kv_heads, -1)
    q, k = apply_rope(q, k, cos, sin)
    attn = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    h = attn.transpose(1, 2).reshape(B, T, H)
    h, residual = add_rms_norm(h, residual, norm_w, 1e-6)
    gate_up = h @ w13.t()
    h = (swiglu_packed(gate_up) + swiglu(*gate_up.chunk(2, dim=-1))) @ w_down.t()
    return rms_norm(h + residual, norm_w, 1e-6)


def loss_fn(hidden, head, target, logits):
    return linear_cross_entropy(hidden, head, target) + cross_entropy(logits, target, label_smoothing=0.1)


def make_block_inputs(dtype):
    B, T, H, nh, nkv, I = 2, 64, 256, 4, 2, 512
    D = H // nh
    g = lambda *s, scale=1.0: (torch.randn(*s, device=DEVICE, dtype=dtype) * scale).requires_grad_()
    pos = torch.arange(T, device=DEVICE)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=DEVICE).float() / D))
    freqs = torch.outer(pos.float(), inv)
    emb = torch.cat([freqs, freqs], -1)
    return (
        g(B, T, H), g(B, T, H), g(H), g(H, H, scale=H**-0.5), g(nkv * D, H, scale=H**-0.5),
        g(2 * I, H, scale=H**-0.5), g(H, I, scale=I**-0.5),
        emb.cos(), emb.sin(), nh, nkv,
    )


def grads_of(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.requires_grad else t for t in inputs]
    out = fn(*leaves)
    out.float().square().sum().backward()
    return out, [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_compiles_as_one_graph(dtype):
    torch._dynamo.reset()
    inputs = make_block_inputs(dtype)
    compiled = torch.compile(block, fullgraph=True)
    out_c, grads_c = grads_of(compiled, inputs)
    out_e, grads_e = grads_of(block, inputs)
    assert_close(out_c, out_e.double(), dtype, scale=4)
    for gc, ge in zip(grads_c, grads_e):
        assert_close(gc, ge.double(), dtype, scale=4)
    explanation = torch._dynamo.explain(block)(*inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_from_one_qkv_projection(dtype):
    """The models' attention: q, k and v out of one projection by `apply_rope_qkv`, whose backward
    writes the projection's whole gradient through one pointer; compiled, the same numbers as
    eager (uninitialised memory is NaN here, so a part left unwritten would show)."""
    torch._dynamo.reset()
    x, _, _, wq, wk, *_, cos, sin, n_heads, n_kv_heads = make_block_inputs(dtype)
    wqkv = torch.cat([wq, wk, wk.flip(0)]).detach().requires_grad_()

    def attention(x, wqkv, cos, sin):
        B, T, H = x.shape
        qkv = (x @ wqkv.t()).view(B, T, n_heads + 2 * n_kv_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in apply_rope_qkv(qkv, n_heads, cos, sin))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)

    inputs = (x, wqkv, cos, sin)
    out_c, grads_c = grads_of(torch.compile(attention, fullgraph=True), inputs)
    out_e, grads_e = grads_of(attention, inputs)
    assert_close(out_c, out_e.double(), dtype, scale=4)
    for gc, ge in zip(grads_c, grads_e):
        assert gc.isfinite().all()
        assert_close(gc, ge.double(), dtype, scale=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_with_in_place_swiglu_backward(dtype):
    """The models' MLP: SwiGLU's gradient written over the gate-and-up projection's output."""
    torch._dynamo.reset()

    def mlp(x, w13, w2):
        return swiglu_packed(x @ w13.t(), in_place_backward=True) @ w2.t()

    inputs = (torch.randn(2, 100, 64, device=DEVICE, dtype=dtype).requires_grad_(),
              (torch.randn(2 * 96, 64, device=DEVICE, dtype=dtype) * 64**-0.5).requires_grad_(),
              (torch.randn(64, 96, device=DEVICE, dtype=dtype) * 96**-0.5).requires_grad_())
    out_c, grads_c = grads_of(torch.compile(mlp, fullgraph=True), inputs)

    def reference(x, w13, w2):
        gate, up = (x.double() @ w13.double().t()).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w2.double().t()

    out_r, grads_r = grads_of(reference, inputs)
    assert_close(out_c, out_r, dtype, scale=4)
    for gc, gr in zip(grads_c, grads_r):
        assert_close(gc, gr, dtype, scale=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_compile_without_sync(dtype):
    torch._dynamo.reset()
    N, H, V = 300, 128, 1000
    hidden = torch.randn(N, H, device=DEVICE, dtype=dtype, requires_grad=True)
    head = (torch.randn(V, H, device=DEVICE, dtype=dtype) * H**-0.5).requires_grad_()
    logits = torch.randn(N, V, device=DEVICE, dtype=dtype, requires_grad=True)
    target = torch.randint(0, V, (N,), device=DEVICE)
    target[::7] = -100
    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (compiled, loss_fn):
        args = [t.detach().clone().requires_grad_() for t in (hidden, head)] + [target]
        lg = logits.detach().clone().requires_grad_()
        loss = fn(*args, lg)
        loss.backward()
        results.append((loss, args[0].grad, args[1].grad, lg.grad))
    for c, e in zip(*results):
        assert_close(c, e.double(), dtype, scale=2)


@pytest.mark.parametrize("compiled", [False, True])
def test_no_host_sync(compiled):
    """With sync debug mode set to "error", any host synchronisation (.item(), a bad-target
    check read back on the host, ...) in forward or backward raises."""
    torch._dynamo.reset()
    inputs = make_block_inputs(torch.bfloat16)
    N, H, V = 256, 128, 1000
    hidden = torch.randn(N, H, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(V, H, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(N, V, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, V, (N,), device=DEVICE)
    run_block = torch.compile(block, fullgraph=True) if compiled else block
    run_loss = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
    run_block(*inputs).float().sum().backward()  # warm-up: compilation itself may sync
    run_loss(hidden, head, target, logits).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_block(*inputs).float().sum().backward()
        run_loss(hidden, head, target, logits).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
