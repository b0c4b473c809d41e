"""Tree attention on the KV cache: one forward of the base model over a tree of candidate tokens.

Medusa verifies its candidates in one forward: the N nodes of a tree (tree.py), in the order of
their depths, parents before children. `TreeCache` is a view on the KV cache that the model takes
as its cache (models/cache.py): its `claim` puts the N tokens in the N slots after the cached
prefix, gives node i the position the prefix's length plus depth[i], and a mask under which it
sees the prefix (as a one-token step at that position would: left padding and sliding window
apply), its ancestors and itself, and no other node. After the forward, `keep` moves the keys and
values of one root-to-node path into the slots right after the prefix, in order, and ends the
cache there: the cache is then as if that path had been fed token by token, and the rest of the
tree is written over by the next forward.
"""

import torch

from ligerzoo.inference import KVCache
from ligerzoo.medusa.tree import MedusaTree
from ligerzoo.models.attention import padded_mask


def tree_mask(start: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor, padding: torch.Tensor,
              window: int | None, n_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive [B, 1, N, n_keys] mask of a tree of N tokens at cache slots start..start+N-1
    (start a device scalar) after a cached prefix: token i, which continues the prefix at slot
    start + depths[i], sees the prefix as `padded_mask` would from that slot, and of the tree only
    its ancestors and itself (ancestors [N, N] bool), within the window counted in depths."""
    n_nodes = depths.shape[0]
    mask = padded_mask(start + depths, padding, window, n_keys, dtype)  # right for the prefix's keys
    node = torch.arange(n_keys, device=depths.device) - start  # [S]: the tree node at each slot
    in_tree = (node >= 0) & (node < n_nodes)
    node = node.clamp(0, n_nodes - 1)
    keep = ancestors[:, node]  # [N, S]
    if window is not None:
        keep = keep & (depths[:, None] - depths[node][None, :] < window)
    tree = torch.zeros(keep.shape, dtype=dtype, device=depths.device).masked_fill_(~keep, float("-inf"))
    # Slots past the tree are beyond every token's own slot, so padded_mask already rules them out.
    return torch.where(in_tree, tree, mask)


class TreeCache:
    """The KV cache `cache` as a forward of the tree's nodes sees it: model.trunk(tokens [B, N],
    cache=TreeCache(cache, tree)) with the same tree in every row, after the prompt went through
    `cache`; then keep(path, count). The view holds no buffers: the keys and values are the cache's.
    """

    def __init__(self, cache: KVCache, tree: MedusaTree):
        self.cache, self.tree = cache, tree
        self.start: torch.Tensor | None = None  # the tree's first slot, from claim until keep

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    def claim(self, seq_len: int, window: int | None):
        """Take the next N slots for a forward of the tree's N tokens: token i's position is the
        prefix's length plus depths[i], and it attends to the prefix, its ancestors and itself.
        Returns what KVCache.claim returns."""
        cache, tree = self.cache, self.tree
        if seq_len != tree.size:
            raise ValueError(f"a forward of {seq_len} tokens through a tree of {tree.size} nodes: pass one "
                             f"token per node, in the tree's order")
        if cache.empty:
            raise ValueError("a tree forward extends a cached prefix: run the prompt through the cache first")
        start = cache.position.clone()
        slots = start + torch.arange(tree.size, device=start.device)  # [N]
        position_ids = start + tree.depths - cache.padding[:, None]  # [B, N]
        mask = tree_mask(start, tree.depths, tree.ancestors, cache.padding, window, cache.max_len, cache.dtype)
        cache.position += tree.size  # in place: a replayed CUDA graph advances it too
        self.start = start
        return position_ids, mask, cache.layers(slots)

    def keep(self, nodes: torch.Tensor, count: torch.Tensor | int) -> None:
        """After a tree forward: keep tree tokens nodes[:count] (nodes [M] indices into the tree, a
        root-to-node path; count a device scalar, so no host sync) in the slots right after the
        prefix, in that order; the next forward writes after them, over the rest of the tree."""
        if self.start is None:
            raise ValueError("keep() follows a tree forward through this view; there was none since the last keep")
        sources = self.start + nodes
        targets = self.start + torch.arange(nodes.shape[0], device=nodes.device)
        for cached in (*self.cache.keys, *self.cache.values):
            # index_select copies first: a path may move onto slots it is read from.
            cached.index_copy_(2, targets, cached.index_select(2, sources))
        self.cache.position.copy_(self.start + count)
        self.start = None
