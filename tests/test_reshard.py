"""A checkpoint saved on N ranks resumes on M (ligerzoo/training/checkpoints.py), on CPU.

Two ranks with --data.batch_size 4 read the same 8 rows a step as one rank with 8; one process
trains unsharded (plain tensors), two with FSDP2 (DTensors), so 2 -> 1 and 1 -> 2 also load one
kind of checkpoint into the other, model and AdamW state alike.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from ligerzoo.training.data import PackedData
from test_train import ROOT, losses, run_train

# The checkpoint to reshard lies at step 4 of 12; the others resume from it.
STEPS = ["--max_steps", "12", "--checkpoint_every", "4"]
BATCH = {1: ["--data.batch_size", "8"], 2: ["--data.batch_size", "4"]}  # 8 rows a step either way


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Runs of 12 steps, never interrupted, on 1 and on 2 ranks."""
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path_factory.mktemp(f"ranks{nproc}")
        run_train(runs[nproc], *STEPS, *BATCH[nproc], nproc=nproc)
    return runs


def rows_consumed(output_dir, step: int) -> int:
    extra = torch.load(output_dir / "checkpoints" / f"step_{step:08d}" / "rank0.pt", weights_only=False)
    return extra["data"]["rows_consumed"]


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_world_size_gives_the_losses_of_that_size(uninterrupted, tmp_path, saved_on, resumed_on):
    checkpoint = uninterrupted[saved_on] / "checkpoints" / "step_00000004"
    shutil.copytree(checkpoint, tmp_path / "checkpoints" / checkpoint.name)
    resumed = run_train(tmp_path, *STEPS, *BATCH[resumed_on], nproc=resumed_on)
    assert "(step 4)" in resumed.stdout
    expected = losses(uninterrupted[resumed_on])
    assert sorted(losses(tmp_path)) == list(range(5, 13))
    for step, loss in losses(tmp_path).items():  # float32, reduced in another order before step 5
        assert loss == pytest.approx(expected[step], rel=1e-4), step
    assert rows_consumed(tmp_path, 12) == rows_consumed(uninterrupted[resumed_on], 12) == 12 * 8


def test_init_distributed_turns_nvlink_multicast_off():
    code = ("import os; from ligerzoo.training.parallel import init_distributed; init_distributed(); "
            "print(*(os.environ.get(k) for k in ('NCCL_NVLS_ENABLE', 'TORCH_SYMM_MEM_DISABLE_MULTICAST', "
            "'NVSHMEM_DISABLE_NVLS')))")
    unset = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
             "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["0", "1", "1"]



def read_steps(state: dict, steps: int, batch_size: int, world_size: int) -> tuple[list, dict]:
    """The rows every rank reads in `steps` steps from `state` (each rank with its own data, as in
    training), and the data state they end in."""
    documents = [[i] * (3 + i % 5) for i in range(200)]  # no two rows of 8 tokens alike
    ranks = [PackedData.from_documents(documents, seq_len=8, seed=3) for _ in range(world_size)]
    for data in ranks:
        data.load_state_dict(state)
    rows = [tuple(row) for _ in range(steps) for rank, data in enumerate(ranks)
            for row in data.next_batch(batch_size, rank, world_size)["input_ids"].tolist()]
    assert all(data.state_dict() == ranks[0].state_dict() for data in ranks)
    return rows, ranks[0].state_dict()


def test_resuming_with_another_global_batch_reads_every_row_once():
    """The data position is the global count of rows consumed, so a run that resumes on another
    number of ranks, or with another batch size, neither repeats nor skips a row."""
    before, state = read_steps({"rows_consumed": 0}, steps=3, batch_size=4, world_size=2)
    after, _ = read_steps(state, steps=2, batch_size=5, world_size=3)
    unbroken, _ = read_steps({"rows_consumed": 0}, steps=1, batch_size=3 * 2 * 4 + 2 * 3 * 5, world_size=1)
    assert len(before + after) == len(unbroken)
    assert sorted(before + after) == sorted(unbroken)
