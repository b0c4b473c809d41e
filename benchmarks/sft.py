"""Fine-tuning on chat data costs what training on text costs, and evaluation runs at least at
training's forward speed.

    python benchmarks/sft.py                       # Llama-3.2-1B shape, seq 4096 x 4, one GPU
    python benchmarks/sft.py --device cpu --shape tiny --seq 256 --batch 2 --steps 3   # plumbing

One process, one model prepared as train.py prepares it (full activation checkpointing, each block
compiled, float32 master weights under FSDP2), trained step by step on rows of:
- text: documents packed end to end (the built-in corpus), positions restarting per document;
- chat: conversations rendered with a ChatML template, packed whole with padding, the loss on the
  assistant turns only (labels -100 elsewhere);
- the same chat rows with the prompts in the loss too (`train_on_prompt`): the masking alone.
Both go through `flex_attention` with a document mask, so the difference is the masking and the
packing alone. Then the chat validation rows are evaluated twice: by `ligerzoo.training.evaluate`
(no autograd, what `ligerzoo eval` and the validation loss run) and by the training forward
(autograd on, no backward). The byte tokenizer keeps the corpus small; the vocabulary is the
shape's, so the loss's cost is the real one. Prints a markdown table.
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ligerzoo.kernels import IGNORE_INDEX
from ligerzoo.tokenizer import ByteTokenizer, load_tokenizer
from ligerzoo.training.config import DataSection
from ligerzoo.training.data import build_datasets
from ligerzoo.training.evaluate import evaluate
from ligerzoo.training.parallel import init_distributed
from train import SHAPES, ligerzoo_model, synchronize  # beside this script

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
UNTIMED_STEPS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per data set (after 3 untimed)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.device == "cpu":
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    _, _, device = init_distributed()
    with tempfile.TemporaryDirectory() as scratch:
        datasets = _datasets(Path(scratch), args.seq)
        model = ligerzoo_model(args.shape, "full", device, bf16_master=False, always_shard=False, fsdp={})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        rows = []
        for name in ("text", "chat", "chat, prompts in the loss"):
            data, stats = datasets[name]
            tokens_per_s = _train_speed(model, optimizer, data, args.batch, args.steps + UNTIMED_STEPS, device)
            targets = stats["targets"] / max(1, stats["rows"] * args.seq)
            rows.append((f"train on {name}", tokens_per_s, f"{100 * targets:.0f}% of tokens in the loss"))
        val = datasets["val"][0]
        forward = _forward_speed(model, val, args.batch, device)
        rows.append(("training forward (autograd on, no backward), chat", forward, ""))
        result = evaluate(model, _cycle(val, args.batch, 2 * len(val) // args.batch + UNTIMED_STEPS), device)
        result = evaluate(model, _cycle(val, args.batch, 2 * len(val) // args.batch), device)  # compiled now
        rows.append(("evaluate (ligerzoo eval, validation loss), chat", result["tokens_per_s"],
                     f"loss {result['loss']:.3f}"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{args.shape}, seq {args.seq} x {args.batch}, full checkpointing, compiled blocks, {name}, "
          f"torch {torch.__version__}\n")
    print("| run | tokens/s | |\n|---|---:|---|")
    for label, speed, note in rows:
        print(f"| {label} | {speed:,.0f} | {note} |")
    print(f"\nchat / text: {rows[1][1] / rows[0][1]:.3f}; masked / unmasked chat: {rows[1][1] / rows[2][1]:.3f}; "
          f"evaluate / training forward: {rows[4][1] / rows[3][1]:.2f}")


def _datasets(scratch: Path, seq: int) -> dict:
    """{"text": (data, stats), "chat": (data, stats), "val": (chat validation data, stats)}."""
    tokenizer_dir = scratch / "tokenizer"
    ByteTokenizer().save(tokenizer_dir)
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": CHATML}))
    tokenizer = load_tokenizer(tokenizer_dir)
    chats = scratch / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": conversation}) + "\n" for conversation in _conversations(3000)))
    text, _, text_stats = build_datasets(DataSection(seq_len=seq, num_documents=20000), tokenizer, seed=0)
    chat, val, chat_stats = build_datasets(DataSection(path=str(chats), seq_len=seq, val_fraction=0.05),
                                           tokenizer, seed=0)
    unmasked, _, unmasked_stats = build_datasets(DataSection(path=str(chats), seq_len=seq, val_fraction=0.05,
                                                             train_on_prompt=True), tokenizer, seed=0)
    return {"text": (text, text_stats["train"]), "chat": (chat, chat_stats["train"]),
            "chat, prompts in the loss": (unmasked, unmasked_stats["train"]), "val": (val, chat_stats["val"])}


def _conversations(count: int) -> list[list[dict]]:
    """Multi-turn conversations of varied lengths (a few hundred bytes to about 4,000)."""
    rng = random.Random(0)
    words = "the a model token answer question data kernel loss train memory fast row mask chat".split()

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high))).capitalize() + "."

    conversations = []
    for _ in range(count):
        turns = [{"role": "system", "content": sentence(5, 20)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            turns.append({"role": "user", "content": sentence(10, 60)})
            turns.append({"role": "assistant", "content": " ".join(sentence(10, 40) for _ in range(rng.randint(1, 3)))})
        conversations.append(turns)
    return conversations


def _train_speed(model, optimizer, data, batch: int, steps: int, device: torch.device) -> float:
    times = []
    for _ in range(steps):
        rows = {k: v.to(device) for k, v in data.next_batch(batch, 0, 1).items()}
        synchronize(device)
        started = time.perf_counter()
        loss = model(rows["input_ids"], labels=rows["labels"], position_ids=rows["position_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return batch * data.seq_len / statistics.median(times[UNTIMED_STEPS:])


def _forward_speed(model, data, batch: int, device: torch.device) -> float:
    times = []
    for rows in _cycle(data, batch, 2 * len(data) // batch + UNTIMED_STEPS):
        rows = {k: v.to(device) for k, v in rows.items()}
        synchronize(device)
        started = time.perf_counter()
        loss = model(rows["input_ids"], labels=rows["labels"], position_ids=rows["position_ids"]).loss
        synchronize(device)
        times.append(time.perf_counter() - started)
        del loss  # frees the graph: no backward
    return batch * data.seq_len / statistics.median(times[UNTIMED_STEPS:])


def _cycle(data, batch: int, count: int):
    """`count` batches of the data's rows in order, round and round (a small set is timed longer)."""
    produced = 0
    while True:
        for rows in data.eval_batches(batch, 0, 1):
            if produced == count:
                return
            if (rows["labels"] != IGNORE_INDEX).any():
                yield rows
                produced += 1


if __name__ == "__main__":
    sys.exit(main())
