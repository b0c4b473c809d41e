"""train.py end to end on CPU: 2 ranks through torchrun (gloo), a tiny Llama, a few steps.

The runs set TRITON_INTERPRET=0 so the kernels take their PyTorch path (the interpreter would
make each step take seconds); the kernels themselves are tested elsewhere.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ligerzoo.training.config import load_config
from ligerzoo.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.hidden_size", "64", "--model.intermediate_size", "128", "--model.num_hidden_layers", "2",
        "--model.num_attention_heads", "4", "--model.num_key_value_heads", "2",
        "--data.seq_len", "64", "--data.batch_size", "4", "--data.num_documents", "300",
        "--train.warmup_steps", "2", "--train.lr", "3e-3"]


def run_train(output_dir, *args, nproc=2, env=None, check=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", str(ROOT / "train.py"),
               "--output_dir", str(output_dir), *TINY, *args]
    # CPU ranks (gloo) on any machine: a GPU machine may have fewer GPUs than ranks.
    environment = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                   **(env or {})}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-8000:]}")
    return result


def losses(output_dir) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(output_dir)}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """A 2-rank run of 12 steps, never interrupted."""
    output_dir = tmp_path_factory.mktemp("reference")
    run_train(output_dir, "--max_steps", "12", "--checkpoint_every", "4")
    return output_dir


def test_loss_falls(reference_run):
    records = read_metrics(reference_run)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gib"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"] - 1.0  # random init starts at ln(320) = 5.8


def test_resume_after_sigkill_gives_same_losses(reference_run, tmp_path):
    killed = run_train(tmp_path, "--max_steps", "12", "--checkpoint_every", "4",
                       env={"LIGERZOO_KILL_AFTER_STEP": "6"}, check=False)
    assert killed.returncode != 0
    assert max(losses(tmp_path)) == 6  # it logged steps 5 and 6 after its checkpoint at step 4
    assert (tmp_path / "checkpoints" / "step_00000004").is_dir()
    resumed = run_train(tmp_path, "--max_steps", "12", "--checkpoint_every", "4")
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout
    assert losses(tmp_path) == losses(reference_run)  # bit for bit: same data, states and reductions


def test_export_loads_in_transformers_with_equal_logits(reference_run):
    transformers = pytest.importorskip("transformers")
    from ligerzoo import from_pretrained

    theirs = transformers.AutoModelForCausalLM.from_pretrained(reference_run / "hf", dtype=torch.float32).eval()
    ours = from_pretrained(reference_run / "hf", dtype=torch.float32)
    input_ids = torch.randint(0, 258, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(input_ids).logits
        actual = ours(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)  # float32, different op order


def test_config_flags_override_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nlr = 1\nmax_steps = 5\n[model]\nname = "some/model"\n')
    config = load_config(["--config", str(toml), "--max_steps", "7", "--data.seq_len=32", "--model.name", "none"])
    assert (config.train.lr, config.train.max_steps, config.data.seq_len, config.model.name) == (1.0, 7, 32, None)
    with pytest.raises(ValueError, match="unknown setting 'train.nope'"):
        load_config(["--train.nope", "1"])
    with pytest.raises(ValueError, match="not a valid int"):
        load_config(["--max_steps", "many"])
    with pytest.raises(ValueError, match="--train.fsdp_prefetch -1: blocks to gather ahead"):
        load_config(["--train.fsdp_prefetch", "-1"])


@pytest.mark.parametrize("configs_file", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_parse(configs_file):
    load_config(["--config", str(configs_file)])


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    """4 micro-batches of 1 row per rank see the same 8 rows per step as 1 micro-batch of 4."""
    run_train(tmp_path / "accum", "--max_steps", "4", "--checkpoint_every", "0",
              "--data.batch_size", "1", "--data.grad_accum", "4")
    run_train(tmp_path / "batch", "--max_steps", "4", "--checkpoint_every", "0", "--data.batch_size", "4")
    accum, batch = read_metrics(tmp_path / "accum"), read_metrics(tmp_path / "batch")
    for a, b in zip(accum, batch, strict=True):  # float32 sums in another order
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_one_rank_and_two_ranks_give_the_same_loss_curve(reference_run, tmp_path):
    run_train(tmp_path, "--max_steps", "12", "--checkpoint_every", "0", "--data.batch_size", "8", nproc=1)
    for step, loss in losses(reference_run).items():
        assert losses(tmp_path)[step] == pytest.approx(loss, rel=1e-4), step  # float32, other reduction order


def test_fsdp_prefetch_keeping_blocks_gathered_and_loss_chunks_give_the_same_losses(reference_run, tmp_path):
    """When the all-gathers start, whether a block's parameters are freed between its forward and
    backward, and how many rows the fused loss takes at a time change speed and memory, never the
    numbers (beyond float32 sums in another order)."""
    run_train(tmp_path, "--max_steps", "4", "--checkpoint_every", "0", "--train.fsdp_prefetch", "2",
              "--train.fsdp_reshard_after_forward", "false", "--train.loss_chunk_rows", "48")
    reference = losses(reference_run)
    for step, loss in losses(tmp_path).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step


@pytest.mark.parametrize("mode", ["full", "keep-attention", "selective"])
def test_activation_checkpointing_gives_the_same_losses(reference_run, tmp_path, mode):
    """Recomputing activations (all of them, or only the elementwise ones) changes memory, not
    the numbers: the losses equal those of the run that keeps everything."""
    run_train(tmp_path, "--max_steps", "12", "--checkpoint_every", "0",
              "--train.activation_checkpointing", mode)
    reference = losses(reference_run)
    for step, loss in losses(tmp_path).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step


@pytest.mark.parametrize("mode", ["full", "keep-attention", "selective"])
def test_compiled_checkpointed_blocks_give_the_same_losses(reference_run, tmp_path, mode):
    """Each block compiled with fullgraph=True, inside or around its checkpointing: a block that
    torch.compile cannot trace fails the run (torch >= 2.12 also fails one it skipped, which would
    otherwise run eagerly and silently), and the compiled block computes what the eager one does."""
    run_train(tmp_path, "--max_steps", "4", "--checkpoint_every", "0",
              "--train.activation_checkpointing", mode, "--train.compile", "true")
    reference = losses(reference_run)
    for step, loss in losses(tmp_path).items():
        assert loss == pytest.approx(reference[step], rel=1e-4), step
