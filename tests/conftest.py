"""Shared test set-up.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (the variable must be
set before any kernel module is imported, because `triton.jit` reads it when decorating).
Every test runs with PyTorch's deterministic mode and `fill_uninitialized_memory`, so each
`torch.empty` output starts as NaN: an element a kernel forgot to write fails the comparison.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Relative error (in norm) allowed against a float64 reference: a few units of the dtype's
# rounding, since every kernel accumulates in float32 and rounds once on store.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def poisoned_outputs():
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(params=["triton", "torch"] if DEVICE.type == "cpu" else ["triton"])
def kernel_path(request, monkeypatch):
    """On CPU, each kernel test runs twice: the Triton kernel under the interpreter, and the
    PyTorch reference path a laptop without TRITON_INTERPRET takes."""
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    return request.param


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if torch.isnan(actual).any():
        return float("inf")
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, what: str = ""):
    """actual (computed in `dtype`) against a float64 reference, relative error in norm."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_error(actual, expected)
    tol = REL_TOL[dtype] * scale
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values laid out with a gap between rows, so the kernel must honour strides."""
    padded = torch.empty(*t.shape[:-1], t.shape[-1] + 7, dtype=t.dtype, device=t.device)
    padded[..., : t.shape[-1]] = t
    return padded[..., : t.shape[-1]]


def assert_device_assert(code: str, message: str) -> None:
    """Run `code` (which must trip a device-side assertion) in a fresh Python process and check
    the assertion's message: on CUDA a device-side assert leaves the context unusable, so it
    cannot be caught in the test process."""
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", "import torch\n" + code + "\ntorch.cuda.synchronize()"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode != 0, "expected a device-side assertion, the process succeeded"
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
