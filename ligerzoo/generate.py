"""Generation with a static KV cache: greedy decoding, temperature / top-k / top-p sampling, stop
tokens, batched prompts of different lengths, tokens streamed as they are produced.

The prompts, left-padded to the longest (see models/kv_cache.py), go through the model in one
forward, the prefill, which fills the cache (flash attention when no prompt is padded). Every
further token is a decode step: a forward of one token per row over the cache. On the GPU the
decode step is captured once in a CUDA graph and replayed. Its ~200 kernels (a dozen a layer)
would otherwise take longer to launch from Python than to run at small batch sizes, and the step
would be bound by the host instead of by reading the weights. The graph and its cache are kept
for the next call with the same batch size and cache length.

The next token is chosen on the device (the argmax, or a sample drawn without a host sync). The
host reads each step's tokens one step late, when the following step is already queued, to stream
them and to see when every row has stopped, so the GPU never waits for the host.
"""

import contextlib
import operator
import warnings
import weakref
from collections.abc import Callable, Iterable

import torch

from ligerzoo.models import ModelConfig, Transformer
from ligerzoo.models.kv_cache import KVCache

# On the GPU the cache length is rounded up to a multiple of this, so that calls with nearby
# lengths share one CUDA graph (and the attention mask's rows stay aligned for SDPA's kernels).
CACHE_LENGTH_MULTIPLE = 128
# Forwards run before capturing the decode step: they compile the Triton kernels for one-token
# shapes and set up cuBLAS, neither of which may happen during capture.
WARMUP_STEPS = 2


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
        tokens = torch.tensor(rows, device=device)
        logits = model(tokens, cache=decoder.cache, logits_to_keep=1).logits[:, -1]  # the prefill
        stream = _TokenStream(len(prompts), max_new_tokens, stop_set, on_token, device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            if step > 0:
                logits = decoder.step(model)  # [B, V], from decoder.tokens
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


class _Decoder:
    """A KV cache and the decode step over it: a forward of `tokens` [B, 1] (the last chosen
    tokens) that returns the next logits [B, V]. On the GPU the step is captured in a CUDA graph
    at its first use, and each call replays it."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype, key=None):
        self.cache = KVCache(config, batch_size, max_len, device=device, dtype=dtype)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.key = key
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output
        self.eager = self.tokens.device.type != "cuda"

    def step(self, model: Transformer) -> torch.Tensor:
        if self.graph is None and not self.eager:
            self._capture(model)
        if self.eager:
            return self._forward(model)
        self.graph.replay()
        return self.logits

    def _forward(self, model: Transformer) -> torch.Tensor:
        return model(self.tokens, cache=self.cache, logits_to_keep=1).logits[:, -1]

    def _capture(self, model: Transformer) -> None:
        # Each warm-up forward writes the next slot's keys and values (which the first real step
        # rewrites) and then moves the cache back.
        position = self.cache.position.clone()
        captured = capture_step(lambda: self._forward(model), lambda: self.cache.position.copy_(position),
                                "the decode step")
        if captured is None:
            self.eager = True
            return
        self.graph, self.logits = captured


def capture_step(step: Callable[[], torch.Tensor], undo: Callable[[], None], what: str):
    """(graph, output): step() captured in a CUDA graph, whose replays rerun it over the same
    buffers; or None, with a warning, when it cannot be captured (it must then run eagerly).
    WARMUP_STEPS calls of step() run first on a side stream, as capture requires, each followed
    by undo(), which must take back what it changed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            step()
            undo()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            output = step()
    except RuntimeError as error:  # e.g. an op that syncs with the host
        warnings.warn(f"{what} could not be captured in a CUDA graph, so it runs eagerly (slower): {error}",
                      stacklevel=4)
        return None
    return graph, output


# model -> its last GPU decoder, kept for the next call (weak: it goes with the model).
_KEPT: "weakref.WeakKeyDictionary[Transformer, _Decoder]" = weakref.WeakKeyDictionary()


def graph_key(length: int, *modules: torch.nn.Module) -> tuple[int, tuple[int, ...]]:
    """(cache length rounded up to CACHE_LENGTH_MULTIPLE, the modules' parameter addresses): what
    a kept CUDA graph must match. It reads the parameters at fixed addresses, so after
    `model.to(...)` it must be redone."""
    rounded = -(-length // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
    return rounded, tuple(p.data_ptr() for module in modules for p in module.parameters())


def _decoder(model: Transformer, batch_size: int, length: int, keep: bool) -> _Decoder:
    """A decoder whose cache holds `length` tokens per row: on the GPU the kept one when it fits
    (same batch size, rounded length and parameter storage), else a new one, kept if `keep`."""
    weight = model.output_weight
    if weight.device.type != "cuda":
        return _Decoder(model.config, batch_size, length, weight.device, weight.dtype)
    length, where = graph_key(length, model)
    key = (batch_size, length, where)
    kept = _KEPT.get(model)
    if kept is not None and kept.key == key:
        return kept
    if keep:
        _KEPT.pop(model, None)  # free the old graph and cache before allocating the new ones
    decoder = _Decoder(model.config, batch_size, length, weight.device, weight.dtype, key)
    if keep:
        _KEPT[model] = decoder
    return decoder


def prompt_lists(input_ids) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer [B, T] tensor or a list of token-id lists, got a "
                             f"{input_ids.dtype} tensor of shape {list(input_ids.shape)}")
        prompts = input_ids.tolist()
    elif isinstance(input_ids, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in input_ids):
        prompts = [list(prompt) for prompt in input_ids]
    else:
        raise ValueError(f"input_ids must be a [B, T] tensor or a list of token-id lists (one prompt: "
                         f"[ids]), got {type(input_ids).__name__}")
    if not prompts:
        raise ValueError("input_ids holds no prompt")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token (e.g. BOS)")
        try:
            prompts[i] = [operator.index(token) for token in prompt]
        except TypeError:
            raise ValueError(f"prompt {i} holds a value that is not an integer token id: {prompt[:8]}") \
                from None
    return prompts


def check_request(config, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids) -> set[int]:
    """Raise a ValueError for any bad argument; return the stop ids as a set."""
    vocab = config.vocab_size
    for i, prompt in enumerate(prompts):
        outside = [token for token in prompt if not 0 <= token < vocab]
        if outside:
            raise ValueError(f"prompt {i} holds token id {outside[0]}, outside the vocabulary [0, {vocab})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    longest, context = max(map(len, prompts)), config.max_position_embeddings
    if longest + max_new_tokens > context:
        # Advise only what can fit: a prompt (at least one token) and at least one new token.
        where = f"the model's context of {context} tokens (max_position_embeddings)"
        if longest >= context:
            fix = f"shorten the prompt to at most {context - max_new_tokens} tokens"
            if max_new_tokens >= context:
                fix = f"shorten the prompt and lower max_new_tokens: together at most {context} tokens"
            raise ValueError(f"a prompt of {longest} tokens leaves no room for a new token in {where}: {fix}")
        if max_new_tokens >= context:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt of {longest} "
                             f"tokens in {where}: lower max_new_tokens to at most {context - longest}")
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds {where}: lower "
            f"max_new_tokens to at most {context - longest}, or shorten the prompt to at most "
            f"{context - max_new_tokens} tokens"
        )
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("top_k and top_p restrict sampling: set temperature > 0 (0 is greedy decoding)")
    if isinstance(stop_ids, int):
        raise ValueError(f"stop_ids must be a collection of token ids, got the int {stop_ids}: "
                         f"pass [{stop_ids}]")
    stop_set = set()
    for token in stop_ids if stop_ids is not None else ():
        if not isinstance(token, int) or not 0 <= token < vocab:
            raise ValueError(f"stop id {token!r} is not a token id in the vocabulary [0, {vocab})")
        stop_set.add(token)
    return stop_set
