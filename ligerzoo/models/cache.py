"""What the model asks of a cache: the protocol between `Transformer.trunk` and whatever holds the
keys and values of earlier tokens (inference/kv_cache.py's static KV cache, or a view of it such as
medusa/tree_attention.py's, which lays a tree of tokens out instead of a sequence).

A forward of [B, T] tokens with a cache asks it once for the tokens' T slots, `claim(T, window)`,
and gets back:
- position_ids [B, T]: each token's rotary position (the cache knows where each row's text starts);
- the attention mask, in whatever form its layers' `attend` takes (the model only passes it on);
- one LayerCache per layer, which stores that layer's new keys and values and attends over them
  and everything cached before.
The model never reads a cache's buffers, so the cache alone decides their layout, the slots a
forward writes and who may attend to whom; the model's code has no path per kind of cache.
"""

from collections.abc import Sequence
from typing import Protocol

import torch

from ligerzoo.models.attention import AttentionMask


class LayerCache(Protocol):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """Store k, v [B, T, Hk, D] (this forward's tokens) and attend with q [B, T, Hq, D] over
        them and what is cached -> [B, T, Hq, D]."""
        ...


class Cache(Protocol):
    @property
    def batch_size(self) -> int:
        """The rows it holds: a forward's input_ids must have as many."""
        ...

    def claim(self, seq_len: int, window: int | None) -> tuple[torch.Tensor, AttentionMask, Sequence[LayerCache]]:
        """Take slots for the next forward of [B, seq_len] tokens (window: the model's sliding
        window, or None) -> (position_ids [B, seq_len], mask, one LayerCache per layer)."""
        ...
