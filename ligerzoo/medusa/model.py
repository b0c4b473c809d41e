"""A causal LM with Medusa heads, as one module to train.

Medusa-1 ("heads"): the trunk is frozen and runs without autograd; only the heads learn, on the
trunk's final hidden states. Medusa-2 ("joint"): trunk and heads learn together; the loss is the
base model's plus the heads', scaled by `heads_weight`. Head k's loss is weighted by decay**(k-1)
in both: the further ahead a head looks, the less its loss can fall.
"""

from typing import NamedTuple

import torch
from torch import nn

from ligerzoo.medusa.heads import MedusaHeads
from ligerzoo.models import Transformer

MODES = ("heads", "joint")


class MedusaOutput(NamedTuple):  # a NamedTuple for FSDP2, as CausalLMOutput (models/transformer.py) says
    loss: torch.Tensor  # float32 scalar: what the step minimises
    head_losses: torch.Tensor  # [K] each head's mean cross-entropy
    base_loss: torch.Tensor | None = None  # the base model's loss, in joint training
    head_accuracies: torch.Tensor | None = None  # [K] top-1 accuracies, when asked for


class MedusaModel(nn.Module):
    def __init__(self, base: Transformer, heads: MedusaHeads, mode: str = "heads", decay: float = 0.8,
                 heads_weight: float = 1.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Medusa training mode {mode!r}: use 'heads' (trunk frozen) or 'joint'")
        if heads.hidden_size != base.config.hidden_size or heads.vocab_size != base.config.vocab_size:
            raise ValueError(f"heads for hidden {heads.hidden_size} / vocab {heads.vocab_size} on a model with "
                             f"hidden {base.config.hidden_size} / vocab {base.config.vocab_size}")
        self.base, self.heads, self.mode = base, heads, mode
        self.config = base.config
        self.decay, self.heads_weight = decay, heads_weight
        if mode == "heads":
            base.requires_grad_(False)

    @property
    def layers(self) -> nn.ModuleList:
        """The trunk's blocks (what checkpointing, compile and FSDP wrap)."""
        return self.base.layers

    def forward(self, input_ids, labels, position_ids=None, accuracy_rows: int = 0) -> MedusaOutput:
        """labels [B, T] aligned with input_ids, as the base model takes them. accuracy_rows: also
        estimate each head's top-1 accuracy on that many positions (0: not)."""
        joint = self.mode == "joint"
        # The base model's trunk, not its forward: the heads read its hidden states. Under FSDP2
        # this module is the root, so the trunk's parameters are gathered for this forward.
        with torch.set_grad_enabled(joint and torch.is_grad_enabled()):
            hidden, aux_loss = self.base.trunk(input_ids, position_ids)  # [B, T, H]
            base_loss = self.base.loss(hidden, labels, aux_loss) if joint else None
        head_losses = self.heads(hidden, labels, self.base.output_weight, position_ids)
        weights = self.decay ** torch.arange(len(head_losses), dtype=torch.float32, device=head_losses.device)
        loss = (head_losses * weights).sum()
        if joint:
            loss = base_loss + self.heads_weight * loss
        accuracies = None
        if accuracy_rows:
            accuracies = self.heads.accuracies(hidden.detach(), labels, self.base.output_weight,
                                               position_ids, max_rows=accuracy_rows)
        return MedusaOutput(loss=loss, head_losses=head_losses.detach(),
                            base_loss=base_loss.detach() if joint else None, head_accuracies=accuracies)
