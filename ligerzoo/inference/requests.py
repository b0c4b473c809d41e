"""What a generation request may ask for, checked before any computation: the prompts (a tensor
or lists of token ids) and the sampling settings, with errors that say what to change. Plain and
Medusa decoding take their requests through the same two functions."""

import operator

import torch


def prompt_lists(input_ids) -> list[list[int]]:
    """The prompts of a [B, T] integer tensor or a list of token-id lists, as lists of ints; a
    ValueError for anything else, an empty prompt or a value that is not a token id."""
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
