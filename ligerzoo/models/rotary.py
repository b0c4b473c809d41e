"""Rotary position embeddings: the inverse frequencies (the original RoPE and Llama 3.1's `llama3`
scaling) and the cos/sin tables for given positions, in Hugging Face's duplicated-halves layout
that `ligerzoo.kernels.apply_rope` reads."""

import math

import torch
from torch import nn

from ligerzoo.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] float32 on the CPU, computed with transformers' operations in its order so
    that the angles agree bit for bit."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    if config.rope_scaling is None:
        return inv_freq
    return llama3_scaled(inv_freq, **{k: v for k, v in config.rope_scaling.items() if k != "rope_type"})


def llama3_scaled(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1's frequency scaling: wavelengths longer than the pretraining context / low_freq_factor
    are stretched by `factor`, those shorter than context / high_freq_factor are kept, and the band
    between blends the two."""
    context = original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    stretched = torch.where(wavelength > context / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    in_band = (wavelength >= context / high_freq_factor) & (wavelength <= context / low_freq_factor)
    return torch.where(in_band, blended, stretched)


class RotaryEmbedding(nn.Module):
    """cos and sin of the rotary angles for the positions of a batch."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self.reset_buffers()

    def forward(self, position_ids: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (cos, sin): [T, D] for positions 0..T-1 when position_ids is None, else [B, T, D]
        for position_ids [B, T] (B may be 1)."""
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=self.inv_freq.device)
        angles = position_ids[..., None].float() * self.inv_freq  # [..., T, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [..., T, D]
        return angles.cos(), angles.sin()

    def reset_buffers(self) -> None:
        """Recompute inv_freq (in float32) on the device it lives on, e.g. after `to_empty`."""
        self.inv_freq = inverse_frequencies(self.config).to(self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would round the frequencies to 8 bits, and positions in the
        # thousands would then rotate by visibly wrong angles; `to_empty` would leave them unset.
        # They are a function of the config, so every move or cast recomputes them instead.
        super()._apply(fn, recurse)
        self.reset_buffers()
        return self
