"""A rowwise FP8 layer's weight cast once per optimizer step, not at every use.

Otherwise a Float8Linear casts its weight W [N, K] to FP8 rows in every forward, twice a step under
activation checkpointing (the forward and its recomputation), and casts W's columns from the bf16
weight in the backward: per element of W, 3 + 3 + 5 bytes of memory traffic a step (a bf16 read
and an e4m3 write for the rows; the columns take two passes). Kept, the rows are cast once after
each optimizer step into two buffers the layer holds; every forward, recomputation and micro-batch
multiplies by them, and the backward makes W's columns from them (float8_linear.py: an e4m3 read
twice and written once), 6 bytes an element a step in all. The price is memory, all the time: 1
byte a block parameter and a float32 scale a row (Llama-3.1-8B: 6.5 GiB, for 1.6% more tokens a
second on an H100 with keep-attention checkpointing; benchmarks/RESULTS.md); so it is an option,
for runs with memory to spare (`--train.float8_keep_weight_rows`).

The kept rows are the bits the layer would cast, `quantize_rows` of W in the compute dtype, so the
forward is unchanged bit for bit; W's columns made from them are the cast of W's columns wherever
a value lies in both casts' normal range (float8_gather.py, whose FP8 all-gather takes the same
path): they differ only in values under 2**-14 of their row's or column's largest.

Stale rows would multiply by old weights without a word, so `keep_weight_rows` returns the cast as
a function to run after every change to the weights; `keep_weight_rows_through_steps` runs it now
(the weights built or resumed) and after each optimizer step, for train.py and the training
benchmark: ligerzoo's AdamW (training/adamw.py) writes the rows in the pass that updates each
weight, so the weight is not read again to be cast; any other optimizer gets the cast as a step
post-hook.

Not kept: weights FSDP2 shards over several ranks (float8_gather.py gathers them as FP8 rows, cast
at each gather), Mixtral's experts, tensorwise layers.
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ligerzoo.kernels.float8 import E4M3, Float8Rows, quantize_rows
from ligerzoo.models.float8 import Float8Linear


def keep_weight_rows(model: nn.Module, compute_dtype: torch.dtype) -> Callable[[], None]:
    """Give every rowwise Float8Linear of `model` buffers for its weight's FP8 rows, which its
    forward then multiplies by; returns `cast()`, which casts each weight (in compute_dtype, the
    dtype the forward sees it in) into them: run it before the first forward and after every change
    to the weights."""
    layers = _rowwise_layers(model)
    if not layers:
        raise ValueError("the model has no rowwise FP8 layer: convert it with convert_to_float8(model, "
                         "'rowwise') (--train.float8 rowwise) first")
    for layer in layers:
        weight = _whole(layer.weight)
        layer.kept_rows_data = torch.empty(weight.shape, dtype=E4M3, device=weight.device)
        layer.kept_rows_scale = torch.empty((weight.shape[0], 1), dtype=torch.float32, device=weight.device)
    # One kernel a weight on the GPU (a compiled graph a weight shape: four for a Llama block).
    cast_into = torch.compile(_cast_into, dynamic=False) if layers[0].kept_rows_data.is_cuda else _cast_into

    @torch.no_grad()
    def cast() -> None:
        for layer in layers:
            cast_into(_whole(layer.weight).to(compute_dtype), layer.kept_rows_data, layer.kept_rows_scale)

    return cast


def keep_weight_rows_through_steps(model: nn.Module, optimizer: torch.optim.Optimizer,
                                   compute_dtype: torch.dtype) -> None:
    """`keep_weight_rows`, its rows cast now and after every `optimizer.step()`: by the step
    itself, in the pass that updates each weight, where the optimizer can (`write_fp8_rows`:
    ligerzoo's AdamW), otherwise by a step post-hook. A weight the optimizer does not step never
    changes, so its rows stay as cast now."""
    cast = keep_weight_rows(model, compute_dtype)
    cast()
    # The optimizer's pass casts a weight as it is or rounded to bf16 (kernels/adamw.py), not to float16.
    in_step = hasattr(optimizer, "write_fp8_rows") and all(
        compute_dtype in (layer.weight.dtype, torch.bfloat16) for layer in _rowwise_layers(model))
    if not in_step:
        optimizer.register_step_post_hook(lambda *_: cast())
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in _rowwise_layers(model):
        if id(layer.weight) in stepped:
            rows = Float8Rows(layer.kept_rows_data, layer.kept_rows_scale)
            optimizer.write_fp8_rows(layer.weight, rows, compute_dtype)


def _rowwise_layers(model: nn.Module) -> list[Float8Linear]:
    return [m for m in model.modules() if isinstance(m, Float8Linear) and m.recipe == "rowwise"]


def _cast_into(weight: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> None:
    rows = quantize_rows(weight, E4M3)
    data.copy_(rows.data)
    scale.copy_(rows.scale)


def _whole(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight: itself, or FSDP2's shard where one rank holds all of it."""
    if not isinstance(weight, DTensor):
        return weight.detach()
    if weight.device_mesh.size() > 1:
        raise ValueError("a weight is sharded over several ranks: FSDP2 gathers it as FP8 rows already "
                         "(float8_gather.py), so its rows are not kept")
    return weight.to_local().detach()
