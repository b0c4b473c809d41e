"""Mixtral: Mistral's attention with a sparse mixture of SwiGLU experts in place of the MLP
(`MoE` in transformer.py), and the load-balancing loss added to the training loss.

Checkpoints name each expert's matrices apart, `block_sparse_moe.experts.{e}.w1/w2/w3.weight`
(the Hub's layout, and what transformers 5.x writes on save even though it holds them stacked in
memory); here they are slices of the stacked `w13` [E, 2I, H] (w1 = gate, then w3 = up) and
`w2` [E, H, I].
"""

from ligerzoo.models.config import ModelConfig
from ligerzoo.models.llama import attention_map
from ligerzoo.models.transformer import MoE, Transformer


class Mixtral(Transformer):
    feed_forward_class = MoE

    def hf_layer_map(self) -> dict[str, tuple[str, tuple]]:
        return {**attention_map(self.config), **moe_map(self.config)}


def moe_map(config: ModelConfig) -> dict[str, tuple[str, tuple]]:
    inner = config.intermediate_size
    names = {"block_sparse_moe.gate.weight": ("feed_forward.router.weight", ())}
    for e in range(config.num_local_experts):
        expert = f"block_sparse_moe.experts.{e}"
        names[f"{expert}.w1.weight"] = ("feed_forward.w13", (e, slice(0, inner)))
        names[f"{expert}.w3.weight"] = ("feed_forward.w13", (e, slice(inner, 2 * inner)))
        names[f"{expert}.w2.weight"] = ("feed_forward.w2", (e,))
    return names
