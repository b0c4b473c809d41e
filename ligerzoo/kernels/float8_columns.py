"""An operand cast along its columns, written transposed: the FP8 layout the backward's products read.

Hopper's FP8 product takes its operands only with the contracted dimension innermost, so every
rowwise product of the backward (float8_linear.py) needs an operand cast along a dimension that
is not its rows, and stored transposed:
    input gradient  W^T [K, N] along N: the weight's columns
    weight gradient dy^T [N, M] and x^T [K, M] along M: the columns of dy and of x
and dy is also cast along its rows for the input gradient. `quantize_rows(t.t())` is that cast in
PyTorch; compiled, both layouts of gate/up's gradient [16384, 16384] took 1.79 ms on an H100
where these kernels take 0.71 (benchmarks/RESULTS.md). Here:

    quantize_columns(t)                 = quantize_rows(t.t())
    quantize_columns(data, scale)       = quantize_rows((data.float() * scale).t())  (t in FP8 rows)
    quantize_rows_and_columns(t)        = (quantize_rows(t), quantize_rows(t.t()))

bit for bit (the data contiguous in the transposed layout, [C, R], and its scales [C, 1]), in two
passes over tiles of t: the first takes each tile's largest |value| per column (and per row) and
merges it into the column's (and row's) amax with an atomic integer max on the float32 bits
(float8_rows.py: the bits order as the magnitudes do, NaN above inf, so a NaN propagates; a max
is exact in any order, so the result does not depend on the order the tiles run in); the second
reads the tile again, casts it with its columns' scales and stores it transposed (and with its
rows' scales, in place). t is read twice and each cast written once: for a bf16 t, 5 bytes of
traffic an element for the columns alone, 6 for both layouts (3 for FP8 rows), besides the
atomics: one a column and one a row for every 128 x 128 tile.

An operand given as FP8 rows (`scale` [R, 1]) is dequantized in float32 (exact: a power-of-two
scale) and cast again: the weight gradient's x, saved by the forward only in its row cast.
"""

import torch
import triton
import triton.language as tl

from ligerzoo.kernels._utils import check_same_device, interpreting, kernel_op, launch, runs_triton
from ligerzoo.kernels.float8 import E4M3, Float8Rows, quantize_rows
from ligerzoo.kernels.float8_rows import cast_e4m3, power_of_two_scales

# Square tiles: a tile is stored transposed, so its rows and columns are both a store's width.
# On an H100, 128 x 128 with 4 warps took 1.27 ms for about one Llama-3.2-1B block's casts, 64 x 64
# 1.44, 128 x 128 with 8 warps 1.41 (benchmarks/RESULTS.md).
TILE = 128
NUM_WARPS = 4
# CUDA's limit on a grid's second dimension, which runs over the column tiles.
_MAX_GRID_Y = 65535


@triton.jit
def load_tile(t_ptr, t_scale_ptr, rows, cols, row_mask, col_mask, t_row_stride, SCALED: tl.constexpr):
    """The tile as float32 (masked lanes 0); SCALED: FP8 data times its rows' scales."""
    mask = row_mask[:, None] & col_mask[None, :]
    v = tl.load(t_ptr + rows.to(tl.int64)[:, None] * t_row_stride + cols[None, :], mask=mask, other=0.0)
    v = v.to(tl.float32)
    if SCALED:
        v = v * tl.load(t_scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    return tl.where(mask, v, 0.0)


@triton.jit
def _amax_kernel(
    t_ptr, t_scale_ptr, row_amax_ptr, col_amax_ptr,
    n_rows, n_cols, t_row_stride,
    SCALED: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
):
    """One program per TILE x TILE tile: its columns' (and, ROWS, its rows') largest |v| as float32
    bits, merged into col_amax_ptr [C] (row_amax_ptr [R]) by atomic max; both start at 0."""
    rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    row_mask, col_mask = rows < n_rows, cols < n_cols
    bits = load_tile(t_ptr, t_scale_ptr, rows, cols, row_mask, col_mask, t_row_stride, SCALED).to(tl.int32, bitcast=True)
    bits = bits & 0x7FFFFFFF
    tl.atomic_max(col_amax_ptr + cols, tl.max(bits, axis=0), mask=col_mask)
    if ROWS:
        tl.atomic_max(row_amax_ptr + rows, tl.max(bits, axis=1), mask=row_mask)


@triton.jit
def _cast_kernel(
    t_ptr, t_scale_ptr, row_amax_ptr, col_amax_ptr,
    rows_ptr, rows_scale_ptr, cols_ptr, cols_scale_ptr,
    n_rows, n_cols, t_row_stride,
    SCALED: tl.constexpr, ROWS: tl.constexpr, EMULATE_FLOAT8: tl.constexpr, TILE: tl.constexpr,
):
    """One program per tile: cast with its columns' scales and stored transposed to cols_ptr
    ([C, R] e4m3; cols_scale_ptr [C] float32); ROWS: also cast with its rows' scales to rows_ptr
    ([R, C]; rows_scale_ptr [R]). The first tile of a column (row) writes its scale."""
    tile_row, tile_col = tl.program_id(0), tl.program_id(1)
    rows = tile_row * TILE + tl.arange(0, TILE)
    cols = tile_col * TILE + tl.arange(0, TILE)
    row_mask, col_mask = rows < n_rows, cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    v = load_tile(t_ptr, t_scale_ptr, rows, cols, row_mask, col_mask, t_row_stride, SCALED)
    quantize, dequantize = power_of_two_scales(tl.load(col_amax_ptr + cols, mask=col_mask, other=0))
    cast = cast_e4m3(v, quantize[None, :], EMULATE_FLOAT8)
    tl.store(cols_ptr + cols.to(tl.int64)[:, None] * n_rows + rows[None, :], tl.trans(cast),
             mask=col_mask[:, None] & row_mask[None, :])
    if tile_row == 0:
        tl.store(cols_scale_ptr + cols, dequantize, mask=col_mask)
    if ROWS:
        quantize, dequantize = power_of_two_scales(tl.load(row_amax_ptr + rows, mask=row_mask, other=0))
        cast = cast_e4m3(v, quantize[:, None], EMULATE_FLOAT8)
        tl.store(rows_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], cast, mask=mask)
        if tile_col == 0:
            tl.store(rows_scale_ptr + rows, dequantize, mask=row_mask)


def check_operand(t: torch.Tensor, scale: torch.Tensor | None) -> None:
    """t [R, C] in a float dtype, or e4m3 rows with their scale [R, 1]."""
    if t.dim() != 2 or 0 in t.shape:
        raise ValueError(f"t has shape {tuple(t.shape)}: expected a non-empty [R, C] matrix")
    if scale is None:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"t is {t.dtype}: expected a float dtype, or e4m3 data with its row scales")
        return
    if t.dtype != E4M3:
        raise ValueError(f"t is {t.dtype} with a scale: expected torch.float8_e4m3fn rows (quantize_rows' data)")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (t.shape[0], 1):
        raise ValueError(f"scale is {scale.dtype} {tuple(scale.shape)}: expected torch.float32 "
                         f"({t.shape[0]}, 1), one per row of t")
    check_same_device(t=t, scale=scale)


def tile_grid(t: torch.Tensor) -> tuple[int, int]:
    """The grid of one program a TILE x TILE tile of t [R, C]: (row tiles, column tiles)."""
    if triton.cdiv(t.shape[1], TILE) > _MAX_GRID_Y:
        raise ValueError(f"t has {t.shape[1]} columns: the kernels take at most {_MAX_GRID_Y * TILE} "
                         f"(a grid of {_MAX_GRID_Y} column tiles)")
    return triton.cdiv(t.shape[0], TILE), triton.cdiv(t.shape[1], TILE)


def _reference(t: torch.Tensor, scale: torch.Tensor | None, rows: bool) -> list[torch.Tensor]:
    """The definition in PyTorch (float8.py's casts): the path where the kernels do not run."""
    values = Float8Rows(t, scale).dequantize() if scale is not None else t
    out = list(quantize_rows(values.t()))
    return [*quantize_rows(values), *out] if rows else out


def _launch(t: torch.Tensor, scale: torch.Tensor | None, rows: bool) -> list[torch.Tensor]:
    check_operand(t, scale)
    if not runs_triton(t):
        return _reference(t, scale, rows)
    if t.stride(1) != 1:
        t = t.contiguous()
    n_rows, n_cols = t.shape
    device = t.device
    col_amax = torch.zeros(n_cols, dtype=torch.int32, device=device)
    cols = torch.empty((n_cols, n_rows), dtype=E4M3, device=device)
    cols_scale = torch.empty((n_cols, 1), dtype=torch.float32, device=device)
    # Unused pointers when only the columns are cast: any tensor of the right device will do.
    row_amax, rows_data, rows_scale = col_amax, cols, cols_scale
    if rows:
        row_amax = torch.zeros(n_rows, dtype=torch.int32, device=device)
        rows_data = torch.empty((n_rows, n_cols), dtype=E4M3, device=device)
        rows_scale = torch.empty((n_rows, 1), dtype=torch.float32, device=device)
    grid = tile_grid(t)
    t_scale = scale if scale is not None else t
    launch(_amax_kernel)[grid](
        t, t_scale, row_amax, col_amax, n_rows, n_cols, t.stride(0),
        SCALED=scale is not None, ROWS=rows, TILE=TILE, num_warps=NUM_WARPS,
    )
    launch(_cast_kernel)[grid](
        t, t_scale, row_amax, col_amax, rows_data, rows_scale, cols, cols_scale, n_rows, n_cols, t.stride(0),
        SCALED=scale is not None, ROWS=rows, EMULATE_FLOAT8=interpreting(), TILE=TILE, num_warps=NUM_WARPS,
    )
    return [rows_data, rows_scale, cols, cols_scale] if rows else [cols, cols_scale]


@kernel_op("quantize_columns")
def quantize_columns(t: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] cast along R, transposed: (data [C, R] e4m3, scale [C, 1] float32), which is
    `quantize_rows(t.t())` bit for bit. With `scale` [R, 1], t is FP8 rows (e4m3 data) standing
    for t.float() * scale."""
    return tuple(_launch(t, scale, rows=False))


@kernel_op("quantize_rows_and_columns")
def quantize_rows_and_columns(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """t [R, C] cast along C and along R: (rows [R, C], rows' scales [R, 1], columns [C, R]
    transposed, columns' scales [C, 1]), which are `quantize_rows(t)` and `quantize_rows(t.t())`
    bit for bit, from one read of t for the amaxes and one for the casts."""
    return tuple(_launch(t, None, rows=True))
