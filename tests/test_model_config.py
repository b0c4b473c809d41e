"""config.json validation (ligerzoo/models/config.py) as from_pretrained meets it: the configs of
released Llama 2, 3, 3.1 and 3.2, Mistral and Mixtral checkpoints parse; each bad value gives a
ValueError that names the file, the field and the value, before any weight is read."""

import json
import math

import pytest

from ligerzoo.hf.pretrained import from_pretrained
from ligerzoo.models import ModelConfig

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}
LLAMA3_8B = {
    **LLAMA2_7B, "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "num_key_value_heads": 8, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
LLAMA31_8B = {
    **LLAMA3_8B, "max_position_embeddings": 131072, "mlp_bias": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
LLAMA32_1B = {
    **LLAMA31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
    "tie_word_embeddings": True, "rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": 32.0},
}
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
MISTRAL_7B_V03 = {**MISTRAL_7B_V01, "rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32768}
# Mistral NeMo: head_dim is given and is not hidden_size / num_attention_heads (160).
MISTRAL_NEMO = {**MISTRAL_7B_V03, "hidden_size": 5120, "head_dim": 128, "num_hidden_layers": 40,
                "max_position_embeddings": 1024000, "vocab_size": 131072}
MIXTRAL_8X7B = {
    **MISTRAL_7B_V03, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "attention_dropout": 0.0, "num_experts_per_tok": 2, "num_local_experts": 8, "output_router_logits": False,
    "router_aux_loss_coef": 0.02, "vocab_size": 32000,
}
RELEASED = {"llama2_7b": LLAMA2_7B, "llama3_8b": LLAMA3_8B, "llama31_8b": LLAMA31_8B,
            "llama32_1b": LLAMA32_1B, "mistral_7b_v01": MISTRAL_7B_V01, "mistral_7b_v03": MISTRAL_7B_V03,
            "mistral_nemo": MISTRAL_NEMO, "mixtral_8x7b": MIXTRAL_8X7B}


def write_config(directory, content) -> str:
    path = directory / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize("name", RELEASED)
def test_released_configs_parse(tmp_path, name):
    config = ModelConfig.from_json(write_config(tmp_path, RELEASED[name]))
    assert config.hidden_size == RELEASED[name]["hidden_size"]
    assert config.head_dim == RELEASED[name].get("head_dim", 128)
    assert config.sliding_window == RELEASED[name].get("sliding_window")


# Each bad value on a Llama 3.1 config, with the field the message must name (the field itself,
# unless the value is wrong only beside another field).
BAD_VALUES = [
    ("hidden_size", "4096"), ("hidden_size", 0), ("hidden_size", 4096.5), ("hidden_size", None),
    ("intermediate_size", -1), ("num_hidden_layers", True), ("num_attention_heads", 0),
    ("num_key_value_heads", 0), ("num_key_value_heads", "8"), ("vocab_size", 0), ("vocab_size", []),
    ("max_position_embeddings", 0), ("max_position_embeddings", "131072"), ("head_dim", 0), ("head_dim", -64),
    ("rms_norm_eps", 0), ("rms_norm_eps", -1e-5), ("rms_norm_eps", "1e-5"), ("rms_norm_eps", math.inf),
    ("rms_norm_eps", math.nan), ("rope_theta", 0), ("rope_theta", -500000.0), ("rope_theta", "500000"),
    ("rope_theta", math.inf),
]


@pytest.mark.parametrize("field, value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_size_or_constant_in_config_json_names_file_field_and_value(tmp_path, field, value):
    path = write_config(tmp_path, {**LLAMA31_8B, field: value})  # json writes inf and nan as Infinity, NaN
    with pytest.raises(ValueError) as error:
        from_pretrained(tmp_path)  # no weights in the directory: the config is rejected first
    message = str(error.value)
    assert message.startswith(f"{path}: {field} must be a positive "), message
    assert message.endswith(f", got {value!r}")


ROPE_31 = LLAMA31_8B["rope_scaling"]


@pytest.mark.parametrize("changes, expected", [
    ({"hidden_size": 4100},
     "hidden_size (4100) must be a multiple of num_attention_heads (32), or head_dim must be given"),
    ({"num_key_value_heads": 5}, "num_attention_heads (32) must be a multiple of num_key_value_heads (5)"),
    ({"rope_theta": None, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 0}},
     "rope_theta must be a positive finite number, got 0"),
    ({"rope_scaling": {**ROPE_31, "factor": 0}},
     "rope_scaling's factor must be a positive finite number, got 0"),
    ({"rope_scaling": {**ROPE_31, "high_freq_factor": 1.0}},
     "rope_scaling's high_freq_factor (1.0) must exceed its low_freq_factor (1.0)"),
    ({"rope_scaling": "llama3"}, "rope_scaling must be an object or null, got 'llama3'"),
    ({"torch_dtype": "int8"}, "dtype 'int8' is not a floating-point dtype"),
])
def test_inconsistent_fields_in_config_json_are_named(tmp_path, changes, expected):
    path = write_config(tmp_path, {**LLAMA31_8B, **changes})
    with pytest.raises(ValueError) as error:
        from_pretrained(tmp_path)
    assert str(error.value).startswith(f"{path}: {expected}"), str(error.value)


@pytest.mark.parametrize("content, kind", [("[1, 2]", "list"), ('"llama"', "str"), ("null", "NoneType")])
def test_config_json_that_is_not_an_object_is_named(tmp_path, content, kind):
    path = write_config(tmp_path, content)
    with pytest.raises(ValueError, match=f"^{path} holds a JSON {kind}, expected an object"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"^{path}: a model config is a JSON object of settings, got {kind}"):
        ModelConfig.from_json(path)


def test_from_json_names_the_file_of_invalid_json(tmp_path):
    path = write_config(tmp_path, '{"hidden_size": 64,')
    with pytest.raises(ValueError, match=f"^{path}: Expecting"):
        ModelConfig.from_json(path)
