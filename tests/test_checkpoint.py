"""Hugging Face checkpoints (ligerzoo/hf/pretrained.py): round trips, parity with transformers in both
directions, strict loading errors and atomic saves, on tiny Llama and Mixtral models."""

import json

import pytest
import torch
from conftest import DEVICE, rel_error
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ligerzoo
from ligerzoo.hf import atomic_files, tensor_names
from ligerzoo.hf.pretrained import CheckpointError, parse_size, save_pretrained
from ligerzoo.hf.tensor_names import tensor_map
from ligerzoo.models import ModelConfig, build_model

# Tiny but complete: GQA (4 query heads, 2 kv heads), two layers, top-2 of 4 experts.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": dict(model_type="llama"),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
}
SHARD = "150KB"  # a tiny model's weights (0.2-0.8 MB in float32) then span several shards


def tiny(family="mixtral", seed=0, **overrides):
    """A ligerzoo model with random weights."""
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**TINY, **FAMILIES[family], **overrides}))


def hf_tiny(family, seed=0):
    """The same architecture as a transformers model with random weights, float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**TINY, **FAMILIES[family]}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def token_ids(seed=0):
    return torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(seed))


def assert_same_parameters(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name], pb[name]), name


def weight_files(directory):
    """Weight files and leftover temporary files (hidden, `.tmp`)."""
    return sorted(p.name for p in directory.iterdir() if "safetensors" in p.name or p.name.endswith(".tmp"))


# --- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_shard_size", ["5GB", SHARD])
def test_save_then_load_is_bitwise_identical(tmp_path, max_shard_size, family):
    model = tiny(family)
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    files = weight_files(tmp_path)
    if max_shard_size == "5GB":
        assert files == ["model.safetensors"]
    else:
        n = len(files) - 1
        assert n >= 2 and files[-1] == "model.safetensors.index.json"
        assert files[:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensor_map(model.config))
        assert index["metadata"]["total_size"] == 4 * sum(p.numel() for p in model.parameters())
    loaded = ligerzoo.from_pretrained(tmp_path)
    assert_same_parameters(model, loaded)
    assert not loaded.training and all(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded(token_ids()).logits, model(token_ids()).logits)


def test_shards_respect_max_shard_size_and_carry_format_metadata(tmp_path):
    save_pretrained(tiny(), tmp_path, max_shard_size=SHARD)
    for f in tmp_path.glob("model-*.safetensors"):
        tensors = load_file(f)
        assert len(tensors) == 1 or sum(t.numel() * 4 for t in tensors.values()) <= parse_size(SHARD)
        with safe_open(f, "pt") as sf:
            assert sf.metadata() == {"format": "pt"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_bf16_loading_gives_bf16_weights(tmp_path, dtype):
    model = tiny()
    save_pretrained(model, tmp_path)
    loaded = ligerzoo.from_pretrained(tmp_path, dtype=dtype, device=DEVICE)
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.bfloat16 and p.device.type == DEVICE.type, name
        assert torch.equal(p.cpu(), dict(model.named_parameters())[name].bfloat16()), name


def test_default_dtype_is_the_configs_else_the_weights(tmp_path):
    save_pretrained(tiny().to(torch.bfloat16), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert next(ligerzoo.from_pretrained(tmp_path).parameters()).dtype == torch.bfloat16
    del config["torch_dtype"]  # no dtype in the config: the weights', as transformers' dtype="auto"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert next(ligerzoo.from_pretrained(tmp_path).parameters()).dtype == torch.bfloat16
    config["dtype"] = "float16"  # the newer spelling
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert next(ligerzoo.from_pretrained(tmp_path).parameters()).dtype == torch.float16
    assert next(ligerzoo.from_pretrained(tmp_path, dtype=torch.float32).parameters()).dtype == torch.float32


def test_tied_model_ignores_a_checkpoint_lm_head(tmp_path):
    model = tiny("llama-tied")
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, tmp_path / "model.safetensors")
    assert_same_parameters(model, ligerzoo.from_pretrained(tmp_path))


# --- parity with transformers ---------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_checkpoint_loads_with_equal_logits(tmp_path, family):
    hf = hf_tiny(family)
    hf.save_pretrained(tmp_path, max_shard_size=SHARD)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = ligerzoo.from_pretrained(tmp_path, device=DEVICE)  # streamed straight onto the device
    ids = token_ids()
    with torch.no_grad():
        expected = hf(ids).logits
    assert rel_error(ours(ids.to(DEVICE)).logits, expected) < 1e-4  # float32, different summation orders


@pytest.mark.parametrize("family", FAMILIES)
def test_our_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = tiny(family)
    model.save_pretrained(tmp_path, max_shard_size=SHARD)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert next(hf.parameters()).dtype == torch.float32
    ids = token_ids()
    with torch.no_grad():
        actual = hf(ids).logits
    assert rel_error(actual, model(ids).logits) < 1e-4  # float32, different summation orders
    # and the weights arrived bit for bit: transformers' own save reads back into ours unchanged
    hf.save_pretrained(tmp_path / "hf")
    assert_same_parameters(model, ligerzoo.from_pretrained(tmp_path / "hf"))


# --- strict loading -------------------------------------------------------------------------
def test_mismatched_checkpoint_lists_every_problem_in_one_error(tmp_path):
    save_pretrained(tiny(), tmp_path, max_shard_size=SHARD)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    missing = "model.layers.1.self_attn.k_proj.weight"
    misshaped = "model.layers.0.block_sparse_moe.experts.2.w3.weight"
    for name in (missing, misshaped):
        tensors = load_file(tmp_path / weight_map[name])
        if name == missing:
            del tensors[name]
        else:
            tensors[name] = tensors[name][:-1].clone()
            tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
        save_file(tensors, tmp_path / weight_map[name])
    with pytest.raises(CheckpointError) as info:
        ligerzoo.from_pretrained(tmp_path)
    message = str(info.value)
    assert f"missing (1):\n    {missing}\n" in message
    assert "unexpected (1):\n    model.layers.0.mystery.weight\n" in message
    assert f"wrong shape (1):\n    {misshaped}: [95, 64] in" in message and "expects [96, 64]" in message


def test_map_that_leaves_a_parameter_region_unfilled_is_a_model_bug(tmp_path, monkeypatch):
    save_pretrained(tiny("llama"), tmp_path)
    full_map = tensor_names.mlp_map
    monkeypatch.setattr(tensor_names, "mlp_map", lambda config: {
        k: v for k, v in full_map(config).items() if k != "mlp.up_proj.weight"})
    uncovered = r"does not cover: layers.0.feed_forward.w13.weight \(6144 of 12288 elements\)"
    with pytest.raises(RuntimeError, match=uncovered):
        ligerzoo.from_pretrained(tmp_path)


def test_shard_listed_in_index_but_absent_is_named(tmp_path):
    save_pretrained(tiny(), tmp_path, max_shard_size=SHARD)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"not in .*{victim.name}"):
        ligerzoo.from_pretrained(tmp_path)


@pytest.mark.parametrize("keep", ["half", "20 bytes"])
def test_truncated_safetensors_file_is_named(tmp_path, keep):
    save_pretrained(tiny(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep == "half" else 20])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable .* truncated"):
        ligerzoo.from_pretrained(tmp_path)


def test_unknown_architecture_is_rejected_naming_the_field(tmp_path):
    save_pretrained(tiny(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: model_type 'gpt2'"):
        ligerzoo.from_pretrained(tmp_path)


def test_directory_without_weights_is_rejected(tmp_path):
    save_pretrained(tiny(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        ligerzoo.from_pretrained(tmp_path)


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="^no such directory: .*nothing'"):
        ligerzoo.from_pretrained(tmp_path / "nothing")


# --- atomic saves ---------------------------------------------------------------------------
@pytest.mark.parametrize("first, second", [(SHARD, "300KB"), (SHARD, "5GB"), ("5GB", SHARD)])
def test_failed_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch, first, second):
    good = tiny(seed=0)
    save_pretrained(good, tmp_path, max_shard_size=first)
    before = {name: (tmp_path / name).read_bytes() for name in weight_files(tmp_path) + ["config.json"]}

    written = []

    def save_file_then_fail(tensors, filename, metadata=None):
        if second == "5GB" or written:  # fail on the only shard, or after the first one
            raise OSError("No space left on device")
        save_file(tensors, filename, metadata=metadata)
        written.append(filename)

    monkeypatch.setattr(atomic_files, "save_file", save_file_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(tiny("llama", seed=1), tmp_path, max_shard_size=second)
    after = {name: (tmp_path / name).read_bytes() for name in weight_files(tmp_path) + ["config.json"]}
    assert after == before  # nothing added (no temporary file left), nothing changed
    assert_same_parameters(good, ligerzoo.from_pretrained(tmp_path))


@pytest.mark.parametrize(
    "first, second", [(SHARD, "300KB"), ("300KB", SHARD), (SHARD, "5GB"), ("5GB", SHARD)]
)
def test_resave_with_another_layout_removes_stale_weights(tmp_path, first, second):
    save_pretrained(tiny(seed=0), tmp_path, max_shard_size=first)
    (tmp_path / "tokenizer.json").write_text("{}")  # not a weight file: stays
    newer = tiny("llama", seed=1)
    save_pretrained(newer, tmp_path, max_shard_size=second)
    files = weight_files(tmp_path)
    if second == "5GB":
        assert files == ["model.safetensors"]
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert files == sorted(set(index["weight_map"].values())) + ["model.safetensors.index.json"]
    assert (tmp_path / "tokenizer.json").exists()
    assert_same_parameters(newer, ligerzoo.from_pretrained(tmp_path))


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 kb") == 1500
    assert parse_size("100B") == 100
    for bad in ["5", "five GB", 0, "-1GB", "5Gx", True]:
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)
