"""Medusa: extra heads that predict tokens t+2, t+3, ..., trained on the fused loss, and the tree
decoding that uses them to emit several tokens per forward of the base model. It reaches the model
through its trunk's hidden states and the cache API (tree_attention.py), never through flags of
the model's forward."""

from ligerzoo.medusa.checkpoint import load_heads, save_heads
from ligerzoo.medusa.decoding import MedusaStats, medusa_generate
from ligerzoo.medusa.heads import MedusaConfig, MedusaHeads, head_targets
from ligerzoo.medusa.tree import TREES, MedusaTree, medusa_tree
from ligerzoo.medusa.tree_attention import TreeCache

__all__ = ["TREES", "MedusaConfig", "MedusaHeads", "MedusaStats", "MedusaTree", "TreeCache", "head_targets",
           "load_heads", "medusa_generate", "medusa_tree", "save_heads"]
