"""FP8 training of a model's blocks: their linear layers swapped for `Float8Linear`.

`Float8Linear` is an `nn.Linear` whose product runs in FP8 (kernels/float8_linear.py: the
forward, input-gradient and weight-gradient products, e4m3 operands with float32 scales, outputs
in the input's dtype). It holds the very parameters of the layer it replaces under the same
names, in their own dtype: the optimizer, the checkpoints, FSDP and the Hugging Face export see
no difference (FSDP2 gathers rowwise weights as FP8 rows, below, and they still see none). FP8 is
a compute format only.

What is converted: each block's attention projections (wqkv, wo) and dense MLP (w13, w2): the
products that are most of a step's work; and Mixtral's experts, whose grouped products become
`Float8MoE`'s (kernels/float8_grouped.py: rowwise under either recipe, the scales torch's grouped
FP8 product takes). The embedding, the output head and its fused loss stay in the parameters'
dtype, as does Mixtral's router (a tiny product whose softmax decides the routing).

Under "rowwise" each block also becomes a `Float8Block`: the same modules, whose forward hands
each projection's input over as the FP8 rows its producer writes (kernels/float8_fused.py): the
attention norm with wqkv, the FFN norm with w13, SwiGLU with w2; wo, whose input comes from
attention, casts it itself (`Float8Linear`). Under "tensorwise" the blocks keep their forward and
each Float8Linear casts its input: one scale for a whole tensor needs the tensor's amax before
any element is cast, which a row-per-program producer cannot know in its one pass.

Under FSDP2 the rowwise layers' weights are all-gathered as their FP8 rows (float8_gather.py:
each rank casts its own rows, half the bytes of bf16 on the wire); Float8Linear and the fused
functions (`weight_fp8=`) multiply by the gathered rows as they are, so a Float8Block keeps its
fused path, and a Float8MoE hands its experts' gathered rows to the grouped product. On one rank a
rowwise layer may instead keep its weight's FP8 rows from one optimizer step to the next
(float8_weight_rows.py), handed over the same way (`Float8Linear.weight_rows`).
"""

import torch
from torch import nn

from ligerzoo.kernels import swiglu_packed
from ligerzoo.kernels.float8 import Float8Rows
from ligerzoo.kernels.float8_fused import add_rms_norm_linear, add_rms_norm_mlp, rms_norm_linear
from ligerzoo.kernels.float8_grouped import GROUP_ALIGNMENT, float8_grouped_linear, runs_grouped_fp8
from ligerzoo.kernels.float8_linear import RECIPES, float8_linear
from ligerzoo.models.attention import AttentionMask
from ligerzoo.models.cache import LayerCache
from ligerzoo.models.float8_gather import gathered_rows
from ligerzoo.models.transformer import MLP, Attention, Block, MoE, Transformer


class Float8Linear(nn.Linear):
    """nn.Linear with its products in FP8 under `recipe` ("rowwise" or "tensorwise")."""

    recipe: str

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The weight's FP8 rows where they are kept from one optimizer step to the next
        # (float8_weight_rows.py); None: the weight is cast at each use.
        self.register_buffer("kept_rows_data", None, persistent=False)
        self.register_buffer("kept_rows_scale", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str) -> "Float8Linear":
        """The same parameters (not copies), now multiplied in FP8."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown FP8 recipe {recipe!r}: use one of {', '.join(RECIPES)}")
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight, layer.bias, layer.recipe = linear.weight, linear.bias, recipe
        return layer

    def weight_rows(self) -> Float8Rows | None:
        """The weight's FP8 rows cast already: FSDP2's gathered ones, or the kept ones; None where
        the products cast the weight themselves."""
        gathered = gathered_rows(self.weight)
        if gathered is not None or self.kept_rows_data is None:
            return gathered
        return Float8Rows(self.kept_rows_data, self.kept_rows_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float8_linear(x, self.weight, self.bias, self.recipe, weight_fp8=self.weight_rows())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"


class Float8MoE(MoE):
    """Mixtral's MoE with its experts' products in FP8 (`float8_grouped_linear`).

    The grouped FP8 product contracts each expert's tokens in 16-byte steps, so each expert's run
    of rows starts at a multiple of GROUP_ALIGNMENT: the rows are copied into a buffer where each
    run is followed by zero rows up to the next multiple, and the last run takes every row left
    (a size fixed by the shapes, so nothing waits for the routing's counts). A zero row stays zero
    through the experts and gives no gradient. Shapes the FP8 product cannot take (a hidden or
    inner size not a multiple of 16), and GPUs without torch's grouped FP8 product (before
    Hopper), run the experts as MoE does."""

    def __init__(self, moe: MoE):
        """`moe`'s modules and parameters (not copies), now multiplied in FP8."""
        nn.Module.__init__(self)  # not MoE's, which would make new parameters
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.router, self.w13, self.w2 = moe.router, moe.w13, moe.w2

    def experts(self, rows: torch.Tensor, expert_of_row: torch.Tensor,
                run_ends: torch.Tensor) -> torch.Tensor:
        _, hidden, inner = self.w2.shape
        if hidden % 16 or inner % 16 or not runs_grouped_fp8(rows.device):
            return super().experts(rows, expert_of_row, run_ends)
        n_rows, n_experts = rows.shape[0], self.n_experts
        counts = torch.diff(run_ends, prepend=run_ends.new_zeros(1))
        aligned_counts = (counts + GROUP_ALIGNMENT - 1) // GROUP_ALIGNMENT * GROUP_ALIGNMENT
        aligned_ends = aligned_counts.cumsum(0)
        # Where each row goes: its run's aligned start plus its place in the run.
        shift = (aligned_ends - aligned_counts) - (run_ends - counts)
        slots = torch.arange(n_rows, device=rows.device) + shift[expert_of_row]
        total = -(-(n_rows + (GROUP_ALIGNMENT - 1) * n_experts) // GROUP_ALIGNMENT) * GROUP_ALIGNMENT
        group_ends = torch.cat([aligned_ends[:-1], aligned_ends.new_full((1,), total)]).to(torch.int32)
        padded = rows.new_zeros(total, rows.shape[1]).index_copy(0, slots, rows)
        gate_up = float8_grouped_linear(padded, self.w13, group_ends, weight_fp8=gathered_rows(self.w13))
        hidden_rows = swiglu_packed(gate_up, in_place_backward=True)  # gate_up is read by nothing else
        out = float8_grouped_linear(hidden_rows, self.w2, group_ends, weight_fp8=gathered_rows(self.w2))
        return out[slots]


class Float8Block(nn.Module):
    """A Block's modules (so its parameters, under the same names) with a rowwise FP8 forward:
    each norm and SwiGLU fused with the projection that reads its output, given the projection's
    FP8 rows where FSDP2 gathered them so (`gathered_rows`). Mixtral's experts take the FFN norm's
    output as in Block."""

    def __init__(self, block: Block):
        super().__init__()
        self.attention_norm, self.attention = block.attention_norm, block.attention
        self.ffn_norm, self.feed_forward = block.ffn_norm, block.feed_forward

    def forward(self, x, residual, cos, sin, mask: AttentionMask, cache: LayerCache | None = None):
        """As `Block.forward`."""
        norm, wqkv = self.attention_norm, self.attention.wqkv
        rows = wqkv.weight_rows()
        if residual is None:
            qkv = rms_norm_linear(x, norm.weight, norm.eps, wqkv.weight, wqkv.bias, weight_fp8=rows)
            residual = x
        else:
            qkv, residual = add_rms_norm_linear(x, residual, norm.weight, norm.eps, wqkv.weight, wqkv.bias,
                                                weight_fp8=rows)
        h = self.attention.attend_qkv(qkv, cos, sin, mask, cache)
        norm, mlp = self.ffn_norm, self.feed_forward
        if not isinstance(mlp, MLP):
            h, residual = norm(h, residual)
            out, router_stats = mlp(h)
            return out, residual, router_stats
        w13, w2 = mlp.w13, mlp.w2
        out, residual = add_rms_norm_mlp(h, residual, norm.weight, norm.eps, w13.weight, w2.weight,
                                         w13.bias, w2.bias, w13_fp8=w13.weight_rows(),
                                         w2_fp8=w2.weight_rows())
        return out, residual, None


def convert_to_float8(model: Transformer, recipe: str) -> list[str]:
    """Swap the linear layers of every block of `model` (or of anything with `.layers`, such as a
    Medusa model's trunk) for Float8Linear, Mixtral's MoE layers for Float8MoE, and under
    "rowwise" each block for a Float8Block, in place; returns the converted layers' names."""
    converted = []
    for index, block in enumerate(model.layers):
        for path, parent in list(block.named_modules()):
            if isinstance(parent, (Attention, MLP)):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        setattr(parent, name, Float8Linear.from_linear(child, recipe))
                        converted.append(f"layers.{index}.{path}.{name}")
            elif type(parent) is MoE:
                owner, _, name = path.rpartition(".")
                setattr(block.get_submodule(owner), name, Float8MoE(parent))
                converted.append(f"layers.{index}.{path}")
        if recipe == "rowwise":
            model.layers[index] = Float8Block(block)
    return converted
