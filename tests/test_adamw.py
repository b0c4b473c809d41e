"""ligerzoo's AdamW: the kernel (kernels/adamw.py) against the update computed in float64, and the
optimizer (training/adamw.py) against torch.optim.AdamW, whose state it shares."""

import math

import pytest
import torch
from conftest import DEVICE

from ligerzoo.kernels import adamw as adamw_kernels
from ligerzoo.kernels.adamw import adamw_step_
from ligerzoo.kernels.float8 import E4M3, Float8Rows, quantize_rows
from ligerzoo.training.adamw import AdamW

HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.1)


def _reference(param, grad, exp_avg, exp_avg_sq, step, grad_scale, lr, beta1, beta2, eps, weight_decay):
    """torch.optim.AdamW's update in float64: (param, exp_avg, exp_avg_sq)."""
    g = grad.double() / (grad_scale.double() if grad_scale is not None else 1.0)
    p = param.double() * (1 - lr * weight_decay)
    m = beta1 * exp_avg.double() + (1 - beta1) * g
    v = beta2 * exp_avg_sq.double() + (1 - beta2) * g * g
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    return p - lr / (1 - beta1**step) * m / denom, m, v


def _operands(n, dtype, seed):
    torch.manual_seed(seed)
    param = (torch.randn(n, device=DEVICE) * 1e-2).to(dtype)
    exp_avg = (torch.randn(n, device=DEVICE) * 1e-2).to(dtype)
    # Against the sign of exp_avg, so that it moves by a tenth of itself at least.
    magnitude = torch.rand(n, device=DEVICE) * torch.logspace(-4, 1, n, device=DEVICE)
    grad = (-exp_avg.float().sign() * magnitude).to(dtype)
    exp_avg_sq = (torch.rand(n, device=DEVICE) * 1e-3).to(dtype)
    return param, grad, exp_avg, exp_avg_sq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 1000, 3 * adamw_kernels.BLOCK + 5])
@pytest.mark.parametrize("step", [1, 7])
@pytest.mark.parametrize("scaled", [False, True])
def test_update_is_adamws_in_float64(kernel_path, dtype, n, step, scaled):
    """Most elements move (the gradients, none zero, span five decades against exp_avg's sign),
    and every one that should has, so one the kernel left unwritten fails."""
    param, grad, exp_avg, exp_avg_sq = _operands(n, dtype, seed=n + step)
    grad_scale = torch.tensor(3.5, device=DEVICE) if scaled else None
    expected = _reference(param, grad, exp_avg, exp_avg_sq, step, grad_scale, **HYPER)
    before = [t.clone() for t in (param, exp_avg, exp_avg_sq)]
    step_count = torch.tensor(float(step), device=DEVICE)
    adamw_step_(param, grad, exp_avg, exp_avg_sq, step_count, grad_scale, **HYPER)
    # float32: a few roundings of the update; bf16: the float32 value rounded once, so at most one
    # bf16 unit from the float64 value rounded (test_bf16_update_rounds_each_value_once).
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-30)
    for got, want in zip((param, exp_avg, exp_avg_sq), expected):
        torch.testing.assert_close(got.double(), want.to(dtype).double(), **tol)
    for got, want, old in zip((param, exp_avg, exp_avg_sq), expected, before):
        moves = (want - old.double()).abs() > 2 * tol["rtol"] * old.double().abs()  # beyond the tolerance
        assert moves.float().mean() > 0.75 and (got[moves] != old[moves]).all()


def test_bf16_update_rounds_each_value_once(kernel_path):
    """Against the float64 update rounded to bf16: at most one bf16 unit apart, and most equal."""
    param, grad, exp_avg, exp_avg_sq = _operands(5000, torch.bfloat16, seed=3)
    expected = _reference(param, grad, exp_avg, exp_avg_sq, 3, None, **HYPER)[0].to(torch.bfloat16)
    adamw_step_(param, grad, exp_avg, exp_avg_sq, torch.tensor(3.0, device=DEVICE), None, **HYPER)
    units = (param.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
    assert units.max() <= 1 and (units == 0).float().mean() > 0.95


@pytest.mark.parametrize("dtype, rows_from", [(torch.bfloat16, None), (torch.float32, torch.bfloat16),
                                              (torch.float32, None)])
@pytest.mark.parametrize("shape", [(3, 1), (5, 100), (4, 300)])
def test_update_writes_the_fp8_rows_of_the_updated_param(kernel_path, monkeypatch, dtype, rows_from, shape):
    """The rows written in the update's pass are `quantize_rows` of the param it stored (rounded to
    rows_from), bit for bit, over rows of several slices, the last partial; the update itself is
    the same bits as without rows. A row of zeros has the smallest scale's rows."""
    monkeypatch.setattr(adamw_kernels, "ROW_BLOCK", 128)
    operands = list(_operands(shape[0] * shape[1], dtype, seed=shape[1]))
    operands = [t.reshape(shape) for t in operands]
    operands[0][1] = 0.0
    operands[1][1] = 0.0
    operands[2][1] = 0.0
    step = torch.tensor(2.0, device=DEVICE)
    plain = [t.clone() for t in operands]
    adamw_step_(*plain, step, None, **HYPER)
    rows = Float8Rows(torch.full(shape, float("nan"), device=DEVICE).to(E4M3),
                      torch.full((shape[0], 1), float("nan"), device=DEVICE))
    adamw_step_(*operands, step, None, **HYPER, rows=rows, rows_from=rows_from)
    for got, want in zip(operands, plain):
        assert torch.equal(got, want)
    expected = quantize_rows(operands[0].to(rows_from or dtype))
    assert torch.equal(rows.data.view(torch.uint8), expected.data.view(torch.uint8))
    assert torch.equal(rows.scale, expected.scale)


def test_bad_rows_are_refused():
    param, grad, exp_avg, exp_avg_sq = (t.reshape(4, 2) for t in _operands(8, torch.float32, seed=0))
    step = torch.tensor(1.0, device=DEVICE)
    data, scale = quantize_rows(param)
    for rows, rows_from, message in (
        (Float8Rows(data.float(), scale), None, "the rows' data is torch.float32"),
        (Float8Rows(data, scale.reshape(4)), None, r"the rows' scale is torch.float32 \(4,\)"),
        (Float8Rows(data, scale), torch.float16, "rows from torch.float16"),
    ):
        with pytest.raises(ValueError, match=message):
            adamw_step_(param, grad, exp_avg, exp_avg_sq, step, None, **HYPER, rows=rows, rows_from=rows_from)


def test_bad_operands_are_refused():
    param, grad, exp_avg, exp_avg_sq = _operands(8, torch.float32, seed=0)
    step = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match=r"grad has shape \(4,\), param \(8,\)"):
        adamw_step_(param, grad[:4], exp_avg, exp_avg_sq, step, None, **HYPER)
    with pytest.raises(ValueError, match="exp_avg_sq is torch.float32 with strides"):
        adamw_step_(param, grad, exp_avg, torch.zeros(8, 2, device=DEVICE)[:, 0], step, None, **HYPER)
    with pytest.raises(ValueError, match="step is torch.int64"):
        adamw_step_(param, grad, exp_avg, exp_avg_sq, torch.tensor(1, device=DEVICE), None, **HYPER)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 8))
    return model.to(DEVICE, dtype)


def _train(model, optimizer, steps, first=0):
    for step in range(first, first + steps):
        torch.manual_seed(100 + step)
        weight = next(model.parameters())
        model(torch.randn(16, 24, device=DEVICE, dtype=weight.dtype)).float().square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _groups(model):
    """Two groups with their own hyperparameters; the last bias takes no gradient."""
    model[2].bias.requires_grad_(False)
    return [{"params": list(model[0].parameters()), "lr": 2e-3, "weight_decay": 0.0},
            {"params": [model[2].weight], "lr": 5e-3, "betas": (0.8, 0.9), "weight_decay": 0.2}]


def test_steps_as_torchs_adamw():
    models = [_model(), _model()]
    ours = AdamW(_groups(models[0]), lr=1e-3, eps=1e-7)
    theirs = torch.optim.AdamW(_groups(models[1]), lr=1e-3, eps=1e-7)
    for optimizer, model in zip((ours, theirs), models):
        _train(model, optimizer, steps=5)
    for a, b, initial in zip(models[0].parameters(), models[1].parameters(), _model().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(a, initial) != a.requires_grad  # trained if and only if it takes a gradient
    for key in ("exp_avg", "exp_avg_sq"):
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            if p.requires_grad:
                torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], rtol=1e-5, atol=1e-6)
    assert models[0][2].bias not in ours.state  # no gradient, no state
    assert float(ours.state[models[0][0].weight]["step"]) == 5.0


@pytest.mark.parametrize("direction", ["torch to ligerzoo", "ligerzoo to torch"])
def test_state_moves_between_it_and_torchs_adamw(direction):
    """A checkpoint of either resumes in the other: 2 steps, state_dict, 2 more steps, as 4 steps
    of torch's AdamW alone."""
    make_first, make_second = torch.optim.AdamW, AdamW
    if direction == "ligerzoo to torch":
        make_first, make_second = AdamW, torch.optim.AdamW
    reference = _model()
    _train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), steps=4)
    model = _model()
    first = make_first(model.parameters(), lr=1e-2)
    _train(model, first, steps=2)
    second = make_second(model.parameters(), lr=1e-2)
    second.load_state_dict(first.state_dict())
    _train(model, second, steps=2, first=2)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(second.state[model[0].weight]["step"]) == 4.0


def test_step_post_hooks_run():
    model = _model()
    optimizer = AdamW(model.parameters())
    calls = []
    optimizer.register_step_post_hook(lambda *_: calls.append(1))
    _train(model, optimizer, steps=2)
    assert calls == [1, 1]


def test_what_it_does_not_support_is_refused():
    model = _model()
    optimizer = AdamW(model.parameters())
    optimizer.param_groups[0]["amsgrad"] = True  # as loading a torch AdamW's amsgrad state would
    with pytest.raises(ValueError, match="neither amsgrad nor maximize"):
        _train(model, optimizer, steps=1)


def test_fp8_rows_are_written_only_for_a_parameter_it_steps():
    model = _model()
    optimizer = AdamW(model[0].parameters())
    rows = quantize_rows(model[2].weight.detach())
    with pytest.raises(ValueError, match="not one this optimizer steps"):
        optimizer.write_fp8_rows(model[2].weight, rows, torch.float32)
