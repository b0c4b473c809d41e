"""A tied embedding's lookup gradient as sparse rows (training/tied_embedding.py): the weight's
gradient is the dense one, dense, over micro-batches; untied and FSDP2-sharded embeddings are left
as they are."""

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import on_gloo_ranks

from ligerzoo.models import ModelConfig, build_model
from ligerzoo.training.tied_embedding import tied_lookup_gradient_as_rows

CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch path: whole models, fast


def _model(tied=True):
    torch.manual_seed(0)
    return build_model(ModelConfig(**CONFIG, tie_word_embeddings=tied))


def _grads(model, micro_batches=2):
    generator = torch.Generator().manual_seed(1)
    for _ in range(micro_batches):
        input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=generator)
        input_ids[0, :3] = 0  # padding rows get no gradient either way
        model(input_ids, labels=input_ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_the_tied_weights_gradient_is_the_dense_lookups():
    dense, rows = _model(), _model()
    assert tied_lookup_gradient_as_rows(rows) and rows.embed_tokens.sparse
    token = torch.ones(1, 1, dtype=torch.long)
    assert rows.embed_tokens(token).grad_fn._saved_sparse  # the lookup's backward makes rows
    assert not dense.embed_tokens(token).grad_fn._saved_sparse
    expected, got = _grads(dense), _grads(rows)
    weight = "embed_tokens.weight"
    assert got[weight].layout == torch.strided
    torch.testing.assert_close(got[weight], expected[weight], rtol=1e-6, atol=1e-7)
    assert not torch.equal(got[weight], torch.zeros_like(got[weight]))
    for name in expected:
        if name != weight:
            assert torch.equal(got[name], expected[name]), name


def test_an_untied_or_frozen_embedding_is_left_dense():
    untied = _model(tied=False)
    assert not tied_lookup_gradient_as_rows(untied) and not untied.embed_tokens.sparse
    frozen = _model()
    frozen.embed_tokens.weight.requires_grad_(False)
    assert not tied_lookup_gradient_as_rows(frozen) and not frozen.embed_tokens.sparse
    assert not tied_lookup_gradient_as_rows(torch.nn.Linear(4, 4))


def _sharded():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return tied_lookup_gradient_as_rows(model), model.embed_tokens.sparse


def test_an_fsdp2_sharded_embedding_is_left_dense(tmp_path):
    assert on_gloo_ranks(1, _sharded, tmp_path) == (False, False)
