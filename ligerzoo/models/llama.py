"""Llama 2 and 3 (3.1, 3.2): the shared decoder with dense SwiGLU MLPs. Grouped-query attention,
tied embeddings, attention/MLP biases, a head_dim other than hidden/heads and Llama 3.1's
`llama3` rope scaling all come from the config. This file maps the Hugging Face checkpoint names
(separate q/k/v and gate/up projections) onto the fused parameters."""

from ligerzoo.models.config import ModelConfig
from ligerzoo.models.transformer import MLP, Transformer


class Llama(Transformer):
    feed_forward_class = MLP

    def hf_layer_map(self) -> dict[str, tuple[str, tuple]]:
        return {**attention_map(self.config), **mlp_map(self.config)}


def attention_map(config: ModelConfig) -> dict[str, tuple[str, tuple]]:
    """The two norms, and the attention projections: q, k and v are consecutive row blocks of
    `wqkv` (heads in checkpoint order), o is `wo`."""
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    blocks = {"q_proj": slice(0, q_rows), "k_proj": slice(q_rows, q_rows + kv_rows),
              "v_proj": slice(q_rows + kv_rows, q_rows + 2 * kv_rows)}
    names = {
        "input_layernorm.weight": ("attention_norm.weight", ()),
        "post_attention_layernorm.weight": ("ffn_norm.weight", ()),
    }
    for tensor in ("weight", "bias") if config.attention_bias else ("weight",):
        for projection, rows in blocks.items():
            names[f"self_attn.{projection}.{tensor}"] = (f"attention.wqkv.{tensor}", (rows,))
        names[f"self_attn.o_proj.{tensor}"] = (f"attention.wo.{tensor}", ())
    return names


def mlp_map(config: ModelConfig) -> dict[str, tuple[str, tuple]]:
    """gate and up are the two row halves of `w13` (gate first, as the SwiGLU call splits it)."""
    inner = config.intermediate_size
    names = {}
    for tensor in ("weight", "bias") if config.mlp_bias else ("weight",):
        names[f"mlp.gate_proj.{tensor}"] = (f"feed_forward.w13.{tensor}", (slice(0, inner),))
        names[f"mlp.up_proj.{tensor}"] = (f"feed_forward.w13.{tensor}", (slice(inner, 2 * inner),))
        names[f"mlp.down_proj.{tensor}"] = (f"feed_forward.w2.{tensor}", ())
    return names
