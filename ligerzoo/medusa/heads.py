"""Medusa heads: K extra next-next-token heads on a causal LM's final hidden states.

The base model's head reads the hidden state at position t and predicts token t+1; Medusa head k
(k = 1..K) reads the same hidden state and predicts token t+1+k. Each head is a stack of residual
blocks, x + SiLU(W x + b), then an output projection: its own (initialised from the base head) or
the base model's, shared. The blocks start as the identity (W = 0), so an untrained head predicts
what the base head predicts.

Every head's loss is the fused linear cross-entropy on its hidden states and output weight: no head
ever holds a [tokens, vocab] logits tensor.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ligerzoo.kernels import IGNORE_INDEX, linear_cross_entropy


@dataclass
class MedusaConfig:
    num_heads: int = 4
    num_layers: int = 1  # residual blocks per head
    shared_output: bool = False  # True: every head uses the base model's output projection

    def __post_init__(self):
        for name in ("num_heads", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MedusaConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.shared_output, bool):
            raise ValueError(f"MedusaConfig.shared_output must be a bool, got {self.shared_output!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, config: MedusaConfig, hidden_size: int, vocab_size: int):
        super().__init__()
        self.config, self.hidden_size, self.vocab_size = config, hidden_size, vocab_size
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResidualBlock(hidden_size) for _ in range(config.num_layers)))
            for _ in range(config.num_heads)
        )
        self.outputs = None
        if not config.shared_output:
            self.outputs = nn.ModuleList(
                nn.Linear(hidden_size, vocab_size, bias=False) for _ in range(config.num_heads)
            )

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @torch.no_grad()
    def init_weights(self, base_output_weight: torch.Tensor) -> None:
        """Blocks as the identity, own output projections copies of the base head's [V, H]."""
        for block in self.blocks:
            for residual in block:
                residual.linear.weight.zero_()
                residual.linear.bias.zero_()
        for output in self.outputs or ():
            output.weight.copy_(base_output_weight)

    def output_weight(self, k: int, base_output_weight: torch.Tensor) -> torch.Tensor:
        """[V, H]: the output projection of head k (0-based)."""
        return base_output_weight if self.outputs is None else self.outputs[k].weight

    def head_states(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Each head's hidden states [..., H] before its output projection."""
        return [block(hidden) for block in self.blocks]

    def logits(self, hidden: torch.Tensor, base_output_weight: torch.Tensor) -> torch.Tensor:
        """[K, ..., V]: every head's logits at hidden [..., H] (for decoding: a few positions)."""
        return torch.stack([
            F.linear(state, self.output_weight(k, base_output_weight))
            for k, state in enumerate(self.head_states(hidden))
        ])

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, base_output_weight: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[K] float32: each head's mean cross-entropy over its targets.

        hidden [B, T, H] the base model's final hidden states; labels [B, T] aligned with the
        input ids, as the base model takes them (-100 ignored); position_ids [B, T] when rows pack
        several documents (positions restart at each): a head never predicts across documents.
        """
        losses = []
        for k, state in enumerate(self.head_states(hidden)):
            targets = head_targets(labels, k + 1, position_ids)
            losses.append(linear_cross_entropy(state, self.output_weight(k, base_output_weight), targets,
                                               ignore_index=IGNORE_INDEX))
        return torch.stack(losses)

    @torch.no_grad()
    def accuracies(self, hidden: torch.Tensor, labels: torch.Tensor, base_output_weight: torch.Tensor,
                   position_ids: torch.Tensor | None = None, max_rows: int = 1024) -> torch.Tensor:
        """[K] float32: each head's top-1 accuracy, estimated on up to `max_rows` evenly spaced
        positions (the logits of every position would cost a head's matmul again)."""
        width = hidden.shape[-1]
        n_rows = hidden.numel() // width
        rows = torch.arange(0, n_rows, max(1, n_rows // max_rows), device=hidden.device)
        sample = hidden.reshape(-1, width)[rows]
        accuracies = []
        for k, state in enumerate(self.head_states(sample)):
            targets = head_targets(labels, k + 1, position_ids).reshape(-1)[rows]
            predicted = F.linear(state, self.output_weight(k, base_output_weight)).argmax(-1)
            counted = targets != IGNORE_INDEX
            hits = (predicted == targets) & counted
            accuracies.append(hits.sum().float() / counted.sum().clamp(min=1))
        return torch.stack(accuracies)


def head_targets(labels: torch.Tensor, k: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T]: the target of head k (1-based) at each position, token t+1+k, aligned with the
    hidden states; -100 past the row's end and, with packed documents, wherever token t+1+k is in
    another document than token t."""
    shift = 1 + k
    targets = F.pad(labels[:, shift:], (0, shift), value=IGNORE_INDEX)
    if position_ids is not None:
        positions = position_ids.expand_as(labels)
        ahead = F.pad(positions[:, shift:], (0, shift), value=-1)
        targets = targets.masked_fill(ahead - positions != shift, IGNORE_INDEX)
    return targets
