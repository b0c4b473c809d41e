"""SwiGLU, the gate of Llama's MLP: `silu(gate) * up`, elementwise.

    y      = silu(g) * u,  silu(g) = g * sigmoid(g)
    d_gate = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    d_up   = dy * silu(g)

`swiglu_packed` takes gate and up as the two halves of one tensor (a fused gate-and-up
projection's output) and writes its gradient as one tensor too.

For FP8 training the launcher `swiglu_packed_forward_float8` writes y only as FP8 rows (float8.py's
rowwise e4m3 cast of y as the plain kernel rounds it, bit for bit) in the pass that computes it,
so that y is never written in gate_up's dtype and read again to be cast. The FP8 layer that reads
y calls it from its own autograd.Function, and the packed backward launchers from its backward.

Purely memory bound: the forward reads two tensors and writes one, the backward reads three and
writes two, so both kernels are one pass with wide tiles and nothing else.
"""

import torch
import triton
import triton.language as tl

from ligerzoo.kernels._utils import (
    as_rows,
    check_float,
    check_rows,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    interpreting,
    kernel_op,
    launch,
    row_block,
    runs_triton,
)
from ligerzoo.kernels.float8 import E4M3, quantize_rows
from ligerzoo.kernels.float8_rows import abs_max_bits, cast_e4m3, power_of_two_scales


@triton.jit
def _swiglu(g, u):
    """silu(g) * u in float32 for g float32: the one expression both forward kernels compute, so
    that the FP8 rows are the cast of the very values the plain kernel writes."""
    return g * tl.sigmoid(g) * u.to(tl.float32)


@triton.jit
def _tile(n_rows, n_cols, n_col_blocks, ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Row and column indices ([ROWS, 1] and [1, BLOCK_COLS]) and mask of this program's tile."""
    pid = tl.program_id(0)
    # int64: a flattened tensor's column index can pass 2**31.
    rows = (pid // n_col_blocks).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows[:, None], cols[None, :], mask


@triton.jit
def _swiglu_forward_kernel(
    gate_ptr, up_ptr, y_ptr,
    gate_row_stride, up_row_stride, y_row_stride,
    n_rows, n_cols, n_col_blocks,
    ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, PACKED: tl.constexpr,
):
    """PACKED: up_ptr is None and up is gate's row continued, columns n_cols.. of the tensor at
    gate_ptr. One pointer for both: Inductor copies a column slice out before a kernel reads it
    (measured: two extra copies of gate_up a layer), and a version that passed one buffer as two
    arguments, with offsets, gave NaN losses compiled (never seen in eager mode)."""
    rows, cols, mask = _tile(n_rows, n_cols, n_col_blocks, ROWS, BLOCK_COLS)
    g = tl.load(gate_ptr + rows * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if PACKED:
        u = tl.load(gate_ptr + n_cols + rows * gate_row_stride + cols, mask=mask, other=0.0)
    else:
        u = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0)
    tl.store(y_ptr + rows * y_row_stride + cols, _swiglu(g, u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _packed_row_slice(gate_up_row_ptr, cols, mask, n_cols):
    """silu(gate) * up at `cols` of one packed row, rounded to its dtype, as float32."""
    g = tl.load(gate_up_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_row_ptr + n_cols + cols, mask=mask, other=0.0)
    return _swiglu(g, u).to(gate_up_row_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _swiglu_packed_float8_kernel(
    gate_up_ptr, y_ptr, y_scale_ptr,
    gate_up_row_stride, y_row_stride,
    n_cols,
    EMULATE_FLOAT8: tl.constexpr, BLOCK: tl.constexpr, ROW_IN_REGISTERS: tl.constexpr,
):
    """One program per row of gate_up [N, 2D]: y = silu(gate) * up, rounded to gate_up's dtype,
    written to y_ptr (e4m3 [N, D]) as FP8 with its row's scale (y_scale_ptr, float32 [N]).
    No value can be cast before the row's amax is known. ROW_IN_REGISTERS (BLOCK >= D): the row
    is read once and held. Otherwise two passes over BLOCK-wide slices, the first for the amax,
    the second reading the row again (from L2, mostly) to cast it."""
    row = tl.program_id(0).to(tl.int64)
    gate_up_row_ptr = gate_up_ptr + row * gate_up_row_stride
    y_row_ptr = y_ptr + row * y_row_stride
    cols = tl.arange(0, BLOCK)
    if ROW_IN_REGISTERS:
        mask = cols < n_cols
        y = _packed_row_slice(gate_up_row_ptr, cols, mask, n_cols)
        quantize, dequantize = power_of_two_scales(abs_max_bits(y))
        tl.store(y_row_ptr + cols, cast_e4m3(y, quantize, EMULATE_FLOAT8), mask=mask)
    else:
        amax_bits = tl.full([], 0, tl.int32)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            y = _packed_row_slice(gate_up_row_ptr, start + cols, mask, n_cols)
            amax_bits = tl.maximum(amax_bits, abs_max_bits(y))
        quantize, dequantize = power_of_two_scales(amax_bits)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            y = _packed_row_slice(gate_up_row_ptr, start + cols, mask, n_cols)
            tl.store(y_row_ptr + start + cols, cast_e4m3(y, quantize, EMULATE_FLOAT8), mask=mask)
    tl.store(y_scale_ptr + row, dequantize)


@triton.jit
def _swiglu_grads(dy, g, u):
    """(d_gate, d_up) in float32 for dy and g float32: the one expression both backward kernels
    compute, so that the FP8 rows are the cast of the very values the plain kernel writes."""
    sig = tl.sigmoid(g)
    return dy * u.to(tl.float32) * sig * (1.0 + g * (1.0 - sig)), dy * (g * sig)


@triton.jit
def _swiglu_backward_kernel(
    dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    dy_row_stride, gate_row_stride, up_row_stride, dgate_row_stride, dup_row_stride,
    n_rows, n_cols, n_col_blocks,
    ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, PACKED: tl.constexpr, IN_PLACE: tl.constexpr,
):
    """dy: gradient of y; gate, up: the forward's inputs; dgate, dup: the gradients written.
    PACKED as in the forward, for up (read) and dup (written after dgate's columns). IN_PLACE
    (packed only): dgate_ptr is None and the gradient goes over gate_up itself; each program
    reads its elements before it writes them, and no other program touches them."""
    rows, cols, mask = _tile(n_rows, n_cols, n_col_blocks, ROWS, BLOCK_COLS)
    dy = tl.load(dy_ptr + rows * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if PACKED:
        u = tl.load(gate_ptr + n_cols + rows * gate_row_stride + cols, mask=mask, other=0.0)
    else:
        u = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0)
    dgate, dup = _swiglu_grads(dy, g, u)
    if IN_PLACE:
        dgate_ptr, dgate_row_stride = gate_ptr, gate_row_stride
    if PACKED:
        dup_ptr, dup_row_stride = dgate_ptr + n_cols, dgate_row_stride
    tl.store(dgate_ptr + rows * dgate_row_stride + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + rows * dup_row_stride + cols, dup.to(dup_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _packed_grad_row_slice(dy_row_ptr, gate_up_row_ptr, cols, mask, n_cols):
    """(d_gate, d_up) at `cols` of one packed row, rounded to gate_up's dtype, as float32."""
    dy = tl.load(dy_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_up_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_row_ptr + n_cols + cols, mask=mask, other=0.0)
    dgate, dup = _swiglu_grads(dy, g, u)
    dtype = gate_up_row_ptr.dtype.element_ty
    return dgate.to(dtype).to(tl.float32), dup.to(dtype).to(tl.float32)


@triton.jit
def _swiglu_packed_backward_float8_kernel(
    dy_ptr, gate_up_ptr, grad_ptr, grad_scale_ptr,
    dy_row_stride, gate_up_row_stride, grad_row_stride,
    n_cols,
    EMULATE_FLOAT8: tl.constexpr, BLOCK: tl.constexpr, ROW_IN_REGISTERS: tl.constexpr,
):
    """One program per row: the gradient of gate_up [N, 2D] (d_gate then d_up, each rounded to
    gate_up's dtype) written to grad_ptr (e4m3 [N, 2D]) as FP8 with its row's scale
    (grad_scale_ptr, float32 [N]). ROW_IN_REGISTERS (BLOCK >= D): both halves computed once and
    held. Otherwise two passes over BLOCK-wide slices of each half, the first for the amax, the
    second reading dy and gate_up again (from L2, mostly) to cast."""
    row = tl.program_id(0).to(tl.int64)
    dy_row_ptr = dy_ptr + row * dy_row_stride
    gate_up_row_ptr = gate_up_ptr + row * gate_up_row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK)
    if ROW_IN_REGISTERS:
        mask = cols < n_cols
        dgate, dup = _packed_grad_row_slice(dy_row_ptr, gate_up_row_ptr, cols, mask, n_cols)
        quantize, dequantize = power_of_two_scales(tl.maximum(abs_max_bits(dgate), abs_max_bits(dup)))
        tl.store(grad_row_ptr + cols, cast_e4m3(dgate, quantize, EMULATE_FLOAT8), mask=mask)
        tl.store(grad_row_ptr + n_cols + cols, cast_e4m3(dup, quantize, EMULATE_FLOAT8), mask=mask)
    else:
        amax_bits = tl.full([], 0, tl.int32)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            dgate, dup = _packed_grad_row_slice(dy_row_ptr, gate_up_row_ptr, start + cols, mask, n_cols)
            amax_bits = tl.maximum(amax_bits, tl.maximum(abs_max_bits(dgate), abs_max_bits(dup)))
        quantize, dequantize = power_of_two_scales(amax_bits)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            dgate, dup = _packed_grad_row_slice(dy_row_ptr, gate_up_row_ptr, start + cols, mask, n_cols)
            tl.store(grad_row_ptr + start + cols, cast_e4m3(dgate, quantize, EMULATE_FLOAT8), mask=mask)
            tl.store(grad_row_ptr + n_cols + start + cols, cast_e4m3(dup, quantize, EMULATE_FLOAT8),
                     mask=mask)
    tl.store(grad_scale_ptr + row, dequantize)


# Elements per program: with 8 warps one 16-byte access per thread in 16-bit dtypes (two in
# float32), and enough programs at LLM sizes that the last wave's tail is negligible.
_TILE = 2048


def _tiling(n_rows: int, n_cols: int, *tensors: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(rows, cols, rows per tile, columns per tile, warps) to launch with. When every operand's
    rows follow one another in memory (the usual case) the tensor is launched as one long row, so
    no tile is cut short by a row end that is not a multiple of the tile."""
    if n_rows == 1 or all(t.stride(0) == n_cols for t in tensors):
        n_rows, n_cols = 1, n_rows * n_cols
    block_cols, _ = row_block(n_cols, max_block=_TILE)
    _, num_warps = row_block(_TILE)
    return n_rows, n_cols, _TILE // block_cols, block_cols, num_warps


# The FP8 forward's rows: up to this many elements a row is held in registers, as rms_norm's rows
# are (gate_up read once; Llama-3.2-1B's D = 8192 and Llama-3.1-8B's 14336, a block of 16384 at 16
# warps, both held); wider rows take two passes of FLOAT8_PASS_BLOCK elements, gate_up read twice
# (the second time mostly from L2: a row of the 8B's is 56 KiB in bf16). On an H100, rows of 8192
# (gate_up [16384, 16384]) took 0.226 ms held and 0.261 ms in two passes (benchmarks/RESULTS.md).
FLOAT8_ROW_IN_REGISTERS = 16384
FLOAT8_PASS_BLOCK = 4096


# The PyTorch path: the kernels' math, for CPU tensors when Triton is not interpreting. Operands
# as the launchers below take them.


def _forward_torch(gate, up, y) -> None:
    n_cols = y.shape[1]
    g = gate[:, :n_cols].float()
    u = gate[:, n_cols:] if up is None else up
    y.copy_(g * torch.sigmoid(g) * u.float())


def _backward_torch(dy, gate, up, dgate, dup) -> None:
    n_cols = dy.shape[1]
    g, d = gate[:, :n_cols].float(), dy.float()
    u = (gate[:, n_cols:] if up is None else up).float()
    sig = torch.sigmoid(g)
    grad_gate = d * u * sig * (1.0 + g * (1.0 - sig))
    grad_up = d * g * sig
    out = gate if dgate is None else dgate
    out[:, :n_cols].copy_(grad_gate)
    (out[:, n_cols:] if dup is None else dup).copy_(grad_up)


def _launch_forward(gate, up, y) -> None:
    """y = silu(gate) * up, all [N, D]; up None: gate is [N, 2D], gate then up (packed)."""
    n_rows, n_cols = y.shape
    if y.numel() == 0:
        return
    if not runs_triton(gate):
        _forward_torch(gate, up, y)
        return
    operands = (gate, y) if up is None else (gate, up, y)
    rows, cols, rows_per_tile, block_cols, num_warps = _tiling(n_rows, n_cols, *operands)
    n_col_blocks = triton.cdiv(cols, block_cols)
    grid = (triton.cdiv(rows, rows_per_tile) * n_col_blocks,)
    launch(_swiglu_forward_kernel)[grid](
        gate, up, y,
        gate.stride(0), 0 if up is None else up.stride(0), y.stride(0),
        rows, cols, n_col_blocks,
        ROWS=rows_per_tile, BLOCK_COLS=block_cols, PACKED=up is None, num_warps=num_warps,
    )


def _launch_backward(dy, gate, up, dgate, dup) -> None:
    """The gradients of gate and up into dgate and dup; up and dup None: packed, as in
    `_launch_forward`, for gate and dgate; dgate None too: packed, written over gate."""
    n_rows, n_cols = dy.shape
    if dy.numel() == 0:
        return
    if not runs_triton(gate):
        _backward_torch(dy, gate, up, dgate, dup)
        return
    operands = [t for t in (dy, gate, up, dgate, dup) if t is not None]
    rows, cols, rows_per_tile, block_cols, num_warps = _tiling(n_rows, n_cols, *operands)
    n_col_blocks = triton.cdiv(cols, block_cols)
    grid = (triton.cdiv(rows, rows_per_tile) * n_col_blocks,)
    launch(_swiglu_backward_kernel)[grid](
        dy, gate, up, dgate, dup,
        dy.stride(0), gate.stride(0), 0 if up is None else up.stride(0),
        0 if dgate is None else dgate.stride(0), 0 if dup is None else dup.stride(0),
        rows, cols, n_col_blocks,
        ROWS=rows_per_tile, BLOCK_COLS=block_cols, PACKED=up is None, IN_PLACE=dgate is None,
        num_warps=num_warps,
    )


@kernel_op("swiglu_forward")
def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [N, D] with unit column stride. Returns silu(gate) * up, [N, D] contiguous."""
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _launch_forward(gate, up, y)
    return y


@kernel_op("swiglu_backward")
def _backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of gate and up, [N, D] contiguous, in one pass over dy, gate and up."""
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    _launch_backward(dy, gate, up, dgate, dup)
    return dgate, dup


@kernel_op("swiglu_packed_forward")
def swiglu_packed_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [N, 2D] = [gate | up], unit column stride. Returns silu(gate) * up, [N, D]."""
    y = torch.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=gate_up.dtype, device=gate_up.device)
    _launch_forward(gate_up, None, y)
    return y


@kernel_op("swiglu_packed_forward_float8")
def swiglu_packed_forward_float8(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up: [N, 2D] = [gate | up], unit column stride, D >= 1. Returns the FP8 rows of
    y = silu(gate) * up: e4m3 data [N, D] and float32 dequantizing scales [N, 1], which are
    `quantize_rows(y)` bit for bit, y as `swiglu_packed_forward` writes it."""
    n_rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    if not runs_triton(gate_up):
        # The PyTorch path's output, then float8.py's cast of it.
        y = torch.empty((n_rows, n_cols), dtype=gate_up.dtype, device=gate_up.device)
        _launch_forward(gate_up, None, y)
        return tuple(quantize_rows(y))
    y = torch.empty((n_rows, n_cols), dtype=E4M3, device=gate_up.device)
    y_scale = torch.empty((n_rows, 1), dtype=torch.float32, device=gate_up.device)
    if n_rows == 0:
        return y, y_scale
    block, num_warps = row_block(n_cols)
    row_in_registers = block <= FLOAT8_ROW_IN_REGISTERS
    if not row_in_registers:
        block, num_warps = row_block(FLOAT8_PASS_BLOCK)
    launch(_swiglu_packed_float8_kernel)[(n_rows,)](
        gate_up, y, y_scale,
        gate_up.stride(0), y.stride(0),
        n_cols,
        EMULATE_FLOAT8=interpreting(), BLOCK=block, ROW_IN_REGISTERS=row_in_registers, num_warps=num_warps,
    )
    return y, y_scale


@kernel_op("swiglu_packed_backward")
def swiglu_packed_backward(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """Gradient of gate_up, [N, 2D] contiguous: both halves written by one pass."""
    grad = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    _launch_backward(dy, gate_up, None, grad, None)
    return grad


@kernel_op("swiglu_packed_backward_float8")
def swiglu_packed_backward_float8(dy: torch.Tensor,
                                  gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dy: [N, D]; gate_up: [N, 2D] = [gate | up]; both unit column stride, D >= 1. Returns the
    FP8 rows of gate_up's gradient: e4m3 data [N, 2D] and float32 dequantizing scales [N, 1],
    which are `quantize_rows(swiglu_packed_backward(dy, gate_up))` bit for bit. The gradient is
    never written in gate_up's dtype: an FP8 layer that reads it as its output gradient casts it
    in this pass instead of reading it again (float8_fused.py's FFN)."""
    grad = torch.empty(gate_up.shape, dtype=E4M3, device=gate_up.device)
    grad_scale = torch.empty((dy.shape[0], 1), dtype=torch.float32, device=gate_up.device)
    _launch_backward_float8(dy, gate_up, grad, grad_scale)
    return grad, grad_scale


def backward_float8_fits_over_dy(dy: torch.Tensor) -> bool:
    """Whether `swiglu_packed_backward_float8_over_dy` can take dy [N, D]: a 16-bit dtype, its
    rows contiguous, and, where Triton runs, each row's gradient (2 D values) held in registers,
    so that a program has read all of its row of dy before it writes the first byte over it (a
    row in two passes would overwrite bytes of dy that its second pass has yet to read)."""
    n_cols = dy.shape[-1]
    rows_contiguous = dy.dim() == 2 and dy.stride(1) == 1 and (dy.shape[0] <= 1 or dy.stride(0) == n_cols)
    return dy.element_size() == 2 and rows_contiguous and (not runs_triton(dy) or _backward_row_held(n_cols))


def _backward_row_held(n_cols: int) -> bool:
    """Whether the FP8 backward kernel holds a row's gradient (both halves, 2 * block values) in
    registers rather than making two passes over it."""
    return 2 * row_block(n_cols)[0] <= FLOAT8_ROW_IN_REGISTERS


# Opaque (see kernel_op): Inductor calls it as one unit on dy's buffer. Traced, the kernel would
# write through a view of dy in another dtype, which functionalization is free to turn into a copy.
@kernel_op("swiglu_packed_backward_float8_over_dy", mutates_args=("dy",), opaque=True)
def swiglu_packed_backward_float8_over_dy(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """`swiglu_packed_backward_float8`, its e4m3 data written over dy's memory, which holds it
    exactly: a row of dy [N, D] in a 16-bit dtype is as many bytes as a row of the gradient's
    FP8 rows [N, 2D]. Returns the scales [N, 1]; the data is `dy.view(E4M3)` afterwards. For a dy
    read by nothing else (the down projection's input gradient): at the Llama-3.2-1B shape
    the gradient's 256 MiB are never allocated, where the step's memory peaks. dy as
    `backward_float8_fits_over_dy` requires."""
    if not backward_float8_fits_over_dy(dy):
        raise ValueError(f"swiglu_packed_backward_float8_over_dy: dy {tuple(dy.shape)} {dy.dtype} with "
                         f"strides {dy.stride()} cannot hold its gradient's FP8 rows (a 16-bit dtype, "
                         "contiguous rows, each held in registers)")
    grad_scale = torch.empty((dy.shape[0], 1), dtype=torch.float32, device=dy.device)
    _launch_backward_float8(dy, gate_up, dy.view(E4M3), grad_scale)
    return grad_scale


@swiglu_packed_backward_float8_over_dy.register_fake
def _(dy, gate_up):
    return dy.new_empty((dy.shape[0], 1), dtype=torch.float32)


def _launch_backward_float8(dy, gate_up, grad, grad_scale) -> None:
    """gate_up's gradient as FP8 rows: e4m3 data into grad [N, 2D], scales into grad_scale."""
    n_rows, n_cols = dy.shape
    if n_rows == 0:
        return
    if not runs_triton(gate_up):
        plain_grad = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        _launch_backward(dy, gate_up, None, plain_grad, None)
        data, scale = quantize_rows(plain_grad)
        grad.copy_(data)
        grad_scale.copy_(scale)
        return
    block, _ = row_block(n_cols)
    row_in_registers = _backward_row_held(n_cols)
    if not row_in_registers:
        block, _ = row_block(FLOAT8_PASS_BLOCK // 2)
    _, num_warps = row_block(2 * block)
    launch(_swiglu_packed_backward_float8_kernel)[(n_rows,)](
        dy, gate_up, grad, grad_scale,
        dy.stride(0), gate_up.stride(0), grad.stride(0),
        n_cols,
        EMULATE_FLOAT8=interpreting(), BLOCK=block, ROW_IN_REGISTERS=row_in_registers, num_warps=num_warps,
    )


@kernel_op("swiglu_packed_backward_in_place", mutates_args=("gate_up",))
def swiglu_packed_backward_in_place(dy: torch.Tensor, gate_up: torch.Tensor) -> None:
    """The gradient of gate_up written over gate_up."""
    _launch_backward(dy, gate_up, None, None, None)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate2, up2 = as_rows(gate), as_rows(up)
        y = _forward(gate2, up2)
        # Only the inputs are saved: sigmoid(gate) is cheaper to recompute than to store and
        # read back. The backward writes new tensors, never into these (others may hold them).
        ctx.save_for_backward(gate2, up2)
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        gate2, up2 = ctx.saved_tensors
        dgate, dup = _backward(as_rows(dy), gate2, up2)
        return dgate.view(dy.shape), dup.view(dy.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise over tensors of one shape and dtype (any leading dims)."""
    check_float("gate", gate)
    check_float("up", up)
    check_rows("gate", gate)
    check_same_shape("up", up, "gate", gate)
    check_same_dtype("up", up, "gate", gate)
    check_same_device(gate=gate, up=up)
    return _SwiGLUFunction.apply(gate, up)


class _SwiGLUPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, in_place_backward):
        gate_up2 = as_rows(gate_up)
        y = swiglu_packed_forward(gate_up2)
        ctx.save_for_backward(gate_up2)
        ctx.in_place_backward = in_place_backward  # on gate_up, or on as_rows' private copy of it
        return y.view(*gate_up.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        (gate_up2,) = ctx.saved_tensors
        if ctx.in_place_backward:
            swiglu_packed_backward_in_place(as_rows(dy), gate_up2)
            grad = gate_up2
        else:
            grad = swiglu_packed_backward(as_rows(dy), gate_up2)
        return grad.view(*dy.shape[:-1], grad.shape[-1]), None


def swiglu_packed(gate_up: torch.Tensor, in_place_backward: bool = False) -> torch.Tensor:
    """silu(gate) * up for gate_up = cat([gate, up], dim=-1), as one matmul of a fused gate-and-up
    projection gives them. Its gradient is one tensor laid out like gate_up: with
    `swiglu(*gate_up.chunk(2, -1))` autograd would concatenate two half-gradients into it, a
    full extra read and write of the MLP's widest activation in every backward.

    in_place_backward: the backward writes the gradient over gate_up, sparing a buffer of its
    size at the moment activation memory peaks. Only for a gate_up nothing else reads after
    the forward, such as the projection's output in an MLP (its backward needs its input, not
    its output); a second backward through the same graph fails autograd's version check."""
    check_float("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up must have an even last dimension (gate, then up), got shape {list(gate_up.shape)}"
        )
    return _SwiGLUPackedFunction.apply(gate_up, in_place_backward)

