#!/usr/bin/env python3
"""A block's FP8 layers with their producers, forward + backward, each compiled (fullgraph):

    norm+wqkv    add_rms_norm then wqkv          norm+w13    add_rms_norm then w13
    swiglu+w2    swiglu_packed then w2           ffn         add_rms_norm, w13, swiglu_packed, w2

three ways: bf16 (the producer, then F.linear), fp8 (the producer's bf16 output, then
float8_linear casting it rowwise with PyTorch ops: the path before the producers wrote FP8) and
fused (kernels/float8_fused.py: the producer writes FP8 rows); the ffn also as one Function
(`add_rms_norm_mlp`, SwiGLU's backward writing gate_up's gradient as FP8 rows: the rowwise path
of --train.float8), its "fused" column the two Functions it replaces.
Prints the median ms of each (triton.testing.do_bench) at the Llama-3.2-1B shape, 16,384 tokens
(--shape 8b: Llama-3.1-8B, 8,192 tokens).

--shape mixtral: one Mixtral-8x7B layer's experts over 8,192 tokens routed top-2 (16,384 rows in 8
uneven runs, each a multiple of 16 as Float8MoE pads them), gate/up, SwiGLU and down: bf16
(`torch._grouped_mm`, MoE's path) and fp8 (`float8_grouped_linear`, Float8MoE's).

    python benchmarks/float8_layers.py [--shape 1b|8b|mixtral]
    python benchmarks/float8_layers.py --dry-run     # CPU, tiny shapes: runs each once, no timing
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ligerzoo.kernels import (
    add_rms_norm,
    add_rms_norm_linear,
    add_rms_norm_mlp,
    float8_linear,
    swiglu_linear,
    swiglu_packed,
)
from ligerzoo.kernels.float8_grouped import float8_grouped_linear

EPS = 1e-5
# tokens, hidden, intermediate, q/k/v width
SHAPES = {"1b": (16384, 2048, 8192, (32 + 2 * 8) * 64), "8b": (8192, 4096, 14336, (32 + 2 * 8) * 128),
          "dry": (64, 64, 128, 96)}
# Rows an expert (Mixtral-8x7B: hidden 4096, intermediate 14336), as benchmarks/kernel_bench's
# per-expert casts take them.
EXPERT_ROWS = {"mixtral": (2416, 1712, 2272, 1936, 2096, 1824, 2160, 1968), "dry": (32, 0, 48, 16)}
EXPERT_SIZES = {"mixtral": (4096, 14336), "dry": (64, 128)}


def layers(tokens, hidden, inner, qkv):
    """name -> (its inputs' shapes, {way: fn}); fn(*inputs) -> the output the gradient flows from."""
    def norm_linear(width):
        return ([(tokens, hidden), (tokens, hidden), (hidden,), (width, hidden)], {
            "bf16": lambda x, r, nw, w: F.linear(add_rms_norm(x, r, nw, EPS)[0], w),
            "fp8": lambda x, r, nw, w: float8_linear(add_rms_norm(x, r, nw, EPS)[0], w),
            "fused": lambda x, r, nw, w: add_rms_norm_linear(x, r, nw, EPS, w)[0],
        })
    def ffn_bf16(x, r, nw, w13, w2):
        return F.linear(swiglu_packed(F.linear(add_rms_norm(x, r, nw, EPS)[0], w13)), w2)

    def ffn_fp8(x, r, nw, w13, w2):
        return float8_linear(swiglu_packed(float8_linear(add_rms_norm(x, r, nw, EPS)[0], w13)), w2)

    def ffn_fused(x, r, nw, w13, w2):
        return swiglu_linear(add_rms_norm_linear(x, r, nw, EPS, w13)[0], w2, in_place_backward=True)

    return {
        "norm+wqkv": norm_linear(qkv),
        "norm+w13": norm_linear(2 * inner),
        "swiglu+w2": ([(tokens, 2 * inner), (hidden, inner)], {
            "bf16": lambda g, w: F.linear(swiglu_packed(g), w),
            "fp8": lambda g, w: float8_linear(swiglu_packed(g), w),
            "fused": lambda g, w: swiglu_linear(g, w),
        }),
        "ffn": ([(tokens, hidden), (tokens, hidden), (hidden,), (2 * inner, hidden), (hidden, inner)], {
            "bf16": ffn_bf16, "fp8": ffn_fp8, "fused": ffn_fused,
            "one Function": lambda x, r, nw, w13, w2: add_rms_norm_mlp(x, r, nw, EPS, w13, w2)[0],
        }),
    }


def expert_layers(rows, hidden, inner, device):
    """As `layers`, for the experts: name -> (inputs' shapes, {way: fn})."""
    ends = torch.tensor(rows, device=device).cumsum(0).to(torch.int32)

    def bf16(x, w13, w2):
        gate_up = torch._grouped_mm(x, w13.transpose(1, 2), offs=ends)
        return torch._grouped_mm(swiglu_packed(gate_up), w2.transpose(1, 2), offs=ends)

    def fp8(x, w13, w2):
        return float8_grouped_linear(swiglu_packed(float8_grouped_linear(x, w13, ends)), w2, ends)

    shapes = [(sum(rows), hidden), (len(rows), 2 * inner, hidden), (len(rows), hidden, inner)]
    return {"experts": (shapes, {"bf16": bf16, "fp8": fp8})}


def inputs(shapes, device):
    """bf16 leaves: weights (every 2-d shape after the first two, or the last) scaled by K**-0.5,
    everything else unit normal."""
    def is_weight(i, shape):
        return i == len(shapes) - 1 or (i >= 2 and len(shape) == 2)

    return [(torch.randn(shape, device=device) * (shape[-1] ** -0.5 if is_weight(i, shape) else 1.0))
            .to(torch.bfloat16).requires_grad_() for i, shape in enumerate(shapes)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["1b", "8b", "mixtral"], default="1b")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, each way run once")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if args.shape == "mixtral":
        size = "dry" if args.dry_run else "mixtral"
        (hidden, inner), rows = EXPERT_SIZES[size], EXPERT_ROWS[size]
        print(f"{gpu}, torch {torch.__version__}, {sum(rows)} rows in {len(rows)} experts, hidden {hidden}, "
              f"intermediate {inner}: forward + backward, ms")
        cases = expert_layers(rows, hidden, inner, device)
    else:
        tokens, hidden, inner, qkv = SHAPES["dry" if args.dry_run else args.shape]
        print(f"{gpu}, torch {torch.__version__}, {tokens} tokens, hidden {hidden}, intermediate {inner}: "
              f"forward + backward, ms")
        cases = layers(tokens, hidden, inner, qkv)
    print("| layer | bf16 | fp8 (PyTorch casts) | fused | one Function |\n|---|---|---|---|---|")
    for name, (shapes, ways) in cases.items():
        leaves = inputs(shapes, device)
        times = []
        for fn in ways.values():
            # The dry run checks the plumbing: aot_eager traces the same graph without Inductor's build.
            compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if args.dry_run else "inductor")
            dy = torch.randn(compiled(*leaves).shape, device=device, dtype=torch.bfloat16)

            def step(compiled=compiled, leaves=leaves, dy=dy):
                compiled(*leaves).backward(dy)

            if args.dry_run:
                step()
                times.append("ran")
                continue
            times.append(f"{triton.testing.do_bench(step, grad_to_none=leaves, return_mode='median'):.3f}")
        times += ["—"] * (4 - len(times))  # the experts have no fused way, only the ffn is one Function
        print(f"| {name} | " + " | ".join(times) + " |")


if __name__ == "__main__":
    main()
