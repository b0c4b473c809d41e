"""The grouped FP8 product of Mixtral's experts (kernels/float8_grouped.py) and the FP8 MoE built on
it (models/float8.py's Float8MoE): each group's product is the FP8 product of its own rows, within
FP8's error of the float64 one; empty groups get zero gradients; the MoE pads each expert's rows to
the kernel's alignment and gives the exact MoE's routing with FP8 products."""

import importlib

import pytest
import torch
from conftest import DEVICE

from ligerzoo.kernels.float8 import emulated_scaled_mm, quantize_rows
from ligerzoo.kernels.float8_group_columns import quantize_group_columns
from ligerzoo.kernels.float8_grouped import (
    GROUP_ALIGNMENT,
    emulated_scaled_grouped_mm,
    float8_grouped_linear,
    has_scaled_grouped_mm,
    scaled_grouped_mm,
)
from ligerzoo.models import ModelConfig
from ligerzoo.models.float8 import Float8MoE, convert_to_float8
from ligerzoo.models.transformer import MoE

# Experts' runs: empty ones first, inside and last; runs of 16 and of several hundred rows.
COUNTS = [0, 48, 16, 0, 400, 32, 64, 0]
BF16 = torch.bfloat16


def group_ends(counts) -> torch.Tensor:
    return torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)


def runs(counts):
    start = 0
    for count in counts:
        yield start, start + count
        start += count


def test_emulation_is_each_groups_scaled_product():
    """On the CPU the grouped product is the dense one of each group, to one unit of the bf16
    output (2**-7 of it): the float32 sums run in another order, and rarely round differently."""
    ends = group_ends(COUNTS)
    m, k, n = sum(COUNTS), 64, 96
    x = quantize_rows(torch.randn(m, k, device=DEVICE))
    w = quantize_rows(torch.randn(len(COUNTS), n, k, device=DEVICE))
    y = emulated_scaled_grouped_mm(x.data, w.data.transpose(1, 2), x.scale.view(-1), w.scale.squeeze(-1), ends, BF16)
    dy = torch.randn(m, n, device=DEVICE)
    dyt, xt = quantize_group_columns(dy, ends), quantize_group_columns(x.data, ends, x.scale)
    dw = emulated_scaled_grouped_mm(dyt[0], xt[0].t(), dyt[1].view(-1), xt[1].view(-1), ends, BF16)
    assert y.shape == (m, n) and dw.shape == (len(COUNTS), n, k)
    for g, (start, end) in enumerate(runs(COUNTS)):
        if end == start:
            assert not dw[g].any()
            continue
        expected = emulated_scaled_mm(x.data[start:end], w.data[g].t(), x.scale[start:end], w.scale[g].t(), BF16)
        torch.testing.assert_close(y[start:end], expected, rtol=2**-7, atol=0)
        expected = emulated_scaled_mm(dyt[0][:, start:end].contiguous(), xt[0][:, start:end].t(),
                                      dyt[1][g][:, None], xt[1][g][None, :], BF16)
        torch.testing.assert_close(dw[g], expected, rtol=2**-7, atol=0)


def reference(x, w, dy, counts):
    """y, dx, dW of each group in float64."""
    x, w, dy = x.double(), w.double(), dy.double()
    y, dx, dw = torch.zeros_like(dy), torch.zeros_like(x), torch.zeros_like(w)
    for g, (start, end) in enumerate(runs(counts)):
        y[start:end] = x[start:end] @ w[g].t()
        dx[start:end] = dy[start:end] @ w[g]
        dw[g] = dy[start:end].t() @ x[start:end]
    return y, dx, dw


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_products_and_gradients_are_within_fp8_error(dtype):
    """Each of the three products within e4m3's rounding of both operands (2**-4 each, half that on
    average: about 4% in norm) of the float64 product, and not exact (it does run in FP8)."""
    if DEVICE.type == "cuda" and dtype != BF16:
        pytest.skip("the H100's grouped FP8 product writes bfloat16 only")
    ends = group_ends(COUNTS)
    m, k, n = sum(COUNTS), 64, 96
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(len(COUNTS), n, k, device=DEVICE, dtype=dtype, requires_grad=True)
    y = float8_grouped_linear(x, w, ends)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert y.dtype == x.grad.dtype == w.grad.dtype == dtype
    for name, got, expected in zip(("y", "dx", "dW"), (y, x.grad, w.grad), reference(x, w, dy, COUNTS)):
        error = ((got.double() - expected).norm() / expected.norm()).item()
        assert 0 < error < 0.06, (name, error)
    for g, (start, end) in enumerate(runs(COUNTS)):
        if end == start:
            assert not w.grad[g].any()


def test_zero_rows_stay_zero_and_give_no_gradient():
    """The MoE's padding rows: zero in, zero out, nothing added to any weight's gradient."""
    x = torch.randn(64, 32, device=DEVICE, dtype=BF16)
    x[16:32] = 0  # the first group's second half
    x.requires_grad_()
    w = torch.randn(2, 48, 32, device=DEVICE, dtype=BF16, requires_grad=True)
    y = float8_grouped_linear(x, w, group_ends([32, 32]))
    assert not y[16:32].any()
    dy = torch.randn_like(y)
    y.backward(dy)
    w_grad = w.grad.clone()
    w.grad = None
    kept = torch.cat([x[:16], x[32:]])
    float8_grouped_linear(kept, w, group_ends([16, 32])).backward(torch.cat([dy[:16], dy[32:]]))
    assert torch.equal(w.grad, w_grad)


def test_given_weight_rows_give_the_same_products():
    """weight_fp8 (FSDP2's FP8 all-gather): the forward multiplies by the given rows, the same bits
    as casting W; W^T for dx is made from them (the same values but for FP8 subnormals); dW does
    not read W."""
    ends = group_ends(COUNTS)
    x = torch.randn(sum(COUNTS), 64, device=DEVICE, dtype=BF16, requires_grad=True)
    w = torch.randn(len(COUNTS), 96, 64, device=DEVICE, dtype=BF16, requires_grad=True)
    dy = torch.randn(sum(COUNTS), 96, device=DEVICE, dtype=BF16)
    results = []
    for given in (None, quantize_rows(w)):
        x.grad = w.grad = None
        y = float8_grouped_linear(x, w, ends, weight_fp8=given)
        y.backward(dy)
        results.append((y.detach(), x.grad, w.grad))
    (y, dx, dw), (y_given, dx_given, dw_given) = results
    assert torch.equal(y_given, y) and torch.equal(dw_given, dw)
    torch.testing.assert_close(dx_given, dx, rtol=2**-7, atol=1e-6)
    with pytest.raises(ValueError, match="weight_fp8 is torch.float8_e4m3fn"):
        float8_grouped_linear(x, w, ends, weight_fp8=quantize_rows(w[:, :48]))


def test_the_weights_transposed_cast_is_each_experts_column_cast(kernel_path):
    """The input gradient's W^T [E, K, N]: `quantize_rows(W.transpose(1, 2))` bit for bit, from W
    and from its FP8 rows (their values cast again), over experts wider than a kernel tile; laid out
    as the cast kernel writes it, which the grouped product takes as it is."""
    from test_float8_kernels import assert_rows_equal, spread

    from ligerzoo.kernels.float8 import Float8Rows
    from ligerzoo.kernels.float8_grouped import _transposed_weight_cast

    w = spread((3, 144, 48), BF16, per_row=False)  # columns over many binades
    rows = quantize_rows(w)
    for given, values in ((w, w), (rows, rows.dequantize())):
        data, scale = _transposed_weight_cast(*(given if isinstance(given, Float8Rows) else (given, None)))
        expected = quantize_rows(values.transpose(1, 2))
        assert data.stride() == (144, 3 * 144, 1)  # the kernel's [K, E N] viewed as [E, K, N]: no copy
        assert_rows_equal(Float8Rows(data.contiguous(), scale[..., None]), expected)


def test_compiles_as_one_graph(monkeypatch):
    """On the CPU the kernels' PyTorch paths (an interpreted kernel cannot be traced)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    ends = group_ends(COUNTS)
    x = torch.randn(sum(COUNTS), 64, device=DEVICE, dtype=BF16, requires_grad=True)
    w = torch.randn(len(COUNTS), 96, 64, device=DEVICE, dtype=BF16, requires_grad=True)

    def step(x, w, ends):
        return float8_grouped_linear(x, w, ends).float().square().sum()

    for compiled in (False, True):
        x.grad = w.grad = None
        loss = (torch.compile(step, fullgraph=True) if compiled else step)(x, w, ends)
        loss.backward()
        if not compiled:
            expected, grads = loss.detach(), (x.grad, w.grad)
    # Inductor may fuse the casts and the loss differently: the same FP8 products, up to float32 sums.
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=0)
    for g, e in zip((x.grad, w.grad), grads):
        torch.testing.assert_close(g, e, rtol=2**-7, atol=2**-7 * e.abs().max().item())


def test_errors_say_what_was_wrong():
    ends = group_ends([16, 16])
    x, w = torch.randn(32, 32, device=DEVICE), torch.randn(2, 48, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"expected x \[M, K\] and weight \[E, N, K\]"):
        float8_grouped_linear(x, w[0], ends)
    with pytest.raises(ValueError, match=r"group_ends has shape \(3,\), expected \(2,\)"):
        float8_grouped_linear(x, w, group_ends([16, 8, 8]))
    with pytest.raises(ValueError, match="x is torch.float32 and weight torch.bfloat16"):
        float8_grouped_linear(x, w.bfloat16(), ends)
    with pytest.raises(ValueError, match="M, N and K must be multiples of 16"):
        float8_grouped_linear(x[:24], w, group_ends([16, 8]))
    xq, wq = quantize_rows(x), quantize_rows(w)
    with pytest.raises(ValueError, match="the contracted and output widths must be multiples of 16"):
        scaled_grouped_mm(xq.data[:, :24], wq.data[:, :, :24].transpose(1, 2), xq.scale.view(-1),
                          wq.scale.squeeze(-1), ends)
    with pytest.raises(ValueError, match=r"scale_b is torch.float32 \(2, 48, 1\)"):
        scaled_grouped_mm(xq.data, wq.data.transpose(1, 2), xq.scale.view(-1), wq.scale, ends)
    with pytest.raises(ValueError, match="expected a row-major, b column-major"):
        scaled_grouped_mm(xq.data, wq.data.transpose(1, 2).contiguous(), xq.scale.view(-1),
                          wq.scale.squeeze(-1), ends)


@pytest.mark.skipif(not (torch.cuda.is_available() and has_scaled_grouped_mm(torch.device("cuda"))),
                    reason="torch._scaled_grouped_mm needs an sm90 GPU")
def test_the_gpu_kernel_agrees_with_the_cpu_emulation():
    """cuBLAS's grouped FP8 products against the same layer on the CPU (the same casts, bit for
    bit, and the float32 emulation): sums that differ only in their order and in the tensor cores'
    partial sums (float8.py's bound), so far below FP8's own error."""
    counts = [0, 48, 16, 1024, 512, 32, 2048, 416]
    x = torch.randn(sum(counts), 512, device="cuda", dtype=BF16, requires_grad=True)
    w = torch.randn(len(counts), 256, 512, device="cuda", dtype=BF16, requires_grad=True)
    dy = torch.randn(sum(counts), 256, device="cuda", dtype=BF16)
    results = []
    for device in ("cuda", "cpu"):
        xd, wd = (t.detach().to(device).requires_grad_() for t in (x, w))
        ends = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
        y = float8_grouped_linear(xd, wd, ends)
        y.backward(dy.to(device))
        results.append([t.cpu().double() for t in (y, xd.grad, wd.grad)])
    for name, got, expected in zip(("y", "dx", "dW"), *results):
        error = ((got - expected).norm() / expected.norm()).item()
        assert error < 2**-8, (name, error)


# ---------------------------------------------------------------------------------------------
# The FP8 MoE.

MIXTRAL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, model_type="mixtral", num_local_experts=4,
               num_experts_per_tok=2)


# The H100's grouped products (bf16 and FP8) write bfloat16 only.
MOE_DTYPE = BF16 if DEVICE.type == "cuda" else torch.float32


def moe_pair(**changes):
    torch.manual_seed(0)
    moe = MoE(ModelConfig(**{**MIXTRAL, **changes})).to(DEVICE, MOE_DTYPE)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    return moe, Float8MoE(moe)


def test_fp8_moe_routes_as_the_exact_one_with_fp8_products(monkeypatch):
    """Same router, so the same experts for every token; the experts' 3 x 2 products in FP8 over
    runs padded to GROUP_ALIGNMENT; output and every gradient within FP8's error of the exact MoE."""
    moe, fp8_moe = moe_pair()
    assert fp8_moe.w13 is moe.w13 and fp8_moe.router is moe.router
    x = torch.randn(2, 37, MIXTRAL["hidden_size"], device=DEVICE, dtype=MOE_DTYPE, requires_grad=True)  # ragged runs
    module = importlib.import_module("ligerzoo.kernels.float8_grouped")
    products, ends_seen = [], []
    original = module.scaled_grouped_mm

    def counted(*args):
        products.append(1)
        ends_seen.append(args[4])
        return original(*args)

    monkeypatch.setattr(module, "scaled_grouped_mm", counted)
    results = []
    for layer in (moe, fp8_moe):
        x.grad = None
        out, stats = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), stats, x.grad, *(p.grad for p in layer.parameters())))
        moe.zero_grad(set_to_none=True)
    assert len(products) == 6
    ends = ends_seen[0]
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    assert not (starts % GROUP_ALIGNMENT).any() and ends[-1] % GROUP_ALIGNMENT == 0
    (out, stats, *grads), (fp8_out, fp8_stats, *fp8_grads) = results
    assert torch.equal(stats, fp8_stats)
    # The router's gradient goes through the softmax's differences of products, which cancel: its
    # relative error is the larger (as the dense layers' test bounds it, tests/test_float8_train.py).
    bounds = {"out": 0.1, "x": 0.1, "router": 0.15, "w13": 0.1, "w2": 0.1}  # two FP8 products in a row
    for name, got, expected in zip(bounds, (fp8_out, *fp8_grads), (out, *grads)):
        error = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
        assert 0 < error < bounds[name], (name, error)


def test_fp8_moe_falls_back_where_the_product_cannot_run():
    """A hidden size not a multiple of 16: the exact experts, the same bits."""
    moe, fp8_moe = moe_pair(hidden_size=40, num_attention_heads=4, num_key_value_heads=2)
    x = torch.randn(30, 40, device=DEVICE, dtype=MOE_DTYPE)
    assert torch.equal(fp8_moe(x)[0], moe(x)[0])


def test_fp8_moe_keeps_the_exact_experts_on_a_gpu_without_the_grouped_fp8_product(monkeypatch):
    """Before Hopper torch has no grouped FP8 product: the experts stay exact (the same bits as
    MoE), where the dense layers' FP8 is emulated."""
    monkeypatch.setattr(importlib.import_module("ligerzoo.models.float8"), "runs_grouped_fp8", lambda device: False)
    moe, fp8_moe = moe_pair()
    x = torch.randn(30, MIXTRAL["hidden_size"], device=DEVICE, dtype=MOE_DTYPE)
    assert torch.equal(fp8_moe(x)[0], moe(x)[0])


def test_conversion_turns_each_moe_into_a_float8_moe():
    from ligerzoo.models import build_model
    model = build_model(ModelConfig(**MIXTRAL))
    names = convert_to_float8(model, "rowwise")
    assert "layers.1.feed_forward" in names
    assert all(isinstance(block.feed_forward, Float8MoE) for block in model.layers)
    assert list(model.state_dict()) == list(build_model(ModelConfig(**MIXTRAL)).state_dict())
    ids = torch.randint(0, MIXTRAL["vocab_size"], (2, 32))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
