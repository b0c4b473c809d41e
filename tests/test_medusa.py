"""Medusa heads: targets, the fused per-head loss against materialised logits, save/load, the
trainable model (trunk frozen or joint), and training through train.py on CPU."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from ligerzoo.hf.pretrained import CheckpointError
from ligerzoo.medusa import MedusaConfig, MedusaHeads, head_targets, load_heads, save_heads
from ligerzoo.medusa.model import MedusaModel
from ligerzoo.models import ModelConfig, build_model
from ligerzoo.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return build_model(config, dtype=torch.float32)


def random_heads(num_heads=3, num_layers=2, shared=False, hidden=32, vocab=96, seed=1):
    torch.manual_seed(seed)
    heads = MedusaHeads(MedusaConfig(num_heads, num_layers, shared), hidden, vocab)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return heads


def test_head_targets_shift_and_stay_inside_documents():
    labels = torch.tensor([[10, 11, 12, IGNORE, 20, 21, 22, 23]])  # a document starts at 3
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    assert head_targets(labels, 1).tolist() == [[12, IGNORE, 20, 21, 22, 23, IGNORE, IGNORE]]
    # Head 1 at position 1 would predict token 3, the next document's first: ignored. Position 2
    # would reach into the next document (token 4): ignored too.
    assert head_targets(labels, 1, positions).tolist() == [[12, IGNORE, IGNORE, 21, 22, 23, IGNORE, IGNORE]]
    assert head_targets(labels, 3, positions).tolist() == [[IGNORE, IGNORE, IGNORE, 23, IGNORE, IGNORE, IGNORE, IGNORE]]


@pytest.mark.parametrize("shared", [False, True])
def test_fused_head_losses_equal_materialised_logits(shared):
    """Every head's loss is the fused linear cross-entropy; it must equal F.cross_entropy on the
    head's materialised logits, computed in float64, value and gradients."""
    heads = random_heads(shared=shared)
    reference = copy.deepcopy(heads).double()
    base_weight = torch.randn(96, 32, requires_grad=True)
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    labels = torch.randint(0, 96, (2, 9))
    labels[0, 4] = IGNORE
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    losses = heads(hidden, labels, base_weight, positions)
    (losses * torch.tensor([1.0, 0.5, 0.25])).sum().backward()

    hidden64 = hidden.detach().double().requires_grad_()
    base64 = base_weight.detach().double().requires_grad_()
    expected = []
    for k, state in enumerate(reference.head_states(hidden64)):
        logits = F.linear(state, reference.output_weight(k, base64))
        targets = head_targets(labels, k + 1, positions)
        expected.append(F.cross_entropy(logits.view(-1, 96), targets.view(-1), ignore_index=IGNORE))
    expected = torch.stack(expected)
    (expected * torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(losses.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=1e-4, atol=1e-5)
    if shared:
        torch.testing.assert_close(base_weight.grad.double(), base64.grad, rtol=1e-4, atol=1e-5)
    else:
        assert base_weight.grad is None
    for (name, p), p64 in zip(heads.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fresh_heads_start_as_copies_of_the_base_head():
    model = tiny_model()
    heads = MedusaHeads(MedusaConfig(num_heads=2), 32, 96)
    heads.init_weights(model.output_weight)
    hidden = torch.randn(1, 5, 32)
    base_logits = F.linear(hidden, model.output_weight)
    for logits in heads.logits(hidden, model.output_weight):
        torch.testing.assert_close(logits, base_logits)


@pytest.mark.parametrize("shared", [False, True])
def test_heads_round_trip_through_save_and_load(tmp_path, shared):
    heads = random_heads(shared=shared)
    save_heads(heads, tmp_path, base_model="some/base")
    loaded = load_heads(tmp_path)
    hidden, weight = torch.randn(3, 32), torch.randn(96, 32)
    assert torch.equal(loaded.logits(hidden, weight), heads.logits(hidden, weight))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["base_model_name_or_path"] == "some/base"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    assert load_heads(tmp_path, dtype=torch.bfloat16).blocks[0][0].linear.weight.dtype == torch.bfloat16


def test_loading_bad_heads_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_heads(tmp_path)
    save_heads(random_heads(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["medusa_num_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unexpected 0.1.linear.weight"):
        load_heads(tmp_path)


def test_medusa_config_is_checked():
    with pytest.raises(ValueError, match="num_heads"):
        MedusaConfig(num_heads=0)
    with pytest.raises(ValueError, match="mode"):
        MedusaModel(tiny_model(), random_heads(), mode="frozen")
    with pytest.raises(ValueError, match="hidden"):
        MedusaModel(tiny_model(), random_heads(hidden=16))


def test_frozen_trunk_gets_no_gradient_and_heads_do():
    model = MedusaModel(tiny_model(), random_heads(), mode="heads")
    ids = torch.randint(0, 96, (2, 12))
    out = model(ids, labels=ids, accuracy_rows=8)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.base.parameters())
    assert all(p.grad is not None for p in model.heads.parameters())
    weights = 0.8 ** torch.arange(3.0)
    torch.testing.assert_close(out.loss, (out.head_losses * weights).sum())
    assert out.head_accuracies.shape == (3,) and out.base_loss is None


def test_outputs_show_their_loss_to_fsdp():
    """FSDP2 hooks a wrapped module's backward on the tensors pytree finds in its output. torch
    2.11's pytree does not look into dataclasses: with the trunk frozen no block hooked the
    backward either, and on several ranks the heads' gradients were never reduced (the heads did
    not learn). Both outputs must hold their loss where pytree sees it."""
    model = MedusaModel(tiny_model(), random_heads(), mode="heads")
    ids = torch.randint(0, 96, (2, 12))
    for out in (model(ids, labels=ids), model.base(ids, labels=ids)):
        assert any(leaf is out.loss for leaf in tree_leaves(out)), type(out).__name__


def test_joint_training_adds_the_base_loss():
    base = tiny_model()
    model = MedusaModel(base, random_heads(), mode="joint", decay=0.5, heads_weight=0.2)
    ids = torch.randint(0, 96, (2, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.base_loss, base(ids, labels=ids).loss.detach())
    weights = 0.5 ** torch.arange(3.0)
    torch.testing.assert_close(out.loss.detach(), out.base_loss + 0.2 * (out.head_losses * weights).sum())
    assert all(p.grad is not None for p in base.parameters())


def run_train(output_dir, *args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               str(ROOT / "train.py"), "--output_dir", str(output_dir), "--data.seq_len", "64",
               "--data.batch_size", "4", "--data.num_documents", "300", "--train.warmup_steps", "2",
               "--train.lr", "3e-3", "--checkpoint_every", "0", *args]
    # CPU ranks (gloo) on any machine: a GPU machine may have fewer GPUs than ranks.
    environment = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"train.py failed:\n{result.stdout}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    """A tiny Llama trained for a few steps on the built-in corpus, exported to the Hub format."""
    output_dir = tmp_path_factory.mktemp("base")
    run_train(output_dir, "--max_steps", "20", "--model.hidden_size", "64", "--model.intermediate_size", "128",
              "--model.num_hidden_layers", "2", "--model.num_attention_heads", "4", "--model.num_key_value_heads", "2")
    return output_dir / "hf"


def test_heads_train_on_a_frozen_trunk_and_their_loss_falls(base_model_dir, tmp_path):
    run_train(tmp_path, "--model.name", str(base_model_dir), "--data.tokenizer", "bytes",
              "--medusa.num_heads", "2", "--max_steps", "16")
    records = read_metrics(tmp_path)
    for k in (1, 2):
        assert records[-1][f"medusa_loss_{k}"] < records[0][f"medusa_loss_{k}"] - 0.3
        assert 0 <= records[-1][f"medusa_acc_{k}"] <= 1
    assert records[-1]["medusa_acc_1"] > records[0]["medusa_acc_1"]
    assert not (tmp_path / "hf").exists()  # the trunk is the checkpoint it came from
    heads = load_heads(tmp_path / "medusa")
    assert heads.config.num_heads == 2
    assert json.loads((tmp_path / "medusa" / "config.json").read_text())["base_model_name_or_path"] == str(base_model_dir)


def test_joint_training_exports_the_trunk_and_the_heads(base_model_dir, tmp_path):
    run_train(tmp_path, "--model.name", str(base_model_dir), "--data.tokenizer", "bytes",
              "--medusa.num_heads", "2", "--medusa.mode", "joint", "--medusa.shared_output", "true",
              "--max_steps", "4", nproc=1)
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert load_heads(tmp_path / "medusa").outputs is None
    assert "medusa_loss_2" in read_metrics(tmp_path)[-1]
