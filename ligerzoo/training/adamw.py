"""AdamW whose step is kernels/adamw.py: one pass over each parameter, gradient clipping in it.

A `torch.optim.AdamW` in everything but its step: the same hyperparameters, param groups and
state (`step`, `exp_avg`, `exp_avg_sq` a parameter, the moments in the parameter's dtype), so
checkpoints move between the two either way and torch.distributed.checkpoint handles it as it
handles AdamW. The step updates each parameter with one kernel launch (parameters sharded by
FSDP2 as DTensors: their local shards), and divides the gradients by `grad_scale` where one is
set (clipping.py) as it reads them, writing nothing back to them. The step counts live on the
parameters' device (as torch's fused AdamW keeps them), so a step never waits on the host. A
weight whose FP8 rows a layer keeps (`write_fp8_rows`) gets them written in its update's pass,
rather than read again by a cast after the step.

Not supported: amsgrad, maximize, sparse or complex gradients (refused with a reason).
"""

import torch
from torch.distributed.tensor import DTensor

from ligerzoo.kernels.adamw import adamw_step_
from ligerzoo.kernels.float8 import Float8Rows


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW(params, lr, betas, eps, weight_decay)`, stepped by ligerzoo's kernel.
    Set `grad_scale` (a float32 tensor of one value) before a step to have that step divide the
    gradients by it; None (the default) divides by nothing."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.grad_scale: torch.Tensor | None = None
        self._fp8_rows: dict[torch.Tensor, tuple[Float8Rows, torch.dtype]] = {}

    def write_fp8_rows(self, param: torch.Tensor, rows: Float8Rows, rows_from: torch.dtype) -> None:
        """From now on, every step that updates param [N, K] (its local tensor: a whole weight)
        also writes `quantize_rows(param.to(rows_from))` into rows (data and scale buffers), in
        the pass that updates it: models/float8_weight_rows.py's kept rows."""
        if not any(param is p for group in self.param_groups for p in group["params"]):
            raise ValueError("write_fp8_rows: the parameter is not one this optimizer steps")
        self._fp8_rows[param] = (rows, rows_from)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("ligerzoo's AdamW supports neither amsgrad nor maximize")
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse or p.is_complex():
                    raise ValueError("ligerzoo's AdamW takes dense real gradients only")
            steps = [self._state(p)["step"] for p in params]
            if steps:
                torch._foreach_add_(steps, 1.0)
            lr, (beta1, beta2) = float(group["lr"]), group["betas"]
            for p in params:
                state = self.state[p]
                rows, rows_from = self._fp8_rows.get(p, (None, None))
                adamw_step_(_local(p), _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                            state["step"], self._grad_scale_on(p.device), lr, float(beta1), float(beta2),
                            group["eps"], group["weight_decay"], rows, rows_from)
        return loss

    def _grad_scale_on(self, device: torch.device) -> torch.Tensor | None:
        scale = self.grad_scale
        if scale is None or (scale.device == device and scale.dtype == torch.float32):
            return scale
        return scale.to(device=device, dtype=torch.float32)

    def _state(self, p: torch.Tensor) -> dict:
        """p's state, made on its first step as torch's AdamW makes it."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device:  # loaded from an AdamW that keeps it on the host
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        return state


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t
