"""Fine-tuning on instruction data end to end (train.py on CPU ranks, a tiny Llama, the byte
tokenizer): prompt-masked loss, validation losses, and `ligerzoo eval`."""

import json
import math
import random

import pytest
import torch

from ligerzoo.cli import main as cli
from ligerzoo.training.metrics import read_metrics
from test_train import losses, run_train

ANSWER = "The answer is 42."
# Rows long enough for any example; a schedule that learns the answer in 60 steps.
LEARNING = ["--data.seq_len", "128", "--max_steps", "60", "--checkpoint_every", "20", "--train.lr", "1e-2"]


def write_examples(path, count: int, seed: int = 0) -> None:
    """Prompts of random letters, every answer the same: only the answers can be learnt."""
    rng = random.Random(seed)
    with open(path, "w") as file:
        for _ in range(count):
            prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(20, 40)))
            file.write(json.dumps({"prompt": f"Q: {prompt}\nA: ", "completion": ANSWER}) + "\n")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    write_examples(path, 400)
    return path


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory, examples):
    output_dir = tmp_path_factory.mktemp("masked")
    run_train(output_dir, "--data.path", str(examples), "--data.val_fraction", "0.1", "--train.eval_every", "20",
              *LEARNING)
    return output_dir


def test_answers_are_learnt_when_only_they_are_in_the_loss(masked_run, examples, tmp_path):
    assert losses(masked_run)[60] < 0.1  # the fixed answer, nearly certain
    run_train(tmp_path, "--data.path", str(examples), "--data.train_on_prompt", "true", *LEARNING)
    assert losses(tmp_path)[60] > 1.0  # the random prompts cannot be


def test_validation_loss_is_logged_every_n_steps_and_at_the_end(masked_run):
    records = {r["step"]: r for r in read_metrics(masked_run)}
    assert [step for step, r in records.items() if "val_loss" in r] == [20, 40, 60]
    for step in (20, 40, 60):
        assert records[step]["val_perplexity"] == pytest.approx(math.exp(records[step]["val_loss"]))
    assert records[60]["val_loss"] < 0.2 < records[20]["val_loss"]


def test_resumed_run_logs_the_same_validation_losses(masked_run, examples, tmp_path):
    arguments = ["--data.path", str(examples), "--data.val_fraction", "0.1", "--train.eval_every", "20", *LEARNING]
    killed = run_train(tmp_path, *arguments, env={"LIGERZOO_KILL_AFTER_STEP": "30"}, check=False)
    assert killed.returncode != 0
    run_train(tmp_path, *arguments)
    resumed = {r["step"]: r.get("val_loss") for r in read_metrics(tmp_path)}
    unbroken = {r["step"]: r.get("val_loss") for r in read_metrics(masked_run)}
    assert resumed == unbroken


def test_ligerzoo_eval_equals_a_direct_computation(masked_run, examples, capsys, monkeypatch):
    from ligerzoo import from_pretrained, load_tokenizer
    from ligerzoo.training.data import build_eval_data

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch path: whole models, not kernels, here

    export = masked_run / "hf"
    assert cli(["eval", str(export), "--data", str(examples), "--seq-len", "128", "--batch-size", "3",
                "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.split()
    reported_loss, reported_perplexity = float(printed[1]), float(printed[3])

    model = from_pretrained(export, dtype=torch.float32)
    data, _ = build_eval_data(str(examples), load_tokenizer(export), 128)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.eval_batches(5, 0, 1):
            logits = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
            targets = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                                                       ignore_index=-100, reduction="sum").item()
            count += (targets != -100).sum().item()
    assert reported_loss == pytest.approx(total / count, abs=1e-4)  # printed to 4 decimals
    assert reported_perplexity == pytest.approx(math.exp(total / count), rel=1e-3)


def test_micro_batches_without_targets_neither_stop_nor_skew_the_run(tmp_path):
    """Prompts longer than a row are cut before their answer: rows with no target at all, whose
    mean loss is NaN, must add nothing (one row a micro-batch, so whole micro-batches have none)."""
    path = tmp_path / "long-prompts.jsonl"
    rng = random.Random(1)
    with open(path, "w") as file:
        for index in range(200):
            prompt = "x" * (100 if index % 2 else 10) + str(rng.random())
            file.write(json.dumps({"prompt": prompt, "completion": ANSWER}) + "\n")
    run_train(tmp_path / "run", "--data.path", str(path), "--data.seq_len", "64", "--data.batch_size", "1",
              "--data.grad_accum", "2", "--max_steps", "8", "--checkpoint_every", "0")
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "run").values())
