"""How blocks are prepared for training (ligerzoo/training/blocks.py): activation checkpointing and
compile change what is kept and what runs twice, never the numbers. CPU, the kernels' PyTorch
path (TRITON_INTERPRET=0 in these tests: a traced triton_op needs a GPU)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ligerzoo.models import ModelConfig, build_model
from ligerzoo.training.blocks import prepare_blocks

LAYERS = 2
# Each block's products: fused q/k/v, the attention output, fused gate/up, the down projection.
LINEARS_PER_BLOCK = 4


@pytest.fixture(autouse=True)
def pytorch_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(checkpointing, compile, layers=LAYERS):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = build_model(config)
    prepare_blocks(model, checkpointing, compile)
    return model


def backward_matmuls(model, input_ids) -> tuple[torch.Tensor, int]:
    """The loss and how many matrix products its backward runs (the recomputation included),
    not counting the loss's own (the output projection is outside the blocks)."""
    # A first step compiles the blocks; some torch versions trace the backward during the first
    # backward, and that tracing's products would count too.
    model(input_ids, labels=input_ids).loss.backward()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=input_ids).loss
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    products = ("aten::mm", "aten::addmm", "aten::bmm")
    # A compiled graph's product calls the op again inside its own event: count the outer one.
    return loss.detach(), sum(event.name in products and not (event.cpu_parent and event.cpu_parent.name in products)
                              for event in prof.events())


@pytest.mark.parametrize("compile", [False, True])
def test_full_checkpointing_recomputes_what_the_backward_needs(compile):
    input_ids = torch.randint(0, 128, (2, 32))
    reference_loss, kept = backward_matmuls(tiny_model("off", compile=False), input_ids)
    loss, recomputed = backward_matmuls(tiny_model("full", compile), input_ids)
    assert torch.allclose(loss, reference_loss, rtol=1e-5)
    # Eagerly the whole block runs again; compiled, the partitioner skips the down projection,
    # whose output only feeds the residual stream the backward does not read.
    again = LINEARS_PER_BLOCK if not compile else LINEARS_PER_BLOCK - 1
    assert recomputed - kept == LAYERS * again


def saved_bytes_in_forward(model, input_ids) -> int:
    """What the forward keeps for the backward, parameters aside. Compiled only: eager
    checkpointing keeps its tensors through saved-tensor hooks of its own, which hide them."""
    saved = 0

    def pack(tensor):
        nonlocal saved
        if not isinstance(tensor, torch.nn.Parameter):
            saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids, labels=input_ids).loss.backward()
    return saved


def test_compiled_full_checkpointing_keeps_only_each_blocks_input():
    input_ids = torch.randint(0, 128, (2, 32))
    per_block = {}
    for mode in ("off", "selective", "full"):
        # One block more, the difference: what a block keeps, without the embedding and the loss.
        one, two = (saved_bytes_in_forward(tiny_model(mode, compile=True, layers=layers), input_ids)
                    for layers in (1, 2))
        per_block[mode] = two - one
    block_input = input_ids.numel() * 64 * 4  # float32, hidden size 64
    assert per_block["full"] < per_block["selective"] < per_block["off"]
    # The input, the rotary tables and the mask's few integers; not one activation more.
    assert block_input <= per_block["full"] < 2 * block_input


def attention_forwards_in_backward(model, input_ids) -> int:
    model(input_ids, labels=input_ids).loss.backward()  # compiles
    loss = model(input_ids, labels=input_ids).loss
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    return sum(event.name.startswith("aten::_scaled_dot_product") and "backward" not in event.name
               and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::_scaled_dot_product"))
               for event in prof.events())


def test_compiled_keep_attention_checkpointing_keeps_attentions_output():
    """keep-attention recomputes what full checkpointing does but attention: its output and
    log-sum-exp are kept (as well as the block's input), so the backward runs no attention forward."""
    input_ids = torch.randint(0, 128, (2, 32))
    reference_loss, kept = backward_matmuls(tiny_model("off", compile=False), input_ids)
    loss, recomputed = backward_matmuls(tiny_model("keep-attention", compile=True), input_ids)
    assert torch.allclose(loss, reference_loss, rtol=1e-5)
    assert recomputed - kept == LAYERS * (LINEARS_PER_BLOCK - 1)
    assert attention_forwards_in_backward(tiny_model("full", compile=True), input_ids) == LAYERS
    assert attention_forwards_in_backward(tiny_model("keep-attention", compile=True), input_ids) == 0
    one, two = (saved_bytes_in_forward(tiny_model("keep-attention", compile=True, layers=layers), input_ids)
                for layers in (1, 2))
    block_input = attention_output = input_ids.numel() * 64 * 4  # float32; 4 heads x 16
    log_sum_exp = input_ids.numel() * 4 * 4  # float32, a query a head
    assert block_input + attention_output + log_sum_exp <= two - one < 2 * block_input + attention_output


def test_selective_checkpointing_keeps_every_kind_of_product():
    """Dense and grouped, bf16 and FP8 (Mixtral's FP8 experts are `_scaled_grouped_mm`)."""
    from torch.utils.checkpoint import CheckpointPolicy

    from ligerzoo.training.blocks import _POLICIES

    aten = torch.ops.aten
    keep = _POLICIES["selective"]
    for op in (aten.mm, aten.addmm, aten._grouped_mm, aten._scaled_mm, aten._scaled_grouped_mm):
        assert keep(None, op.default) == CheckpointPolicy.MUST_SAVE, op
    assert keep(None, aten.mul.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE


def test_unknown_checkpointing_mode_is_refused_before_the_model_changes():
    model = build_model(ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2))
    forward = model.layers[0].forward
    with pytest.raises(ValueError, match="activation_checkpointing is 'attention': expected one of off, full, "
                                         "keep-attention, selective"):
        prepare_blocks(model, "attention", float8="rowwise")
    assert model.layers[0].forward == forward and type(model.layers[0].attention.wqkv) is torch.nn.Linear
