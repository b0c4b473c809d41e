#!/usr/bin/env python3
"""Medusa decoding benchmark: batch-1 greedy decode throughput of plain `generate` (static KV cache,
CUDA-graph decode step) against `medusa_generate` (one eager tree forward per step) with a few
trees, on a Llama-3.2-1B-shaped model, and a check that the outputs agree.

    python benchmarks/medusa_decode.py [--model DIR] [--heads DIR] [--trees chain,small,mc_sim_7b_63]
    python benchmarks/medusa_decode.py --tiny      # CPU, a tiny model: checks the plumbing, not speed

How it measures:
- model: --model (a checkpoint directory or Hub id, loaded with from_pretrained), else random
  weights in Llama-3.2-1B's shape (transformers' init). Heads: --heads (a directory from
  save_heads), else fresh heads (identity blocks and copies of the base head: each predicts what
  the base head predicts one place early). A random model mostly repeats one token, which fresh
  heads guess right: acceptance then runs near the tree's depth, so such a run measures the cost
  of the tree forwards at (nearly) full acceptance, an upper bound, not a trained Medusa's speed-up.
  Trained heads on their base model (--model, --heads, --prompt-text) give the real figure.
- decode: one prompt of --prompt-len tokens (random, or --prompt-text through the model's
  tokenizer), --new-tokens new tokens, greedy, no stop tokens. Decode time = median time of the
  full call minus the median time of a call for 1 new token (the prefill and first token), so
  tokens/s = (new tokens - 1) / that time. Every decoder is warmed up first at both lengths (CUDA
  graph capture, Triton compilation for the tree's row count).
- mean accepted length: tokens emitted per tree forward (accepted candidates + the base model's
  own token), from MedusaStats.
- equality: greedy Medusa must return plain greedy's tokens. In bf16 the tree forward sums the
  attention in another order than a one-token step, so the two may part at a near-tie of the top
  two logits; a divergence counts as a tie (reported, not a failure) only when the plain forward's
  top-two logits there differ by less than --tie-tolerance, else the script fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

from ligerzoo.hf.pretrained import from_pretrained  # noqa: E402
from ligerzoo.inference import generate  # noqa: E402
from ligerzoo.medusa import TREES, MedusaConfig, MedusaHeads, MedusaStats, load_heads, medusa_generate  # noqa: E402
from ligerzoo.models import ModelConfig, build_model
from ligerzoo.models.presets import LLAMA_3_2_1B, TINY_LLAMA  # noqa: E402

TINY = TINY_LLAMA
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def measure(decode, new_tokens: int, repeats: int, device: torch.device) -> dict:
    """decode(n) -> tokens. Median decode time of n = new_tokens beyond n = 1, after a warm-up."""
    decode(1), decode(new_tokens)
    first = statistics.median(timed(lambda: decode(1), device) for _ in range(repeats))
    full = statistics.median(timed(lambda: decode(new_tokens), device) for _ in range(repeats))
    seconds = max(full - first, 1e-9)
    return {"tokens_per_s": (new_tokens - 1) / seconds, "decode_s": seconds}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def top_two_gap(model, prompt: list[int], tokens: list[int], device: torch.device) -> float:
    """The gap between the two largest logits of a plain forward after prompt + tokens."""
    hidden, _ = model.trunk(torch.tensor([prompt + tokens], device=device))
    logits = torch.nn.functional.linear(hidden[:, -1:], model.output_weight)[0, -1].float()
    top = logits.topk(2).values
    return (top[0] - top[1]).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory or Hub id (default: random Llama-3.2-1B shape)")
    parser.add_argument("--heads", help="Medusa heads directory (default: fresh heads)")
    parser.add_argument("--num-heads", type=int, default=4, help="fresh heads: how many (default 4)")
    parser.add_argument("--trees", default="chain,small,mc_sim_7b_63",
                        help=f"comma-separated subset of {','.join(TREES)}")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--prompt-text", help="a real prompt (needs --model with a tokenizer, or --tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer of --prompt-text (default: --model's; 'bytes': the byte "
                        "tokenizer of models trained from scratch by train.py)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per length (default 3)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="default bf16 (--tiny: fp32)")
    parser.add_argument("--tie-tolerance", type=float, default=0.05,
                        help="a divergence from plain greedy is a tie below this top-two logit gap")
    parser.add_argument("--tiny", action="store_true", help="CPU, a tiny fp32 model: checks the plumbing")
    args = parser.parse_args(argv)
    trees = [t.strip() for t in args.trees.split(",") if t.strip()]
    if not trees or any(t not in TREES for t in trees):
        parser.error(f"--trees takes a subset of {','.join(TREES)}, got {args.trees!r}")
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.prompt_len, args.new_tokens, args.repeats = min(args.prompt_len, 16), min(args.new_tokens, 24), 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device (use --tiny to check the script on CPU)")
        device, dtype = torch.device("cuda"), DTYPES[args.dtype]

    torch.manual_seed(0)
    if args.model:
        log(f"loading {args.model}")
        model = from_pretrained(args.model, dtype=dtype, device=device)
    else:
        config = ModelConfig(**(TINY if args.tiny else LLAMA_3_2_1B))
        log(f"building a random {'tiny' if args.tiny else 'Llama-3.2-1B-shaped'} model")
        model = build_model(config, device=device, dtype=dtype).eval()
    config = model.config
    if args.heads:
        heads = load_heads(args.heads, dtype=dtype, device=device)
    else:
        heads = MedusaHeads(MedusaConfig(num_heads=args.num_heads), config.hidden_size, config.vocab_size)
        heads = heads.to(device=device, dtype=dtype)
        heads.init_weights(model.output_weight)
    heads.eval()

    if args.prompt_text:
        from ligerzoo.tokenizer import load_tokenizer
        from ligerzoo.tokenizer import ByteTokenizer

        tokenizer = ByteTokenizer() if args.tokenizer == "bytes" else load_tokenizer(args.tokenizer or args.model)
        prompt = tokenizer.encode(args.prompt_text, bos=True)
    else:
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=generator).tolist()

    log("plain generate")
    plain = generate(model, [prompt], max_new_tokens=args.new_tokens)[0]
    result = measure(lambda n: generate(model, [prompt], max_new_tokens=n), args.new_tokens, args.repeats,
                     device)
    plain_name = "plain generate (CUDA graph)" if device.type == "cuda" else "plain generate"
    rows = [(plain_name, "-", result, None, "-")]
    failures = []
    for name in trees:
        log(f"medusa_generate, tree {name}")
        stats = MedusaStats()
        out = medusa_generate(model, heads, [prompt], args.new_tokens, tree=name, stats=stats)[0]
        at = first_divergence(out, plain)
        if at is None:
            agreement = "equal"
        else:
            gap = top_two_gap(model, prompt, plain[:at], device)
            agreement = f"parts at token {at} (top-two gap {gap:.3g})"
            if gap >= args.tie_tolerance:
                failures.append(f"tree {name}: greedy Medusa differs from plain greedy at token {at}, "
                                f"where the top two logits differ by {gap:.3g} (not a tie)")
                agreement += " NOT A TIE"
        result = measure(lambda n, name=name: medusa_generate(model, heads, [prompt], n, tree=name),
                         args.new_tokens, args.repeats, device)
        rows.append((f"medusa_generate ({heads.num_heads} heads)", f"{name}", result, stats, agreement))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--tiny: plumbing only)"
    print(f"# Medusa decoding: {datetime.datetime.now().isoformat(timespec='minutes')} | {where} | "
          f"torch {torch.__version__} | {str(dtype).removeprefix('torch.')} | batch 1, prompt {len(prompt)}, "
          f"{args.new_tokens} new tokens, greedy | model {args.model or 'random'}, "
          f"heads {args.heads or 'fresh'}\n")
    print("| decoder | tree | tokens/s | speed-up | mean accepted length | decode forwards "
          "| vs plain greedy |")
    print("|---|---|---:|---:|---:|---:|---|")
    base = rows[0][2]["tokens_per_s"]
    for decoder, tree, result, stats, agreement in rows:
        accepted = f"{stats.mean_accepted_length:.2f}" if stats else "1"
        forwards = str(stats.forwards) if stats else str(args.new_tokens - 1)
        print(f"| {decoder} | {tree} | {result['tokens_per_s']:.1f} | {result['tokens_per_s'] / base:.2f}x | "
              f"{accepted} | {forwards} | {agreement} |")
    for failure in failures:
        print(f"\nFAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
