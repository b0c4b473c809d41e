"""Host time of one small forward+backward through autograd, GPU time negligible: our RMSNorm,
variants of its backward (plain torch ops, a raw Triton launch with and without the `.sum(0)`
reduction, the launcher, the registered op) and liger's, with autograd's device threads on and
off. It shows that on autograd's device thread each PyTorch op costs far more host time than a
Triton launch, which is why the backwards avoid PyTorch ops. Needs a CUDA GPU."""

import sys
import time

import torch
import ligerzoo.kernels.rms_norm
from torch._library.triton import set_wrap_triton_enabled
R = sys.modules["ligerzoo.kernels.rms_norm"]
s = torch.randn(4, 64, device="cuda"); w = torch.randn(64, device="cuda")
def loop(f, n=400):
    for _ in range(20): f()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e6
def make(bwd_impl, fwd_impl=lambda x, w: R._forward(x, None, w, 1e-6)):
    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            y, _, rstd = fwd_impl(x, w); ctx.save_for_backward(x, w, rstd); return y
        @staticmethod
        def backward(ctx, dy):
            x, w, rstd = ctx.saved_tensors
            return bwd_impl(dy, x, w, rstd)
    def fb():
        a = s.detach().requires_grad_(); b = w.detach().requires_grad_()
        F.apply(a, b).backward(s)
    return fb
def raw_bwd(dy, x, w, rstd):
    dx = torch.empty_like(x); part = torch.empty((4, 64), device="cuda")
    R._rms_norm_backward_kernel[(4,)](dy, x, w, rstd, dy, dx, part, 64, 64, 0, 64, 4, 64, HAS_SUM_GRAD=False, BLOCK=64, num_warps=4)
    return dx, part.sum(0)
def raw_bwd_nosum(dy, x, w, rstd):
    dx = torch.empty_like(x); part = torch.empty((4, 64), device="cuda")
    R._rms_norm_backward_kernel[(4,)](dy, x, w, rstd, dy, dx, part, 64, 64, 0, 64, 4, 64, HAS_SUM_GRAD=False, BLOCK=64, num_warps=4)
    return dx, part[0]
def torch_bwd(dy, x, w, rstd):
    return dy * 2, (dy * x).sum(0)
def launcher_bwd(dy, x, w, rstd):
    with set_wrap_triton_enabled(False):
        return R._backward.launcher(dy, x, w, rstd, None)
variants = {"current rms_norm": None, "torch ops bwd": torch_bwd, "raw triton + sum": raw_bwd, "raw triton no sum": raw_bwd_nosum,
            "launcher direct": launcher_bwd, "kernel_op call": lambda dy, x, w, r: R._backward(dy, x, w, r, None)}
for mt in (True, False):
    torch.autograd.set_multithreading_enabled(mt)
    for name, impl in variants.items():
        if impl is None:
            def fb():
                a = s.detach().requires_grad_(); b = w.detach().requires_grad_(); R.rms_norm(a, b).backward(s)
        else:
            fb = make(impl)
        print(f"multithread={mt} {name:20s} {loop(fb):7.1f} us")
try:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    torch.autograd.set_multithreading_enabled(True)
    def lfb():
        a = s.detach().requires_grad_(); b = w.detach().requires_grad_(); LigerRMSNormFunction.apply(a, b, 1e-6).backward(s)
    print("liger fwd+bwd", loop(lfb))
except Exception as e: print(e)
