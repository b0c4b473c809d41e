"""Where every tensor of a Hugging Face checkpoint lives in our fused parameters.

Checkpoints store q, k and v apart, and gate and up apart; the models hold them fused (`wqkv`,
`w13`) so that each is one matmul, and Mixtral's experts stacked [E, ...] for grouped matmuls.
`tensor_map(config)` says, for every checkpoint name, which parameter and which region of it:
`param[index]` is exactly that tensor. Loading and saving both go through it.

Mixtral checkpoints name each expert's matrices apart, `block_sparse_moe.experts.{e}.w1/w2/w3`
(the Hub's layout, and what transformers 5.x writes on save even though it holds them stacked in
memory); here they are slices of the stacked `w13` [E, 2I, H] (w1 = gate, then w3 = up) and
`w2` [E, H, I].
"""

from ligerzoo.models import ModelConfig

TensorMap = dict[str, tuple[str, tuple]]  # checkpoint name -> (parameter name, index)


def tensor_map(config: ModelConfig) -> TensorMap:
    """Every tensor of the checkpoint, covering every element of every parameter once."""
    names = {"model.embed_tokens.weight": ("embed_tokens.weight", ()),
             "model.norm.weight": ("norm.weight", ())}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", ())
    feed_forward = moe_map(config) if config.model_type == "mixtral" else mlp_map(config)
    layer = {**attention_map(config), **feed_forward}
    for i in range(config.num_hidden_layers):
        for hf_name, (name, index) in layer.items():
            names[f"model.layers.{i}.{hf_name}"] = (f"layers.{i}.{name}", index)
    return names


def optional_names(config: ModelConfig) -> set[str]:
    """Checkpoint tensors that are ignored if present: the head when tied to the embedding, and
    the rotary frequencies older checkpoints stored."""
    names = {"model.rotary_emb.inv_freq"}
    names.update(f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(config.num_hidden_layers))
    if config.tie_word_embeddings:
        names.add("lm_head.weight")
    return names


def attention_map(config: ModelConfig) -> TensorMap:
    """A layer's two norms and attention projections: q, k and v are consecutive row blocks of
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


def mlp_map(config: ModelConfig) -> TensorMap:
    """A dense layer's MLP: gate and up are the two row halves of `w13` (gate first, as the SwiGLU
    kernel splits it)."""
    inner = config.intermediate_size
    names = {}
    for tensor in ("weight", "bias") if config.mlp_bias else ("weight",):
        names[f"mlp.gate_proj.{tensor}"] = (f"feed_forward.w13.{tensor}", (slice(0, inner),))
        names[f"mlp.up_proj.{tensor}"] = (f"feed_forward.w13.{tensor}", (slice(inner, 2 * inner),))
        names[f"mlp.down_proj.{tensor}"] = (f"feed_forward.w2.{tensor}", ())
    return names


def moe_map(config: ModelConfig) -> TensorMap:
    """Mixtral's router and experts."""
    inner = config.intermediate_size
    names = {"block_sparse_moe.gate.weight": ("feed_forward.router.weight", ())}
    for e in range(config.num_local_experts):
        expert = f"block_sparse_moe.experts.{e}"
        names[f"{expert}.w1.weight"] = ("feed_forward.w13", (e, slice(0, inner)))
        names[f"{expert}.w3.weight"] = ("feed_forward.w13", (e, slice(inner, 2 * inner)))
        names[f"{expert}.w2.weight"] = ("feed_forward.w2", (e,))
    return names
