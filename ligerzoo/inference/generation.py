"""Generation with a static KV cache: greedy decoding, temperature / top-k / top-p sampling, stop
tokens, batched prompts of different lengths, tokens streamed as they are produced.

The prompts, left-padded to the longest (see kv_cache.py), go through the model in one forward,
the prefill, which fills the cache (flash attention when no prompt is padded). Every further token
is a decode step: a forward of one token per row over the cache. On the GPU the decode step is
captured once in a CUDA graph and replayed (cuda_graphs.py); the graph and its cache are kept for
the next call with the same batch size and cache length. Only the last position's hidden state
goes through the head: the prefill needs the logits of one position, not of the whole prompt.

The next token is chosen on the device (the argmax, or a sample drawn without a host sync). The
host reads each step's tokens one step late, when the following step is already queued, to stream
them and to see when every row has stopped, so the GPU never waits for the host.
"""

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from ligerzoo.inference.cuda_graphs import CUDAGraphStep, KeptGraphs, graph_key
from ligerzoo.inference.kv_cache import KVCache
from ligerzoo.inference.requests import check_request, prompt_lists
from ligerzoo.inference.sampling import sample
from ligerzoo.models import ModelConfig, Transformer


@torch.no_grad()
def generate(
    model: Transformer,
    input_ids: torch.Tensor | list[list[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Iterable[int] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    seed: int | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt: max_new_tokens of them, or fewer when the row produced a
    stop token (it ends the row's list).

    input_ids: a [B, T] integer tensor, or a list of B token-id lists of any lengths (at least one
        token each).
    temperature: 0 for greedy decoding; otherwise a sample from softmax(logits / temperature),
        restricted to the top_k most likely tokens and to the fewest most likely tokens whose
        probabilities reach top_p (when given).
    stop_ids: token ids that end a row (e.g. the tokenizer's `stop_ids`). A row that stopped stays
        in the batch, fed padding, and reports nothing more.
    on_token: called as on_token(row, token_id) for every returned token, in order, as soon as the
        host knows it (one decode step after it was chosen).
    seed: seeds the sampling (a torch.Generator on the model's device): equal seeds, equal samples.
    vocab_size: generate only ids below it: a tokenizer's size, where the model's vocabulary is
        padded past it (rows no text maps to).
    """
    config: ModelConfig = model.config
    prompts = prompt_lists(input_ids)
    stop_set = check_request(config, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids)
    if vocab_size is not None and not 1 <= vocab_size <= config.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is outside [1, {config.vocab_size}], the model's vocabulary")
    device = model.output_weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(sorted(stop_set), dtype=torch.long, device=device)
    pad_id = config.pad_token_id if config.pad_token_id in range(config.vocab_size) else 0
    prompt_len = max(map(len, prompts))
    padding = [prompt_len - len(prompt) for prompt in prompts]

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        decoder = _decoder(model, len(prompts), prompt_len + max_new_tokens, keep=max_new_tokens > 1)
        decoder.cache.reset(padding)
        rows = [[pad_id] * n + prompt for n, prompt in zip(padding, prompts, strict=True)]
        logits = next_logits(model, torch.tensor(rows, device=device), decoder.cache)  # the prefill
        stream = _TokenStream(len(prompts), max_new_tokens, stop_set, on_token, device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            if step > 0:
                logits = decoder(model)  # [B, V], from decoder.tokens
            next_tokens = sample(logits[:, :vocab_size], temperature, top_k, top_p, generator)
            if stop_set:
                next_tokens = torch.where(finished, pad_id, next_tokens)
                finished |= torch.isin(next_tokens, stops)
            decoder.tokens.copy_(next_tokens[:, None])
            stream.push(next_tokens)
            if stream.read_until(step):  # every step before this one; the GPU is busy with it
                break
        stream.read_until(max_new_tokens)
    return stream.outputs


def next_logits(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """[B, V]: the logits after tokens [B, T], run through the model over the cache (the head reads
    the last position only)."""
    hidden, _ = model.trunk(tokens, cache=cache)  # [B, T, H]
    return F.linear(hidden[:, -1:], model.output_weight)[:, -1]


class _TokenStream:
    """The tokens chosen on the device, copied to the host step by step and read there one step
    late: collected per row until the row's stop token, and passed to on_token."""

    def __init__(self, batch_size, max_steps, stop_ids, on_token, device):
        self.on_token, self.stop_ids = on_token, stop_ids
        self.host = torch.empty(max_steps, batch_size, dtype=torch.long, pin_memory=device.type == "cuda")
        self.copied = []  # per pushed step: a CUDA event marking its copy, or None on the CPU
        self.n_read = 0
        self.outputs = [[] for _ in range(batch_size)]
        self.running = [True] * batch_size

    def push(self, tokens: torch.Tensor) -> None:
        self.host[len(self.copied)].copy_(tokens, non_blocking=True)
        event = None
        if tokens.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self.copied.append(event)

    def read_until(self, step: int) -> bool:
        """Read every pushed step before `step` not read yet; True when every row has stopped."""
        while self.n_read < min(step, len(self.copied)):
            if self.copied[self.n_read] is not None:
                self.copied[self.n_read].synchronize()
            for row, token in enumerate(self.host[self.n_read].tolist()):
                if self.running[row]:
                    self.outputs[row].append(token)
                    self.running[row] = token not in self.stop_ids
                    if self.on_token is not None:
                        self.on_token(row, token)
            self.n_read += 1
        return not any(self.running)


class Decoder(CUDAGraphStep):
    """A KV cache and the decode step over it: decoder(model) runs `tokens` [B, 1] (the last chosen
    tokens) through the model and returns the next logits [B, V]. On the GPU the step is captured
    in a CUDA graph at its first call, and each call replays it."""

    what = "the decode step"

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        self.cache = KVCache(config, batch_size, max_len, device=device, dtype=dtype)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        # Each warm-up forward writes the next slot's keys and values (which the first real step
        # rewrites) and moves the cache on, which is put back.
        super().__init__(state=[self.cache.position], capture=self.tokens.device.type == "cuda")

    def forward(self, model: Transformer) -> torch.Tensor:
        return next_logits(model, self.tokens, self.cache)


# model -> its last GPU decoder, kept for the next call.
KEPT_DECODERS = KeptGraphs()


def _decoder(model: Transformer, batch_size: int, length: int, keep: bool) -> Decoder:
    """A decoder whose cache holds `length` tokens per row: on the GPU the kept one when it fits
    (same batch size, rounded length and parameter storage), else a new one, kept if `keep`."""
    weight = model.output_weight
    config, device, dtype = model.config, weight.device, weight.dtype
    if device.type != "cuda":
        return Decoder(config, batch_size, length, device, dtype)
    length, where = graph_key(length, model)
    return KEPT_DECODERS.reuse(model, (batch_size, length, where),
                               lambda: Decoder(config, batch_size, length, device, dtype), keep=keep)
