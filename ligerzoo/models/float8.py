"""FP8 training of a model's blocks: their linear layers swapped for `Float8Linear`.

`Float8Linear` is an `nn.Linear` whose product runs in FP8 (kernels/float8_linear.py: the
forward, input-gradient and weight-gradient products, e4m3 operands with float32 scales, outputs
in the input's dtype). It holds the very parameters of the layer it replaces under the same
names, in their own dtype: the optimizer, the checkpoints, FSDP and the Hugging Face export see
no difference. FP8 is a compute format only.

What is converted: each block's attention projections (wqkv, wo) and dense MLP (w13, w2): the
products that are most of a step's work. The embedding, the output head and its fused loss stay
in the parameters' dtype, as does Mixtral's router (a tiny product whose softmax decides the
routing) and its experts (grouped products).
"""

import torch
from torch import nn

from ligerzoo.kernels.float8_linear import RECIPES, float8_linear
from ligerzoo.models.transformer import MLP, Attention, Transformer


class Float8Linear(nn.Linear):
    """nn.Linear with its products in FP8 under `recipe` ("rowwise" or "tensorwise")."""

    recipe: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str) -> "Float8Linear":
        """The same parameters (not copies), now multiplied in FP8."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown FP8 recipe {recipe!r}: use one of {', '.join(RECIPES)}")
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight, layer.bias, layer.recipe = linear.weight, linear.bias, recipe
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float8_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"


def convert_to_float8(model: Transformer, recipe: str) -> list[str]:
    """Swap the linear layers of every block of `model` (or of anything with `.layers`, such as a
    Medusa model's trunk) for Float8Linear, in place; returns the converted layers' names."""
    converted = []
    for index, block in enumerate(model.layers):
        for path, parent in block.named_modules():
            if isinstance(parent, (Attention, MLP)):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        setattr(parent, name, Float8Linear.from_linear(child, recipe))
                        converted.append(f"layers.{index}.{path}.{name}")
    return converted
