"""Medusa head training on a frozen trunk: the fused loss against materialised logits and liger-kernel.

    python benchmarks/medusa_train.py --heads 4 1
    python benchmarks/medusa_train.py --device cpu --tiny     # CPU, tiny shapes: the plumbing, not speed
    TRITON_INTERPRET=1 python benchmarks/medusa_train.py --device cpu --tiny --seq 32  # hf-liger too

Every (peer, K) pair runs in a fresh process, from random init, on random tokens (labels = the
input ids): a Llama-3.2-1B-shaped trunk (benchmarks/train.py's `llama-1b`), frozen and run under
no_grad, then K Medusa heads, each --layers residual blocks and its own output projection
(ligerzoo.medusa.MedusaHeads for every peer, built in the compute dtype and initialised as
`init_weights` does: identity blocks, copies of the base head). Head k predicts token t+1+k
(`head_targets`), the step's loss is the plain sum of the K heads' mean losses, and fused AdamW
updates the heads' parameters only (bf16; float32 on CPU). Nothing is compiled. The peers differ
in the trunk and in each head's loss:

- ligerzoo: ligerzoo's trunk (`Transformer.trunk`), `MedusaHeads.forward`, which is
  ligerzoo's fused linear cross-entropy per head;
- hf-logits: transformers' LlamaForCausalLM (sdpa), `model.model(...).last_hidden_state`, each
  head's logits F.linear(state, W_k) materialised in bf16 and fed to F.cross_entropy as they are,
  as the original Medusa trains (its loss_fct takes the model-dtype logits, no float32 upcast);
- hf-liger: the same trunk, liger-kernel's LigerFusedLinearCrossEntropyLoss per head (the
  trunk itself is not patched: only the loss differs from hf-logits).

Prints a markdown table: median tokens/s (batch x seq over the median step time, the first 3 steps
untimed), peak memory (torch.cuda.max_memory_allocated since the trunk and heads were built: their
weights count, their construction does not) and the last step's loss per head. hf-logits and
hf-liger build the same trunk and heads from the same seed, so their losses should agree.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/train.py, not the root train.py

from train import SHAPES, profile_steps, synchronize  # noqa: E402

from ligerzoo.medusa import MedusaConfig, MedusaHeads, head_targets  # noqa: E402
from ligerzoo.medusa.heads import IGNORE_INDEX  # noqa: E402
from ligerzoo.models import ModelConfig, build_model  # noqa: E402

LLAMA_1B, TINY = SHAPES["llama-1b"], SHAPES["tiny"]
PEERS = ("ligerzoo", "hf-logits", "hf-liger")
UNTIMED_STEPS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", type=int, default=[4], metavar="K",
                        help="Medusa heads per run; several: one run each")
    parser.add_argument("--layers", type=int, default=1, help="residual blocks per head")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--seq", type=int, help="default 4096 (128 with --tiny)")
    parser.add_argument("--batch", type=int, help="default 4 (2 with --tiny)")
    parser.add_argument("--steps", type=int, default=10,
                        help=f"steps per run; the first {UNTIMED_STEPS} are not timed")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu runs in float32, and hf-liger only under TRITON_INTERPRET=1")
    parser.add_argument("--tiny", action="store_true", help="a tiny trunk (vocab 512, hidden 64, 2 layers)")
    parser.add_argument("--profile", metavar="DIR", help="also profile 2 steps of each run: the top CUDA "
                        "kernels to DIR/<peer>-k<K>.txt")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one JSON-encoded run
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(**json.loads(args.one))), flush=True)
        return
    if args.steps <= UNTIMED_STEPS:
        parser.error(f"--steps is {args.steps}: give more than the {UNTIMED_STEPS} untimed ones")
    if args.profile and args.device != "cuda":
        parser.error("--profile lists CUDA kernels: it needs --device cuda")
    seq = args.seq or (128 if args.tiny else 4096)
    batch = args.batch or (2 if args.tiny else 4)

    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    trunk = "tiny" if args.tiny else "llama-1b"
    print(f"{where}, torch {torch.__version__}, {trunk} trunk, seq {seq} x batch {batch}, {args.layers} "
          f"residual block(s) per head, {args.steps} steps ({UNTIMED_STEPS} untimed)\n", flush=True)
    print("| run | K | tokens/s | peak memory (GiB) | mean head loss | loss per head |")
    print("|---|---|---|---|---|---|", flush=True)
    failed = 0
    for num_heads in args.heads:
        for peer in args.peers:
            if peer == "hf-liger" and args.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                print(f"| {peer} | {num_heads} | skipped: liger-kernel's Triton kernels need CUDA (or "
                      "TRITON_INTERPRET=1) | | | |", flush=True)
                continue
            run = dict(peer=peer, num_heads=num_heads, num_layers=args.layers, seq=seq, batch=batch,
                       steps=args.steps, device=args.device, tiny=args.tiny, profile=args.profile)
            result = _in_child(run)
            if "error" in result:
                print(f"| {peer} | {num_heads} | failed: {result['error']} | | | |", flush=True)
                failed += 1
                continue
            peak = "n/a" if result["peak_gib"] is None else f"{result['peak_gib']:.1f}"
            per_head = ", ".join(f"{loss:.3f}" for loss in result["losses"])
            print(f"| {peer} | {num_heads} | {result['tokens_per_s']:,.0f} | {peak} "
                  f"| {statistics.mean(result['losses']):.3f} | {per_head} |", flush=True)
    if failed:
        sys.exit(f"{failed} run(s) failed; their errors are above")


def _in_child(run: dict) -> dict:
    """benchmarks/train.py's `_in_child`, on this file."""
    command = [sys.executable, __file__, "--one", json.dumps(run)]
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    print(done.stderr[-3000:], file=sys.stderr)
    return {"error": tail[:200]}


def run_one(peer: str, num_heads: int, num_layers: int, seq: int, batch: int, steps: int, device: str,
            tiny: bool, profile: str | None = None) -> dict:
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = TINY if tiny else LLAMA_1B
    # The same tokens for every peer, whatever the trunk's construction draws from the global seed.
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=generator).to(device)
    torch.manual_seed(0)
    if peer == "ligerzoo":
        trunk = build_model(ModelConfig(**shape), device=device, dtype=dtype)
        output_weight = trunk.output_weight

        def hidden_states(ids: torch.Tensor) -> torch.Tensor:
            return trunk.trunk(ids)[0]  # [B, T, H] after the final norm
    else:
        trunk = _hf_trunk(shape, device, dtype)
        output_weight = trunk.get_output_embeddings().weight

        def hidden_states(ids: torch.Tensor) -> torch.Tensor:
            return trunk.model(ids).last_hidden_state
    trunk.requires_grad_(False)
    trunk.eval()
    config = MedusaConfig(num_heads=num_heads, num_layers=num_layers)
    heads = _heads(config, shape, output_weight, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # from here: the weights and what training adds
    optimizer = torch.optim.AdamW(heads.parameters(), lr=1e-4, fused=True)
    head_losses = _head_losses(peer)

    def step() -> torch.Tensor:
        with torch.no_grad():
            hidden = hidden_states(input_ids)
        losses = head_losses(heads, hidden, input_ids, output_weight)  # [K]
        losses.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return losses.detach()

    times, losses = [], []
    for _ in range(steps):
        synchronize(device)
        started = time.perf_counter()
        losses.append(step())
        synchronize(device)
        times.append(time.perf_counter() - started)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if profile:
        profile_steps(step, os.path.join(profile, f"{peer}-k{num_heads}.txt"), device)
    tokens_per_s = batch * seq / statistics.median(times[UNTIMED_STEPS:])
    return {"tokens_per_s": tokens_per_s, "peak_gib": peak_gib, "losses": losses[-1].float().tolist()}


def _head_losses(peer: str):
    """(heads, hidden [B, T, H], labels [B, T], base output weight [V, H]) -> [K] each head's mean loss."""
    if peer == "ligerzoo":
        return lambda heads, hidden, labels, output_weight: heads(hidden, labels, output_weight)
    if peer == "hf-logits":
        def loss(state, weight, targets):
            return F.cross_entropy(F.linear(state, weight), targets, ignore_index=IGNORE_INDEX)  # bf16 logits
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)

        def loss(state, weight, targets):
            return liger_loss(weight, state, targets)

    def head_losses(heads, hidden, labels, output_weight):
        width = hidden.shape[-1]
        return torch.stack([
            # [N, H] rows and [N] targets: liger-kernel takes 2-D input only.
            loss(state.reshape(-1, width), heads.output_weight(k, output_weight),
                 head_targets(labels, k + 1).reshape(-1)).float()
            for k, state in enumerate(heads.head_states(hidden))
        ])
    return head_losses


def _heads(config: MedusaConfig, shape: dict, output_weight: torch.Tensor, device: torch.device,
           dtype: torch.dtype) -> MedusaHeads:
    """Heads built on the meta device and filled by `init_weights` on `device`: no float32 copy of
    K [V, H] projections on the way."""
    with torch.device("meta"):
        heads = MedusaHeads(config, shape["hidden_size"], shape["vocab_size"])
    heads.to(dtype).to_empty(device=device)
    heads.init_weights(output_weight)
    return heads


def _hf_trunk(shape: dict, device: torch.device, dtype: torch.dtype):
    import transformers

    values = dict(shape)
    values.pop("model_type")
    config = transformers.LlamaConfig(**values, attn_implementation="sdpa", use_cache=False)
    torch.set_default_dtype(dtype)  # built in the compute dtype directly
    with device:
        model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
