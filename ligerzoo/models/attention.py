"""Who may attend to whom, and the attention call.

One predicate, `mask_predicate`, defines the mask: causal; within one document when position_ids
restart inside a row (packed documents); within the sliding window when the model has one. The
model builds the mask once per forward, in the form the attention call wants:

- No position_ids and no window shorter than the sequence: no mask at all, SDPA with
  `is_causal=True` (the flash kernel on the GPU).
- On CUDA: a flex_attention `BlockMask`. The predicate is evaluated per 128 x 128 tile of
  (query, key): tiles it rules out entirely (beyond the window, in another document, above the
  diagonal) are skipped, so a window of W costs O(T * W) rather than O(T^2), and no dense [T, T]
  mask is ever kept. Both `create_block_mask` and `flex_attention` run compiled (eager
  flex_attention is a reference implementation that materialises the scores).
- Elsewhere (CPU): SDPA with a dense boolean [B, 1, T, T] mask from the same predicate.

Passing position_ids selects the document-aware path (its cost is a block mask per forward):
nothing here reads tensor values on the host to find out whether a row is really packed.

Generation with a KV cache (inference/kv_cache.py) uses the same predicate: left padding is a
document of its own, and the mask is an additive [B, 1, T, S] tensor over the cache's S slots
(`padded_mask`), small enough for a decode step (T = 1) to rebuild it on the device every step,
inside a CUDA graph, and attention over the cache is `attend_grouped`. A tree of candidate tokens
(Medusa's verification forward, medusa/tree_attention.py) gets the same mask over the prefix.
"""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# Device types whose masks are flex_attention BlockMasks (tests add "cpu" to run that path there).
FLEX_DEVICES = ("cuda",)

AttentionMask = torch.Tensor | BlockMask | None


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] int32 document index of each token. A document starts wherever a position does not
    follow the previous one by 1 (a restart at 0 is the usual case), as transformers splits
    packed sequences."""
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return F.pad(starts.cumsum(-1), (1, 0)).to(torch.int32)


def mask_predicate(documents: torch.Tensor | None, window: int | None):
    """The attention mask as flex_attention's `mask_mod(batch, head, q, kv) -> keep`: causal,
    same document (documents [B, T] or None), query - key < window (or no window). Works on
    broadcast index tensors as well, which is how the dense mask is built."""

    def allowed(batch, head, q, kv):
        keep = kv <= q
        if window is not None:
            keep = keep & (q - kv < window)
        if documents is not None:
            keep = keep & (documents[batch, q] == documents[batch, kv])
        return keep

    return allowed


def build_mask(position_ids: torch.Tensor | None, batch: int, seq_len: int, window: int | None,
               device: torch.device) -> AttentionMask:
    """The mask for `batch` rows of `seq_len` tokens (see the module docstring for its three
    forms); position_ids [batch or 1, seq_len] or None."""
    if window is not None and seq_len <= window:
        window = None  # the window covers the whole sequence: plain causal
    if position_ids is None and window is None:
        return None
    documents = None
    if position_ids is not None:
        # flex_attention calls the predicate with the query's batch index even for a block mask
        # built for one row, so a shared row of positions is expanded (a view) to every row.
        documents = document_ids(position_ids).expand(batch, -1)
    else:
        batch = 1  # the window alone is the same for every row
    allowed = mask_predicate(documents, window)
    if device.type in FLEX_DEVICES:
        make = _compiled(create_block_mask) if device.type == "cuda" else create_block_mask
        return make(allowed, batch, None, seq_len, seq_len, device=device)
    positions = torch.arange(seq_len, device=device)
    batches = torch.arange(batch, device=device)[:, None, None, None]
    return allowed(batches, None, positions[:, None], positions[None, :])  # [B, 1, T, T] or [T, T]


def padded_mask(slots: torch.Tensor, padding: torch.Tensor, window: int | None, n_keys: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The additive [B, 1, T, n_keys] mask (0 or -inf, in `dtype`) of queries at cache slots
    `slots` [T] over slots 0..n_keys-1 of rows left-padded by `padding` [B] tokens (a KV cache):
    causal, within the window, and the padding a document of its own. Additive rather than boolean
    because SDPA would convert a boolean mask in every layer."""
    keys = torch.arange(n_keys, device=slots.device)
    documents = (keys >= padding[:, None]).to(torch.int32)  # [B, n_keys]: 0 padding, 1 the prompt
    batches = torch.arange(padding.shape[0], device=slots.device)[:, None, None, None]
    keep = mask_predicate(documents, window)(batches, None, slots[:, None], keys[None, :])
    return torch.zeros(keep.shape, dtype=dtype, device=slots.device).masked_fill_(~keep, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Softmax attention of q [B, T, Hq, D] over k, v [B, T, Hk, D] (any strides; Hq a multiple of
    Hk: grouped-query attention without copying k and v) -> [B, T, Hq, D]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D], as both kernels want
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        flex = _compiled(flex_attention) if q.is_cuda else flex_attention
        out = flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
    return out.transpose(1, 2)


def attend_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q [B, T, Hq, D] over a cache's k, v [B, Hk, S, D] with an additive mask
    [B, 1, T, S] -> [B, T, Hq, D]. The G = Hq / Hk query heads that share a key head are folded
    into the query rows ([B, Hk, T G, D]), so k and v are read once per key head by whichever SDPA
    kernel runs, none of which has to support grouped-query attention (for a decode step, T = 1,
    the fold is a view)."""
    batch, seq_len, n_heads, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    q = q.view(batch, seq_len, n_kv_heads, group, head_dim).transpose(1, 2)  # [B, Hk, T, G, D]
    q = q.reshape(batch, n_kv_heads, seq_len * group, head_dim)
    mask = mask[:, :, :, None, :].expand(-1, -1, -1, group, -1).reshape(-1, 1, seq_len * group, n_keys)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, Hk, T G, D]
    return out.view(batch, n_kv_heads, seq_len, group, head_dim).transpose(1, 2).reshape(
        batch, seq_len, n_heads, head_dim)


def _compiled(fn):
    """fn compiled once per process; fn itself while torch.compile traces (the caller is being
    compiled, so it gets fused there)."""
    return fn if torch.compiler.is_compiling() else _compile_once(fn)


@functools.cache
def _compile_once(fn):
    return torch.compile(fn)

