"""Generation (ligerzoo/inference/generation.py) and the KV cache (ligerzoo/inference/kv_cache.py) on
tiny float32 models: cached greedy decoding against recomputing the whole sequence each step and against
transformers' `generate`; batches of different prompt lengths against one prompt at a time;
sliding windows, Mixtral, stop tokens, streaming, seeded sampling, and bad requests.

The models have weights of unit gain (as in test_models.py), so the logits are spread out and
an argmax is not decided by float32 rounding: token sequences are compared exactly.
"""

import os
from unittest import mock

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import DEVICE
from ligerzoo.hf.pretrained import from_pretrained
from ligerzoo.inference import KVCache, generate, sample
from ligerzoo.inference.generation import Decoder
from ligerzoo.models import ModelConfig, build_model

VOCAB = 128
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
FAMILIES = {
    "llama": dict(model_type="llama", rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                  tie_word_embeddings=True),
    "mistral_window_6": dict(model_type="mistral", sliding_window=6),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
}


def unit_gain_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights that make every layer matter (transformers' std 0.02 leaves each one nearly
    the identity, and the logits nearly flat)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return model.eval()


def tiny(family="llama"):
    return unit_gain_(build_model(ModelConfig(**TINY, **FAMILIES[family]), device=DEVICE))


def prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


@torch.no_grad()
def recomputed_greedy(model, batch, max_new_tokens):
    """Greedy decoding without a cache, prompts of one length: the whole sequences through the
    model for every token. On the CPU the kernels take their PyTorch paths here (the interpreter,
    which runs the cached path under test, would take most of the test's time)."""
    sequences = torch.tensor(batch, device=DEVICE)
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
        for _ in range(max_new_tokens):
            next_tokens = model(sequences).logits[:, -1].argmax(dim=-1, keepdim=True)
            sequences = torch.cat([sequences, next_tokens], dim=1)
    return sequences[:, len(batch[0]):].tolist()


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny Llama 3.2-style transformers model (GQA, llama3 rope scaling, tied embeddings) saved
    with transformers' save_pretrained, and the same weights loaded by ligerzoo from that directory."""
    fields = {**TINY, **FAMILIES["llama"]}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    unit_gain_(hf_model)
    hf_model.generation_config.eos_token_id = None  # generate the full max_new_tokens
    path = tmp_path_factory.mktemp("hf_llama")
    hf_model.save_pretrained(path)
    return hf_model.to(DEVICE), from_pretrained(path, device=DEVICE)


# --- greedy decoding against references ------------------------------------------------------
def test_cached_greedy_equals_recomputing_the_sequence_each_step(hf_checkpoint):
    _, model = hf_checkpoint
    batch = prompts([7, 7])  # equal lengths: the prefill takes the unmasked (flash) path
    assert generate(model, torch.tensor(batch), max_new_tokens=12) == recomputed_greedy(model, batch, 12)


def test_greedy_equals_transformers_generate(hf_checkpoint):
    hf_model, model = hf_checkpoint
    input_ids = torch.tensor(prompts([9, 9], seed=1), device=DEVICE)
    expected = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=10,
                                 do_sample=False, pad_token_id=0)
    assert generate(model, input_ids, max_new_tokens=10) == expected[:, 9:].tolist()


def test_left_padded_batch_equals_transformers_generate(hf_checkpoint):
    hf_model, model = hf_checkpoint
    batch = prompts([4, 9, 6], seed=2)
    input_ids = torch.tensor([[0] * (9 - len(p)) + p for p in batch], device=DEVICE)
    attention_mask = (torch.arange(9) >= torch.tensor([9 - len(p) for p in batch])[:, None]).long().to(DEVICE)
    expected = hf_model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                                 pad_token_id=0)
    assert generate(model, batch, max_new_tokens=8) == expected[:, 9:].tolist()


def test_batch_of_different_prompt_lengths_equals_one_prompt_at_a_time(hf_checkpoint):
    _, model = hf_checkpoint
    batch = prompts([3, 9, 1, 6], seed=3)
    one_by_one = [generate(model, [prompt], max_new_tokens=8)[0] for prompt in batch]
    assert generate(model, batch, max_new_tokens=8) == one_by_one


@pytest.mark.parametrize("family, lengths", [("mistral_window_6", [9, 5]), ("mistral_window_6", [9, 9]),
                                             ("mixtral", [9, 5])])
def test_family_with_cache_equals_recomputing(family, lengths):
    """Mistral: prompt + new tokens (up to 20) run far past the window of 6, with a padded row (the
    prefill's mask holds window and padding) and without (the prefill's plain window mask);
    Mixtral: the decode steps route one token per row."""
    model = tiny(family)
    batch = prompts(lengths, seed=4)
    expected = [recomputed_greedy(model, [prompt], 11)[0] for prompt in batch]
    assert generate(model, batch, max_new_tokens=11) == expected


def test_cache_forward_gives_the_logits_of_the_full_forward():
    model = tiny("llama")
    input_ids = torch.tensor(prompts([12, 12], seed=5), device=DEVICE)
    cache = KVCache(model.config, batch_size=2, max_len=16, device=DEVICE)
    with torch.no_grad():
        expected = model(input_ids).logits
        chunks = [model(input_ids[:, :8], cache=cache).logits]
        chunks += [model(input_ids[:, i:i + 1], cache=cache).logits for i in range(8, 10)]
        chunks.append(model(input_ids[:, 10:], cache=cache).logits)  # a chunk of 2 after the steps
    # float32, logits of a few units: the cache changes only the order of the sums (about 1e-6)
    assert torch.allclose(torch.cat(chunks, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_trunk_gives_the_hidden_states_the_forward_puts_through_the_head():
    model = tiny("mixtral")
    input_ids = torch.tensor(prompts([9, 9], seed=5), device=DEVICE)
    with torch.no_grad():
        out = model(input_ids)
        hidden, aux_loss = model.trunk(input_ids)
    assert hidden.shape == (2, 9, TINY["hidden_size"])
    torch.testing.assert_close(torch.nn.functional.linear(hidden, model.output_weight), out.logits)
    torch.testing.assert_close(aux_loss, out.aux_loss)


# --- stop tokens and streaming ---------------------------------------------------------------
def test_stop_ids_end_each_row_after_its_first_stop_token():
    model = tiny("llama")
    batch = prompts([5, 8], seed=6)
    full = generate(model, batch, max_new_tokens=12)
    stop = full[0][3]  # row 0 stops at its 4th token at the latest
    cut = [row[:row.index(stop) + 1] if stop in row else row for row in full]
    streamed = []
    out = generate(model, batch, max_new_tokens=12, stop_ids=[stop],
                   on_token=lambda row, token: streamed.append((row, token)))
    assert out == cut and len(out[0]) <= 4
    for row in range(2):  # the callback saw exactly the returned tokens, in order
        assert [t for r, t in streamed if r == row] == out[row]


def test_generation_ends_one_step_after_every_row_has_stopped(monkeypatch):
    model = tiny("llama")
    full = generate(model, prompts([6]), max_new_tokens=10)[0]
    stop = full[1]
    steps, streamed = [], []
    forward = Decoder.forward  # on the CPU each decode step runs it eagerly
    monkeypatch.setattr(Decoder, "forward", lambda self, m: steps.append(1) or forward(self, m))
    out = generate(model, prompts([6]), max_new_tokens=10, stop_ids={stop},
                   on_token=lambda row, token: streamed.append(token))
    assert out == [full[:full.index(stop) + 1]] and streamed == out[0]
    # the host learns of the stop token one step late: at most one decode step is wasted
    assert len(steps) <= len(out[0])


# --- sampling --------------------------------------------------------------------------------
def test_sampling_with_a_seed_is_reproducible():
    model = tiny("llama")
    batch = prompts([5, 3], seed=7)
    first = generate(model, batch, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=123)
    assert generate(model, batch, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=123) == first
    assert generate(model, batch, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=124) != first


def test_top_k_1_and_tiny_top_p_sample_the_greedy_tokens():
    model = tiny("llama")
    batch = prompts([5, 3], seed=8)
    greedy = generate(model, batch, max_new_tokens=8)
    assert generate(model, batch, max_new_tokens=8, temperature=1.0, top_k=1, seed=0) == greedy
    assert generate(model, batch, max_new_tokens=8, temperature=2.0, top_p=1e-6, seed=0) == greedy


def test_sample_draws_only_from_the_top_k_and_top_p_tokens_in_proportion():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, -1).to(DEVICE)
    generator = torch.Generator(DEVICE).manual_seed(0)

    def counts(**kwargs):
        return torch.bincount(sample(logits, generator=generator, **kwargs), minlength=4).tolist()

    # temperature 1: frequencies within 4 standard deviations (sqrt(p (1 - p) / n) <= 0.0036) of p
    frequencies = torch.tensor(counts(temperature=1.0)) / 20000
    assert torch.allclose(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)
    assert counts(temperature=1.0, top_k=2)[2:] == [0, 0]
    assert counts(temperature=1.0, top_p=0.8)[2:] == [0, 0]  # 0.5 + 0.3 reach 0.8
    assert counts(temperature=1.0, top_p=0.81)[3] == 0  # needs the third token, not the fourth


# --- bad requests ----------------------------------------------------------------------------
BAD_REQUESTS = {
    "empty prompt": (dict(input_ids=[[1, 2], []]), r"prompt 1 is empty"),
    "no prompt": (dict(input_ids=[]), r"holds no prompt"),
    "id past the vocabulary": (dict(input_ids=[[1, VOCAB]]),
                               r"token id 128, outside the vocabulary \[0, 128\)"),
    "negative id": (dict(input_ids=torch.tensor([[3, -1]])), r"token id -1, outside the vocabulary"),
    "not integers": (dict(input_ids=[[1.5, 2]]), r"not an integer token id"),
    "flat list": (dict(input_ids=[1, 2, 3]), r"list of token-id lists \(one prompt: \[ids\]\)"),
    "float tensor": (dict(input_ids=torch.zeros(1, 3)), r"integer \[B, T\] tensor"),
    "prompt too long": (dict(input_ids=[[1] * 60], max_new_tokens=5),
                        r"60 tokens plus max_new_tokens=5 exceeds the model's context of 64 tokens"),
    "no new tokens": (dict(max_new_tokens=0), r"max_new_tokens must be a positive integer"),
    "negative temperature": (dict(temperature=-1.0), r"temperature must be a finite number >= 0"),
    "top_k when greedy": (dict(top_k=5), r"set temperature > 0"),
    "top_p out of range": (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
    "top_k zero": (dict(temperature=1.0, top_k=0), r"top_k must be a positive integer"),
    "stop id past the vocabulary": (dict(stop_ids=[VOCAB]), r"stop id 128 is not a token id"),
    "single stop id": (dict(stop_ids=2), r"pass \[2\]"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_raises_a_clear_error(name):
    model = build_model(ModelConfig(**TINY), device="meta")  # rejected before any computation
    request, message = BAD_REQUESTS[name]
    with pytest.raises(ValueError, match=message):
        generate(model, **{"input_ids": [[1, 2, 3]], "max_new_tokens": 4, **request})


def test_forward_with_a_cache_rejects_labels_position_ids_and_other_batch_sizes():
    model = tiny("llama")
    cache = KVCache(model.config, batch_size=2, max_len=8, device=DEVICE)
    input_ids = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="with a cache, labels must be None"):
        model(input_ids, labels=input_ids, cache=cache)
    with pytest.raises(ValueError, match="with a cache, position_ids must be None"):
        model(input_ids, position_ids=torch.arange(3, device=DEVICE)[None], cache=cache)
    with pytest.raises(ValueError, match="made for 2"):
        model(input_ids[:1], cache=cache)


def test_vocab_size_keeps_generation_inside_a_smaller_tokenizer():
    """A model whose vocabulary is padded past its tokenizer's never emits the padding ids."""
    model = tiny()
    prompt = [[1, 5, 9, 33]]
    free = generate(model, prompt, max_new_tokens=12)[0]
    limit = max(free)  # the largest id it chose is now past the end
    limited = generate(model, prompt, max_new_tokens=12, vocab_size=limit)[0]
    assert max(limited) < limit and limited != free
    with pytest.raises(ValueError, match=f"vocab_size={VOCAB + 1} is outside"):
        generate(model, prompt, max_new_tokens=4, vocab_size=VOCAB + 1)
