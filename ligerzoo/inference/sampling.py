"""Choosing the next token on the device: the argmax, or a draw from the softmax restricted by
temperature, top-k and top-p, without a host sync (so a decode step can be queued, or captured in
a CUDA graph, while the host reads the previous one)."""

import torch


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token [B] of each row of logits [B, V], chosen on the device without a host sync:
    the argmax when temperature is 0, else a draw from softmax(logits / temperature) over the
    top_k most likely tokens and the fewest most likely tokens whose probabilities reach top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # A token goes when the more likely ones already reach top_p; the most likely always stays.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
    # argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p (the first of the exponential clocks of
    # rates p_i to ring), and unlike torch.multinomial it needs no normalised p and no host sync.
    clocks = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / clocks.clamp_(min=torch.finfo(clocks.dtype).tiny)).argmax(dim=-1)

