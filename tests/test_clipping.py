"""Gradient clipping folded into the AdamW step (ligerzoo/training/clipping.py) against
clip_grad_norm_ and then the step: ligerzoo's AdamW, and PyTorch's fused one (which runs on the
CPU too)."""

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import on_gloo_ranks

from ligerzoo.training.adamw import AdamW
from ligerzoo.training.clipping import clip_grad_norm, folds_into_step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(dtype, device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 8))
    return model.to(device, dtype)


def _train(model, optimizer, fold, max_norm, steps=4):
    """steps of clipping then AdamW; the norms before clipping, and whether the call left the
    gradients as they were (where the step does the clipping)."""
    norms, untouched = [], []
    for step in range(steps):
        torch.manual_seed(100 + step)
        weight = next(model.parameters())
        x = torch.randn(16, 32, dtype=weight.dtype).to(weight.device)
        (model(x).float().square().sum() * 10).backward()
        params = list(model.parameters())
        grads = [p.grad.clone() for p in params]
        if fold:
            norm = clip_grad_norm(optimizer, params, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        untouched.append(all(torch.equal(g, p.grad) for g, p in zip(grads, params)))
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms, untouched


def _weights(model):
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()
            for p in model.parameters()]


def _adamw(model, kind="ligerzoo"):
    # A large eps: the update then follows the gradient's size, so clipping shows in the weights
    # (Adam's update is otherwise nearly the same for any scale of the gradients).
    if kind == "ligerzoo":
        return AdamW(model.parameters(), lr=1e-2, eps=1.0, weight_decay=0.1)
    fused = kind == "torch-fused"
    return torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1.0, weight_decay=0.1, fused=fused)


@pytest.mark.parametrize("kind", ["ligerzoo", "torch-fused"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_clips_in_its_step_as_clip_grad_norm_then_step(dtype, device, kind):
    runs = {}
    for fold, max_norm in ((False, 1.0), (True, 1.0), (False, float("inf"))):
        model = _model(dtype, device)
        optimizer = _adamw(model, kind)
        assert folds_into_step(optimizer)
        norms, untouched = _train(model, optimizer, fold, max_norm)
        runs[fold, max_norm] = norms, untouched, _weights(model)
    norms, untouched, weights = runs[False, 1.0]
    folded_norms, folded_untouched, folded_weights = runs[True, 1.0]
    assert min(norms) > 10  # every step clipped, by a factor over 10
    assert not any(untouched) and all(folded_untouched)  # scaled now / left to the step
    # float32: the same update to float32 rounding; bf16: clip_grad_norm_ rounds the clipped
    # gradients to bf16 and the step divides in float32, so the weights differ by bf16 roundings.
    assert folded_norms == pytest.approx(norms, rel=1e-5 if dtype == torch.float32 else 2e-2)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    unclipped = runs[False, float("inf")][2]
    for w, folded, free in zip(weights, folded_weights, unclipped):
        torch.testing.assert_close(folded, w, rtol=0, atol=tol)
        assert (free - w).abs().max() > 10 * tol  # clipping changed the weights


def test_a_norm_under_the_limit_changes_nothing():
    runs = []
    for fold in (False, True):
        model = _model(torch.float32)
        norms, _ = _train(model, _adamw(model), fold, max_norm=1e6)
        runs.append(_weights(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # divided by exactly 1


def test_an_optimizer_that_cannot_fold_gets_its_gradients_clipped_now():
    for make in (lambda model: _adamw(model, "torch-foreach"),
                 lambda model: torch.optim.SGD(model.parameters(), lr=1e-2)):
        model = _model(torch.float32)
        optimizer = make(model)
        assert not folds_into_step(optimizer)
        _, untouched = _train(model, optimizer, fold=True, max_norm=1.0, steps=1)
        assert untouched == [False]
        assert not hasattr(optimizer, "grad_scale")


def _sharded_runs():
    return {fold: _sharded_run(fold) for fold in (False, True)}


def _sharded_run(fold):
    """The model sharded by FSDP2 over the gloo ranks (DTensor gradients), trained 4 steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model(torch.float32)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    norms, _ = _train(model, _adamw(model), fold, max_norm=1.0)
    return norms, _weights(model)


def test_sharded_gradients_clip_in_the_step_as_clip_grad_norm_then_step(tmp_path):
    out = on_gloo_ranks(2, _sharded_runs, tmp_path)
    (norms, weights), (folded_norms, folded_weights) = out[False], out[True]
    assert min(norms) > 10
    assert folded_norms == pytest.approx(norms, rel=1e-5)
    for w, folded in zip(weights, folded_weights):
        torch.testing.assert_close(folded, w, rtol=0, atol=1e-6)
