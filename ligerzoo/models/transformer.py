"""The decoder shared by Llama, Mistral and Mixtral: embedding, blocks, final norm, head.

Every norm, rotary embedding, gated MLP and the loss are the project's kernels. Parameters fuse
what Hugging Face checkpoints store apart, so each step is one matmul: q, k and v are one `wqkv`
projection, gate and up one `w13` (the SwiGLU kernel reads its two halves in place), and Mixtral's
experts are stacked [E, ...] tensors for grouped matmuls. hf/tensor_names.py says where every
checkpoint tensor lives in them.

The residual add is fused into the following norm (`add_rms_norm`): a block takes the previous
block's output and the residual stream, and returns its own output and the updated stream.

`trunk` is the model without its head: embedding, blocks, final norm -> hidden states. `forward`
adds the head: the logits, or with labels the fused loss (`loss`), which never makes the logits.
Generation and Medusa call the trunk and apply their own heads to the positions they need.

With a cache (the protocol in cache.py; the KV cache is inference/kv_cache.py) the trunk extends
what is cached: the cache sets the tokens' positions and mask, and each layer's attention writes
its keys and values there and attends over them. The model knows nothing else of the cache.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ligerzoo.kernels import IGNORE_INDEX, RMSNorm, apply_rope_qkv, linear_cross_entropy, swiglu_packed
from ligerzoo.models.attention import AttentionMask, attend, build_mask
from ligerzoo.models.cache import Cache, LayerCache
from ligerzoo.models.config import ModelConfig
from ligerzoo.models.rotary import RotaryEmbedding


# A NamedTuple, not a dataclass: FSDP2 finds the tensors of a wrapped module's output with pytree,
# which sees into tuples, and in torch 2.11 not into dataclasses (2.13 does). A root it cannot see
# into gets no pre-backward hook; when no block is in the backward either (a frozen trunk under
# Medusa heads), its gradients are never reduce-scattered and the optimizer sees none.
class CausalLMOutput(NamedTuple):
    loss: torch.Tensor | None = None  # float32 scalar when labels were given (Mixtral: + coef * aux_loss)
    logits: torch.Tensor | None = None  # [B, T, V] only when labels were not given
    aux_loss: torch.Tensor | None = None  # Mixtral's load-balancing loss, unscaled


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, qkv_width, bias=config.attention_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: LayerCache | None = None):
        return self.attend_qkv(self.wqkv(x), cos, sin, mask, cache)

    def attend_qkv(self, qkv, cos, sin, mask: AttentionMask, cache: LayerCache | None = None):
        """Attention from wqkv's output [B, T, (Hq + 2 Hk) D] on: RoPE, attention, wo. Apart from
        `forward` for a block that computes the projection itself (models/float8.py)."""
        batch, seq_len, _ = qkv.shape
        qkv = qkv.view(batch, seq_len, -1, self.head_dim)  # [B, T, Hq + 2 Hk, D]
        q, k, v = apply_rope_qkv(qkv, self.n_heads, cos, sin)  # new tensors: nothing keeps qkv alive
        y = attend(q, k, v, mask) if cache is None else cache.attend(q, k, v, mask)  # [B, T, Hq, D]
        return self.wo(y.reshape(batch, seq_len, -1))


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        """-> (output, None): a dense layer has no router statistics."""
        # w13's output is read by nothing but swiglu: its gradient may take its memory.
        return self.w2(swiglu_packed(self.w13(x), in_place_backward=True)), None


class MoE(nn.Module):
    """Mixtral's sparse MoE: each token goes to its top-k experts (SwiGLU MLPs), weighted by the
    router's softmax renormalised over those k.

    The (token, expert) assignments are sorted by expert, so each expert's tokens form one run of
    rows, and `torch._grouped_mm` multiplies every run by its expert's weights in one call, given
    the run ends as a device tensor: no Python loop over experts or tokens. In bf16 on the H100
    that is one grouped GEMM with no host sync; in other dtypes or on older GPUs PyTorch falls back
    to a loop over experts inside the op (torch >= 2.9 has it on CPU and CUDA).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
        hidden, inner = config.hidden_size, config.intermediate_size
        self.router = nn.Linear(hidden, self.n_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(self.n_experts, 2 * inner, hidden))  # [gate; up] per expert
        self.w2 = nn.Parameter(torch.empty(self.n_experts, hidden, inner))

    def forward(self, x):
        """-> (output, router statistics [2, E]: top-k assignments and summed probabilities per
        expert, from which the model computes the load-balancing loss)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        probs = F.softmax(self.router(x).float(), dim=-1)  # [N, E]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [N, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)

        expert_of_row, order = experts.reshape(-1).sort(stable=True)  # [N k] assignments by expert
        run_ends = torch.searchsorted(expert_of_row, torch.arange(1, self.n_experts + 1, device=x.device))
        out_rows = self.experts(x[order // self.top_k], expert_of_row, run_ends)  # [N k, H]
        out = out_rows[order.argsort()].view(-1, self.top_k, shape[-1])  # back to [N, k, H]
        out = (out * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)

        counts = torch.diff(run_ends, prepend=run_ends.new_zeros(1)).float()
        return out.view(shape), torch.stack([counts, probs.sum(dim=0)])

    def experts(self, rows: torch.Tensor, expert_of_row: torch.Tensor, run_ends: torch.Tensor) -> torch.Tensor:
        """Each expert's SwiGLU MLP over its run of rows [N k, H], sorted by expert
        (expert_of_row [N k]); run_ends [E] ends each run."""
        offsets = run_ends.to(torch.int32)
        gate_up = torch._grouped_mm(rows, self.w13.transpose(1, 2), offs=offsets)
        hidden_rows = swiglu_packed(gate_up, in_place_backward=True)  # gate_up is read by nothing else
        return torch._grouped_mm(hidden_rows, self.w2.transpose(1, 2), offs=offsets)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, feed_forward: nn.Module):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = feed_forward

    def forward(self, x, residual, cos, sin, mask: AttentionMask, cache: LayerCache | None = None):
        """x: the previous block's output, not yet added to the residual stream (the first block
        gets the embeddings and residual None). Returns the same pair for the next block, and the
        router statistics (None for a dense block)."""
        if residual is None:
            h, residual = self.attention_norm(x), x
        else:
            h, residual = self.attention_norm(x, residual)  # residual += x; h = norm(residual)
        h, residual = self.ffn_norm(self.attention(h, cos, sin, mask, cache), residual)
        out, router_stats = self.feed_forward(h)
        return out, residual, router_stats


class Transformer(nn.Module):
    """A decoder-only language model; the family classes (families.py) set `feed_forward_class`."""

    feed_forward_class: type[nn.Module]  # MLP or MoE

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        pad = config.pad_token_id  # as in transformers, the padding row gets no gradient
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=padding_idx)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(
            Block(config, self.feed_forward_class(config)) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Rows of logits the fused loss makes at a time (linear_cross_entropy's chunk_rows): None
        # for its default 126 MiB buffer; more rows are faster where memory allows.
        self.loss_chunk_rows: int | None = None

    @property
    def output_weight(self) -> torch.Tensor:
        """[V, H]: the head's weight, or the embedding when they are tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids, labels=None, position_ids=None, cache: Cache | None = None) -> CausalLMOutput:
        """input_ids [B, T]; labels [B, T] aligned with input_ids (shifted here, -100 ignored);
        position_ids and cache as `trunk` takes them. With labels: the loss (no logits), else the
        logits [B, T, V]; Mixtral's aux_loss either way."""
        if labels is not None:
            if cache is not None:
                raise ValueError("with a cache, labels must be None: a cache is for generation, not for a loss")
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have input_ids' shape {list(input_ids.shape)}, got {list(labels.shape)}"
                )
        hidden, aux_loss = self.trunk(input_ids, position_ids, cache)
        if labels is None:
            return CausalLMOutput(logits=F.linear(hidden, self.output_weight), aux_loss=aux_loss)
        return CausalLMOutput(loss=self.loss(hidden, labels, aux_loss), aux_loss=aux_loss)

    def trunk(self, input_ids, position_ids=None,
              cache: Cache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedding, blocks and final norm: (hidden states [B, T, H], Mixtral's load-balancing loss
        or None).

        input_ids [B, T]; position_ids [B, T] or [1, T], which may restart inside a row (packed
        documents: attention then stays within each document), or None for 0..T-1. cache: a cache
        to extend (cache.py): the tokens go to its next T slots, their positions and mask come
        from the cache, and attention covers everything cached before them (position_ids None).
        """
        batch, seq_len = self._check_inputs(input_ids, position_ids, cache)
        x = self.embed_tokens(input_ids)
        if cache is None:
            cos, sin = self.rotary(position_ids, seq_len)
            mask = build_mask(position_ids, batch, seq_len, self.config.sliding_window, input_ids.device)
            layer_caches = [None] * len(self.layers)
        else:
            position_ids, mask, layer_caches = cache.claim(seq_len, self.config.sliding_window)
            cos, sin = self.rotary(position_ids, seq_len)
        residual, router_stats = None, []
        for layer, layer_cache in zip(self.layers, layer_caches, strict=True):
            x, residual, stats = layer(x, residual, cos, sin, mask, layer_cache)
            if stats is not None:
                router_stats.append(stats)
        hidden, _ = self.norm(x, residual)
        # The last block's output was read only by the norm: free it before the loss's buffers
        # (64 MiB at the Llama-3.2-1B shape, seq 4096 x 4, at the step's peak).
        del x
        aux_loss = load_balancing_loss(torch.stack(router_stats), batch * seq_len) if router_stats else None
        return hidden, aux_loss

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor,
             aux_loss: torch.Tensor | None = None) -> torch.Tensor:
        """float32 scalar: the mean next-token cross-entropy of the trunk's hidden states [B, T, H]
        against labels [B, T] aligned with input_ids (-100 ignored), through the fused loss (no
        logits made); plus router_aux_loss_coef * aux_loss when given (Mixtral)."""
        # Shift by padding the labels, not by slicing hidden: it stays contiguous and unsliced.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        loss = linear_cross_entropy(hidden, self.output_weight, targets, ignore_index=IGNORE_INDEX,
                                    chunk_rows=self.loss_chunk_rows)
        if aux_loss is not None:
            loss = loss + self.config.router_aux_loss_coef * aux_loss
        return loss

    def _check_inputs(self, input_ids, position_ids, cache) -> tuple[int, int]:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer [B, T] tensor, got {input_ids.dtype} {list(input_ids.shape)}"
            )
        batch, seq_len = input_ids.shape
        if cache is not None:
            if position_ids is not None:
                raise ValueError("with a cache, position_ids must be None: the cache sets the positions")
            if cache.batch_size != batch:
                raise ValueError(f"input_ids has {batch} rows but the cache was made for {cache.batch_size}")
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[1] != seq_len
                                         or position_ids.shape[0] not in (1, batch)):
            raise ValueError(
                f"position_ids must be [{batch}, {seq_len}] or [1, {seq_len}], got {list(position_ids.shape)}"
            )
        # Checked on the device without a host sync (the assert fires asynchronously on the GPU,
        # at once on the CPU); the embedding lookup would fail too, but less clearly.
        vocab = self.config.vocab_size
        in_vocab = ((input_ids >= 0) & (input_ids < vocab)).all()
        torch.ops.aten._assert_async.msg(in_vocab, f"input_ids must lie in [0, vocab_size={vocab})")
        return batch, seq_len

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random weights for training from scratch, as transformers initialises: normal(0,
        initializer_range) for every matrix, zero biases, unit norms, a zero padding embedding."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, MoE):
                nn.init.normal_(module.w13, std=std)
                nn.init.normal_(module.w2, std=std)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (rotary frequencies), e.g. after `to_empty`."""
        self.rotary.reset_buffers()

    def save_pretrained(self, path, max_shard_size="5GB") -> None:
        """Write config.json and safetensors shards in the Hugging Face layout (hf/pretrained.py).

        The one call from a model up into the layer that reads and writes Hugging Face files: the
        public API saves through the model, as transformers does. Imported here, not at the top, so
        that models import nothing above them and the package has no import cycle."""
        from ligerzoo.hf.pretrained import save_pretrained

        save_pretrained(self, path, max_shard_size)


def load_balancing_loss(router_stats: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as transformers' `load_balancing_loss_func` computes it
    (no attention mask): E * sum_e f_e * P_e, with f_e the share of top-k assignments and P_e the
    mean router probability of expert e, both pooled over all layers and tokens.

    router_stats: [L, 2, E], each layer's assignment counts and summed probabilities over the
    n_tokens tokens. Only P_e carries a gradient, as in transformers (f_e is a histogram).
    """
    n_layers, _, n_experts = router_stats.shape
    counts, prob_sums = router_stats.sum(dim=0)  # [E] each
    n_rows = n_layers * n_tokens
    return n_experts * torch.sum((counts / n_rows) * (prob_sums / n_rows))
