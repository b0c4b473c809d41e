"""Llama, Mistral and Mixtral as plain PyTorch modules on the project's kernels."""

import torch

from ligerzoo.models.config import ModelConfig
from ligerzoo.models.families import MODEL_CLASSES, Llama, Mistral, Mixtral
from ligerzoo.models.transformer import CausalLMOutput, Transformer


def build_model(config: ModelConfig, device=None, dtype=None) -> Transformer:
    """The model for `config`, built on the meta device (no memory, no init), then, unless
    device is "meta", materialised on `device` (default CPU) with random weights from
    `init_weights()`. dtype: the parameters' dtype (default torch's default dtype); the rotary
    frequencies stay float32."""
    with torch.device("meta"):
        model = MODEL_CLASSES[config.model_type](config)
    if dtype is not None:
        model.to(dtype)
    if torch.device(device if device is not None else "cpu").type != "meta":
        model.to_empty(device=device if device is not None else "cpu")
        model.init_weights()
    return model


__all__ = ["CausalLMOutput", "Llama", "Mistral", "Mixtral", "ModelConfig", "Transformer", "build_model"]
