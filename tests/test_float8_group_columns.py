"""kernels/float8_group_columns.py: `quantize_group_columns` equals, for every group of rows,
float8.py's `quantize_rows` of that group's transposed rows, bit for bit (data and scales), on the
Triton kernel (interpreted on the CPU) and on the PyTorch path."""

import pytest
import torch
from conftest import DEVICE, DTYPES
from test_float8_columns import special_lines
from test_float8_kernels import assert_rows_equal, spread

from ligerzoo.kernels.float8 import E4M3, Float8Rows, quantize_rows
from ligerzoo.kernels.float8_columns import TILE
from ligerzoo.kernels.float8_group_columns import quantize_group_columns

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

# (rows, columns, group ends): groups inside one tile, groups straddling tiles, empty groups (at
# the start, inside, at the end), rows past the last group, one group of everything.
CASES = [
    (1, 1, [1]),
    (TILE, 3, [5, 5, 64, TILE]),
    (2 * TILE + 40, TILE + 3, [0, 100, 100, 250, 2 * TILE + 40]),
    (3 * TILE + 8, 20, [TILE + 1, 2 * TILE - 1, 2 * TILE + 16]),
    (2 * TILE + 2, 2 * TILE + 1, [2 * TILE + 2]),
    (40, 9, [16, 32, 32, 32]),
]


def expected_cast(values: torch.Tensor, ends: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group cast by quantize_rows of its transposed rows; rows in no group zeros."""
    n_rows, n_cols = values.shape
    data = torch.zeros(n_cols, n_rows, dtype=E4M3, device=values.device)
    scales = []
    start = 0
    for end in ends:
        group = values[start:end]
        if end == start:  # no rows: the scales of an all-zero cast
            group = values.new_zeros(1, n_cols)
        cast = quantize_rows(group.t())
        data[:, start:end] = cast.data[:, :end - start]
        scales.append(cast.scale.reshape(n_cols))
        start = end
    return data, torch.stack(scales)


def assert_group_cast_equal(got, expected, ends):
    """Per group, the columns' data and scales bit for bit (a NaN column's data need only be NaN)."""
    (data, scale), (want_data, want_scale) = got, expected
    assert data.dtype == E4M3 and data.shape == want_data.shape and data.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == want_scale.shape
    start = 0
    for g, end in enumerate(ends):
        if end == start:
            assert torch.equal(scale[g].view(torch.int32), want_scale[g].view(torch.int32))
            continue
        assert_rows_equal(Float8Rows(data[:, start:end].contiguous(), scale[g][:, None]),
                          Float8Rows(want_data[:, start:end].contiguous(), want_scale[g][:, None]))
        start = end
    assert torch.equal(data[:, start:].view(torch.uint8), want_data[:, start:].view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{len(c[2])}groups")
def test_each_group_is_the_cast_of_its_transposed_rows(kernel_path, dtype, case):
    n_rows, n_cols, ends = case
    t = special_lines(spread((n_rows, n_cols), dtype, per_row=False))  # columns over many binades
    group_ends = torch.tensor(ends, dtype=torch.int32, device=DEVICE)
    got = quantize_group_columns(t, group_ends)
    assert_group_cast_equal(got, expected_cast(t.float(), ends), ends)


@pytest.mark.parametrize("case", CASES[1:4], ids=lambda c: f"{c[0]}x{c[1]}-{len(c[2])}groups")
def test_fp8_rows_cast_again_per_group(kernel_path, case):
    """The experts' weight gradient's x: saved as FP8 rows, dequantized exactly, cast per group."""
    n_rows, n_cols, ends = case
    x = quantize_rows(special_lines(spread((n_rows, n_cols), torch.bfloat16, per_row=True)))
    group_ends = torch.tensor(ends, dtype=torch.int32, device=DEVICE)
    got = quantize_group_columns(x.data, group_ends, x.scale)
    assert_group_cast_equal(got, expected_cast(x.dequantize(), ends), ends)


def test_a_nan_spoils_only_its_group_and_column(kernel_path):
    t = torch.randn(3 * TILE, 5, device=DEVICE, dtype=torch.bfloat16)
    t[TILE + 3, 2] = float("nan")
    ends = [TILE, 2 * TILE, 3 * TILE]
    data, scale = quantize_group_columns(t, torch.tensor(ends, dtype=torch.int32, device=DEVICE))
    nan = scale.isnan()
    assert nan[1, 2] and nan.sum() == 1
    assert data[2, TILE:2 * TILE].float().isnan().all() and not data[2, :TILE].float().isnan().any()


def test_writes_every_element(kernel_path):
    """Outputs start as garbage in torch.empty; poisoning the allocator's pool makes any element a
    kernel forgets NaN, which the comparison then catches (rows past the last group included)."""
    t = spread((300, 140), torch.bfloat16, per_row=True)
    ends = [7, 150, 280]
    group_ends = torch.tensor(ends, dtype=torch.int32, device=DEVICE)
    for _ in range(3):
        torch.full((4 * 300 * 140,), float("nan"), device=DEVICE)
        got = quantize_group_columns(t, group_ends)
        assert not got[0].float().isnan().any() and not got[1].isnan().any()
        assert_group_cast_equal(got, expected_cast(t.float(), ends), ends)


def test_errors_say_what_was_wrong():
    t = torch.randn(32, 16, device=DEVICE)
    ends = torch.tensor([16, 32], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"group_ends is torch.int64 \(2,\)"):
        quantize_group_columns(t, ends.long())
    with pytest.raises(ValueError, match=r"group_ends is torch.int32 \(0,\)"):
        quantize_group_columns(t, ends[:0])
    with pytest.raises(ValueError, match=r"t has shape \(16,\)"):
        quantize_group_columns(t[0], ends)
    rows = quantize_rows(t)
    with pytest.raises(ValueError, match=r"scale is torch.float32 \(32,\)"):
        quantize_group_columns(rows.data, ends, rows.scale.reshape(32))


def test_compiles_as_one_graph_with_the_same_bits(monkeypatch):
    """Under torch.compile(fullgraph=True): on the GPU the kernels, scheduled by Inductor; on the
    CPU the PyTorch path (an interpreted kernel cannot be traced)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    t = spread((300, 140), torch.bfloat16, per_row=False)
    group_ends = torch.tensor([7, 150, 280], dtype=torch.int32, device=DEVICE)
    got = torch.compile(quantize_group_columns, fullgraph=True)(t, group_ends)
    expected = quantize_group_columns(t, group_ends)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and torch.equal(g.view(torch.uint8), e.view(torch.uint8))
