"""Rotary position embedding on q and k, in Hugging Face's rotate-half convention.

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1)

with x1, x2 the two halves of each head and cos/sin built with duplicated halves
(`emb = cat(freqs, freqs)`), as HF's rotary modules build them. Per head, with c, s the first
halves of cos and sin:

    out1 = x1 * c - x2 * s
    out2 = x2 * c + x1 * s

The map is a rotation, so its backward is the rotation by -sin: the same kernel with a flag.
`apply_rope_qkv` takes q, k and v as one fused projection's output and copies v out in the same
launch, so that its backward can write the projection's whole gradient in one pass.
"""

import torch
import triton
import triton.language as tl

from ligerzoo.kernels._utils import (
    check_float,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    kernel_op,
    launch,
    row_block,
    runs_triton,
)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, x_head_stride, x_dim_stride,
    n_heads, half_dim, cos, sin,
    ROTATE: tl.constexpr, HEAD_BLOCK: tl.constexpr, HALF_BLOCK: tl.constexpr,
):
    """Rotates (ROTATE) or copies every head of one token. x_ptr, out_ptr: that token's first
    element in x and in the output, whose heads lie side by side; cos, sin: [1, HALF_BLOCK]
    float32 first halves for the token."""
    dims = tl.arange(0, HALF_BLOCK)[None, :]
    dim_mask = dims < half_dim
    head_dim = 2 * half_dim
    for first_head in range(0, n_heads, HEAD_BLOCK):
        heads = first_head + tl.arange(0, HEAD_BLOCK)[:, None]
        mask = (heads < n_heads) & dim_mask
        x1_ptrs = x_ptr + heads * x_head_stride + dims * x_dim_stride
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0)
        x2 = tl.load(x1_ptrs + half_dim * x_dim_stride, mask=mask, other=0.0)
        if ROTATE:
            a, b = x1.to(tl.float32), x2.to(tl.float32)
            out1, out2 = a * cos - b * sin, b * cos + a * sin
        else:
            out1, out2 = x1, x2
        out1_ptrs = out_ptr + heads * head_dim + dims
        tl.store(out1_ptrs, out1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out1_ptrs + half_dim, out2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, v_out_ptr,
    q_offset, k_offset, v_offset, q_out_offset, k_out_offset, v_out_offset,
    q_batch_stride, q_seq_stride, q_head_stride, q_dim_stride,
    k_batch_stride, k_seq_stride, k_head_stride, k_dim_stride,
    v_batch_stride, v_seq_stride, v_head_stride, v_dim_stride,
    cos_batch_stride, cos_seq_stride, cos_dim_stride,
    sin_batch_stride, sin_seq_stride, sin_dim_stride,
    q_out_token_stride, k_out_token_stride, v_out_token_stride,
    seq_len, n_q_heads, n_k_heads, half_dim,
    INVERSE: tl.constexpr, COPY_V: tl.constexpr, ONE_OUTPUT: tl.constexpr,
    Q_HEAD_BLOCK: tl.constexpr, K_HEAD_BLOCK: tl.constexpr, HALF_BLOCK: tl.constexpr,
):
    """One program per token (b, t): q, k [B, T, H, D] with any strides, each *_offset elements
    into its buffer; cos, sin [B or 1, T, D] (batch stride 0 when shared), of which only the first
    half of D is read. Each output holds a token's heads side by side, D apart, tokens
    *_out_token_stride apart: its own contiguous tensor, or its heads' place in one
    [B, T, Hq + 2 Hk, D] gradient. INVERSE rotates by -sin (the backward); COPY_V also copies v
    [B, T, Hk, D] to v_out unrotated. Parts of one tensor come as its pointer and an offset, not as
    views: torch.compile would turn writes through views into copies of the whole. ONE_OUTPUT: the
    outputs are parts of q_out's tensor, all written through q_out_ptr (k_out_ptr and v_out_ptr
    unused), so that torch.compile sees one written argument, not one tensor written as three,
    each of which it may clone apart."""
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    t = token % seq_len
    # cos/sin are read once per token and reused for all q and k heads, so their traffic is
    # 1/(Hq + Hk) of q and k's.
    dims = tl.arange(0, HALF_BLOCK)[None, :]
    dim_mask = dims < half_dim
    cos = tl.load(cos_ptr + b * cos_batch_stride + t * cos_seq_stride + dims * cos_dim_stride,
                  mask=dim_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * sin_batch_stride + t * sin_seq_stride + dims * sin_dim_stride,
                  mask=dim_mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    if ONE_OUTPUT:
        k_out_ptr = q_out_ptr
        v_out_ptr = q_out_ptr
    _rotate_heads(
        q_ptr + q_offset + b * q_batch_stride + t * q_seq_stride,
        q_out_ptr + q_out_offset + token * q_out_token_stride,
        q_head_stride, q_dim_stride, n_q_heads, half_dim, cos, sin, True, Q_HEAD_BLOCK, HALF_BLOCK,
    )
    _rotate_heads(
        k_ptr + k_offset + b * k_batch_stride + t * k_seq_stride,
        k_out_ptr + k_out_offset + token * k_out_token_stride,
        k_head_stride, k_dim_stride, n_k_heads, half_dim, cos, sin, True, K_HEAD_BLOCK, HALF_BLOCK,
    )
    if COPY_V:
        _rotate_heads(
            v_ptr + v_offset + b * v_batch_stride + t * v_seq_stride,
            v_out_ptr + v_out_offset + token * v_out_token_stride,
            v_head_stride, v_dim_stride, n_k_heads, half_dim, cos, sin, False, K_HEAD_BLOCK, HALF_BLOCK,
        )


# Elements of one half-head tile [heads, D/2]: with 4 warps one 16-byte access per thread in
# 16-bit dtypes, so Llama's 32 q heads of 128 take two iterations and its 8 k heads one.
_HALF_TILE = 1024


def _cos_sin_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seq, dim) strides of a [T, D] or [B or 1, T, D] cos/sin; batch 0 when shared."""
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1)
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


# A group of heads: a [B, T, H, D] tensor and the first of its heads the group starts at.
Heads = tuple[torch.Tensor, int]


def _rope_torch(sources: list[Heads], cos, sin, inverse, outputs: list[Heads], n_heads: list[int]) -> None:
    """The PyTorch path (CPU tensors when Triton is not interpreting): `_rope_kernel`'s math."""
    q, k, *v = (t.narrow(2, first, heads) for (t, first), heads in zip(sources, n_heads))
    q_out, k_out, *v_out = (t.narrow(2, first, heads) for (t, first), heads in zip(outputs, n_heads))
    seq_len, half_dim = q.shape[1], q.shape[3] // 2
    # [T, D] -> [1, T, 1, D/2]; [B or 1, T, D] -> [B or 1, T, 1, D/2]
    cos_half = cos[..., :half_dim].float().reshape(-1, seq_len, 1, half_dim)
    sin_half = sin[..., :half_dim].float().reshape(-1, seq_len, 1, half_dim)
    if inverse:
        sin_half = -sin_half
    for x, out in ((q, q_out), (k, k_out)):
        x1, x2 = x.float().split(half_dim, dim=-1)
        out.copy_(torch.cat((x1 * cos_half - x2 * sin_half, x2 * cos_half + x1 * sin_half), dim=-1))
    for x, out in zip(v, v_out):
        out.copy_(x)


def _launch(sources: list[Heads], cos, sin, inverse: bool, outputs: list[Heads], n_q_heads: int,
            n_k_heads: int) -> None:
    """Rotates q's and k's heads (the first two sources) into the first two outputs and, given a
    third source, copies v's heads into the third output. Sources [B, T, H, D] with any strides;
    outputs with heads D apart and tokens one stride(1) apart."""
    (q, _), (k, _) = sources[:2]
    batch, seq_len, _, head_dim = q.shape
    if batch * seq_len == 0 or head_dim == 0:
        return
    n_heads = [n_q_heads, n_k_heads, n_k_heads][:len(sources)]
    if not runs_triton(q):
        _rope_torch(sources, cos, sin, inverse, outputs, n_heads)
        return
    half_dim = head_dim // 2
    half_block = triton.next_power_of_2(half_dim)
    heads_per_tile = max(1, _HALF_TILE // half_block)
    q_head_block = min(heads_per_tile, triton.next_power_of_2(max(n_q_heads, 1)))
    k_head_block = min(heads_per_tile, triton.next_power_of_2(max(n_k_heads, 1)))
    _, num_warps = row_block(q_head_block * half_block)
    copy_v = len(sources) == 3
    if not copy_v:  # unused pointers and strides: k's stand in
        sources, outputs = [*sources, sources[1]], [*outputs, outputs[1]]
    launch(_rope_kernel)[(batch * seq_len,)](
        *(t for t, _ in sources), cos, sin, *(t for t, _ in outputs),
        *(first * t.stride(2) for t, first in sources), *(first * t.stride(2) for t, first in outputs),
        *(stride for t, _ in sources for stride in t.stride()),
        *_cos_sin_strides(cos), *_cos_sin_strides(sin),
        *(t.stride(1) for t, _ in outputs),
        seq_len, n_q_heads, n_k_heads, half_dim,
        INVERSE=inverse, COPY_V=copy_v, ONE_OUTPUT=all(t is outputs[0][0] for t, _ in outputs),
        Q_HEAD_BLOCK=q_head_block, K_HEAD_BLOCK=k_head_block, HALF_BLOCK=half_block, num_warps=num_warps,
    )


@kernel_op("rope")
def _rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, Hq, D], k [B, T, Hk, D] (any strides) rotated in one launch; contiguous outputs."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch([(q, 0), (k, 0)], cos, sin, inverse, [(q_out, 0), (k_out, 0)], q.shape[2], k.shape[2])
    return q_out, k_out


@kernel_op("rope_qkv")
def _rope_qkv(
    qkv: torch.Tensor, n_q_heads: int, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, T, Hq + 2 Hk, D] (any strides) -> q and k rotated, v copied: three contiguous tensors."""
    batch, seq_len, _, head_dim = qkv.shape
    n_kv_heads = (qkv.shape[2] - n_q_heads) // 2
    outputs = [torch.empty((batch, seq_len, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
               for heads in (n_q_heads, n_kv_heads, n_kv_heads)]
    sources = [(qkv, 0), (qkv, n_q_heads), (qkv, n_q_heads + n_kv_heads)]
    _launch(sources, cos, sin, False, [(t, 0) for t in outputs], n_q_heads, n_kv_heads)
    return tuple(outputs)


@kernel_op("rope_qkv_backward")
def _rope_qkv_backward(
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """The gradient of `_rope_qkv`'s qkv, written whole by one launch: dq and dk rotated back and
    dv copied into their heads' places in a contiguous [B, T, Hq + 2 Hk, D]."""
    batch, seq_len, n_q_heads, head_dim = dq.shape
    n_kv_heads = dk.shape[2]
    shape = (batch, seq_len, n_q_heads + 2 * n_kv_heads, head_dim)
    dqkv = torch.empty(shape, dtype=dq.dtype, device=dq.device)
    outputs = [(dqkv, 0), (dqkv, n_q_heads), (dqkv, n_q_heads + n_kv_heads)]
    _launch([(dq, 0), (dk, 0), (dv, 0)], cos, sin, True, outputs, n_q_heads, n_kv_heads)
    return dqkv


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q_rot, k_rot = _rope(q, k, cos, sin, False)
        # A rotation's backward needs only the angle: nothing of q or k is saved.
        ctx.save_for_backward(cos, sin)
        return q_rot, k_rot

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope(dq_rot, dk_rot, cos, sin, True)
        return dq, dk, None, None


class _RopeQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_q_heads, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_qkv(qkv, n_q_heads, cos, sin)

    @staticmethod
    def backward(ctx, dq_rot, dk_rot, dv):
        cos, sin = ctx.saved_tensors
        return _rope_qkv_backward(dq_rot, dk_rot, dv, cos, sin), None, None, None


def _check(q, k, cos, sin):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, Hq, D], got shape {list(q.shape)}")
    batch, seq_len, _, head_dim = q.shape
    if k.dim() != 4 or k.shape[0] != batch or k.shape[1] != seq_len or k.shape[3] != head_dim:
        raise ValueError(
            f"k must be [{batch}, {seq_len}, Hk, {head_dim}] to match q, got shape {list(k.shape)}"
        )
    check_same_dtype("k", k, "q", q)
    if head_dim % 2:
        raise ValueError(f"q and k have head dim {head_dim}: rotate-half needs an even head dim")
    shapes = ([seq_len, head_dim], [1, seq_len, head_dim], [batch, seq_len, head_dim])
    if list(cos.shape) not in shapes:
        raise ValueError(
            f"cos must be [T, D] or [B, T, D] = [{batch}, {seq_len}, {head_dim}] (B may be 1), "
            f"got shape {list(cos.shape)}"
        )
    check_same_shape("sin", sin, "cos", cos)
    check_same_device(q=q, k=k, cos=cos, sin=sin)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k) in one launch, math in float32.

    q: [B, T, Hq, D], k: [B, T, Hk, D] (any strides, e.g. views into a fused QKV projection).
    cos, sin: [T, D] or [B, T, D] (B may be 1), any float dtype, with duplicated halves as
    Hugging Face builds them: only their first halves are read. They get no gradient.
    Returns new contiguous tensors in q's dtype.
    """
    _check(q, k, cos, sin)
    return _RopeFunction.apply(q, k, cos, sin)


def apply_rope_qkv(
    qkv: torch.Tensor, n_q_heads: int, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k rotated as `apply_rope` does, and v copied, out of one fused projection's output
    qkv [B, T, Hq + 2 Hk, D] (any strides): (q [B, T, Hq, D], k, v [B, T, Hk, D]), contiguous.

    One launch each way: the backward writes qkv's whole gradient, q's and k's heads rotated back
    and v's copied into place, where rotating q and k apart would leave autograd a concatenation
    of the three, and v, kept as a view, would keep all of qkv alive for attention's backward.
    """
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be [B, T, Hq + 2 Hk, D], got shape {list(qkv.shape)}")
    n_kv_heads, extra = divmod(qkv.shape[2] - n_q_heads, 2)
    if n_q_heads < 1 or n_kv_heads < 1 or extra:
        raise ValueError(f"qkv has {qkv.shape[2]} heads: expected {n_q_heads} query heads and two equal "
                         f"groups of key and value heads after them")
    _check(qkv[:, :, :n_q_heads], qkv[:, :, n_q_heads:n_q_heads + n_kv_heads], cos, sin)
    return _RopeQKVFunction.apply(qkv, n_q_heads, cos, sin)
