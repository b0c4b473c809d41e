"""The grouped FP8 product of Mixtral's experts: every expert's rows times its own weight, with the
forward, input-gradient and weight-gradient products in FP8 (rowwise e4m3, float32 scales, outputs
in the input's dtype), as float8_linear.py does for one weight.

Rows x [M, K] are sorted by expert; group_ends [E] int32 ends each expert's run of rows, the last
at M (the H100's kernel leaves rows past the last end unwritten); the weights W [E, N, K] stack one
[N, K] matrix an expert. Per expert e with rows x_e:

    forward         y_e  = x_e @ W_e^T     x  [M, K] along K,        W   [E, N, K] along K
    input gradient  dx_e = dy_e @ W_e      dy [M, N] along N,        W^T [E, K, N] along N
    weight gradient dW_e = dy_e^T @ x_e    dy_e^T along its tokens,  x_e^T along its tokens

Each is one `torch._scaled_grouped_mm`: 2d x 3d along the rows for the first two, 2d x 2d along
the tokens for the weight gradient, whose operands are cast per expert along its own tokens
(float8_group_columns.py). x is saved as its FP8 rows (1 byte an element) and cast again along the
tokens from them, as float8_linear.py explains for one weight.

The H100's grouped FP8 kernel reads each group's slice of the tokens in 16-byte steps, so where the
tokens are contracted (the weight gradient) every group must start at a multiple of 16 rows
(`GROUP_ALIGNMENT`): the caller lays the rows out so (models/transformer.py's MoE pads each
expert's run with zero rows). The forward and the input gradient need no such alignment.

`scaled_grouped_mm` is `torch._scaled_grouped_mm` on CUDA GPUs from sm90; on the CPU, which has
no such kernel, `emulated_scaled_grouped_mm`: the operands dequantized (exact in float32: the scales
are powers of two) and multiplied in float32, one rounding to the output dtype.
"""

import torch

from ligerzoo.kernels.float8 import E4M3, Float8Rows, nvidia_capability, quantize_rows
from ligerzoo.kernels.float8_group_columns import group_index, quantize_group_columns

GROUP_ALIGNMENT = 16


def has_scaled_grouped_mm(device: torch.device) -> bool:
    """Whether `torch._scaled_grouped_mm` runs here: CUDA from sm90 (Hopper), as torch builds it."""
    capability = nvidia_capability(device)
    return capability is not None and capability >= (9, 0)


def runs_grouped_fp8(device: torch.device) -> bool:
    """Whether `scaled_grouped_mm` runs here: the kernel (CUDA from sm90) or the CPU's emulation.
    Elsewhere (older GPUs, where the emulation's float32 products would be slower than bf16)
    callers keep their exact grouped product."""
    return device.type == "cpu" or has_scaled_grouped_mm(device)


def _check_operands(a, b, scale_a, scale_b, group_ends) -> None:
    for name, t in (("a", a), ("b", b)):
        if t.dtype != E4M3:
            raise ValueError(f"{name} is {t.dtype}, expected torch.float8_e4m3fn")
    if group_ends.dtype != torch.int32 or group_ends.dim() != 1:
        raise ValueError(f"group_ends is {group_ends.dtype} {tuple(group_ends.shape)}: expected int32 [G]")
    n_groups = group_ends.numel()
    if a.dim() != 2 or b.dim() not in (2, 3) or a.shape[1] != b.shape[-2]:
        raise ValueError(f"a {tuple(a.shape)} @ b {tuple(b.shape)}: expected [M, K] @ [G, K, N] or "
                         f"[N, T] @ [T, K]")
    if b.dim() == 3:
        (m, k), n = a.shape, b.shape[2]
        scale_shapes = ((m,), (n_groups, n))
        if b.shape[0] != n_groups:
            raise ValueError(f"b has {b.shape[0]} groups and group_ends {n_groups}")
    else:
        (m, k), n = a.shape, b.shape[1]
        scale_shapes = ((n_groups * m,), (n_groups * n,))
    # Rows are 16-byte aligned when the contracted and output widths are multiples of 16 (and the
    # token slices of a 2d x 2d product when the tokens are).
    if k % 16 or n % 16 or (b.dim() == 2 and m % 16):
        raise ValueError(f"a {tuple(a.shape)} @ b {tuple(b.shape)}: the contracted and output widths must be "
                         f"multiples of 16")
    if a.stride(-1) != 1 or b.stride(-2) != 1:
        raise ValueError(f"a has strides {a.stride()} and b {b.stride()}: expected a row-major, "
                         f"b column-major")
    for name, scale, shape in (("scale_a", scale_a, scale_shapes[0]), ("scale_b", scale_b, scale_shapes[1])):
        if scale.dtype != torch.float32 or tuple(scale.shape) != shape:
            raise ValueError(f"{name} is {scale.dtype} {tuple(scale.shape)}, expected torch.float32 {shape}")


def emulated_scaled_grouped_mm(a, b, scale_a, scale_b, group_ends, out_dtype: torch.dtype) -> torch.Tensor:
    """`scaled_grouped_mm` in PyTorch: FP8 values times their power-of-two scales (exact in
    float32), float32 products and sums per group, one rounding to out_dtype. A dense product a
    group over all rows, the other groups' rows masked to zero (adding zeros is exact): slower
    than slicing, but free of data-dependent shapes, so it compiles (torch._grouped_mm would, but
    takes bfloat16 only)."""
    _check_operands(a, b, scale_a, scale_b, group_ends)
    n_groups = group_ends.numel()
    if b.dim() == 3:  # rows scaled [M], each group's columns [G, N]
        group = group_index(a.shape[0], group_ends)
        a_values = a.float() * scale_a[:, None]
        b_values = b.float() * scale_b[:, None, :]
        out = sum(torch.where((group == g)[:, None], a_values, 0.0) @ b_values[g] for g in range(n_groups))
    else:  # both scaled per group along their rows, group-major: [G * N] and [G * K]
        group = group_index(a.shape[1], group_ends)
        a_scales, b_scales = scale_a.view(n_groups, -1), scale_b.view(n_groups, -1)
        a_values, b_values = a.float(), b.float()
        out = torch.stack([
            (torch.where(group == g, a_values, 0.0) * a_scales[g][:, None]) @ (b_values * b_scales[g])
            for g in range(n_groups)])
    return out.to(out_dtype)


def scaled_grouped_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      group_ends: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The grouped product of FP8 operands, products and sums in float32, out_dtype out.

    a [M, K] row-major @ b [G, K, N] column-major -> [M, N]: rows of group g (up to group_ends[g])
    times b[g]; scale_a [M], scale_b [G, N].
    a [N, T] row-major @ b [T, K] column-major -> [G, N, K]: group g contracts its tokens; scale_a
    [G * N] and scale_b [G * K], group-major. Groups start at multiples of 16 tokens (GROUP_ALIGNMENT).
    K and N (and T) multiples of 16; scales float32 dequantizing ones.
    """
    _check_operands(a, b, scale_a, scale_b, group_ends)
    if has_scaled_grouped_mm(a.device) and out_dtype == torch.bfloat16:
        return torch._scaled_grouped_mm(a, b, scale_a, scale_b, offs=group_ends, out_dtype=out_dtype)
    if a.is_cuda:
        raise RuntimeError("the grouped FP8 product needs an sm90 (Hopper) or newer GPU and a "
                           "bfloat16 output")
    return emulated_scaled_grouped_mm(a, b, scale_a, scale_b, group_ends, out_dtype)


def _transposed_weight_cast(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """W^T [E, K, N] cast along N, each expert's own columns: (data [E, K, N] e4m3, scales [E, K]),
    `quantize_rows(weight.transpose(1, 2))` bit for bit. weight [E, N, K]; or its FP8 rows with
    their scales [E, N, 1], whose values (exact in float32) are cast again, as float8_linear.py
    does for one weight's columns. The column-cast kernel over W as [E N, K] with an expert every N
    rows, whose [K, E N] output is viewed as [E, K, N] (strides (N, E N, 1)): no float32 copy of
    the whole weight, which PyTorch's cast makes outside torch.compile (3.8 GB for Mixtral-8x7B's
    gate/up), and no copy of the cast either: torch's grouped product takes that layout as it is
    (the contracted dimension innermost; on an H100 the same bits as from a contiguous copy)."""
    n_experts, n, k = weight.shape
    every_n_rows = torch.arange(1, n_experts + 1, device=weight.device, dtype=torch.int32) * n
    rows_scale = scale.view(n_experts * n, 1) if scale is not None else None
    data, wt_scale = quantize_group_columns(weight.reshape(n_experts * n, k), every_n_rows, rows_scale)
    return data.view(k, n_experts, n).permute(1, 0, 2), wt_scale


class _Float8GroupedFunction(torch.autograd.Function):
    """x [M, K], weight [E, N, K], group_ends [E]; w_data [E, N, K] and w_scale [E, N, 1]: the
    weight's rows already cast (FSDP2 gathered them so, models/float8_gather.py), or None."""

    @staticmethod
    def forward(ctx, x, weight, group_ends, w_data, w_scale):
        x_cast = quantize_rows(x)  # [M, K] along K
        w_cast = Float8Rows(w_data, w_scale) if w_data is not None else quantize_rows(weight)  # along K
        y = scaled_grouped_mm(x_cast.data, w_cast.data.transpose(1, 2), x_cast.scale.view(-1),
                              w_cast.scale.squeeze(-1), group_ends, weight.dtype)
        # What the input gradient reads of W: the given rows (FSDP2 frees and regathers them, so
        # keeping them costs what keeping the parameter does), or the parameter itself.
        saved_weight = (w_data, w_scale) if w_data is not None else (weight, None)
        ctx.save_for_backward(*x_cast, *saved_weight, group_ends)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_data, x_scale, w_saved, w_scale_saved, group_ends = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_cast = quantize_rows(dy)
            wt_data, wt_scale = _transposed_weight_cast(w_saved, w_scale_saved)
            dx = scaled_grouped_mm(dy_cast.data, wt_data.transpose(1, 2), dy_cast.scale.view(-1), wt_scale,
                                   group_ends, dy.dtype)
        if ctx.needs_input_grad[1]:
            dyt_data, dyt_scale = quantize_group_columns(dy, group_ends)  # [N, M], [E, N]
            xt_data, xt_scale = quantize_group_columns(x_data, group_ends, x_scale)  # [K, M], [E, K]
            dw = scaled_grouped_mm(dyt_data, xt_data.t(), dyt_scale.view(-1), xt_scale.view(-1), group_ends,
                                   dy.dtype).to(ctx.weight_dtype)
        return dx, dw, None, None, None


def float8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor, *,
                          weight_fp8: Float8Rows | None = None) -> torch.Tensor:
    """Each group of rows of x [M, K] times its weight's transpose: y [M, N] in x's dtype, the
    three products in FP8 (module docstring). weight [E, N, K] in x's dtype; group_ends [E] int32,
    every group starting at a multiple of GROUP_ALIGNMENT rows, the last ending at M (values on the
    device, not checked: that would wait for them); M, N and K multiples of 16.
    weight_fp8: `quantize_rows(weight)`, made already (FSDP2's FP8 all-gather): multiplied by as
    it is, W^T made from it for the input gradient; `weight` then gives the gradient's dtype and
    shape and receives it, and its values are not read.

    `torch._grouped_mm(x, weight.transpose(1, 2), offs=group_ends)` in FP8."""
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: expected x [M, K] and "
                         f"weight [E, N, K]")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} and weight {weight.dtype}: expected one float dtype for both")
    if any(d % 16 for d in (*x.shape, weight.shape[1])):
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: M, N and K must be "
                         f"multiples of 16")
    if group_ends.shape != (weight.shape[0],):
        raise ValueError(f"group_ends has shape {tuple(group_ends.shape)}, expected ({weight.shape[0]},): "
                         f"one end an expert")
    w_data = w_scale = None
    if weight_fp8 is not None:
        w_data, w_scale = weight_fp8
        if w_data.dtype != E4M3 or w_data.shape != weight.shape or w_scale.shape != (*weight.shape[:2], 1):
            raise ValueError(f"weight_fp8 is {w_data.dtype} {tuple(w_data.shape)} with scales "
                             f"{tuple(w_scale.shape)}: "
                             f"expected quantize_rows(weight), e4m3 {tuple(weight.shape)} and "
                             f"{(*weight.shape[:2], 1)}")
    return _Float8GroupedFunction.apply(x, weight, group_ends, w_data, w_scale)
