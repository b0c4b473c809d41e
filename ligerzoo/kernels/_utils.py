"""What every kernel file shares: how a launcher is registered and dispatched, where a tensor's
kernel runs, tile sizes, argument checks and the losses' conventions.

Kernel files import nothing of the package but this module and the kernels they build on: the
fused linear cross-entropy imports the cross-entropy launchers it runs on each chunk, the
kernels that write FP8 import its definition (float8.py) and its Triton helpers (float8_rows.py),
and float8_fused.py the norm's and SwiGLU's launchers it runs around the FP8 products.
"""

import functools
import inspect
import os

import torch
import triton
from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
from torch.library import custom_op, infer_schema, triton_op, wrap_triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# A row-per-program kernel holds one row in registers; past this many elements it would spill.
MAX_ROW_BLOCK = 65536


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through Triton's interpreter (CI's mode)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors do too under the interpreter,
    and otherwise take the PyTorch path each kernel file keeps beside its kernels."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


@functools.cache
def row_block(n_cols: int, max_block: int = MAX_ROW_BLOCK) -> tuple[int, int]:
    """Block size covering one row (next power of two, capped) and the warps that suit it."""
    block = min(max_block, triton.next_power_of_2(max(n_cols, 1)))
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    else:
        num_warps = 4
    return block, num_warps


def program_count(device: torch.device, per_sm: int = 1) -> int:
    """Programs for a persistent grid: a few per multiprocessor on the GPU, a handful when
    interpreting (each interpreted program is a Python loop)."""
    if device.type == "cuda":
        return per_sm * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---------------------------------------------------------------------------------------------
# Dispatch: every launcher is registered with `kernel_op` and launches with `launch`.


def launch(kernel):
    """`wrap_triton(kernel)` while torch.compile traces a launcher (so Inductor sees the kernel),
    the kernel itself when the launcher simply runs (see `kernel_op`): even switched off,
    wrap_triton's checks cost several microseconds a launch. Under Triton's interpreter the kernel
    is an interpreted function, which wrap_triton cannot trace: torch 2.13 hands it back as it
    is, earlier versions raise."""
    if is_wrap_triton_enabled() and not interpreting():
        return wrap_triton(kernel)
    return kernel


def kernel_op(name: str, mutates_args=(), opaque: bool = False):
    """Register a launcher as the torch.library op `ligerzoo::<name>` and return a callable that
    takes the op while torch.compile traces, and in eager mode calls the launcher directly: through
    the custom-op dispatcher a call costs about 75 us of host time, through `wrap_triton`'s
    higher-order op about 300 us (H100, torch 2.11), more than these kernels take on the GPU.
    Whenever the launcher runs rather than being traced (eager, or as the op's implementation),
    it runs with wrap_triton switched off, so `launch` hands it the raw kernels.

    The op is a `triton_op`: Inductor traces the launcher, sees the Triton kernels inside and
    schedules them with the code around it. `opaque=True` registers a plain `custom_op`, which
    Inductor calls as one unit, for a launcher that loops over chunks calling other launchers
    and cuBLAS matmuls: traced, the loop would be unrolled into the graph, one copy per chunk,
    with nothing inside for Inductor to fuse. An opaque op's output shapes come from a fake
    registered with `@<the returned callable>.register_fake`.
    """

    def register(launcher):
        def run(*args, **kwargs):
            with set_wrap_triton_enabled(False):
                return launcher(*args, **kwargs)

        qualified = f"ligerzoo::{name}"
        if opaque:
            schema = infer_schema(launcher, mutates_args=mutates_args)
            op = custom_op(qualified, run, mutates_args=mutates_args, schema=schema)
        else:
            op = triton_op(qualified, mutates_args=mutates_args)(launcher)
        parameters = list(inspect.signature(launcher).parameters)
        mutated = [parameters.index(arg) for arg in mutates_args]

        def call(*args):
            if torch.compiler.is_compiling():
                return op(*args)
            result = run(*args)
            # Raw kernel writes are invisible to autograd: bump the version the op would have
            # bumped, so a saved tensor modified in place is caught on reuse.
            for index in mutated:
                torch.autograd.graph.increment_version(args[index])
            return result

        call.op = op
        call.launcher = launcher
        call.register_fake = op.register_fake
        call.__name__ = call.__qualname__ = launcher.__name__
        call.__doc__ = launcher.__doc__
        return call

    return register


# ---------------------------------------------------------------------------------------------
# Argument checks: each error names the argument and the value it had.


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_rows(name: str, t: torch.Tensor, last_dim: str | None = None) -> None:
    """t has at least one dimension, the one a kernel's rows run along; with `last_dim` (what
    that dimension holds, e.g. "class") it must also be non-empty."""
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if last_dim is not None and t.shape[-1] == 0:
        shape = list(t.shape)
        raise ValueError(f"{name} must have a non-empty last ({last_dim}) dimension, got shape {shape}")


def check_shape(name: str, t: torch.Tensor, shape: list[int]) -> None:
    if list(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {list(t.shape)}")


def check_same_shape(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{name} must have {like_name}'s shape {list(like.shape)}, got {list(t.shape)}")


def check_same_dtype(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.dtype != like.dtype:
        raise ValueError(f"{name} must have {like_name}'s dtype {like.dtype}, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x as [rows, last dim] with unit stride along the row (copying only when needed)."""
    if x.dim() == 2:
        x2 = x
    else:
        # An empty tensor's row count cannot be inferred by reshape(-1, 0): count it.
        x2 = x.reshape(-1 if x.numel() else x.shape[:-1].numel(), x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


# ---------------------------------------------------------------------------------------------
# The cross-entropy losses' conventions, shared by the plain and the fused linear one.

# The target that takes no part in a loss (PyTorch's and Hugging Face's convention): prompt tokens,
# padding, the first token of a packed document.
IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")


def check_loss_options(ignore_index, label_smoothing, reduction) -> None:
    """The options both cross-entropy losses take, each checked with the value named."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")


def check_target(target: torch.Tensor, name: str, t: torch.Tensor) -> None:
    """target holds one class index for each row of t: int64 or int32, t's shape less its last
    dimension."""
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must be an int64 or int32 tensor of class indices, got {got}")
    if target.shape != t.shape[:-1]:
        raise ValueError(
            f"target has shape {list(target.shape)}, expected {list(t.shape[:-1])}, the shape of "
            f"{name} without its last dimension"
        )


def assert_targets_in_range(error_flag: torch.Tensor, op_name: str) -> None:
    """Fail, asynchronously (at once on CPU, as a device-side assert on CUDA, like torch's own
    cross-entropy), when the cross-entropy kernel flagged a target outside [0, V) that is not
    ignore_index: the host never waits for the flag."""
    message = f"{op_name}: target index outside [0, V) (and not ignore_index)"
    torch.ops.aten._assert_async.msg(error_flag == 0, message)
