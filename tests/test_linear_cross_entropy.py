import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, DTYPES, assert_close, assert_device_assert, non_contiguous
from ligerzoo.kernels.linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy

REDUCTIONS = ["mean", "sum", "none"]
BAD_TARGET = r"linear_cross_entropy: target index outside \[0, V\)"
# The package re-exports the function under the module's name; the module holds the chunk budget.
lce_module = importlib.import_module("ligerzoo.kernels.linear_cross_entropy")


def make_inputs(n_rows, width, vocab, dtype, ignored_every=4, bias=True, lead=()):
    hidden = torch.randn(*lead, n_rows, width, device=DEVICE, dtype=dtype)
    # Scaled so the logits are O(1..3): a softmax neither flat nor one-hot.
    weight = torch.randn(vocab, width, device=DEVICE, dtype=dtype) * (2 / width**0.5)
    bias_ = torch.randn(vocab, device=DEVICE, dtype=dtype) if bias else None
    target = torch.randint(0, vocab, (*lead, n_rows), device=DEVICE)
    target.view(-1)[1::ignored_every] = -100  # row 0 always counts: no NaN mean
    return hidden, weight, target, bias_


def reference(hidden, weight, target, bias=None, **options):
    """float64 torch: materialised logits, then F.cross_entropy."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), target.reshape(-1).long(), **options)
    return loss.view(target.shape) if options.get("reduction") == "none" else loss


def loss_and_grads(fn, hidden, weight, target, bias=None, grad_loss=None, frozen=(), to64=False, **options):
    """Loss and the gradients of (hidden, weight, bias) through fn, on fresh leaves (float64
    copies of the same rounded values when to64). A frozen input's gradient is None."""
    inputs = {"hidden": hidden, "weight": weight, "bias": bias}
    leaves = {}
    for name, t in inputs.items():
        if t is not None:
            t = t.detach().double() if to64 else t.detach().clone()
            leaves[name] = t.requires_grad_(name not in frozen)
    loss = fn(leaves["hidden"], leaves["weight"], target, leaves.get("bias"), **options)
    if grad_loss is not None and to64:
        grad_loss = grad_loss.double()
    loss.backward(grad_loss)
    return loss, [leaves[name].grad if name in leaves else None for name in inputs]


def force_chunk_rows(monkeypatch, rows, weight):
    """Shrink the chunk budget so that chunks have `rows` rows."""
    monkeypatch.setattr(lce_module, "CHUNK_BUFFER_BYTES", rows * weight.shape[0] * weight.element_size())
    assert lce_module.rows_per_chunk(weight.shape[0], weight.element_size()) == rows


def assert_grads_close(grads, grads64, dtype):
    for name, grad, grad64 in zip(("dhidden", "dweight", "dbias"), grads, grads64):
        if grad64 is None:
            assert grad is None, name
        else:
            assert grad.dtype == dtype, name
            assert_close(grad, grad64, dtype, what=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_over_several_chunks(kernel_path, monkeypatch, dtype, reduction):
    hidden, weight, target, bias = make_inputs(67, 37, 100, dtype)
    force_chunk_rows(monkeypatch, 16, weight)  # chunks of 16, 16, 16, 16, 3 rows
    options = dict(label_smoothing=0.1, reduction=reduction)
    # An incoming gradient other than 1, so the backward's scaling is exercised.
    grad_loss = torch.rand(67 if reduction == "none" else (), device=DEVICE, dtype=dtype) + 0.5
    args = (hidden, weight, target, bias, grad_loss)
    loss, grads = loss_and_grads(linear_cross_entropy, *args, **options)
    loss64, grads64 = loss_and_grads(reference, *args, to64=True, **options)
    assert loss.dtype == torch.float32  # the loss is float32 whatever the inputs
    assert_close(loss, loss64, dtype, what="loss")
    # The dtype's usual tolerance (a few roundings) holds although the logits' gradient is
    # rounded when stored and again when scaled by grad_loss, and dweight once per chunk (5 here)
    # as it accumulates in dtype: measured, at most half of it.
    assert_grads_close(grads, grads64, dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_backward_without_bias_or_smoothing(kernel_path, monkeypatch, dtype, reduction):
    """The language-model case: loss.backward() (an incoming gradient of exactly 1)."""
    hidden, weight, target, _ = make_inputs(40, 24, 77, dtype, bias=False)
    force_chunk_rows(monkeypatch, 16, weight)
    fn = lambda *a, **o: linear_cross_entropy(*a, **o).sum()
    ref = lambda *a, **o: reference(*a, **o).sum()
    loss, grads = loss_and_grads(fn, hidden, weight, target, reduction=reduction)
    loss64, grads64 = loss_and_grads(ref, hidden, weight, target, to64=True, reduction=reduction)
    assert_close(loss, loss64, dtype, what="loss")
    assert_grads_close(grads, grads64, dtype)


# (leading dims, rows, H, V, chunk rows)
SHAPES = [((), 1, 37, 100, 1), ((), 5, 1, 7, 2), ((), 6, 20, 1, 4), ((2,), 5, 12, 33, 3), ((), 7, 9, 4099, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_odd_shapes(kernel_path, monkeypatch, dtype, shape):
    lead, n_rows, width, vocab, rows = shape
    hidden, weight, target, bias = make_inputs(n_rows, width, vocab, dtype, lead=lead)
    force_chunk_rows(monkeypatch, rows, weight)
    grad_loss = torch.rand(target.shape, device=DEVICE, dtype=dtype) + 0.5
    options = dict(label_smoothing=0.05, reduction="none")
    loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, target, bias, grad_loss, **options)
    loss64, grads64 = loss_and_grads(reference, hidden, weight, target, bias, grad_loss, to64=True, **options)
    assert loss.shape == target.shape
    assert_close(loss, loss64, dtype, what="loss")
    assert_grads_close(grads, grads64, dtype)


def test_one_unbatched_row(kernel_path):
    hidden, weight, target, bias = make_inputs(1, 10, 30, torch.float32, ignored_every=100)
    options = dict(label_smoothing=0.1)
    loss, grads = loss_and_grads(linear_cross_entropy, hidden[0], weight, target[0], bias, **options)
    loss64, grads64 = loss_and_grads(reference, hidden[0], weight, target[0], bias, to64=True, **options)
    assert loss.shape == () and grads[0].shape == (10,)
    assert_close(loss, loss64, torch.float32, what="loss")
    assert_grads_close(grads, grads64, torch.float32)


@pytest.mark.parametrize("label_smoothing", [0.0, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_and_ignore_index_inside_the_vocabulary(
    kernel_path, monkeypatch, label_smoothing, reduction
):
    hidden, weight, target, bias = make_inputs(30, 16, 10, torch.float32)
    target[target == -100] = 3
    force_chunk_rows(monkeypatch, 8, weight)
    grad_loss = torch.rand(30, device=DEVICE) + 0.5 if reduction == "none" else None
    options = dict(ignore_index=3, label_smoothing=label_smoothing, reduction=reduction)
    loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, target, bias, grad_loss, **options)
    loss64, grads64 = loss_and_grads(reference, hidden, weight, target, bias, grad_loss, to64=True, **options)
    assert_close(loss, loss64, torch.float32, what="loss")
    assert_grads_close(grads, grads64, torch.float32)
    assert torch.equal(grads[0][target == 3], torch.zeros_like(grads[0][target == 3]))


def test_chunks_cover_every_row_once(kernel_path, monkeypatch):
    """Forward: one cross-entropy launch per chunk, the last one ragged; "none" runs a second
    chunked pass in the backward, the others none."""
    hidden, weight, target, bias = make_inputs(67, 8, 20, torch.float32)
    force_chunk_rows(monkeypatch, 16, weight)
    launched = []
    real_launch = lce_module.launch_cross_entropy

    def spy(logits2d, target, grad_out, *args, **kwargs):
        launched.append((logits2d.shape[0], grad_out is not None))
        return real_launch(logits2d, target, grad_out, *args, **kwargs)

    monkeypatch.setattr(lce_module, "launch_cross_entropy", spy)
    chunks = [16, 16, 16, 16, 3]
    for reduction, passes in (("mean", [(c, True) for c in chunks]),
                              ("none", [(c, False) for c in chunks] + [(c, True) for c in chunks])):
        launched.clear()
        summed = lambda *a, **o: linear_cross_entropy(*a, **o).sum()
        loss_and_grads(summed, hidden, weight, target, bias, reduction=reduction)
        assert launched == passes, reduction



@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_rows_asked_for_are_the_chunks_that_run(kernel_path, monkeypatch, reduction):
    """chunk_rows overrides the budget's rows (here 128, far more than the input has), through the
    function and the module alike, and the result still matches float64."""
    hidden, weight, target, bias = make_inputs(45, 8, 20, torch.float32)
    launched = []
    real_launch = lce_module.launch_cross_entropy

    def spy(logits2d, *args, **kwargs):
        launched.append(logits2d.shape[0])
        return real_launch(logits2d, *args, **kwargs)

    monkeypatch.setattr(lce_module, "launch_cross_entropy", spy)
    grad_loss = torch.rand(45, device=DEVICE) + 0.5 if reduction == "none" else None
    loss64, grads64 = loss_and_grads(reference, hidden, weight, target, bias, grad_loss, to64=True,
                                     reduction=reduction)
    passes = 2 if reduction == "none" else 1
    module = LinearCrossEntropyLoss(reduction=reduction, chunk_rows=20)
    for fn in (lambda *a, **o: linear_cross_entropy(*a, **o, chunk_rows=20), module):
        launched.clear()
        loss, grads = loss_and_grads(fn, hidden, weight, target, bias, grad_loss,
                                     **({} if fn is module else {"reduction": reduction}))
        assert launched == [20, 20, 5] * passes
        assert_close(loss, loss64, torch.float32, what="loss")
        assert_grads_close(grads, grads64, torch.float32)
    assert "chunk_rows=20" in repr(module)

def test_chunk_buffer_is_bounded_at_the_llama3_8b_head():
    vocab = 128256
    bf16_rows = lce_module.rows_per_chunk(vocab, 2)
    assert bf16_rows == 512  # 512 rows: the weight-gradient matmul is compute-bound on an H100
    assert bf16_rows * vocab * 2 <= lce_module.CHUNK_BUFFER_BYTES <= 126 * 2**20
    assert lce_module.rows_per_chunk(vocab, 4) == 256
    assert lce_module.rows_per_chunk(32000, 2) % 128 == 0
    assert lce_module.rows_per_chunk(32000, 2) * 32000 * 2 <= lce_module.CHUNK_BUFFER_BYTES
    assert lce_module.rows_per_chunk(2**30, 4) == 1  # a vocabulary wider than the budget still runs


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(kernel_path, monkeypatch, reduction):
    hidden, weight, target, bias = make_inputs(9, 8, 20, torch.float32)
    target.fill_(-100)
    force_chunk_rows(monkeypatch, 4, weight)
    fn = lambda *a, **o: linear_cross_entropy(*a, **o).sum()
    loss, grads = loss_and_grads(fn, hidden, weight, target, bias, reduction=reduction)
    assert loss.isnan().item() == (reduction == "mean")  # 0 / 0, as torch
    if reduction != "mean":
        assert loss.item() == 0
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_rows(kernel_path, reduction):
    hidden, weight, target, bias = make_inputs(0, 8, 20, torch.float32)
    fn = lambda *a, **o: linear_cross_entropy(*a, **o).sum()
    loss, (dhidden, dweight, dbias) = loss_and_grads(fn, hidden, weight, target, bias, reduction=reduction)
    expected = reference(hidden, weight, target, bias, reduction=reduction).sum()
    assert torch.equal(loss.isnan(), expected.isnan())
    assert dhidden.shape == (0, 8)
    assert torch.equal(dweight, torch.zeros_like(dweight)) and torch.equal(dbias, torch.zeros_like(dbias))


def test_out_of_range_target_poisons_its_row_and_sets_the_flag(kernel_path):
    hidden, weight, target, bias = make_inputs(7, 8, 20, torch.float32, ignored_every=100)
    target[2], target[5] = 20, -3
    scale = torch.ones((), device=DEVICE)
    loss_rows, dhidden, _, _, error_flag = torch.ops.ligerzoo.linear_cross_entropy(
        hidden, weight, target, bias, scale, -100, 0.0, 3, True, True, True
    )
    assert error_flag.tolist() == [1]
    bad = torch.zeros(7, dtype=torch.bool, device=DEVICE)
    bad[[2, 5]] = True
    assert loss_rows[bad].isnan().all() and dhidden[bad].isnan().all()
    good = (hidden[~bad].double(), weight.double(), target[~bad], bias.double())
    good_rows = reference(*good, reduction="none")
    assert_close(loss_rows[~bad], good_rows, torch.float32)


@pytest.mark.parametrize("bad_target", [20, -1])
def test_out_of_range_target_raises(kernel_path, bad_target):
    if DEVICE.type == "cuda":
        assert_device_assert(
            "from ligerzoo.kernels import linear_cross_entropy\n"
            f"target = torch.tensor([0, {bad_target}, 3], device='cuda')\n"
            "linear_cross_entropy(torch.randn(3, 8, device='cuda', requires_grad=True),"
            " torch.randn(20, 8, device='cuda'), target)",
            BAD_TARGET,
        )
        return
    hidden, weight, target, bias = make_inputs(5, 8, 20, torch.float32)
    target[3] = bad_target
    with pytest.raises(RuntimeError, match=BAD_TARGET):
        linear_cross_entropy(hidden.requires_grad_(), weight, target, bias)
    with pytest.raises(RuntimeError, match=BAD_TARGET):
        linear_cross_entropy(hidden.detach(), weight, target, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("frozen", [("weight", "bias"), ("hidden",), ("bias",)], ids="+".join)
def test_frozen_inputs_get_no_gradient(kernel_path, monkeypatch, frozen, reduction):
    hidden, weight, target, bias = make_inputs(20, 12, 30, torch.float32)
    force_chunk_rows(monkeypatch, 8, weight)
    grad_loss = torch.rand(20, device=DEVICE) + 0.5 if reduction == "none" else None
    options = dict(label_smoothing=0.1, reduction=reduction)
    args = (hidden, weight, target, bias, grad_loss)
    loss, grads = loss_and_grads(linear_cross_entropy, *args, frozen=frozen, **options)
    loss64, grads64 = loss_and_grads(reference, *args, frozen=frozen, to64=True, **options)
    assert_close(loss, loss64, torch.float32, what="loss")
    assert_grads_close(grads, grads64, torch.float32)


def test_unwanted_gradients_are_not_computed(kernel_path):
    """A frozen weight skips the weight-gradient matmul: its output is an empty placeholder."""
    hidden, weight, target, bias = make_inputs(6, 8, 20, torch.float32)
    scale = torch.ones((), device=DEVICE)
    _, dhidden, dweight, dbias, _ = torch.ops.ligerzoo.linear_cross_entropy(
        hidden, weight, target, bias, scale, -100, 0.0, 4, True, False, False
    )
    assert dhidden.shape == (6, 8) and dweight.shape == (0, 8) and dbias.shape == (0,)


def test_without_grad_mode_only_the_loss_is_computed(kernel_path, monkeypatch):
    hidden, weight, target, bias = make_inputs(6, 8, 20, torch.float32)
    asked_for_grad = []
    real_launch = lce_module.launch_cross_entropy
    monkeypatch.setattr(lce_module, "launch_cross_entropy",
                        lambda logits, t, grad_out, *a, **k: asked_for_grad.append(grad_out is not None)
                        or real_launch(logits, t, grad_out, *a, **k))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), target, bias)
    assert asked_for_grad == [False] and not loss.requires_grad
    assert_close(loss, reference(hidden.double(), weight.double(), target, bias.double()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs_and_int32_target(kernel_path, monkeypatch, dtype):
    hidden, weight, target, bias = make_inputs(7, 40, 50, dtype, lead=(3,))
    force_chunk_rows(monkeypatch, 8, weight)
    strided_hidden = non_contiguous(hidden)
    strided_weight = non_contiguous(weight)
    strided_target = torch.stack([target, target], dim=-1).int()[..., 0]
    assert not strided_hidden.is_contiguous() and not strided_target.is_contiguous()
    options = dict(label_smoothing=0.1)
    strided = (strided_hidden, strided_weight, strided_target, bias)
    loss, grads = loss_and_grads(linear_cross_entropy, *strided, **options)
    loss64, grads64 = loss_and_grads(reference, hidden, weight, target, bias, to64=True, **options)
    assert_close(loss, loss64, dtype, what="loss")
    assert_grads_close(grads, grads64, dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_deterministic(kernel_path, monkeypatch, reduction):
    hidden, weight, target, bias = make_inputs(50, 24, 130, torch.bfloat16)
    force_chunk_rows(monkeypatch, 16, weight)
    grad_loss = torch.rand(50, device=DEVICE, dtype=torch.bfloat16) if reduction == "none" else None
    args = (hidden, weight, target, bias, grad_loss)
    options = dict(label_smoothing=0.1, reduction=reduction)
    runs = [loss_and_grads(linear_cross_entropy, *args, **options) for _ in range(2)]
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_second_backward_through_retained_graph_raises(kernel_path):
    hidden, weight, target, bias = make_inputs(4, 8, 20, torch.float32)
    loss = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), target, bias)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (2 * loss).backward()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_as_one_graph(kernel_path, monkeypatch, reduction):
    if DEVICE.type == "cpu" and kernel_path == "triton":
        pytest.skip("an interpreted Triton kernel cannot be traced; the torch path can")
    torch._dynamo.reset()
    hidden, weight, target, bias = make_inputs(30, 16, 40, torch.float32)
    force_chunk_rows(monkeypatch, 8, weight)

    def fn(h, w, t, b):
        return linear_cross_entropy(h, w, t, b, label_smoothing=0.1, reduction=reduction).sum() * 3

    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    loss_c, grads_c = loss_and_grads(compiled, hidden, weight, target, bias)
    loss_e, grads_e = loss_and_grads(fn, hidden, weight, target, bias)
    assert_close(loss_c, loss_e.double(), torch.float32, what="loss")
    assert_grads_close(grads_c, [g.double() for g in grads_e], torch.float32)


def test_module(kernel_path):
    loss_fn = LinearCrossEntropyLoss(ignore_index=0, label_smoothing=0.1, reduction="sum")
    hidden, weight, target, bias = make_inputs(6, 8, 12, torch.float32)
    target[target == -100] = 0
    options = dict(ignore_index=0, label_smoothing=0.1, reduction="sum")
    expected = reference(hidden, weight, target, bias, **options)
    assert_close(loss_fn(hidden, weight, target, bias), expected, torch.float32)
    expected = reference(hidden, weight, target, **options)
    assert_close(loss_fn(hidden, weight, target), expected, torch.float32)
    assert "ignore_index=0, label_smoothing=0.1, reduction='sum'" in repr(loss_fn)


def test_bad_arguments():
    hidden, weight, target, bias = make_inputs(4, 8, 12, torch.float32)
    cases = [
        ("hidden must be", dict(hidden=hidden.long())),
        ("hidden must have a non-empty", dict(hidden=torch.randn(4, 0))),
        ("weight must be", dict(weight=weight.long())),
        ("weight must be float32", dict(weight=weight.double())),
        ("weight must have hidden's dtype", dict(weight=weight.half())),
        (r"weight must have shape \[V, 8\]", dict(weight=weight[:, :7])),
        (r"weight must have shape \[V, 8\]", dict(weight=weight[0])),
        (r"weight must have shape \[V, 8\]", dict(weight=weight[:0])),
        ("target must be", dict(target=target.float())),
        ("target must be", dict(target=target.to(torch.int16))),
        ("target has shape", dict(target=target[:3])),
        ("target has shape", dict(target=target[:, None])),
        (r"bias must have shape \[12\]", dict(bias=bias[:11])),
        ("bias must have hidden's dtype", dict(bias=bias.half())),
        ("bias must be", dict(bias=bias.long())),
        ("reduction", dict(reduction="avg")),
        ("label_smoothing", dict(label_smoothing=1.5)),
        ("ignore_index", dict(ignore_index=-100.0)),
        ("chunk_rows is 0", dict(chunk_rows=0)),
        ("chunk_rows is 2.0", dict(chunk_rows=2.0)),
        ("chunk_rows is True", dict(chunk_rows=True)),
    ]
    for message, override in cases:
        args = dict(hidden=hidden, weight=weight, target=target, bias=bias) | override
        with pytest.raises(ValueError, match=message):
            linear_cross_entropy(**args)
    with pytest.raises(ValueError, match="reduction"):
        LinearCrossEntropyLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="chunk_rows is -1"):
        LinearCrossEntropyLoss(chunk_rows=-1)
