"""A static (preallocated) key/value cache for generation.

Every layer's keys and values live in two [B, Hk, L, D] tensors allocated once, in the layout SDPA
reads. Prompts of different lengths are left-padded to a common length, so all rows write their
next token to the same slot: `position`, a device tensor that each forward advances in place (a
CUDA graph of the decode step therefore moves on by itself when replayed). A token's rotary
position is its slot minus its row's padding: each prompt's first real token is at position 0.

Left padding is treated as a document of its own (the packed-documents rule of attention.py):
real tokens never attend to it, and a padding token attends only to padding, so no query row is
entirely masked (which would give NaN).

`KVCache` is what models/cache.py asks of a cache: the model passes it as `cache=` and it hands
out the slots, positions, mask and per-layer caches of each forward. Other layouts of a forward's
tokens are views on it that claim slots their own way: Medusa's tree of candidates
(medusa/tree_attention.py) continues the prefix at each token's depth and keeps one path after.
"""

from typing import NamedTuple

import torch

from ligerzoo.models.attention import AttentionMask, attend, attend_grouped, build_mask, padded_mask
from ligerzoo.models.config import ModelConfig


class KVLayer(NamedTuple):
    """One layer's slice of the cache during one forward (a models.cache.LayerCache)."""

    keys: torch.Tensor  # [B, Hk, L, D]
    values: torch.Tensor  # [B, Hk, L, D]
    slots: torch.Tensor  # [T] where this forward's tokens go
    fresh: bool  # the cache held nothing before this forward

    def attend(self, q, k, v, mask: AttentionMask) -> torch.Tensor:
        """Write k, v [B, T, Hk, D] at the slots, then attend with q [B, T, Hq, D] -> [B, T, Hq, D]:
        over the new keys alone on a fresh cache (the prefill, which then needs no cache read and,
        without padding, no mask: flash attention), else over every slot of the cache."""
        self.keys.index_copy_(2, self.slots, k.transpose(1, 2))
        self.values.index_copy_(2, self.slots, v.transpose(1, 2))
        if self.fresh:
            return attend(q, k, v, mask)
        return attend_grouped(q, self.keys, self.values, mask)


class KVCache:
    """Keys and values of every layer for `batch_size` rows of up to `max_len` tokens (prompt and
    generated tokens together)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        # Zeros, not empty: a masked slot still gets multiplied by its zero attention weight, and
        # 0 * NaN would be NaN.
        n_layers = config.num_hidden_layers
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.padding = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] left padding
        self.position = torch.zeros((), dtype=torch.long, device=device)  # the next free slot
        self.padded = False  # whether any row is padded (known on the host, for the prefill)
        self.empty = True  # nothing written yet (known on the host, for the prefill)

    @property
    def batch_size(self) -> int:
        return self.padding.shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def reset(self, padding: list[int] | None = None) -> None:
        """Start again for new prompts, row i left-padded by padding[i] tokens (default none). The
        buffers are kept, in place: a captured CUDA graph holds their addresses."""
        padding = list(padding) if padding is not None else [0] * self.batch_size
        if len(padding) != self.batch_size or min(padding) < 0:
            raise ValueError(f"padding must be {self.batch_size} non-negative counts, got {padding}")
        self.padding.copy_(torch.tensor(padding, dtype=torch.long))
        self.position.zero_()
        self.padded = any(padding)
        self.empty = True

    def claim(self, seq_len: int, window: int | None):
        """Take the next seq_len slots for a forward of [B, seq_len] tokens. Returns their
        position_ids [B, T] (0 on padding), the attention mask, and one KVLayer per layer."""
        slots = self.position + torch.arange(seq_len, device=self.position.device)  # [T]
        position_ids = (slots - self.padding[:, None]).clamp(min=0)
        fresh = self.empty
        if fresh and not self.padded:
            mask = build_mask(None, self.batch_size, seq_len, window, slots.device)  # None: causal
        else:
            n_keys = seq_len if fresh else self.max_len
            mask = padded_mask(slots, self.padding, window, n_keys, self.dtype)
        self.position += seq_len  # in place: a replayed CUDA graph advances it too
        self.empty = False
        return position_ids, mask, self.layers(slots, fresh)

    def layers(self, slots: torch.Tensor, fresh: bool = False) -> list[KVLayer]:
        """One KVLayer per layer, writing a forward's tokens at `slots` [T] (what `claim` and views
        that lay the tokens out otherwise return to the model)."""
        return [KVLayer(k, v, slots, fresh) for k, v in zip(self.keys, self.values, strict=True)]
