"""The column casts of kernels/float8_columns.py: `quantize_columns` and `quantize_rows_and_columns`
equal float8.py's `quantize_rows` of the transposed tensor (and of the tensor) bit for bit, data and
scales, on the Triton kernel (interpreted on the CPU) and on the PyTorch path."""

import pytest
import torch
from conftest import DEVICE, DTYPES
from test_float8_kernels import assert_rows_equal, spread

from ligerzoo.kernels import float8_columns
from ligerzoo.kernels._utils import interpreting
from ligerzoo.kernels.float8 import E4M3, Float8Rows, quantize_rows
from ligerzoo.kernels.float8_columns import quantize_columns, quantize_rows_and_columns

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

# One element; a tile exactly; partial tiles along either dimension and both; several tiles.
TILE = float8_columns.TILE
SHAPES = [(1, 1), (TILE, TILE), (TILE + 1, 2 * TILE + 2), (2 * TILE + 2, 7), (3, 3 * TILE + 8),
          (2 * TILE + 8, TILE + 1)]


def special_lines(t: torch.Tensor) -> torch.Tensor:
    """t [R, C] with, where it is wide and tall enough, a column of zeros, one of negative zeros,
    a row and a column holding an inf and a row and a column holding a NaN."""
    rows, cols = t.shape
    if cols >= 6 and rows >= 6:
        t[:, 0], t[:, 1] = 0.0, -0.0
        t[rows // 2, 2] = float("inf")
        t[2, cols // 2] = float("nan")
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_row", [True, False])
def test_columns_are_the_cast_of_the_transpose(kernel_path, dtype, shape, per_row):
    t = special_lines(spread(shape, dtype, per_row))  # rows or columns over many binades: subnormals
    expected = quantize_rows(t.t())
    assert_rows_equal(Float8Rows(*quantize_columns(t)), expected)
    rows_data, rows_scale, cols_data, cols_scale = quantize_rows_and_columns(t)
    assert_rows_equal(Float8Rows(rows_data, rows_scale), quantize_rows(t))
    assert_rows_equal(Float8Rows(cols_data, cols_scale), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_rows_cast_again_along_the_columns(kernel_path, shape):
    """The weight gradient's x: saved as FP8 rows, dequantized exactly, cast along M."""
    x = quantize_rows(special_lines(spread(shape, torch.bfloat16, per_row=False)))
    expected = quantize_rows((x.data.float() * x.scale).t())
    assert_rows_equal(Float8Rows(*quantize_columns(x.data, x.scale)), expected)


def test_strided_input(kernel_path):
    """A view with a row stride past its width, and a transposed view (copied to rows first)."""
    base = spread((70, 150), torch.bfloat16, per_row=False)
    for t in (base[:, 10:110], base.t()[:90]):
        assert_rows_equal(Float8Rows(*quantize_columns(t)), quantize_rows(t.t()))


def test_writes_every_element(kernel_path):
    """Outputs start as garbage in torch.empty; poisoning the allocator's pool makes any element a
    kernel forgets NaN, which the comparison then catches."""
    t = spread((130, 200), torch.bfloat16, per_row=True)
    for _ in range(3):
        torch.full((4 * 130 * 200,), float("nan"), device=DEVICE)
        got = quantize_rows_and_columns(t)
        assert not got[0].float().isnan().any() and not got[2].float().isnan().any()
        assert_rows_equal(Float8Rows(*got[2:]), quantize_rows(t.t()))


def test_errors_say_what_was_wrong():
    t = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"t has shape \(16,\)"):
        quantize_columns(t[0])
    with pytest.raises(ValueError, match=r"t has shape \(0, 16\)"):
        quantize_columns(t[:0])
    with pytest.raises(ValueError, match="t is torch.int64"):
        quantize_columns(t.long())
    rows = quantize_rows(t)
    with pytest.raises(ValueError, match=r"t is torch.float32 with a scale"):
        quantize_columns(t, rows.scale)
    with pytest.raises(ValueError, match=r"scale is torch.float32 \(8,\)"):
        quantize_columns(rows.data, rows.scale.reshape(8))
    assert rows.data.dtype == E4M3


def test_too_many_column_tiles_is_refused(monkeypatch):
    """CUDA grids take at most 65,535 blocks along their second dimension, the column tiles: past
    that the launch would fail, so the launcher says why first (shown with 1-column tiles)."""
    if DEVICE.type == "cpu" and not interpreting():
        pytest.skip("the PyTorch path has no grid")
    monkeypatch.setattr(float8_columns, "TILE", 1)
    with pytest.raises(ValueError, match="t has 65536 columns: the kernels take at most 65535"):
        quantize_columns(torch.ones(1, 65536, device=DEVICE))


def test_compiles_as_one_graph_with_the_same_bits(monkeypatch):
    """Under torch.compile(fullgraph=True): on the GPU the kernels, scheduled by Inductor; on the
    CPU the PyTorch path (an interpreted kernel cannot be traced)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    t = spread((130, 200), torch.bfloat16, per_row=False)

    def both(t):
        rows_data, rows_scale, cols_data, cols_scale = quantize_rows_and_columns(t)
        x_cols = quantize_columns(rows_data, rows_scale)
        return rows_data, rows_scale, cols_data, cols_scale, *x_cols

    got = torch.compile(both, fullgraph=True)(t)
    expected = both(t)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and torch.equal(g.view(torch.uint8), e.view(torch.uint8))
