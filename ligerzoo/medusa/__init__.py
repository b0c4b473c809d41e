"""Medusa: extra heads that predict tokens t+2, t+3, ..., trained on the fused loss, and the tree
decoding that uses them to emit several tokens per forward of the base model."""

from ligerzoo.medusa.checkpoint import load_heads, save_heads
from ligerzoo.medusa.heads import MedusaConfig, MedusaHeads, head_targets

__all__ = ["MedusaConfig", "MedusaHeads", "head_targets", "load_heads", "save_heads"]
