"""train.py against bad settings, busy or used output directories, changed resumes, damaged
checkpoints and diverging steps: each refused with a clear message and nothing lost.

Runs are tiny (see test_train.py) and mostly one rank; the fallback after a damaged checkpoint
runs on two, where the checkpoint's files are split across ranks.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ligerzoo.training.checkpoints import MANIFEST_FILE, complete_checkpoints
from ligerzoo.training.config import config_warnings, load_config
from ligerzoo.training.metrics import read_metrics
from test_train import ROOT, losses, run_train


def checkpoint_steps(output_dir) -> list[int]:
    return sorted(int(path.name.split("_")[1]) for path in complete_checkpoints(output_dir))


def snapshot(directory) -> dict:
    """Every file under `directory` with its bytes, to show that a refused run changed nothing."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "train.lock"}


@pytest.fixture(scope="module")
def unbroken_run(tmp_path_factory):
    """Two ranks, 12 steps, checkpoints every 4: the losses every resumed run must log."""
    output_dir = tmp_path_factory.mktemp("unbroken")
    run_train(output_dir, "--max_steps", "12", "--checkpoint_every", "4")
    return output_dir


# -- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--data.seq_len", "0", "--data.seq_len 0: 2 or more"),
    ("--data.batch_size", "-1", "--data.batch_size -1: a positive integer"),
    ("--data.grad_accum", "0", "--data.grad_accum 0: a positive integer"),
    ("--train.betas", "0.9", r"--train.betas \(0.9,\): two numbers"),
    ("--max_steps", "-3", "--train.max_steps -3: a positive number of steps"),
    ("--checkpoint_every", "-1", "--train.checkpoint_every -1"),
    ("--train.max_grad_norm", "0", "--train.max_grad_norm 0.0: a positive gradient norm"),
    ("--train.lr", "nan", "--train.lr nan: a positive learning rate"),
    ("--output_dir", "", "--train.output_dir '': a directory"),
    ("--train.keep_checkpoints", "-2", "--train.keep_checkpoints -2"),
    ("--train.loss_chunk_rows", "-1", "--train.loss_chunk_rows -1: a positive number of rows, or 0"),
    ("--model.num_key_value_heads", "3", "--model.num_key_value_heads 3: a divisor of"),
])
def test_out_of_range_setting_is_refused_naming_the_flag(flag, value, message):
    with pytest.raises(ValueError, match=message):
        load_config([flag, value])


def test_every_bad_setting_is_listed_in_one_error():
    with pytest.raises(ValueError) as error:
        load_config(["--max_steps", "0", "--data.batch_size", "0", "--train.lr", "-1"])
    assert all(flag in str(error.value) for flag in ("train.max_steps", "data.batch_size", "train.lr"))


def test_legal_but_surely_unintended_settings_warn():
    warnings = config_warnings(load_config(["--max_steps", "10", "--train.warmup_steps", "20",
                                            "--data.seq_len", "4096", "--model.max_position_embeddings", "2048"]))
    assert any("warmup_steps (20) is not shorter than the run" in w for w in warnings)
    assert any("exceeds model.max_position_embeddings" in w for w in warnings)
    assert config_warnings(load_config([])) == []


def test_bad_setting_stops_train_py_before_anything_is_written(tmp_path):
    result = run_train(tmp_path / "run", "--max_steps", "0", nproc=1, check=False)
    assert result.returncode == 1
    assert "train.py: error: --train.max_steps 0: a positive number of steps" in result.stderr
    assert str(ROOT / "ligerzoo") not in result.stderr  # no traceback of ours (torchrun prints its own)
    assert not (tmp_path / "run").exists()


# -- the output directory --------------------------------------------------------------------------


def test_second_run_on_a_busy_directory_stops_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ligerzoo.training.output_dir import claim_output_dir\n"
         f"held = claim_output_dir({str(tmp_path)!r}, overwrite=False, resumable=False)\nprint('held', flush=True)\n"
         "time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_train(tmp_path, "--max_steps", "2", nproc=1, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert f"is in use by another training run (pid {holder.pid} on" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.lock"]  # nothing written


def test_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    (tmp_path / "train.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "earlier"}))
    result = run_train(tmp_path, "--max_steps", "2", nproc=1)
    assert "took over" in result.stderr and "pid 999999 on gone" in result.stderr
    assert checkpoint_steps(tmp_path) == [2]


def test_earlier_run_without_checkpoints_is_kept_unless_overwrite_is_passed(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "tokens_per_s": 1.0}\n')
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    refused = run_train(tmp_path, "--max_steps", "2", nproc=1, check=False)
    assert refused.returncode == 1 and "--train.overwrite true" in refused.stderr
    assert snapshot(tmp_path) == before
    run_train(tmp_path, "--max_steps", "2", "--train.overwrite", "true", nproc=1)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_output_directory_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = run_train(tmp_path / "a-file" / "run", "--max_steps", "2", nproc=1, check=False)
    assert result.returncode == 1 and "cannot create the output directory" in result.stderr


# -- resuming ----------------------------------------------------------------------------------------


def test_resume_with_another_shape_is_refused_listing_every_difference(tmp_path):
    run_train(tmp_path, "--max_steps", "2", nproc=1)
    before = snapshot(tmp_path)
    result = run_train(tmp_path, "--max_steps", "4", "--model.num_hidden_layers", "1",
                       "--model.intermediate_size", "96", nproc=1, check=False)
    assert result.returncode == 1
    assert "model num_hidden_layers: 2 in the checkpoint, 1 now" in result.stderr
    assert "model intermediate_size: 128 in the checkpoint, 96 now" in result.stderr
    assert snapshot(tmp_path) == before  # export and metrics untouched


def test_resume_with_another_tokenizer_is_refused(tmp_path, small_sentencepiece):
    run_train(tmp_path, "--max_steps", "2", nproc=1)
    result = run_train(tmp_path, "--max_steps", "4", "--data.tokenizer", str(small_sentencepiece),
                       nproc=1, check=False)
    assert result.returncode == 1
    assert ("tokenizer: ByteTokenizer with 258 ids in the checkpoint, SentencePieceTokenizer with 60 ids now"
            in result.stderr)


@pytest.fixture
def small_sentencepiece(tmp_path):
    """A 60-piece SentencePiece model: it fits the from-scratch vocabulary of 320."""
    import sentencepiece

    from ligerzoo.training.data import builtin_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(builtin_corpus(200)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                             minloglevel=2)
    return tmp_path / "sp.model"


def test_resume_with_another_learning_rate_takes_effect(tmp_path):
    run_train(tmp_path, "--max_steps", "3", nproc=1)
    result = run_train(tmp_path, "--max_steps", "6", "--train.lr", "1e-3", "--train.warmup_steps", "0",
                       nproc=1)
    assert "train.lr: 0.003 -> 0.001" in result.stdout
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6))  # step 4: progress 3 of 6
    assert records[4]["lr"] == pytest.approx(1e-3 * cosine)


def test_checkpoint_past_max_steps_is_refused(tmp_path):
    run_train(tmp_path, "--max_steps", "3", nproc=1)
    result = run_train(tmp_path, "--max_steps", "2", nproc=1, check=False)
    assert result.returncode == 1 and "past --train.max_steps 2" in result.stderr


# -- damaged checkpoints, diverging steps ------------------------------------------------------------


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(unbroken_run, tmp_path):
    killed = run_train(tmp_path, "--max_steps", "12", "--checkpoint_every", "4",
                       env={"LIGERZOO_KILL_AFTER_STEP": "9"}, check=False)
    assert killed.returncode != 0 and checkpoint_steps(tmp_path) == [4, 8]
    latest = complete_checkpoints(tmp_path)[0]
    data_file = max(latest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[:-100])
    (tmp_path / "checkpoints" / "step_final").mkdir()  # a stray folder is not a checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 10, "loss": 1.2')  # a line cut short by a crash
    result = run_train(tmp_path, "--max_steps", "12", "--checkpoint_every", "4")
    assert f"{data_file.name} has" in result.stderr and "falling back" in result.stderr
    assert "resumed from" in result.stdout and "(step 4)" in result.stdout
    assert losses(tmp_path) == losses(unbroken_run)  # steps 5-12 again, as an unbroken run logs them


def test_planted_inf_is_caught_when_the_checkpoint_loads(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    run_train(tmp_path, "--max_steps", "4", "--checkpoint_every", "2", nproc=1)
    latest = complete_checkpoints(tmp_path)[0]
    whole = tmp_path / "whole.pt"
    dcp_to_torch_save(latest, whole)
    state = torch.load(whole, weights_only=False)
    state["model"]["embed_tokens.weight"][3, 5] = float("inf")
    torch.save(state, whole)
    for old in [*latest.glob("*.distcp"), latest / ".metadata", latest / MANIFEST_FILE]:
        old.unlink()  # as if written by a ligerzoo that kept no manifest
    torch_save_to_dcp(whole, latest)
    result = run_train(tmp_path, "--max_steps", "6", nproc=1)
    assert "non-finite values in model.embed_tokens.weight" in result.stderr
    assert "(step 2)" in result.stdout


def test_flipped_byte_is_caught_by_the_manifest(tmp_path):
    run_train(tmp_path, "--max_steps", "4", "--checkpoint_every", "2", nproc=1)
    latest = complete_checkpoints(tmp_path)[0]
    data_file = next(latest.glob("*.distcp"))
    content = bytearray(data_file.read_bytes())
    content[len(content) // 2] ^= 0x01
    data_file.write_bytes(bytes(content))
    result = run_train(tmp_path, "--max_steps", "6", nproc=1)
    assert "does not have the checksum it was saved with" in result.stderr and "(step 2)" in result.stdout


def test_diverging_step_is_never_applied_and_a_lower_lr_goes_on_from_the_last_checkpoint(tmp_path):
    run_train(tmp_path, "--max_steps", "2", nproc=1)
    # Step 3's update throws the weights to ~1e35, step 4's loss overflows: it is not applied.
    diverged = run_train(tmp_path, "--max_steps", "6", "--train.lr", "1e35", "--checkpoint_every", "0",
                         nproc=1, check=False)
    assert diverged.returncode == 1 and "at step 4; stopping without applying it" in diverged.stderr
    assert checkpoint_steps(tmp_path) == [2]
    resumed = run_train(tmp_path, "--max_steps", "6", "--train.lr", "1e-3", nproc=1)
    assert "(step 2)" in resumed.stdout
    assert all(math.isfinite(loss) for loss in losses(tmp_path).values()) and max(losses(tmp_path)) == 6


SAVE_NON_FINITE = """
import torch
from ligerzoo.models import ModelConfig, build_model
from ligerzoo.training.checkpoints import save_checkpoint
from ligerzoo.training.data import PackedData
from ligerzoo.training.parallel import init_distributed

init_distributed()
model = build_model(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2), device="cpu", dtype=torch.float32)
optimizer = torch.optim.AdamW(model.parameters())
with torch.no_grad():
    model.layers[0].attention.wqkv.weight[0, 0] = float("nan")
data = PackedData(torch.arange(64), torch.tensor([0]), seq_len=8, seed=0)
try:
    save_checkpoint({output_dir!r}, 7, model, optimizer, data, run={{}})
except FloatingPointError as error:
    print(error)
"""


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    result = subprocess.run([sys.executable, "-c", SAVE_NON_FINITE.format(output_dir=str(tmp_path))], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""})
    assert "step 7 left non-finite values in model.layers.0.attention.wqkv.weight" in result.stdout, result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_keep_checkpoints_keeps_the_newest(tmp_path):
    run_train(tmp_path, "--max_steps", "5", "--checkpoint_every", "1", "--train.keep_checkpoints", "2", nproc=1)
    assert checkpoint_steps(tmp_path) == [4, 5]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


# -- the export ----------------------------------------------------------------------------------------


def test_export_is_self_contained_for_generate_and_fine_tuning(tmp_path, monkeypatch):
    from ligerzoo.cli import main
    from ligerzoo.models.config import ModelConfig
    from ligerzoo.tokenizer import ByteTokenizer, load_tokenizer

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch path: a whole model generates
    run_train(tmp_path / "scratch", "--max_steps", "2", nproc=1)
    export = tmp_path / "scratch" / "hf"
    assert isinstance(load_tokenizer(export), ByteTokenizer)
    config = ModelConfig.from_dict(json.loads((export / "config.json").read_text()))
    assert (config.bos_token_id, config.eos_token_id) == (ByteTokenizer.bos_id, ByteTokenizer.eos_id)
    assert main(["generate", str(export), "Ada found", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    run_train(tmp_path / "tuned", "--max_steps", "2", "--model.name", str(export), nproc=1)
    assert isinstance(load_tokenizer(tmp_path / "tuned" / "hf"), ByteTokenizer)


def test_tokenizer_larger_than_the_vocabulary_is_refused_with_the_size_to_use(tmp_path):
    llama_tokenizer = pytest.importorskip("llama_models.llama3.tokenizer")
    llama3_file = Path(llama_tokenizer.__file__).parent / "tokenizer.model"  # 128,256 ids
    result = run_train(tmp_path, "--max_steps", "2", "--data.tokenizer", str(llama3_file), nproc=1, check=False)
    assert result.returncode == 1 and "pass --model.vocab_size 128256" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
