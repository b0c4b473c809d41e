"""Rowwise FP8 weights cast once per optimizer step and kept (models/float8_weight_rows.py,
--train.float8_keep_weight_rows) on CPU: the forward multiplies by the kept rows, bit for bit the
cast it would make; the backward makes W's columns from them; a cast after each optimizer step
and after a resume keeps them current; nothing of them reaches the state dict."""


import pytest
import torch
import torch.distributed as dist
from gloo_ranks import on_gloo_ranks
from test_float8_train import CONFIG, model_pair
from test_train import losses, run_train

from ligerzoo.kernels.float8 import E4M3, quantize_rows
from ligerzoo.models import ModelConfig, build_model, float8_weight_rows
from ligerzoo.models.float8 import Float8Linear, convert_to_float8
from ligerzoo.models.float8_weight_rows import keep_weight_rows, keep_weight_rows_through_steps
from ligerzoo.training.adamw import AdamW
from ligerzoo.training.blocks import prepare_blocks
from ligerzoo.training.config import load_config


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch path: whole models, fast


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 32), generator=generator)
    return input_ids, input_ids.clone()


def loss_and_grads(model):
    model.zero_grad()
    input_ids, labels = batch()
    loss = model(input_ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def layers(model):
    return [m for m in model.modules() if isinstance(m, Float8Linear)]


def test_the_kept_rows_are_the_cast_the_forward_makes_and_the_backward_reads():
    _, casting = model_pair("rowwise")
    _, keeping = model_pair("rowwise")
    keep_weight_rows(keeping, torch.float32)()
    for layer in layers(keeping):
        rows = quantize_rows(layer.weight.detach())
        assert layer.kept_rows_data.dtype == E4M3
        assert torch.equal(layer.kept_rows_data.view(torch.uint8), rows.data.view(torch.uint8))
        assert torch.equal(layer.kept_rows_scale, rows.scale)
    loss, grads = loss_and_grads(casting)
    kept_loss, kept_grads = loss_and_grads(keeping)
    assert torch.equal(kept_loss, loss)  # the forward's bits
    for name, grad in grads.items():  # W's columns from its rows: the same but for FP8 subnormals
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_the_forward_multiplies_by_the_kept_rows_until_they_are_cast_again():
    """Kept rows go stale when the weights change: the forward keeps multiplying by them until
    cast() runs (which train.py runs after every optimizer step)."""
    _, casting = model_pair("rowwise")
    _, keeping = model_pair("rowwise")
    cast = keep_weight_rows(keeping, torch.float32)
    cast()
    input_ids, labels = batch(1)
    before = keeping(input_ids, labels=labels).loss.detach()
    with torch.no_grad():
        for model in (casting, keeping):
            for layer in layers(model):
                layer.weight.mul_(1.5)
    assert torch.equal(keeping(input_ids, labels=labels).loss.detach(), before)
    cast()
    after = keeping(input_ids, labels=labels).loss.detach()
    assert not torch.equal(after, before)
    assert torch.equal(after, casting(input_ids, labels=labels).loss.detach())


def test_compiled_checkpointed_blocks_multiply_by_the_kept_rows():
    """Compiled blocks with full activation checkpointing read the kept rows in the forward and its
    recomputation (no graph break: prepare_blocks compiles with fullgraph): the loss and gradients
    of the blocks that cast at every use, and stale rows until cast again."""
    results = []
    for keep in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model(ModelConfig(**CONFIG))
        prepare_blocks(model, activation_checkpointing="full", compile=True, float8="rowwise")
        cast = keep_weight_rows(model, torch.float32) if keep else lambda: None
        cast()
        results.append(loss_and_grads(model))
    (loss, grads), (kept_loss, kept_grads) = results
    assert torch.equal(kept_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)
    with torch.no_grad():
        for layer in layers(model):
            layer.weight.mul_(1.5)
    assert torch.equal(loss_and_grads(model)[0], kept_loss)
    cast()
    assert not torch.equal(loss_and_grads(model)[0], kept_loss)


def test_the_compiled_cast_the_gpu_runs_is_the_cast():
    """On the GPU the rows are cast by `_cast_into` compiled, a graph a weight shape; compiled on
    the CPU here, the same bits as quantize_rows."""
    torch._dynamo.reset()
    cast_into = torch.compile(float8_weight_rows._cast_into, dynamic=False)
    for shape in ((96, 64), (64, 128), (96, 64)):
        weight = torch.randn(shape, dtype=torch.bfloat16)
        data, scale = torch.empty(shape, dtype=E4M3), torch.empty(shape[0], 1)
        cast_into(weight, data, scale)
        rows = quantize_rows(weight)
        assert torch.equal(data.view(torch.uint8), rows.data.view(torch.uint8))
        assert torch.equal(scale, rows.scale)


def test_the_kept_rows_stay_out_of_the_state_dict():
    _, model = model_pair("rowwise")
    names = list(model.state_dict())
    keep_weight_rows(model, torch.float32)()
    assert list(model.state_dict()) == names


def test_a_model_without_rowwise_layers_is_refused():
    with pytest.raises(ValueError, match="no rowwise FP8 layer"):
        keep_weight_rows(build_model(ModelConfig(**CONFIG)), torch.float32)
    model = build_model(ModelConfig(**CONFIG))
    convert_to_float8(model, "tensorwise")
    with pytest.raises(ValueError, match="no rowwise FP8 layer"):
        keep_weight_rows(model, torch.float32)


def test_the_setting_needs_the_rowwise_recipe():
    flag = ["--train.float8_keep_weight_rows", "true"]
    with pytest.raises(ValueError, match="keep_weight_rows True: false unless --train.float8 is rowwise"):
        load_config([*flag, "--train.float8", "tensorwise"])
    assert load_config([*flag, "--train.float8", "rowwise"]).train.float8_keep_weight_rows


@pytest.mark.parametrize("optimizer_kind", ["ligerzoo", "torch"])
def test_the_rows_are_cast_again_by_each_step(optimizer_kind):
    """ligerzoo's AdamW writes the rows in the pass that updates each weight; torch's gets the cast
    as a step post-hook. Either way the rows after a step are the cast of the weights it made."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**CONFIG))
    convert_to_float8(model, "rowwise")
    params = list(model.parameters())
    optimizer = AdamW(params, lr=1e-2) if optimizer_kind == "ligerzoo" else torch.optim.AdamW(params, lr=1e-2)
    keep_weight_rows_through_steps(model, optimizer, torch.float32)
    assert bool(optimizer._optimizer_step_post_hooks) == (optimizer_kind == "torch")
    first = [layer.kept_rows_data.clone() for layer in layers(model)]
    for _ in range(2):
        loss_and_grads(model)
        optimizer.step()
    for layer, before in zip(layers(model), first):
        expected = quantize_rows(layer.weight.detach())
        assert torch.equal(layer.kept_rows_data.view(torch.uint8), expected.data.view(torch.uint8))
        assert torch.equal(layer.kept_rows_scale, expected.scale)
        assert not torch.equal(layer.kept_rows_data.view(torch.uint8), before.view(torch.uint8))


def test_training_with_kept_rows_and_a_resume_tracks_the_run_that_casts_at_every_use(tmp_path):
    """train.py casts the kept rows after the weights are built or resumed and after each optimizer
    step: a run that kept none of them current would multiply by its first weights throughout."""
    steps = ["--max_steps", "8", "--checkpoint_every", "4", "--train.float8", "rowwise"]
    run_train(tmp_path / "casting", *steps, nproc=1)
    keep = [*steps, "--train.float8_keep_weight_rows", "true"]
    killed = run_train(tmp_path / "keeping", *keep, nproc=1, env={"LIGERZOO_KILL_AFTER_STEP": "5"},
                       check=False)
    assert killed.returncode != 0
    resumed = run_train(tmp_path / "keeping", *keep, nproc=1)
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout
    casting, keeping = losses(tmp_path / "casting"), losses(tmp_path / "keeping")
    assert list(keeping) == list(casting) == list(range(1, 9))
    assert keeping[1] == casting[1]  # the same forward from the same weights
    assert casting[8] < casting[1] - 0.5  # the weights move
    for step in casting:
        assert keeping[step] == pytest.approx(casting[step], rel=1e-3), step


def _sharded_model(keep):
    """The tiny rowwise model as train.py wraps float32 master weights on the GPU: each block and
    the root sharded by FSDP2, gathered and computed in bf16; (its loss, whether rows were kept)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = build_model(ModelConfig(**CONFIG))
    convert_to_float8(model, "rowwise")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if keep:
        keep_weight_rows(model, torch.bfloat16)()
    input_ids, labels = batch()
    loss = model(input_ids, labels=labels).loss
    loss.backward()
    if keep:  # the forward multiplies by the kept rows: changing the shards changes nothing yet
        with torch.no_grad():
            for layer in layers(model):
                layer.weight.to_local().mul_(2)
        return loss.detach(), model(input_ids, labels=labels).loss.detach()
    return loss.detach()


def _one_rank():
    return _sharded_model(keep=False), *_sharded_model(keep=True)


def _two_ranks():
    try:
        _sharded_model(keep=True)
    except ValueError as error:
        return str(error)
    return None


def test_one_ranks_fsdp2_shards_are_whole_weights_whose_rows_are_kept(tmp_path):
    """Under FSDP2 on one rank (float32 master weights) the rows are cast from the shard, which is the
    whole weight, in the compute dtype: the loss of the gathered bf16 weights' own casts, bit for bit."""
    loss, kept_loss, kept_loss_after_the_shards_changed = on_gloo_ranks(1, _one_rank, tmp_path)
    assert torch.equal(kept_loss, loss)
    assert torch.equal(kept_loss_after_the_shards_changed, kept_loss)


def test_weights_sharded_over_several_ranks_are_refused(tmp_path):
    assert "sharded over several ranks" in on_gloo_ranks(2, _two_ranks, tmp_path)
