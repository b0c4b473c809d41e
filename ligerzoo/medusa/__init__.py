"""Medusa: extra heads that predict tokens t+2, t+3, ..., trained on the fused loss, and the tree
decoding that uses them to emit several tokens per forward of the base model."""

from ligerzoo.medusa.checkpoint import load_heads, save_heads
from ligerzoo.medusa.decoding import MedusaStats, medusa_generate
from ligerzoo.medusa.heads import MedusaConfig, MedusaHeads, head_targets
from ligerzoo.medusa.tree import TREES, MedusaTree, medusa_tree

__all__ = ["TREES", "MedusaConfig", "MedusaHeads", "MedusaStats", "MedusaTree", "head_targets", "load_heads",
           "medusa_generate", "medusa_tree", "save_heads"]
