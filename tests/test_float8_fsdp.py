"""FSDP2 all-gathering the rowwise FP8 layers' weights as FP8 rows (ligerzoo/models/float8_gather.py,
wired in ligerzoo/training/parallel.py), on 2 CPU ranks (gloo).

The ranks are spawned processes; rank 0 hands its results back through a file. The kernels run
their PyTorch path (TRITON_INTERPRET=0); compiled blocks use the aot_eager backend, which traces
what Inductor would (Dynamo, then AOTAutograd taking the subclass apart) without generating code.
"""

import contextlib
import functools
import shutil
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import on_gloo_ranks
from safetensors import safe_open
from test_train import losses, run_train

from ligerzoo.hf.pretrained import from_pretrained
from ligerzoo.kernels.float8 import E4M3, quantize_rows
from ligerzoo.models import ModelConfig, build_model
from ligerzoo.models import float8 as float8_models
from ligerzoo.models.float8 import Float8Linear, convert_to_float8
from ligerzoo.models.float8_gather import Float8GatheredWeight, Float8ShardedWeight
from ligerzoo.training.parallel import gather_in_float8

WORLD_SIZE = 2
# Every dimension a multiple of 16, the scaled product's granularity: no layer falls back.
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
LAYERS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def spawn(worker, tmp_path, *args):
    """worker(*args) on 2 gloo ranks; rank 0's return value."""
    return on_gloo_ranks(WORLD_SIZE, worker, tmp_path, *args)


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD_SIZE,))


def _bf16_policy():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # The GPU's policy (parallel.py): float32 master weights, gathered and computed in bf16.
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _wide_weight(n, k) -> torch.Tensor:
    """Rows over 40 powers of two, a row of zeros, and values deep in FP8's subnormal range."""
    torch.manual_seed(0)
    w = torch.randn(n, k) * 2.0 ** torch.arange(-20, 20, 40 / n).floor()[:n, None]
    w[3] = 0
    w[5, :8] *= 2.0**-18
    return w


# ---------------------------------------------------------------------------------------------
# (a) the gathered rows, (c) the bytes on the wire


def _gather_one_layer(fp8: bool, n=64, k=48):
    """A Float8Linear's float32 master weight sharded and gathered under the bf16 policy: (the
    gathered weight's type, dtype and shape, its rows and scales, their reference; the bytes each
    all-gather sent from this rank) for the weight, then for the weight doubled (FSDP2 gathers
    into the same buffers the second time)."""
    from torch.distributed.fsdp import fully_shard

    layer = Float8Linear.from_linear(torch.nn.Linear(k, n, bias=False), "rowwise")
    with torch.no_grad():
        layer.weight.copy_(_wide_weight(n, k))
    container = torch.nn.Sequential(layer)
    if fp8:
        gather_in_float8(container, WORLD_SIZE)
    fully_shard(container, mesh=_mesh(), mp_policy=_bf16_policy())
    sent = []
    # The collective FSDP2 calls: all_gather_single in torch 2.13, all_gather_into_tensor in 2.11.
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    all_gather = getattr(dist, name)

    def counting(output_tensor, input_tensor, *args, **kwargs):
        sent.append((str(input_tensor.dtype), input_tensor.numel() * input_tensor.element_size()))
        return all_gather(output_tensor, input_tensor, *args, **kwargs)

    setattr(dist, name, counting)
    results = []
    try:
        for _ in range(2):
            container.unshard()
            weight = layer.weight  # the unsharded parameter FSDP2 set on the module
            record = {"type": type(weight).__name__, "dtype": weight.dtype, "shape": tuple(weight.shape),
                      "sent": sent[:]}
            if isinstance(weight, Float8GatheredWeight):
                record["gathered"] = (weight.rows.view(torch.uint8).clone(), weight.scale.clone())
            container.reshard()  # frees the gathered buffers
            reference = quantize_rows(layer.weight.full_tensor().to(torch.bfloat16), E4M3)
            record["reference"] = (reference.data.view(torch.uint8), reference.scale)
            results.append(record)
            sent.clear()
            with torch.no_grad():
                layer.weight.mul_(2)
    finally:
        setattr(dist, name, all_gather)
    return results


def test_gathered_fp8_rows_are_the_cast_of_the_gathered_bf16_weight(tmp_path):
    n, k = 64, 48
    for record in spawn(_gather_one_layer, tmp_path, True, n, k):
        assert record["type"] == "Float8GatheredWeight"
        assert record["dtype"] == torch.bfloat16 and record["shape"] == (n, k)  # looks like bf16 W
        (rows, scale), (ref_rows, ref_scale) = record["gathered"], record["reference"]
        assert torch.equal(rows, ref_rows) and torch.equal(scale, ref_scale)  # bit for bit
        # (c) what each rank sent: its 32 rows in e4m3 and their float32 scales, one uint8 buffer
        # (FSDP2 gathers mixed dtypes as bytes): 1 + 4/K bytes an element.
        assert record["sent"] == [("torch.uint8", n // 2 * k + n // 2 * 4)]


def test_fp8_all_gather_sends_half_the_bytes_of_bf16_plus_the_scales(tmp_path):
    n, k = 64, 48
    (record, _) = spawn(_gather_one_layer, tmp_path, False, n, k)
    assert record["type"] == "Parameter" and "gathered" not in record
    assert record["sent"] == [("torch.bfloat16", n // 2 * k * 2)]
    fp8_bytes = n // 2 * k + n // 2 * 4
    assert fp8_bytes / (n // 2 * k * 2) == pytest.approx(0.5 + 2 / k)


# ---------------------------------------------------------------------------------------------
# (b) training: FP8 against bf16 all-gather, (e) compiled


FUSED = ("rms_norm_linear", "add_rms_norm_linear", "add_rms_norm_mlp")


@contextlib.contextmanager
def _recording_fused_calls(record: bool):
    """A list of Float8Block's calls to the fused functions, each (name, the types of its weights'
    FP8 rows); left empty unless `record` (compiled, Dynamo would trace the recording)."""
    calls = []
    with contextlib.ExitStack() as stack:
        for name in FUSED if record else ():
            def recorded(*args, _fused=getattr(float8_models, name), _name=name, **kwargs):
                rows = [kwargs[key] for key in ("weight_fp8", "w13_fp8", "w2_fp8") if key in kwargs]
                calls.append((_name, *(type(r).__name__ for r in rows)))
                return _fused(*args, **kwargs)

            stack.enter_context(mock.patch.object(float8_models, name, recorded))
        yield calls


MIXTRAL = dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)


def _train(fp8_gather: bool, compile: bool, steps: int, family: str = "llama"):
    """A tiny rowwise FP8 model sharded under the bf16 policy, trained `steps` steps: (losses,
    gradient norms, first step's gradients, the type of wqkv's weight inside the block's
    forward, Dynamo's graph breaks, the bytes the first forward left for the backward, the
    blocks' calls to the fused functions in the last forward (eager only))."""
    from torch.distributed.fsdp import fully_shard

    from ligerzoo.training.blocks import prepare_blocks

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = build_model(ModelConfig(**CONFIG, **(MIXTRAL if family == "mixtral" else {})))
    if compile:
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
    prepare_blocks(model, "off", compile, "rowwise")
    mesh, policy = _mesh(), _bf16_policy()
    for block in model.layers:
        if fp8_gather:
            gather_in_float8(block, WORLD_SIZE)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    seen = []
    watched = "feed_forward.w13" if family == "mixtral" else "attention.wqkv.weight"
    model.layers[0].register_forward_pre_hook(
        lambda block, args: seen.append(type(block.get_parameter(watched)).__name__))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1 + dist.get_rank())
    step_losses, norms, grads = [], [], None
    for step in range(steps):
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 32), generator=generator)
        saved = []
        with (torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
              _recording_fused_calls(not compile) as calls):
            loss = model(ids, labels=ids).loss
        if step == 0:  # what the backward keeps in memory: gathered weights are freed by now
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
            kept = sum(storages.values())
        saved.clear()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if step == 0:
            grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        step_losses.append(total.item())
        norms.append(norm.full_tensor().item())
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return step_losses, norms, grads, seen[0], breaks, kept, calls


def _compare_gathers(steps: int, compile: bool, family: str = "llama"):
    return _train(True, compile, steps, family), _train(False, compile, steps, family)


def test_training_with_fp8_all_gather_matches_bf16_all_gather(tmp_path):
    (losses_fp8, norms_fp8, grads_fp8, seen, _, kept_fp8, calls_fp8), \
        (losses_bf16, norms_bf16, grads_bf16, seen_bf16, _, kept_bf16, calls_bf16) = \
        spawn(_compare_gathers, tmp_path, 4, False)
    assert seen == "Float8GatheredWeight" and seen_bf16 == "Parameter"
    # Each block keeps its fused path, handed the gathered rows (the last step's forward): the
    # first block's attention norm has no residual to add.
    fused = [("rms_norm_linear", 1), ("add_rms_norm_mlp", 2),
             ("add_rms_norm_linear", 1), ("add_rms_norm_mlp", 2)]
    assert calls_fp8 == [(name, *["Float8Rows"] * weights) for name, weights in fused]
    assert calls_bf16 == [(name, *["NoneType"] * weights) for name, weights in fused]
    # The backward keeps the gathered rows, whose buffers FSDP2 frees after the forward and fills
    # again before the backward, as it does the bf16 weights: nothing more is kept.
    assert kept_fp8 == kept_bf16
    assert all(map(torch.isfinite, torch.tensor(losses_fp8 + norms_fp8)))
    # The forward reads the same FP8 rows: the first loss is the same bits.
    assert losses_fp8[0] == losses_bf16[0]
    # The backward's W columns come from the FP8 rows: the same but for FP8 subnormals, far below
    # what a bf16 gradient resolves.
    for name, grad in grads_bf16.items():
        torch.testing.assert_close(grads_fp8[name], grad, rtol=2**-7, atol=1e-6, msg=name)
    assert losses_fp8 == pytest.approx(losses_bf16, rel=1e-3)  # bf16 compute: 8 bits of mantissa
    assert norms_fp8 == pytest.approx(norms_bf16, rel=1e-2)


def test_mixtral_experts_train_with_fp8_all_gather_as_with_bf16_all_gather(tmp_path):
    """The experts' stacked weights [4, N, K], sharded two experts a rank, gathered as FP8 rows and
    multiplied by as they are (Float8MoE's weight_fp8): the first loss the same bits, the
    gradients those of the bf16 all-gather but for FP8 subnormals."""
    (losses_fp8, norms_fp8, grads_fp8, seen, *_), (losses_bf16, norms_bf16, grads_bf16, seen_bf16, *_) = \
        spawn(_compare_gathers, tmp_path, 3, False, "mixtral")
    assert seen == "Float8GatheredWeight" and seen_bf16 == "Parameter"
    assert losses_fp8[0] == losses_bf16[0]
    for name, grad in grads_bf16.items():
        torch.testing.assert_close(grads_fp8[name], grad, rtol=2**-7, atol=1e-6, msg=name)
    assert losses_fp8 == pytest.approx(losses_bf16, rel=1e-3)
    assert norms_fp8 == pytest.approx(norms_bf16, rel=1e-2)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_compiled_blocks_take_the_gathered_weight_with_no_graph_break(tmp_path, family):
    (losses_fp8, norms_fp8, _, seen, breaks, *_), (losses_bf16, *_) = spawn(_compare_gathers, tmp_path, 2,
                                                                              True, family)
    # fullgraph=True would raise at a break; the counter says none was even attempted.
    assert seen == "Float8GatheredWeight" and breaks == 0
    assert all(map(torch.isfinite, torch.tensor(losses_fp8 + norms_fp8)))
    assert losses_fp8[0] == losses_bf16[0]
    assert losses_fp8 == pytest.approx(losses_bf16, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Wiring, checkpoints and the export: plain tensors, unchanged names


@pytest.mark.parametrize("recipe, world_size, expected", [
    ("rowwise", 2, [f"{layer}.weight" for layer in LAYERS]),
    ("rowwise", 3, []),  # 128, 64, 256 and 64 rows: none splits evenly over 3 ranks
    ("rowwise", 1, []),  # one rank: no bytes to save, and the fused path stays
    ("tensorwise", 2, []),  # one scale a tensor needs the whole weight's amax (float8_gather.py)
    ("off", 2, []),
])
def test_only_rowwise_weights_whose_rows_split_evenly_gather_in_fp8(recipe, world_size, expected):
    model = build_model(ModelConfig(**CONFIG))
    if recipe != "off":
        convert_to_float8(model, recipe)
    assert gather_in_float8(model.layers[0], world_size) == expected
    gathered = [name for name, p in model.named_parameters() if type(p) is Float8ShardedWeight]
    assert gathered == [f"layers.0.{name}" for name in expected]


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_mixtral_experts_gather_in_fp8_under_either_recipe(recipe):
    """The experts' products are rowwise under either recipe (models/float8.py), so their weights
    gather as FP8 rows whenever their experts split evenly over the ranks."""
    model = build_model(ModelConfig(**CONFIG, **MIXTRAL))
    convert_to_float8(model, recipe)
    attention = [f"attention.{name}.weight" for name in ("wqkv", "wo")] if recipe == "rowwise" else []
    assert gather_in_float8(model.layers[0], 2) == [*attention, "feed_forward.w13", "feed_forward.w2"]
    assert gather_in_float8(model.layers[1], 3) == []  # 4 experts over 3 ranks (and 128-row attention)
    state = model.state_dict()
    assert all(type(value) is torch.Tensor for value in state.values())


def test_a_wrapped_blocks_parameters_and_state_dict_are_as_before():
    model = build_model(ModelConfig(**CONFIG))
    convert_to_float8(model, "rowwise")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    gather_in_float8(model.layers[0], WORLD_SIZE)
    wqkv = model.layers[0].attention.wqkv.weight
    assert isinstance(wqkv, torch.nn.Parameter) and type(wqkv) is Float8ShardedWeight
    assert wqkv.dtype == torch.float32 and wqkv.requires_grad
    # What the optimizer does to it comes back plain and changes the values inside.
    assert type(wqkv * 2) is torch.Tensor and type(torch.zeros_like(wqkv)) is torch.Tensor
    state = model.state_dict()
    assert list(state) == list(before)
    for name, value in state.items():
        assert type(value) is torch.Tensor and value.dtype == before[name].dtype, name
        assert torch.equal(value, before[name]), name


def test_checkpoints_resume_and_export_plain_tensors_under_fp8_all_gather(tmp_path):
    # Two micro-batches a step: gradients accumulate on the gathered weights before the reduction.
    steps = ["--max_steps", "4", "--checkpoint_every", "2", "--train.float8", "rowwise", "--data.grad_accum", "2"]
    run_train(tmp_path / "whole", *steps)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_00000002"
    for resumed in ("resumed", "unsharded"):
        shutil.copytree(checkpoint, tmp_path / resumed / "checkpoints" / checkpoint.name)
    run_train(tmp_path / "resumed", *steps)
    whole = losses(tmp_path / "whole")
    assert losses(tmp_path / "resumed") == {step: whole[step] for step in (3, 4)}  # exact resume
    # One process, unsharded and without FP8: plain tensors load into plain tensors.
    unsharded = run_train(tmp_path / "unsharded", "--max_steps", "3", "--checkpoint_every", "0",
                          "--data.batch_size", "8", "--data.grad_accum", "2", nproc=1)
    assert "(step 2)" in unsharded.stdout
    assert losses(tmp_path / "unsharded")[3] == pytest.approx(whole[3], rel=0.02)  # FP8 against exact

    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    export = tmp_path / "whole" / "hf"
    exported = from_pretrained(export, dtype=torch.float32)  # checks every name and shape
    names = [f"model.{name}" for name in exported.state_dict()]
    assert set(names) <= set(metadata)
    for name in names:
        assert metadata[name].properties.dtype == torch.float32, name
    assert any(key.startswith("optimizer.state.") for key in metadata)
    assert all("_tensor" not in key for key in metadata)
    reference = tmp_path / "reference"
    exported.save_pretrained(reference)  # a plain model's export: the names and dtypes expected
    with safe_open(export / "model.safetensors", "pt") as fp8_run, \
            safe_open(reference / "model.safetensors", "pt") as plain:
        assert sorted(fp8_run.keys()) == sorted(plain.keys())
        for name in plain.keys():
            assert fp8_run.get_slice(name).get_dtype() == plain.get_slice(name).get_dtype() == "F32", name
