"""FP8 training (models/float8.py, --train.float8) on CPU: the blocks' linear layers swapped in
place, their products in FP8 and within its error of the exact ones, under "rowwise" the norms and
SwiGLU handing their projections FP8 rows, and a tiny model trained 100 steps in FP8 tracking the
same run without it."""

import importlib

import pytest
import torch
from test_train import losses, run_train

from ligerzoo.hf.pretrained import save_pretrained
from ligerzoo.models import ModelConfig, build_model
from ligerzoo.models.float8 import Float8Block, Float8Linear, Float8MoE, convert_to_float8
from ligerzoo.models.transformer import Block
from ligerzoo.training.blocks import prepare_blocks

# Every dimension a multiple of 16, the scaled product's granularity: no layer falls back.
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch path: whole models, fast


def model_pair(recipe, family="llama"):
    extra = dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2) if family == "mixtral" else {}
    if family == "llama with biases":
        extra = dict(attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    exact = build_model(ModelConfig(**CONFIG, **extra))
    converted = build_model(ModelConfig(**CONFIG, **extra))
    converted.load_state_dict(exact.state_dict())
    convert_to_float8(converted, recipe)
    return exact, converted


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_conversion_keeps_every_parameter_and_its_name(recipe):
    model = build_model(ModelConfig(**CONFIG))
    before = dict(model.named_parameters())
    names = convert_to_float8(model, recipe)
    assert names == [f"layers.{i}.{layer}" for i in range(2)
                     for layer in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")]
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[name] is before[name] for name in before)
    assert isinstance(model.layers[1].feed_forward.w2, Float8Linear)
    # One scale a row is what a producer computes in its pass: only rowwise fuses (models/float8.py).
    assert all(type(block) is (Float8Block if recipe == "rowwise" else Block) for block in model.layers)
    assert list(model.state_dict()) == list(build_model(ModelConfig(**CONFIG)).state_dict())


def test_mixtral_keeps_its_router_exact_and_runs_its_experts_in_fp8():
    _, model = model_pair("rowwise", "mixtral")
    block = model.layers[0]
    assert isinstance(block.attention.wqkv, Float8Linear) and isinstance(block.attention.wo, Float8Linear)
    assert type(block.feed_forward) is Float8MoE and type(block.feed_forward.router) is torch.nn.Linear


def loss_and_grads(model):
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(1))
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_fp8_loss_and_gradients_are_near_the_exact_ones_and_not_equal(recipe, monkeypatch):
    exact, converted = model_pair(recipe)
    products = []
    module = importlib.import_module("ligerzoo.kernels.float8_linear")  # the package exports the function
    scaled_mm = module.scaled_mm
    monkeypatch.setattr(module, "scaled_mm", lambda *args: products.append(1) or scaled_mm(*args))
    (loss, grads), (fp8_loss, fp8_grads) = loss_and_grads(exact), loss_and_grads(converted)
    assert len(products) == 8 * 3  # 8 layers x (forward, input gradient, weight gradient)
    assert fp8_loss != loss and abs(fp8_loss - loss) < 0.02 * loss
    for name, grad in grads.items():
        error = (fp8_grads[name] - grad).norm() / grad.norm()
        assert 0 < error < 0.15, (name, error)  # e4m3 rounds to 2**-4, e5m2 to 2**-3 of each operand


@pytest.mark.parametrize("family", ["llama", "llama with biases", "mixtral"])
def test_fused_producers_give_the_bits_of_the_fp8_layers_behind_the_plain_ones(family, monkeypatch):
    """A rowwise block's norms and SwiGLU write the FP8 rows their projections read (Mixtral's
    experts cast their own rows, so only its attention norm does); loss and every gradient are those of the
    same Float8Linear layers behind the plain norms and SwiGLU (Block.forward on the same modules),
    but w13's weight gradient in a bias-free MLP, whose dy columns come from the FP8 rows SwiGLU's
    backward writes (kernels/float8_fused.py: add_rms_norm_mlp): there within FP8's rounding."""
    _, model = model_pair("rowwise", family)
    module = importlib.import_module("ligerzoo.kernels.float8_fused")
    calls = []
    for name in ("rms_norm_forward_float8", "swiglu_packed_forward_float8"):
        launcher = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, f=launcher, n=name: calls.append(n) or f(*args))
    fused_loss, fused_grads = loss_and_grads(model)
    norms, swiglus = (2, 0) if family == "mixtral" else (4, 2)  # in 2 layers
    assert calls.count("rms_norm_forward_float8") == norms and calls.count("swiglu_packed_forward_float8") == swiglus
    monkeypatch.setattr(Float8Block, "forward", Block.forward)
    loss, grads = loss_and_grads(model)
    assert torch.equal(fused_loss, loss)
    assert list(fused_grads) == list(grads)
    for name, grad in grads.items():
        if family == "llama" and name.endswith("w13.weight"):
            error = (fused_grads[name] - grad).norm() / grad.norm()
            assert 0 < error < 2.0**-5, (name, error)
        else:
            assert torch.equal(fused_grads[name], grad), name


def test_prepare_blocks_converts_before_checkpointing_and_compile():
    model = build_model(ModelConfig(**CONFIG))
    prepare_blocks(model, activation_checkpointing="full", float8="rowwise")
    assert isinstance(model.layers[0].attention.wqkv, Float8Linear)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 32))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("checkpointing,family", [("full", "llama"), ("keep-attention", "llama"),
                                                   ("full", "mixtral")])
def test_fp8_blocks_recomputed_compute_what_they_did(checkpointing, family):
    """Rowwise FP8 blocks compiled with each checkpointing mode give the loss and gradients of the
    same blocks compiled without it: what is recomputed is recomputed to the same bits, and what
    keep-attention keeps (attention's output) is what the backward would have read. Mixtral's FP8
    experts (their routing and padding) too."""
    extra = dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2) if family == "mixtral" else {}
    results = []
    for mode in ("off", checkpointing):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model(ModelConfig(**CONFIG, **extra))
        prepare_blocks(model, activation_checkpointing=mode, compile=True, float8="rowwise")
        results.append(loss_and_grads(model))
    (loss, grads), (recomputed_loss, recomputed_grads) = results
    assert torch.equal(recomputed_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="unknown FP8 recipe 'e4m3'"):
        convert_to_float8(build_model(ModelConfig(**CONFIG)), "e4m3")


def test_bad_flag_is_refused_before_anything_is_written(tmp_path):
    result = run_train(tmp_path / "run", "--train.float8", "fp8", nproc=1, check=False)
    assert result.returncode == 1
    assert "train.py: error: --train.float8 'fp8': 'off', 'rowwise' or 'tensorwise'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_tiny_model_trained_in_fp8_tracks_the_exact_run(tmp_path):
    steps = ["--max_steps", "100", "--checkpoint_every", "0", "--data.num_documents", "2000"]
    run_train(tmp_path / "exact", *steps, nproc=1)
    run_train(tmp_path / "fp8", *steps, "--train.float8", "rowwise", nproc=1)
    exact, fp8 = losses(tmp_path / "exact"), losses(tmp_path / "fp8")
    assert list(fp8) == list(exact) == list(range(1, 101))
    assert fp8[1] == pytest.approx(exact[1], rel=0.01)  # the same start
    assert exact[100] < exact[1] - 2.0  # it learns
    late = range(81, 101)
    mean_exact = sum(exact[s] for s in late) / len(late)
    mean_fp8 = sum(fp8[s] for s in late) / len(late)
    assert mean_fp8 == pytest.approx(mean_exact, rel=0.03), (mean_fp8, mean_exact)
    assert any(fp8[s] != exact[s] for s in late)  # FP8 was in the products


def test_a_tiny_mixtral_trains_in_fp8_on_two_ranks_as_it_does_exactly(tmp_path):
    """Mixtral's experts in FP8 (Float8MoE) under FSDP2 over 2 ranks, its 4 experts' weights
    sharded across them, compiled blocks, a checkpoint and the export: the loss tracks the exact run."""
    torch.manual_seed(0)
    save_pretrained(build_model(ModelConfig(**{**CONFIG, "vocab_size": 320}, model_type="mixtral",
                                            num_local_experts=4, num_experts_per_tok=2)), tmp_path / "base")
    steps = ["--model.name", str(tmp_path / "base"), "--data.tokenizer", "bytes", "--max_steps", "20",
             "--checkpoint_every", "10"]
    run_train(tmp_path / "exact", *steps)
    run_train(tmp_path / "fp8", *steps, "--train.float8", "rowwise")
    exact, fp8 = losses(tmp_path / "exact"), losses(tmp_path / "fp8")
    assert list(fp8) == list(exact) == list(range(1, 21))
    assert exact[20] < exact[1] - 1.5  # it learns
    assert fp8[20] == pytest.approx(exact[20], rel=0.03) and fp8[20] != exact[20]
    assert (tmp_path / "fp8" / "hf" / "model.safetensors").exists()


def test_a_run_resumes_with_fp8_switched_on(tmp_path):
    """FP8 is a compute format: the checkpoint of an exact run resumes under FP8, and says so."""
    run_train(tmp_path, "--max_steps", "4", "--checkpoint_every", "4", nproc=1)
    result = run_train(tmp_path, "--max_steps", "8", "--checkpoint_every", "4", "--train.float8", "rowwise", nproc=1)
    assert "train.float8: 'off' -> 'rowwise'" in result.stdout + result.stderr
    assert list(losses(tmp_path)) == list(range(1, 9))
