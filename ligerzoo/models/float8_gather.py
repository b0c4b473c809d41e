"""FSDP2 all-gathers the rowwise FP8 layers' weights as FP8 rows: half the bytes of bf16.

Under `--train.float8 rowwise` each Float8Linear casts its weight W [N, K] along K for the forward
(`quantize_rows(W)`: e4m3 data and one float32 power-of-two scale a row, kernels/float8.py). FSDP2
shards W along N, by rows, and a row's cast reads that row alone; so each rank casts the rows of
its own shard before the all-gather, and the gathered e4m3 rows and scales are, bit for bit, the
cast of the gathered weight. Mixtral's experts (Float8MoE, under either recipe) likewise: their
stacked weights [E, N, K] are sharded by experts, each rank casts its experts' rows. The shard is
first converted to the compute dtype (the mixed precision policy's param_dtype: float32 master
weights go to bf16, then to FP8), so the bits are those of today's path, which casts the bf16
weight FSDP gathered. Bytes an element on the wire:
1 + 4/K (the data, and a float32 scale a row of K) against 2 for bf16: 0.5 + 2/K of them.

The backward's input gradient reads W's columns cast along N, across shards: they are taken from
the gathered rows, dequantized exactly (a power-of-two scale) and cast again
(`quantize_columns(data, scale)`). That is the cast of bf16 W's columns wherever a value lies in
both casts' normal range, because multiplying by a power of two does not move where a 3-bit
mantissa rounds; they differ only for values under 2**-14 of their row's or column's largest (FP8
subnormals), by at most the column cast's subnormal spacing: float8_linear.py's argument for x.

Two tensor subclasses carry it:
    Float8ShardedWeight   the sharded parameter's local tensor: the master weight's rows (any
                          dtype) wrapped, with FSDP2's all-gather extension hooks. Every op but
                          those FSDP2 uses to shard and pad it runs on the plain tensor inside and
                          returns plain tensors: AdamW, gradient clipping and the optimizer state
                          see the parameter as before (and `plain_state_dict` unwraps the model's
                          state dict for checkpoints and the export).
    Float8GatheredWeight  the unsharded parameter FSDP2 builds from the all-gather: W [N, K] with
                          W's dtype and shape (param_dtype), holding the gathered e4m3 rows [N, K]
                          and scales [N, 1] (experts: [E, N, K] and [E, N, 1]). Its gradient is a
                          plain tensor of W's shape and dtype, which FSDP2 reduce-scatters as it
                          would bf16 W's. It is a traceable
                          wrapper subclass (__tensor_flatten__ / __tensor_unflatten__), so a
                          compiled block takes it as an input with no graph break.
`Float8Linear` hands a gathered weight's rows to `float8_linear` (`weight_fp8=`, W's rows alone),
which multiplies by them as they are, as Float8MoE hands its experts' gathered rows to the grouped
product (kernels/float8_grouped.py); anything else done with it (an op of a shape the FP8
product cannot take) sees W dequantized: the values the gathered FP8 rows hold, not the bf16 ones.

A `Float8Block` keeps its fused path (kernels/float8_fused.py): it hands each gathered weight's
rows to the fused functions as `weight_fp8` (`gathered_rows`), which multiply by them as they are
and make W's columns from them in the backward, as Float8Linear does; the norms and SwiGLU still
write only the FP8 rows of their outputs.

FSDP2 frees the gathered data and scales after the forward and gathers them into the same
buffers for the backward, so what the backward keeps of a weight is no memory, as with bf16.

Not gathered in FP8 (gathered in the compute dtype as before): one rank's weights (sharded only
to cast float32 master weights: nothing crosses a wire, so there are no bytes to save);
tensorwise weights, whose one scale needs the whole weight's amax, an all-reduce before any rank
could cast (torchao does it once a step after the optimizer, for every weight at once; it is not
done here); and weights whose rows do not split evenly over the ranks (FSDP2 requires every
all-gather input of a padded shard to have the padded shard's shape, which the scales [rows, 1]
do not).
"""

import torch
import torch.utils._pytree as pytree

from ligerzoo.kernels.float8 import E4M3, Float8Rows, quantize_rows

aten = torch.ops.aten

# The ops FSDP2 applies to a parameter while sharding, padding and moving it: their results stay
# sharded weights (the local tensor FSDP2 keeps, and calls the hooks on). Any other op returns plain
# tensors: the optimizer's and the state dict's.
_KEPT_OPS = {aten.detach.default, aten.alias.default, aten.empty_like.default, aten.new_zeros.default,
             aten.slice.Tensor, aten.narrow.default, aten.copy_.default, aten.view.default,
             aten.as_strided.default, aten.split.Tensor, aten.split_with_sizes.default,
             aten.chunk.default, aten._to_copy.default, aten._pin_memory.default, aten.clone.default}


def _wrapper(cls, like: torch.Tensor, dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    return torch.Tensor._make_wrapper_subclass(cls, like.size(), strides=like.stride(), dtype=dtype,
                                               device=like.device, requires_grad=requires_grad)


class Float8ShardedWeight(torch.Tensor):
    """A weight's local rows under FSDP2, all-gathered as their FP8 rows (module docstring)."""

    @staticmethod
    def __new__(cls, tensor: torch.Tensor):
        return _wrapper(cls, tensor, tensor.dtype, tensor.requires_grad)

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor

    def __repr__(self):
        return f"Float8ShardedWeight({self._tensor!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = pytree.tree_map_only(cls, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _KEPT_OPS:
            return out
        return pytree.tree_map_only(torch.Tensor, cls, out)

    def __tensor_flatten__(self):
        return ["_tensor"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, metadata, outer_size, outer_stride):
        return Float8ShardedWeight(inner_tensors["_tensor"])

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """(this shard's e4m3 rows, their float32 scales [rows, 1]) to gather; no metadata."""
        compute = self._tensor.to(mp_policy.param_dtype or self.dtype)  # bf16 first: today's bits
        rows = quantize_rows(compute, E4M3)
        return (rows.data, rows.scale), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """The gathered rows and scales as W [N, K] of param_dtype; FSDP2 frees and refills both."""
        data, scale = all_gather_outputs
        if out is not None:  # the same buffers, gathered into again: out holds them already
            return
        return Float8GatheredWeight(data, scale, param_dtype), (data, scale)


class Float8GatheredWeight(torch.Tensor):
    """W [..., N, K] (dtype: the compute dtype) as its e4m3 rows [..., N, K] and float32 scales
    [..., N, 1]."""

    @staticmethod
    def __new__(cls, rows: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return _wrapper(cls, rows, dtype, requires_grad=False)

    def __init__(self, rows: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self.rows, self.scale = rows, scale

    def __repr__(self):
        return f"Float8GatheredWeight(shape={tuple(self.shape)}, dtype={self.dtype})"

    def dequantize(self) -> torch.Tensor:
        """W's values as the FP8 rows hold them, in W's dtype (exact: a power-of-two scale)."""
        return Float8Rows(self.rows, self.scale).dequantize(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[0]
        if func in (aten.detach.default, aten.alias.default):
            return cls(weight.rows, weight.scale, weight.dtype)
        if func is aten.as_strided.default and _is_whole(weight, *args[1:], **kwargs):
            return cls(weight.rows, weight.scale, weight.dtype)  # FSDP2's view of the whole weight
        args, kwargs = pytree.tree_map_only(cls, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)

    def __tensor_flatten__(self):
        return ["rows", "scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner_tensors, dtype, outer_size, outer_stride):
        return Float8GatheredWeight(inner_tensors["rows"], inner_tensors["scale"], dtype)


def _is_whole(weight: torch.Tensor, size, stride, storage_offset=0) -> bool:
    return tuple(size) == tuple(weight.shape) and tuple(stride) == weight.stride() and not storage_offset


def gathered_rows(weight: torch.Tensor) -> Float8Rows | None:
    """The FP8 rows FSDP2 gathered for `weight` (a Float8GatheredWeight), as the fused functions'
    and the grouped product's `weight_fp8` takes them; None for any other weight, which they cast
    themselves."""
    if isinstance(weight, Float8GatheredWeight):
        return Float8Rows(weight.rows, weight.scale)
    return None


def gathers_in_float8(weight: torch.Tensor, world_size: int) -> bool:
    """Whether W [N, K] (or experts' [E, N, K]) is all-gathered as FP8 rows over world_size ranks:
    several of them (one rank sends nothing), and its first dimension, which FSDP2 shards, splits
    evenly (module docstring)."""
    return world_size > 1 and weight.dim() in (2, 3) and weight.shape[0] % world_size == 0


def plain_state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
    """A module state-dict hook: each sharded weight's entry as the plain tensor inside it (a
    DTensor of it under FSDP2), sharing its memory, so checkpoints and the export see what they
    saw before."""
    from torch.distributed.tensor import DTensor

    for name, value in state_dict.items():
        if not name.startswith(prefix):
            continue
        if isinstance(value, DTensor) and isinstance(value._local_tensor, Float8ShardedWeight):
            state_dict[name] = DTensor.from_local(value._local_tensor._tensor, value.device_mesh, value.placements,
                                                  run_check=False, shape=value.shape, stride=value.stride())
        elif isinstance(value, Float8ShardedWeight):
            state_dict[name] = value._tensor
