"""The model configuration, with the field names of a Hugging Face `config.json`.

`ModelConfig.from_dict` reads both styles found on the Hub: the older top-level `rope_theta` +
`rope_scaling`, and the newer `rope_parameters` block of transformers 5. Keys that belong to
another family (e.g. `sliding_window` in a Llama config, which transformers ignores for Llama too)
and keys without effect on the computation (`use_cache`, `transformers_version`, ...) are kept in
`extra` and written back; settings that would change the computation in a way these models do not
implement raise a ValueError naming the field.
"""

import json
import math
import os
from dataclasses import dataclass, field

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM"}

# Fields every family has, and those only some have (as in transformers' LlamaConfig,
# MistralConfig and MixtralConfig: a key outside its family's set goes to `extra`).
COMMON_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
)
FAMILY_FIELDS = {
    "llama": ("attention_bias", "mlp_bias"),
    "mistral": ("sliding_window",),
    "mixtral": ("sliding_window", "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef"),
}
# The value of each family-specific field in the families that lack it.
UNUSED = {"attention_bias": False, "mlp_bias": False, "sliding_window": None, "num_local_experts": None,
          "num_experts_per_tok": None, "router_aux_loss_coef": None}

# transformers' defaults for keys a config.json may leave out, where they differ by family.
FAMILY_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048, rope_theta=10000.0),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=131072, rope_theta=10000.0,
                    num_key_value_heads=8, sliding_window=4096),
    "mixtral": dict(rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=1e6,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    router_aux_loss_coef=0.001),
}

# Settings transformers honours that these models do not implement: allowed only at these values.
MUST_BE = {"attention_dropout": 0.0, "router_jitter_noise": 0.0, "partial_rotary_factor": 1.0,
           "quantization_config": None}

LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
# Fields that are sizes: positive integers. num_key_value_heads and head_dim may be None (derived).
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


@dataclass
class ModelConfig:
    """A Llama, Mistral or Mixtral architecture; defaults are Llama 2 7B's (transformers'
    LlamaConfig). Constructing one validates it.

    rope_scaling: None for the original RoPE, or {"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1, 3.2).
    sliding_window: Mistral and Mixtral only; None for full causal attention.
    num_local_experts / num_experts_per_tok / router_aux_loss_coef: Mixtral only.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as attention heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    num_local_experts: int | None = None
    num_experts_per_tok: int | None = None
    router_aux_loss_coef: float | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    dtype: str | None = None  # the checkpoint's weight dtype ("bfloat16", ...), informational
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in SIZE_FIELDS:  # first: the derived fields are computed from them
            value = getattr(self, name)
            if not (value is None and name in ("num_key_value_heads", "head_dim")):
                _check_positive(name, value, integer=True)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}), or head_dim must be given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("rms_norm_eps", "rope_theta"):
            _check_positive(name, getattr(self, name))
        self.rope_theta = float(self.rope_theta)
        if self.model_type == "mixtral":
            defaults = FAMILY_DEFAULTS["mixtral"]
            for name in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef"):
                if getattr(self, name) is None:
                    setattr(self, name, defaults[name])
        if self.rope_scaling is not None:
            self.rope_scaling = _rope_scaling(self.rope_scaling, self.max_position_embeddings)
        self._validate()

    def _validate(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported: expected one of {sorted(ARCHITECTURES)}"
            )
        for name, unused in UNUSED.items():
            if name not in FAMILY_FIELDS[self.model_type] and getattr(self, name) != unused:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not a {self.model_type} setting: leave it at {unused}"
                )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: these models use 'silu'")
        if self.dtype is not None and str(self.dtype).removeprefix("torch.") not in FLOAT_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not a floating-point dtype: expected one of "
                             f"{', '.join(FLOAT_DTYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got {window!r}")
        if self.model_type == "mixtral":
            for name in ("num_local_experts", "num_experts_per_tok"):
                _check_positive(name, getattr(self, name), integer=True)
            if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_local_experts "
                    f"({self.num_local_experts})]"
                )
            # torch._grouped_mm, which runs the experts, needs 16-byte aligned rows (8 bf16 elements).
            for name in ("hidden_size", "intermediate_size"):
                if getattr(self, name) % 8:
                    raise ValueError(f"{name} must be a multiple of 8 for the grouped expert matmuls, "
                                     f"got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Parse a Hugging Face config.json dict (either RoPE style)."""
        if not isinstance(d, dict):
            raise ValueError(f"a model config is a JSON object of settings, got {type(d).__name__} {d!r:.80}")
        d = dict(d)
        model_type = _model_type(d)
        d.pop("architectures", None)
        d.pop("model_type", None)
        for name, value in MUST_BE.items():
            if name in d and d[name] != value:
                raise ValueError(f"{name}={d[name]!r} is not supported: only {name}={value!r} is")
        defaults = FAMILY_DEFAULTS[model_type]
        values = {}
        for name in COMMON_FIELDS + FAMILY_FIELDS[model_type]:
            if name in d:
                values[name] = d.pop(name)
            elif name in defaults:
                values[name] = defaults[name]
        values["rope_theta"], values["rope_scaling"] = _parse_rope(d, defaults["rope_theta"])
        for name in ROPE_KEYS:
            d.pop(name, None)
        values["dtype"] = d.pop("dtype", None) or d.pop("torch_dtype", None)
        d.pop("torch_dtype", None)
        return cls(model_type=model_type, **values, extra=d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read a config.json file; a ValueError names the file."""
        with open(path, encoding="utf-8") as f:
            try:
                return cls.from_dict(json.load(f))
            except ValueError as error:  # json's errors too
                raise ValueError(f"{path}: {error}") from error

    def to_dict(self) -> dict:
        """A config.json dict that transformers' AutoConfig loads. RoPE and dtype are written in the
        older spellings (`rope_theta` + `rope_scaling`, `torch_dtype`), which every transformers
        version reads (5.x converts them to `rope_parameters` and `dtype`)."""
        d = {"architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type}
        for name in COMMON_FIELDS + FAMILY_FIELDS[self.model_type]:
            d[name] = getattr(self, name)
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling is not None else None
        if self.dtype is not None:
            d["torch_dtype"] = self.dtype
        return {**d, **self.extra}


def _check_positive(name: str, value, integer: bool = False) -> None:
    """Raise a ValueError naming `name` unless `value` is a positive (finite) integer or number."""
    kinds, what = (int, "integer") if integer else ((int, float), "finite number")
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive {what}, got {value!r}")


def _model_type(d: dict) -> str:
    model_type = d.get("model_type")
    architectures = d.get("architectures")
    if model_type is None and architectures:
        by_architecture = {arch: family for family, arch in ARCHITECTURES.items()}
        first = architectures[0] if isinstance(architectures, list) else None
        model_type = by_architecture.get(first) if isinstance(first, str) else None
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} (architectures {architectures!r}) is not supported: expected one of "
            f"{sorted(ARCHITECTURES)}"
        )
    if architectures is not None and architectures != [ARCHITECTURES[model_type]]:
        raise ValueError(
            f"architectures {architectures!r} is not supported for model_type {model_type!r}: expected "
            f"[{ARCHITECTURES[model_type]!r}] (a causal language model)"
        )
    return model_type


def _parse_rope(d: dict, default_theta: float) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either `rope_parameters` or `rope_theta` + `rope_scaling`."""
    old_theta, old_scaling = d.get("rope_theta"), d.get("rope_scaling")
    params = d.get("rope_parameters")
    for name, value in (("rope_scaling", old_scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{name} must be an object or null, got {value!r}")
    if params is not None:
        params = dict(params)
        if any(isinstance(value, dict) for value in params.values()):
            raise ValueError(f"rope_parameters per layer type is not supported, got {params!r}")
        theta = params.pop("rope_theta", old_theta if old_theta is not None else default_theta)
        partial = params.pop("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ValueError(f"rope_parameters partial_rotary_factor={partial!r} is not supported: only 1.0")
        scaling = params if _rope_type(params) != "default" else None
        if old_theta is not None and old_theta != theta:
            raise ValueError(f"rope_theta ({old_theta}) disagrees with rope_parameters' rope_theta ({theta})")
        if old_scaling is not None and _rope_type(old_scaling) != _rope_type(params):
            raise ValueError(f"rope_scaling {old_scaling!r} disagrees with rope_parameters {params!r}")
        return theta, scaling  # checked (a positive number) and made a float by ModelConfig
    theta = old_theta if old_theta is not None else default_theta
    if old_scaling is not None and _rope_type(old_scaling) == "default":
        old_scaling = None
    return theta, old_scaling


def _rope_type(scaling: dict) -> str:
    return scaling.get("rope_type", scaling.get("type", "default"))


def _rope_scaling(scaling: dict, max_position_embeddings: int) -> dict:
    """The llama3 scaling dict in one spelling; any other rope type raises."""
    rope_type = _rope_type(scaling)
    if rope_type != "llama3":
        raise ValueError(
            f"rope type {rope_type!r} (rope_scaling / rope_parameters) is not supported: only the "
            f"default RoPE and 'llama3'"
        )
    # transformers falls back to max_position_embeddings for the pretraining length.
    values = {"original_max_position_embeddings": max_position_embeddings, **scaling}
    missing = [key for key in LLAMA3_ROPE_KEYS if key not in values]
    if missing:
        raise ValueError(f"rope_scaling of type 'llama3' lacks {missing}: got {scaling!r}")
    for key in LLAMA3_ROPE_KEYS:
        _check_positive(f"rope_scaling's {key}", values[key])
    if values["high_freq_factor"] <= values["low_freq_factor"]:  # they divide the band between them
        raise ValueError(f"rope_scaling's high_freq_factor ({values['high_freq_factor']}) must exceed its "
                         f"low_freq_factor ({values['low_freq_factor']})")
    return {"rope_type": "llama3", **{key: values[key] for key in LLAMA3_ROPE_KEYS}}
