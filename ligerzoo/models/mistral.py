"""Mistral: Llama's layout and checkpoint names (no biases), with sliding-window attention when
`config.sliding_window` is set and shorter than the sequence. The window is part of the one mask
predicate in attention.py (on the GPU a flex_attention block mask that skips the tiles outside
the window)."""

from ligerzoo.models.llama import Llama


class Mistral(Llama):
    pass
