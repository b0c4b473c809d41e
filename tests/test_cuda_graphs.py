"""The CUDA-graph step and the kept-graph cache (ligerzoo/inference/cuda_graphs.py) where CI can
run them: what is kept, for which key, and for how long; and a step whose capture fails, with the
CUDA calls faked on the CPU. Capture itself is covered on the GPU by test_generate.py and
test_medusa_decoding.py (a failed capture warns, and those tests turn warnings into errors)."""

import contextlib
import gc
import weakref
from unittest import mock

import pytest
import torch
from conftest import DEVICE
from test_generate import prompts, tiny
from test_medusa_decoding import noisy_heads

from ligerzoo.inference import CUDAGraphStep, KeptGraphs, generate
from ligerzoo.inference.generation import Decoder
from ligerzoo.medusa import medusa_tree
from ligerzoo.medusa.decoding import MedusaStep


class Counter(CUDAGraphStep):
    """A step that moves its state on by one and returns it."""

    def __init__(self, capture: bool):
        self.count = torch.zeros((), dtype=torch.long)
        super().__init__(state=[self.count], capture=capture)

    def forward(self) -> torch.Tensor:
        self.count += 1
        return self.count.clone()


def test_a_kept_step_is_reused_for_its_key_and_replaced_for_another():
    kept, model = KeptGraphs(), torch.nn.Linear(2, 2)
    first = kept.reuse(model, "a", lambda: Counter(capture=False))
    assert kept.reuse(model, "a", lambda: Counter(capture=False)) is first
    second = kept.reuse(model, "b", lambda: Counter(capture=False))
    assert second is not first and kept.get(model) is second
    unkept = kept.reuse(model, "c", lambda: Counter(capture=False), keep=False)
    assert unkept is not second and kept.get(model) is second


def keep_a_step_of_each_kind(kept: KeptGraphs, model, heads) -> None:
    tree = medusa_tree("small", heads.num_heads, DEVICE)
    kept.reuse(model, "medusa", lambda: MedusaStep(model, heads, tree, 32))
    KeptGraphs().reuse(model, "decoder", lambda: Decoder(model.config, 1, 8, DEVICE, torch.float32))


def test_kept_steps_go_with_their_model():
    """Neither step holds its model (an entry whose value refers to its weak key would keep it alive)."""
    kept, model = KeptGraphs(), tiny("llama")
    keep_a_step_of_each_kind(kept, model, noisy_heads(model))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


@contextlib.contextmanager
def capture_fails(graph):
    raise RuntimeError("operation not permitted when stream is capturing")
    yield


@pytest.fixture
def fake_cuda():
    """Streams that do nothing and a capture that fails, as an op syncing with the host makes it."""

    class Stream:
        def wait_stream(self, other):
            pass

    with (mock.patch.object(torch.cuda, "Stream", Stream), mock.patch.object(torch.cuda, "current_stream", Stream),
          mock.patch.object(torch.cuda, "stream", lambda stream: contextlib.nullcontext()),
          mock.patch.object(torch.cuda, "CUDAGraph", object), mock.patch.object(torch.cuda, "graph", capture_fails)):
        yield


def test_a_step_that_cannot_be_captured_warns_and_runs_eagerly_from_where_it_was(fake_cuda):
    step = Counter(capture=True)
    with pytest.warns(UserWarning, match="the step could not be captured in a CUDA graph"):
        assert step().item() == 1  # the warm-up calls were undone
    assert step.eager and step().item() == 2


def test_a_decoder_that_cannot_be_captured_generates_the_same_tokens(fake_cuda, monkeypatch):
    model = tiny("llama").cpu()  # on the CPU even beside a GPU: the faked streams are not CUDA's
    prompt = prompts([6], seed=3)
    expected = generate(model, prompt, max_new_tokens=6)
    build = Decoder.__init__

    def capturing(self, *args, **kwargs):  # as on the GPU
        build(self, *args, **kwargs)
        self.eager = False

    monkeypatch.setattr(Decoder, "__init__", capturing)
    with pytest.warns(UserWarning, match="the decode step could not be captured") as warned:
        assert generate(model, prompt, max_new_tokens=6) == expected
    # The warning points at generate's step call (torch 2.11's interpreter may warn first, apart).
    ours = [w for w in warned if "could not be captured" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename.endswith("generation.py")
