"""An operand cast along its columns one group of rows at a time, written transposed: the weight
gradient's operands of a grouped product (Mixtral's experts, float8_grouped.py).

The experts' weight gradient is one product per expert over that expert's tokens, dW_e = dy_e^T x_e,
so each expert casts dy and x along its own tokens: a column's scale comes from the largest |value|
of the column within the group. With the groups' row ends `group_ends` [G] (rows of group g are
group_ends[g - 1] .. group_ends[g] - 1; rows at or past the last end belong to no group):

    quantize_group_columns(t, group_ends)  ->  data [C, R] e4m3, t^T cast along R per group
                                               scale [G, C] float32, group g's scale of column c

which is, for every group g, `quantize_rows(t[start:end].t())` bit for bit in data[:, start:end]
and scale[g] (float8.py's cast); the columns of rows in no group are zeros, and a group with no
rows has the scales of an all-zero cast. The scales' layout, group-major, is what
`torch._scaled_grouped_mm` reads for a product grouped along its contracted dimension.

Two passes over 128 x 128 tiles, as float8_columns.py: the first merges each tile's largest |value|
per column and group into the [G, C] amaxes (an atomic integer max on the float32 bits, exact in any
order, NaN above inf), looping over the groups that meet the tile; the second casts each element
with its group's column scale and stores the tile transposed. With `scale` [R, 1], t is FP8 rows
(e4m3 data) standing for t.float() * scale: x, which the forward saved only in its row cast.
"""

import torch
import triton
import triton.language as tl

from ligerzoo.kernels import float8
from ligerzoo.kernels._utils import check_same_device, interpreting, kernel_op, launch, runs_triton
from ligerzoo.kernels.float8 import E4M3, FP8_MAX, Float8Rows
from ligerzoo.kernels.float8_columns import NUM_WARPS, TILE, check_operand, load_tile, tile_grid

# Inductor copies a user kernel's helpers by their own names: no aliases (float8.py's
# power_of_two_scales, the PyTorch one, is called through its module).
from ligerzoo.kernels.float8_rows import cast_e4m3, power_of_two_scales


@triton.jit
def _group_of_rows(rows, group_ends_ptr, n_groups, GROUPS_BLOCK: tl.constexpr):
    """Each row's group: how many group ends lie at or before it (n_groups: in no group)."""
    groups = tl.arange(0, GROUPS_BLOCK)
    ends = tl.load(group_ends_ptr + groups, mask=groups < n_groups, other=2**31 - 1)
    return tl.sum((rows[:, None] >= ends[None, :]).to(tl.int32), axis=1)


@triton.jit
def _group_amax_kernel(
    t_ptr, t_scale_ptr, group_ends_ptr, amax_ptr,
    n_rows, n_cols, t_row_stride, n_groups,
    SCALED: tl.constexpr, TILE: tl.constexpr, GROUPS_BLOCK: tl.constexpr,
):
    """One program per TILE x TILE tile: for each group among its rows, its columns' largest |v|
    as float32 bits, merged into amax_ptr [G, C] (zeros at first) by atomic max."""
    rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    row_mask, col_mask = rows < n_rows, cols < n_cols
    group = _group_of_rows(rows, group_ends_ptr, n_groups, GROUPS_BLOCK)
    in_group = row_mask & (group < n_groups)
    v = load_tile(t_ptr, t_scale_ptr, rows, cols, row_mask, col_mask, t_row_stride, SCALED)
    bits = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    # Rows are in group order, so the tile's groups are the run from its first row's to its last's.
    first = tl.min(tl.where(in_group, group, n_groups), axis=0)
    last = tl.max(tl.where(in_group, group, -1), axis=0)
    for g in range(first, last + 1):
        column_max = tl.max(tl.where((in_group & (group == g))[:, None], bits, 0), axis=0)
        tl.atomic_max(amax_ptr + g * n_cols + cols, column_max, mask=col_mask)


@triton.jit
def _group_cast_kernel(
    t_ptr, t_scale_ptr, group_ends_ptr, amax_ptr, out_ptr, out_scale_ptr,
    n_rows, n_cols, t_row_stride, n_groups,
    SCALED: tl.constexpr, EMULATE_FLOAT8: tl.constexpr, TILE: tl.constexpr, GROUPS_BLOCK: tl.constexpr,
):
    """One program per tile: each element cast with its group's column scale, the tile stored
    transposed to out_ptr [C, R] (zeros for rows in no group); the first row of tiles writes the
    [G, C] scales of its columns."""
    tile_row, tile_col = tl.program_id(0), tl.program_id(1)
    rows = tile_row * TILE + tl.arange(0, TILE)
    cols = tile_col * TILE + tl.arange(0, TILE)
    row_mask, col_mask = rows < n_rows, cols < n_cols
    group = _group_of_rows(rows, group_ends_ptr, n_groups, GROUPS_BLOCK)
    in_group = row_mask & (group < n_groups)
    v = load_tile(t_ptr, t_scale_ptr, rows, cols, row_mask, col_mask, t_row_stride, SCALED)
    amax_bits = tl.load(amax_ptr + group[:, None] * n_cols + cols[None, :],
                        mask=in_group[:, None] & col_mask[None, :], other=0)
    quantize = power_of_two_scales(amax_bits)[0]
    cast = cast_e4m3(tl.where(in_group[:, None], v, 0.0), quantize, EMULATE_FLOAT8)
    tl.store(out_ptr + cols.to(tl.int64)[:, None] * n_rows + rows[None, :], tl.trans(cast),
             mask=col_mask[:, None] & row_mask[None, :])
    if tile_row == 0:
        for g in range(n_groups):
            group_amax_bits = tl.load(amax_ptr + g * n_cols + cols, mask=col_mask, other=0)
            dequantize = power_of_two_scales(group_amax_bits)[1]
            tl.store(out_scale_ptr + g * n_cols + cols, dequantize, mask=col_mask)


def _check_groups(t: torch.Tensor, group_ends: torch.Tensor) -> None:
    if group_ends.dim() != 1 or group_ends.numel() == 0 or group_ends.dtype != torch.int32:
        raise ValueError(f"group_ends is {group_ends.dtype} {tuple(group_ends.shape)}: expected a non-empty "
                         f"int32 [G], each group's end row")
    check_same_device(t=t, group_ends=group_ends)


def group_index(n_rows: int, group_ends: torch.Tensor) -> torch.Tensor:
    """[n_rows] each row's group, by the groups' row ends [G] (as the kernels find it); G for the
    rows past the last end."""
    rows = torch.arange(n_rows, device=group_ends.device, dtype=group_ends.dtype)
    return torch.searchsorted(group_ends, rows, right=True)


def _reference(t: torch.Tensor, scale: torch.Tensor | None, group_ends: torch.Tensor) -> tuple:
    """The definition in PyTorch, with no host sync: the path where the kernels do not run."""
    values = Float8Rows(t, scale).dequantize() if scale is not None else t.float()
    n_rows, n_cols = values.shape
    n_groups = group_ends.numel()
    group = group_index(n_rows, group_ends)
    in_group = (group < n_groups)[:, None]
    values = torch.where(in_group, values, 0.0)
    # Row n_groups gathers the rows in no group (zeros). scatter_reduce's amax propagates NaN.
    amax = values.new_zeros(n_groups + 1, n_cols).scatter_reduce_(
        0, group[:, None].expand(-1, n_cols), values.abs(), "amax")
    quantize, dequantize = float8.power_of_two_scales(amax, E4M3)
    data = (values * quantize[group]).clamp(-FP8_MAX[E4M3], FP8_MAX[E4M3]).to(E4M3)
    return data.t().contiguous(), dequantize[:n_groups].contiguous()


@kernel_op("quantize_group_columns")
def quantize_group_columns(t: torch.Tensor, group_ends: torch.Tensor,
                           scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] cast along R one group of rows at a time, transposed: (data [C, R] e4m3, scale
    [G, C] float32); group_ends [G] int32 (module docstring). With `scale` [R, 1], t is FP8 rows
    (e4m3 data) standing for t.float() * scale."""
    check_operand(t, scale)
    _check_groups(t, group_ends)
    if not runs_triton(t):
        return _reference(t, scale, group_ends)
    if t.stride(1) != 1:
        t = t.contiguous()
    n_rows, n_cols = t.shape
    n_groups = group_ends.numel()
    amax = torch.zeros((n_groups, n_cols), dtype=torch.int32, device=t.device)
    data = torch.empty((n_cols, n_rows), dtype=E4M3, device=t.device)
    out_scale = torch.empty((n_groups, n_cols), dtype=torch.float32, device=t.device)
    grid = tile_grid(t)
    t_scale = scale if scale is not None else t
    groups_block = triton.next_power_of_2(n_groups)
    launch(_group_amax_kernel)[grid](
        t, t_scale, group_ends, amax, n_rows, n_cols, t.stride(0), n_groups,
        SCALED=scale is not None, TILE=TILE, GROUPS_BLOCK=groups_block, num_warps=NUM_WARPS,
    )
    launch(_group_cast_kernel)[grid](
        t, t_scale, group_ends, amax, data, out_scale, n_rows, n_cols, t.stride(0), n_groups,
        SCALED=scale is not None, EMULATE_FLOAT8=interpreting(), TILE=TILE, GROUPS_BLOCK=groups_block,
        num_warps=NUM_WARPS,
    )
    return data, out_scale
