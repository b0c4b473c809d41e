"""AdamW's update of one bf16 parameter with its gradient and moments (kernels/adamw.py), the
gradient divided by a clipping scale in the same pass, as train.py's step makes it.

Peers: eager: torch's fused AdamW kernel (`torch._fused_adamw_`, what `torch.optim.AdamW(...,
fused=True)` and Hugging Face's `adamw_torch_fused` run), which also writes the divided gradient
back; compile: torch.compile of the update's formulas; liger: has no optimizer (the column says
so); ligerzoo: `adamw_step_`. Shapes: Llama-3.2-1B's gate/up weight (16384 x 2048) and its tied
embedding (128256 x 2048). Each call updates the same tensors again (step 3 throughout), which
moves the same bytes; the error is of one update on fresh tensors against float64.
"""

from functools import partial

import torch

from .case import BF16, Case, compiled, ligerzoo_kernel, randn

TABLE = "AdamW: one parameter's update, its gradient divided by a clipping scale"
NOTE = (
    "AdamW (forward only: an in-place update of param, exp_avg, exp_avg_sq from grad / grad_scale); "
    "eager: torch._fused_adamw_ (it also writes the divided gradient back); compile: torch.compile "
    "of the formulas; ligerzoo: kernels/adamw.py; bytes: 4 bf16 tensors read, 3 written"
)
OUTPUTS = ("param", "exp_avg", "exp_avg_sq")
LR, BETA1, BETA2, EPS, WEIGHT_DECAY = 3e-4, 0.9, 0.95, 1e-8, 0.1
STEP = 3.0


def update(param, grad, exp_avg, exp_avg_sq, grad_scale, step):
    """The update's formulas in PyTorch (float32 math, stored in the tensors' dtype)."""
    g = grad.float() / grad_scale
    m = BETA1 * exp_avg.float() + (1 - BETA1) * g
    v = BETA2 * exp_avg_sq.float() + (1 - BETA2) * g * g
    denom = v.sqrt() / (1 - BETA2**step).sqrt() + EPS
    p = param.float() * (1 - LR * WEIGHT_DECAY) - LR / (1 - BETA1**step) * m / denom
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    return param, exp_avg, exp_avg_sq


def reference(master):
    t = {k: v.double() for k, v in master.items()}
    g = t["grad"] / t["grad_scale"]
    m = BETA1 * t["exp_avg"] + (1 - BETA1) * g
    v = BETA2 * t["exp_avg_sq"] + (1 - BETA2) * g * g
    denom = v.sqrt() / (1 - BETA2**STEP) ** 0.5 + EPS
    p = t["param"] * (1 - LR * WEIGHT_DECAY) - LR / (1 - BETA1**STEP) * m / denom
    return {"param": p.float(), "exp_avg": m.float(), "exp_avg_sq": v.float()}


def make_inputs(shape, dev, g):
    return {
        "param": randn(shape, dev, g, 0.02),
        "grad": randn(shape, dev, g, 1e-3),
        "exp_avg": randn(shape, dev, g, 1e-4),
        "exp_avg_sq": randn(shape, dev, g, 1e-7).abs(),
        "grad_scale": torch.tensor(2.5, device=dev),
        "step": torch.tensor(STEP, device=dev),
    }


def tensors(t):
    return t["param"], t["grad"], t["exp_avg"], t["exp_avg_sq"]


def build_eager():
    def fused(t):
        param, grad, exp_avg, exp_avg_sq = tensors(t)
        torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [t["step"]], lr=LR, beta1=BETA1,
                            beta2=BETA2, weight_decay=WEIGHT_DECAY, eps=EPS, amsgrad=False, maximize=False,
                            grad_scale=t["grad_scale"], found_inf=None)
        return param, exp_avg, exp_avg_sq

    return fused


def build_compile():
    fn = compiled(update)
    return lambda t: fn(*tensors(t), t["grad_scale"], t["step"])


def build_liger():
    raise RuntimeError("liger-kernel has no optimizer")


def build_ligerzoo():
    step_ = ligerzoo_kernel("adamw", "adamw_step_")

    def ligerzoo(t):
        param, grad, exp_avg, exp_avg_sq = tensors(t)
        step_(param, grad, exp_avg, exp_avg_sq, t["step"], t["grad_scale"],
              LR, BETA1, BETA2, EPS, WEIGHT_DECAY)
        return param, exp_avg, exp_avg_sq

    return ligerzoo


def moved_bytes(shape, direction):
    return torch.Size(shape).numel() * 7 * BF16.itemsize


def cases(small: bool) -> list[Case]:
    shapes = [("w13", "gate/up weight", (16384, 2048)), ("embedding", "embedding", (128256, 2048))]
    out = []
    for name, label, shape in shapes:
        if small:
            shape = (96, 80)
        out.append(Case(
            name=f"adamw_{name}",
            label=f"AdamW, {label}",
            shape=f"param[{shape[0]},{shape[1]}]",
            make=partial(make_inputs, shape),
            grad_inputs=(),
            out_names=OUTPUTS,
            peers={"eager": build_eager, "compile": build_compile, "liger": build_liger,
                   "ligerzoo": build_ligerzoo},
            reference=reference,
            work=partial(moved_bytes, shape),
            directions=("fwd",),
            table=TABLE,
            notes=[NOTE],
        ))
    return out
