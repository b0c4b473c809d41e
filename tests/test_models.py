"""The models against transformers on tiny random models: float32 logits, loss and every
gradient, for each family and config variant; packed documents; meta construction; errors.

transformers is imported here only (a test extra). Each case builds the transformers model from
its own config class; ours is built from that config's dict and filled from the transformers
state dict through hf/tensor_names.py (loading from files: test_checkpoint.py).
"""

import pytest
import torch
from conftest import DEVICE, assert_device_assert
from safetensors import safe_open
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from ligerzoo.hf.tensor_names import optional_names, tensor_map
from ligerzoo.models import ModelConfig, build_model
from ligerzoo.models import attention as attention_module

VOCAB, SEQ = 128, 24
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # with head_dim 16 and theta 5e5 the wavelengths fall on both sides of 64/4 and 64/1
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
MOE = dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.05, output_router_logits=True)

CASES = {  # name: (transformers model class, its config class, config fields)
    "llama2_mha": (LlamaForCausalLM, LlamaConfig, {**TINY, "num_key_value_heads": 4}),
    "llama31_rope_scaling_tied": (LlamaForCausalLM, LlamaConfig,
                                  {**TINY, "rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "head_dim_not_hidden_over_heads": (LlamaForCausalLM, LlamaConfig, {**TINY, "head_dim": 32}),
    "attention_and_mlp_bias": (LlamaForCausalLM, LlamaConfig,
                               {**TINY, "attention_bias": True, "mlp_bias": True}),
    "mistral_window_shorter_than_sequence": (MistralForCausalLM, MistralConfig,
                                             {**TINY, "sliding_window": 8}),
    "mixtral_top2_of_4": (MixtralForCausalLM, MixtralConfig, {**TINY, **MOE}),
}
# Relative error (in norm) of float32 results: both sides accumulate in float32, in different
# orders; the models agree to about 1e-6.
FLOAT32_TOL = 1e-4


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    # The floor keeps gradients that are zero in exact arithmetic (e.g. a key bias's: softmax
    # ignores a shift shared by all keys) from dividing rounding noise by rounding noise.
    diff = (actual.double() - expected.double()).norm()
    return (diff / max(expected.double().norm(), 1e-3)).item()


def make_hf_model(name):
    hf_class, config_class, fields = CASES[name]
    torch.manual_seed(0)
    # eager attention: the plain softmax(QK^T)V reference
    hf_model = hf_class(config_class(**fields, attn_implementation="eager")).eval().to(DEVICE)
    # transformers' init (std 0.02) leaves every layer nearly the identity; weights of unit gain
    # make each layer, and any mistake in it, show in the output.
    with torch.no_grad():
        for param_name, param in hf_model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif param.dim() == 1:
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
    return hf_model


def hub_tensors(hf_model, tensors: dict) -> dict:
    """transformers' in-memory names -> checkpoint names. transformers 5 holds Mixtral's experts
    stacked (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) and writes them per
    expert, `block_sparse_moe.experts.{e}.w1/w3/w2.weight`, on save."""
    inner = hf_model.config.intermediate_size
    out = {}
    for name, tensor in tensors.items():
        if isinstance(hf_model, MixtralForCausalLM):
            name = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith(".experts.gate_up_proj"):
            for e in range(tensor.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.w1.weight")] = tensor[e, :inner]
                out[name.replace("gate_up_proj", f"{e}.w3.weight")] = tensor[e, inner:]
        elif name.endswith(".experts.down_proj"):
            for e in range(tensor.shape[0]):
                out[name.replace("down_proj", f"{e}.w2.weight")] = tensor[e]
        else:
            out[name] = tensor
    return out


def load_hf_state(model, hf_state: dict) -> None:
    """param[index] = hf_state[name] for every entry of tensor_map(), checking that the map
    names exactly the checkpoint's tensors and covers every parameter element once."""
    mapping = tensor_map(model.config)
    expected = set(hf_state) - optional_names(model.config)
    assert set(mapping) == expected, f"missing: {expected - set(mapping)}, unknown: {set(mapping) - expected}"
    params = dict(model.named_parameters())
    written = {name: torch.zeros(p.shape, dtype=torch.int32) for name, p in params.items()}
    with torch.no_grad():
        for hf_name, (name, index) in mapping.items():
            region = params[name][index]
            assert region.shape == hf_state[hf_name].shape, f"{hf_name} -> {name}{index}"
            region.copy_(hf_state[hf_name])
            written[name][index] += 1
    for name, count in written.items():
        assert (count == 1).all(), f"{name}: elements written {count.min()} to {count.max()} times, not once"


def our_model(hf_model):
    model = build_model(ModelConfig.from_dict(hf_model.config.to_dict()), device=DEVICE)
    load_hf_state(model, hub_tensors(hf_model, hf_model.state_dict()))
    return model


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    labels = input_ids.clone()
    labels[0, 3:7] = -100
    labels[1, ::5] = -100
    return input_ids.to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_loss_and_gradients_match_transformers(name):
    hf_model = make_hf_model(name)
    model = our_model(hf_model)
    input_ids, labels = batch()

    expected = hf_model(input_ids, labels=labels)
    expected.loss.backward()
    with torch.no_grad():
        logits = model(input_ids).logits
    out = model(input_ids, labels=labels)
    out.loss.backward()

    assert out.logits is None
    assert rel_error(logits, expected.logits) < FLOAT32_TOL
    assert abs(out.loss.item() - expected.loss.item()) < FLOAT32_TOL * expected.loss.item()
    if name.startswith("mixtral"):  # the loss above includes router_aux_loss_coef * aux_loss
        assert abs(out.aux_loss.item() - expected.aux_loss.item()) < FLOAT32_TOL * expected.aux_loss.item()
    params = dict(model.named_parameters())
    hf_grads = hub_tensors(hf_model, {n: p.grad for n, p in hf_model.named_parameters()})
    for hf_name, (param_name, index) in tensor_map(model.config).items():
        error = rel_error(params[param_name].grad[index], hf_grads[hf_name])
        assert error < FLOAT32_TOL, f"gradient of {hf_name}: relative error {error:.2e}"


def test_mixtral_aux_loss_and_its_gradient_match_transformers():
    hf_model = make_hf_model("mixtral_top2_of_4")
    model = our_model(hf_model)
    input_ids, _ = batch()
    expected, aux = hf_model(input_ids).aux_loss, model(input_ids).aux_loss
    params, hf_params = dict(model.named_parameters()), dict(hf_model.named_parameters())
    routers = [params[f"layers.{i}.feed_forward.router.weight"] for i in range(2)]
    hf_routers = [hf_params[f"model.layers.{i}.mlp.gate.weight"] for i in range(2)]
    grads, hf_grads = torch.autograd.grad(aux, routers), torch.autograd.grad(expected, hf_routers)
    assert abs(aux.item() - expected.item()) < FLOAT32_TOL * expected.item()
    for grad, hf_grad in zip(grads, hf_grads):
        assert hf_grad.norm() > 0 and rel_error(grad, hf_grad) < FLOAT32_TOL


def test_loss_chunk_rows_reach_the_fused_loss(monkeypatch):
    """model.loss_chunk_rows is the fused loss's chunk_rows (None: its own budget); the loss and the
    head's gradient are the same either way."""
    from ligerzoo.models import transformer as transformer_module

    asked = []
    real_loss = transformer_module.linear_cross_entropy

    def spy(*args, **kwargs):
        asked.append(kwargs.get("chunk_rows"))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(transformer_module, "linear_cross_entropy", spy)
    model = our_model(make_hf_model("llama2_mha"))
    input_ids, labels = batch()
    results = []
    for rows in (None, 5):
        model.loss_chunk_rows = rows
        model.zero_grad()
        loss = model(input_ids, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), model.lm_head.weight.grad.clone()))
    assert asked == [None, 5]
    (loss, grad), (chunked_loss, chunked_grad) = results
    assert abs(chunked_loss.item() - loss.item()) < FLOAT32_TOL * loss.item()
    assert rel_error(chunked_grad, grad) < FLOAT32_TOL

@pytest.mark.parametrize("name", ["llama31_rope_scaling_tied", "attention_and_mlp_bias", "mixtral_top2_of_4"])
def test_hf_tensor_map_names_what_transformers_saves(name, tmp_path):
    hf_model = make_hf_model(name)
    hf_model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    model = build_model(ModelConfig.from_dict(hf_model.config.to_dict()), device="meta")
    assert set(tensor_map(model.config)) == saved - optional_names(model.config)
    if name.startswith("mixtral"):  # the Hub's per-expert names
        assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in saved


@pytest.fixture(params=["sdpa", "flex"])
def attention_path(request, monkeypatch):
    """Masks as dense SDPA masks or as flex_attention block masks, on either device (on the CPU
    flex_attention runs eagerly and has no backward: forward-only tests)."""
    monkeypatch.setattr(attention_module, "FLEX_DEVICES", ("cuda", "cpu") if request.param == "flex" else ())
    return request.param


@pytest.mark.parametrize("name", ["head_dim_not_hidden_over_heads", "mistral_window_shorter_than_sequence"])
def test_packed_documents_give_the_logits_of_each_document_alone(name, attention_path):
    model = our_model(make_hf_model(name))
    input_ids, _ = batch()
    first, second = input_ids[:1, :10], input_ids[1:, :14]  # both longer than Mistral's window of 8
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(10), torch.arange(14)])[None].to(DEVICE)
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids).logits
        alone = torch.cat([model(first).logits, model(second).logits], dim=1)
    assert rel_error(logits, alone) < FLOAT32_TOL


def test_flex_block_mask_matches_dense_mask_with_window_and_documents(monkeypatch):
    model = our_model(make_hf_model("mistral_window_shorter_than_sequence"))
    input_ids, _ = batch()
    restart_at = [5, 12]  # a different packing in each row
    position_ids = torch.stack([torch.cat([torch.arange(r), torch.arange(SEQ - r)]) for r in restart_at])
    position_ids = position_ids.to(DEVICE)
    logits = {}
    with torch.no_grad():
        for path, devices in (("dense", ()), ("flex", ("cuda", "cpu"))):
            monkeypatch.setattr(attention_module, "FLEX_DEVICES", devices)
            logits[path] = model(input_ids, position_ids=position_ids).logits
            # position_ids [1, T] apply to every row
            shared = model(input_ids, position_ids=position_ids[:1]).logits
            expanded = model(input_ids, position_ids=position_ids[:1].expand(2, -1)).logits
            assert rel_error(shared, expanded) < 1e-6, path
    assert rel_error(logits["flex"], logits["dense"]) < FLOAT32_TOL


def test_mask_is_causal_windowed_and_per_document():
    documents = attention_module.document_ids(torch.tensor([[0, 1, 2, 0, 1, 5, 6]]))
    assert documents.tolist() == [[0, 0, 0, 1, 1, 2, 2]]
    cpu = torch.device("cpu")
    mask = attention_module.build_mask(torch.tensor([[0, 1, 2, 0, 1, 2, 3]]), 1, 7, 2, cpu)
    q, kv = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    doc = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    assert torch.equal(mask[0, 0], (kv <= q) & (q - kv < 2) & (doc[q] == doc[kv]))
    assert attention_module.build_mask(None, 1, 7, 7, cpu) is None  # the window covers the sequence


def test_meta_construction_then_to_empty_and_init_weights():
    config = ModelConfig.from_dict(CASES["mixtral_top2_of_4"][1](**CASES["mixtral_top2_of_4"][2]).to_dict())
    model = build_model(config, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())
    assert model.rotary.inv_freq.dtype == torch.float32
    model.to_empty(device=DEVICE)
    model.init_weights()
    assert torch.equal(model.rotary.inv_freq, build_model(config, device=DEVICE).rotary.inv_freq)
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16, name
        if name.endswith("norm.weight"):
            assert torch.all(param == 1), name
        else:  # at least 256 samples of normal(0, 0.02): the estimate is within 0.005
            assert abs(param.float().std().item() - config.initializer_range) < 0.005, name
    input_ids, labels = batch()
    out = model(input_ids, labels=labels)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_casting_the_model_keeps_rotary_frequencies_float32():
    config = ModelConfig(vocab_size=16, hidden_size=256, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, rope_theta=500000.0)  # Llama 3's frequencies
    model = build_model(config, device="meta").to_empty(device="cpu")
    model_inv_freq = model.rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.rotary.inv_freq, model_inv_freq)


def test_rotary_frequencies_match_transformers_bit_for_bit():
    for name in ("llama2_mha", "llama31_rope_scaling_tied"):
        hf_model = make_hf_model(name)
        model = build_model(ModelConfig.from_dict(hf_model.config.to_dict()), device="meta")
        model.to_empty(device=DEVICE)
        assert torch.equal(model.rotary.inv_freq, hf_model.model.rotary_emb.inv_freq), name


def test_input_ids_outside_the_vocabulary_raise():
    if DEVICE.type == "cuda":  # an asynchronous device-side assert, which ends the process
        assert_device_assert(
            "from ligerzoo.models import ModelConfig, build_model\n"
            "config = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=1,"
            " num_attention_heads=2)\n"
            "build_model(config, device='cuda')(torch.tensor([[1, 16]], device='cuda'))",
            r"input_ids must lie in \[0, vocab_size=16\)",
        )
    model = build_model(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2))  # CPU: raises at once
    with pytest.raises(RuntimeError, match=r"input_ids must lie in \[0, vocab_size=128\)"):
        model(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(RuntimeError, match="vocab_size"):
        model(torch.tensor([[-1, 2, 3]]))


def test_bad_shapes_raise_naming_the_argument():
    model = build_model(ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2), device="meta")
    input_ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids, position_ids=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
