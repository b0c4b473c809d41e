"""ModelConfig against transformers' config classes: both RoPE styles, family defaults, errors
that name the field, and config.json round trips through AutoConfig."""

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from ligerzoo.models import ModelConfig

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8)
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
LLAMA31 = {"model_type": "llama", **BASE, "num_key_value_heads": 2, "max_position_embeddings": 131072,
           "tie_word_embeddings": True, "eos_token_id": [128001, 128008, 128009]}
MISTRAL = {"model_type": "mistral", **BASE, "sliding_window": 16}
MIXTRAL = {"model_type": "mixtral", **BASE, "num_local_experts": 4, "num_experts_per_tok": 2,
           "router_aux_loss_coef": 0.02}


def test_both_rope_styles_parse_to_the_same_config():
    def parse(**rope):
        return ModelConfig.from_dict({**LLAMA31, **rope})

    old = parse(rope_theta=5e5, rope_scaling={"rope_type": "llama3", **LLAMA3})
    new = parse(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3})
    legacy = parse(rope_theta=5e5, rope_scaling={"type": "llama3", **LLAMA3})  # "type": before 4.45
    assert old == new == legacy
    assert old.rope_theta == 5e5 and old.rope_scaling == {"rope_type": "llama3", **LLAMA3}
    default_old = parse(rope_theta=5e5, rope_scaling=None)
    default_new = parse(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert default_old == default_new and default_old.rope_scaling is None


@pytest.mark.parametrize("family", [LLAMA31, MISTRAL, MIXTRAL, {"model_type": "mistral", **BASE}],
                         ids=["llama", "mistral", "mixtral", "mistral_defaults"])
def test_fields_and_defaults_agree_with_transformers(family):
    ours = ModelConfig.from_dict(family)
    theirs = AutoConfig.for_model(**family)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "sliding_window", "num_local_experts", "num_experts_per_tok",
                 "router_aux_loss_coef", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
                 "pad_token_id"):
        if hasattr(theirs, name):
            expected = getattr(theirs, name)
            if name == "head_dim" and expected is None:  # Mixtral leaves it unset
                expected = theirs.hidden_size // theirs.num_attention_heads
            assert getattr(ours, name) == expected, name
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]


@pytest.mark.parametrize("family", [LLAMA31, MISTRAL, MIXTRAL], ids=["llama", "mistral", "mixtral"])
def test_to_dict_round_trips_through_autoconfig(family, tmp_path):
    config = ModelConfig.from_dict({**family, "rope_theta": 500000.0,
                                    "rope_scaling": {"rope_type": "llama3", **LLAMA3},
                                    "torch_dtype": "bfloat16", "use_cache": True})
    assert ModelConfig.from_dict(config.to_dict()) == config
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config.to_dict()))
    theirs = AutoConfig.from_pretrained(tmp_path / "ours")
    assert type(theirs).__name__ == {"llama": "LlamaConfig", "mistral": "MistralConfig",
                                     "mixtral": "MixtralConfig"}[config.model_type]
    assert theirs.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}
    assert theirs.num_key_value_heads == config.num_key_value_heads and str(theirs.dtype) == "torch.bfloat16"
    assert type(AutoModelForCausalLM.from_config(theirs)).__name__ == config.to_dict()["architectures"][0]
    theirs.save_pretrained(tmp_path / "theirs")  # transformers 5 writes `rope_parameters` and `dtype`
    back = ModelConfig.from_json(tmp_path / "theirs" / "config.json")
    assert {**back.__dict__, "extra": None} == {**config.__dict__, "extra": None}
    assert back.extra["use_cache"] is True


def test_keys_of_other_families_and_harmless_keys_are_kept_in_extra():
    config = ModelConfig.from_dict({**LLAMA31, "sliding_window": 4096, "pretraining_tp": 1, "custom": [1, 2]})
    assert config.sliding_window is None  # transformers' Llama ignores it too
    assert config.extra == {"sliding_window": 4096, "pretraining_tp": 1, "custom": [1, 2]}
    assert config.to_dict()["custom"] == [1, 2]


@pytest.mark.parametrize("changes, field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"model_type": None, "architectures": ["Qwen2ForCausalLM"]}, "model_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": 15}, "head_dim"),
    ({"hidden_size": 0}, "hidden_size"),
])
def test_unsupported_settings_raise_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({**LLAMA31, **changes})


@pytest.mark.parametrize("changes, field", [
    ({"router_jitter_noise": 0.01}, "router_jitter_noise"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"intermediate_size": 100}, "intermediate_size"),
])
def test_unsupported_mixtral_settings_raise_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({**MIXTRAL, **changes})


def test_constructing_with_another_familys_field_raises():
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig(model_type="llama", sliding_window=8)
    with pytest.raises(ValueError, match="num_local_experts"):
        ModelConfig(model_type="mistral", num_local_experts=8)
