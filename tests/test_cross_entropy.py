import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, DTYPES, assert_close, assert_device_assert, non_contiguous
from ligerzoo.kernels.cross_entropy import CrossEntropyLoss, cross_entropy, launch_cross_entropy

SHAPES = [(1, 1), (1, 37), (5, 100), (3, 7, 64), (40, 4099)]
REDUCTIONS = ["mean", "sum", "none"]
BAD_TARGET = r"target index outside \[0, V\)"
# The package re-exports the function under the module's name; the module itself holds MAX_BLOCK.
ce_module = importlib.import_module("ligerzoo.kernels.cross_entropy")


def make_inputs(shape, dtype, ignored_every=3, ignore_index=-100, scale=3.0):
    logits = torch.randn(shape, device=DEVICE, dtype=dtype) * scale
    target = torch.randint(0, shape[-1], shape[:-1], device=DEVICE)
    target.view(-1)[1::ignored_every] = ignore_index  # row 0 always counts: no NaN mean
    return logits, target


def reference(logits, target, **options):
    """float64 torch cross-entropy on the same (rounded) logits, classes on the last dim."""
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.double().reshape(-1, V), target.reshape(-1).long(), **options)
    return loss.view(target.shape) if options.get("reduction") == "none" else loss


def loss_and_grad(fn, logits, target, grad_loss=None, **options):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, target, **options)
    loss.backward(grad_loss)
    return loss, leaf.grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64(kernel_path, shape, dtype, reduction):
    logits, target = make_inputs(shape, dtype)
    options = dict(label_smoothing=0.1, reduction=reduction)
    # An incoming gradient other than 1, so the backward's scaling is exercised.
    grad_loss = torch.rand(shape[:-1] if reduction == "none" else (), device=DEVICE, dtype=dtype) + 0.5
    loss, grad = loss_and_grad(cross_entropy, logits, target, grad_loss, **options)
    loss64, grad64 = loss_and_grad(reference, logits, target, grad_loss.double(), **options)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_close(loss, loss64, dtype, what="loss")
    # The gradient is rounded once when stored, once more after scaling by grad_loss.
    assert_close(grad, grad64, dtype, scale=2, what="dlogits")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_label_smoothing(kernel_path, label_smoothing, reduction):
    logits, target = make_inputs((30, 77), torch.float32)
    options = dict(label_smoothing=label_smoothing, reduction=reduction)
    grad_loss = torch.rand(30, device=DEVICE) + 0.5 if reduction == "none" else None
    loss, grad = loss_and_grad(cross_entropy, logits, target, grad_loss, **options)
    loss64, grad64 = loss_and_grad(
        reference, logits, target, None if grad_loss is None else grad_loss.double(), **options
    )
    assert_close(loss, loss64, torch.float32, what="loss")
    assert_close(grad, grad64, torch.float32, what="dlogits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_wider_than_one_block(kernel_path, monkeypatch, dtype):
    """The online log-sum-exp across 5 blocks (the last partial), with the row maximum moving
    in a late block and a large offset that a naive exp would overflow."""
    monkeypatch.setattr(ce_module, "MAX_BLOCK", 1024)
    logits, target = make_inputs((12, 5000), dtype, ignored_every=5)
    logits[:, 4500] += 20  # the max appears only in the last (partial) block
    logits[3] += 1000
    logits[4, 10] += 50  # a max in the first block: later blocks are rescaled against it
    target[6] = 4999
    options = dict(label_smoothing=0.05, reduction="sum")
    loss, grad = loss_and_grad(cross_entropy, logits, target, **options)
    loss64, grad64 = loss_and_grad(reference, logits, target, **options)
    assert_close(loss, loss64, dtype, what="loss")
    assert_close(grad, grad64, dtype, what="dlogits")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_plain_backward_of_reduced_loss(kernel_path, reduction):
    """loss.backward() (incoming gradient exactly 1, the kernel skips the scaling) and, for
    "none", .sum().backward() (an expanded, stride-0 incoming gradient)."""
    logits, target = make_inputs((2, 9, 50), torch.float32)
    run = lambda fn: loss_and_grad(lambda x, t, **o: fn(x, t, **o).sum(), logits, target, reduction=reduction)
    loss, grad = run(cross_entropy)
    loss64, grad64 = run(reference)
    assert_close(loss, loss64, torch.float32, what="loss")
    assert_close(grad, grad64, torch.float32, what="dlogits")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(kernel_path, reduction):
    logits, target = make_inputs((6, 40), torch.float32)
    target.fill_(-100)
    loss, grad = loss_and_grad(lambda x, t: cross_entropy(x, t, reduction=reduction).sum(), logits, target)
    expected = F.cross_entropy(logits, target, reduction=reduction).sum()  # NaN for "mean", like torch
    assert torch.equal(loss.isnan(), expected.isnan())
    if reduction != "mean":
        assert torch.equal(loss, expected)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_ignore_index_inside_the_vocabulary(kernel_path):
    logits, target = make_inputs((20, 10), torch.float32, ignored_every=2, ignore_index=3)
    options = dict(ignore_index=3, label_smoothing=0.2)
    loss, grad = loss_and_grad(cross_entropy, logits, target, **options)
    loss64, grad64 = loss_and_grad(reference, logits, target, **options)
    assert_close(loss, loss64, torch.float32, what="loss")
    assert_close(grad, grad64, torch.float32, what="dlogits")
    assert torch.equal(grad[target == 3], torch.zeros_like(grad[target == 3]))


def test_masked_vocabulary_entries_without_smoothing(kernel_path):
    """-inf logits (a masked vocabulary) give a finite loss when label_smoothing is 0."""
    logits, target = make_inputs((8, 33), torch.float32, ignored_every=100)
    target = target % 30
    logits[:, 30:] = float("-inf")
    loss, grad = loss_and_grad(cross_entropy, logits, target)
    loss64, grad64 = loss_and_grad(reference, logits, target)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, loss64, torch.float32, what="loss")
    assert_close(grad, grad64, torch.float32, what="dlogits")


@pytest.mark.parametrize("bad_target", [10, 11, -1, -101])
def test_out_of_range_target_raises(kernel_path, bad_target):
    if DEVICE.type == "cuda":
        assert_device_assert(
            "from ligerzoo.kernels import cross_entropy\n"
            f"target = torch.tensor([0, {bad_target}, 3], device='cuda')\n"
            "cross_entropy(torch.randn(3, 10, device='cuda', requires_grad=True), target)",
            BAD_TARGET,
        )
        return
    logits, target = make_inputs((4, 10), torch.float32)
    target[2] = bad_target
    with pytest.raises(RuntimeError, match=BAD_TARGET):
        cross_entropy(logits.requires_grad_(), target)
    with pytest.raises(RuntimeError, match=BAD_TARGET):
        cross_entropy(logits.detach(), target, reduction="none")


def test_out_of_range_target_poisons_only_its_row(kernel_path):
    logits, target = make_inputs((5, 10), torch.float32)
    target[1], target[3] = 10, -7
    grad = torch.empty_like(logits)
    scale = torch.ones((), device=DEVICE)
    loss, error_flag = launch_cross_entropy(logits, target, grad, scale)
    assert error_flag.tolist() == [1]
    bad = torch.tensor([False, True, False, True, False], device=DEVICE)
    assert loss[bad].isnan().all() and grad[bad].isnan().all()
    loss64, grad64 = loss_and_grad(reference, logits[~bad], target[~bad], reduction="sum")
    assert_close(loss[~bad].sum(), loss64, torch.float32, what="loss")
    assert_close(grad[~bad], grad64, torch.float32, what="dlogits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launcher_in_place_on_a_strided_view(kernel_path, dtype):
    """What the fused linear cross-entropy does: a chunk of a larger logits buffer (rows with a
    gap after them) becomes its own gradient, losses land in a slice, the flag accumulates."""
    buffer = torch.randn(9, 70, device=DEVICE, dtype=dtype) * 3
    chunk = buffer[2:8, :61]
    original, buffer_before = chunk.clone(), buffer.clone()
    target = torch.randint(0, 61, (12,), device=DEVICE)[::2]  # a strided target
    target[1] = -100
    losses = torch.full((10,), 7.0, device=DEVICE)
    error_flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    scale = torch.full((), 0.25, device=DEVICE)
    loss, flag = launch_cross_entropy(chunk, target, chunk, scale, label_smoothing=0.1,
                                      loss_out=losses[3:9], error_flag=error_flag)
    assert loss.data_ptr() == losses[3:9].data_ptr() and flag is error_flag
    assert error_flag.tolist() == [0]
    ones = torch.ones(6, device=DEVICE, dtype=torch.float64)
    loss64, grad64 = loss_and_grad(reference, original, target, ones, label_smoothing=0.1, reduction="none")
    assert_close(losses[3:9], loss64, torch.float32, what="loss")
    assert_close(chunk, grad64 * 0.25, dtype, what="dlogits in place")
    assert torch.equal(losses[:3], torch.full((3,), 7.0, device=DEVICE))
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[2:8, :61] = False
    assert torch.equal(buffer[outside], buffer_before[outside])


def test_int32_target_and_non_contiguous_inputs(kernel_path):
    logits, target = make_inputs((11, 130), torch.bfloat16)
    strided_logits = non_contiguous(logits)
    strided_target = torch.stack([target, target], dim=1)[:, 0].int()
    loss, grad = loss_and_grad(cross_entropy, strided_logits, strided_target, label_smoothing=0.1)
    loss64, grad64 = loss_and_grad(reference, logits, target, label_smoothing=0.1)
    assert_close(loss, loss64, torch.bfloat16, what="loss")
    assert_close(grad, grad64, torch.bfloat16, what="dlogits")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_rows(kernel_path, reduction):
    logits = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = cross_entropy(logits, target, reduction=reduction)
    expected = F.cross_entropy(logits, target, reduction=reduction)
    assert loss.shape == expected.shape and torch.equal(loss.isnan(), expected.isnan())
    loss.sum().backward()
    assert logits.grad.shape == (0, 16)


def test_without_grad_no_gradient_is_made(kernel_path):
    logits, target = make_inputs((4, 20), torch.float32)
    _, grad, _ = torch.ops.ligerzoo.cross_entropy_forward(logits, target, -100, 0.0, "mean", False)
    assert grad.shape == (0, 20)
    with torch.no_grad():
        loss = cross_entropy(logits.requires_grad_(), target)
    assert_close(loss, reference(logits.detach(), target), torch.float32)


def test_second_backward_through_retained_graph_raises(kernel_path):
    logits, target = make_inputs((4, 20), torch.float32)
    loss = cross_entropy(logits.requires_grad_(), target)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (2 * loss).backward()


def test_deterministic(kernel_path):
    logits, target = make_inputs((100, 301), torch.bfloat16)
    runs = [loss_and_grad(cross_entropy, logits, target, label_smoothing=0.1) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_module(kernel_path):
    loss_fn = CrossEntropyLoss(ignore_index=0, label_smoothing=0.1, reduction="sum")
    logits, target = make_inputs((3, 5, 12), torch.float32, ignore_index=0)
    expected = reference(logits, target, ignore_index=0, label_smoothing=0.1, reduction="sum")
    assert_close(loss_fn(logits, target), expected, torch.float32)
    assert "ignore_index=0, label_smoothing=0.1, reduction='sum'" in repr(loss_fn)


def test_bad_arguments():
    logits, target = torch.randn(4, 8), torch.randint(0, 8, (4,))
    with pytest.raises(ValueError, match="logits must be"):
        cross_entropy(logits.long(), target)
    with pytest.raises(ValueError, match="target must be"):
        cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match="target must be"):
        cross_entropy(logits, target.to(torch.int16))
    with pytest.raises(ValueError, match="target has shape"):
        cross_entropy(logits, target[:3])
    with pytest.raises(ValueError, match="target has shape"):
        cross_entropy(logits, target[:, None])
    with pytest.raises(ValueError, match="last"):
        cross_entropy(torch.randn(4, 0), target)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, target, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="ignore_index"):
        cross_entropy(logits, target, ignore_index=-100.0)
    with pytest.raises(ValueError, match="reduction"):
        CrossEntropyLoss(reduction="batchmean")
