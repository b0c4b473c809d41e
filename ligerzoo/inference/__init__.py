"""Inference: the static KV cache, generation steps captured in CUDA graphs (and kept between
calls), sampling on the device, request checks, and `generate`. Medusa decoding (ligerzoo.medusa)
builds on the same pieces."""

from ligerzoo.inference.cuda_graphs import CUDAGraphStep, KeptGraphs, graph_key
from ligerzoo.inference.generation import generate
from ligerzoo.inference.kv_cache import KVCache
from ligerzoo.inference.requests import check_request, prompt_lists
from ligerzoo.inference.sampling import sample

__all__ = ["CUDAGraphStep", "KVCache", "KeptGraphs", "check_request", "generate", "graph_key", "prompt_lists",
           "sample"]
