"""Generation steps captured in CUDA graphs, and the graphs kept from one call to the next.

A decode step of a small model at a small batch is a few hundred small kernels (a dozen a layer),
which take longer to launch from Python than to run: the step would be bound by the host instead
of by reading the weights. Captured once in a CUDA graph and replayed, it is one launch. Plain
decoding's step (inference/generation.py) and Medusa's tree step (medusa/decoding.py) are both a
`CUDAGraphStep`: a forward that reads its inputs from fixed buffers and writes its outputs and the
next step's inputs back into fixed buffers, so that a replay, which reruns the captured kernels
over the same addresses, is the next step.

Capture needs a few eager calls first, on a side stream: they compile the Triton kernels for the
step's shapes and set up cuBLAS, neither of which may happen during capture. Each warm-up call
changes the step's state (the cache's position, the step's inputs), so its `state` buffers are put
back after each, and the first real call starts where the caller left off. A step that cannot be
captured (an op that syncs with the host) runs eagerly, with a warning.

Capturing costs far more than a step, so a caller keeps what it built in a `KeptGraphs`: per model,
the last step (its cache and its graph, which reads that cache and the model's weights at fixed
addresses) with the key it was built for. The model is held weakly, so a kept step goes with it,
which is why a step never holds the model itself: the model is an argument of every call.
"""

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

# On the GPU the cache length is rounded up to a multiple of this, so that calls with nearby
# lengths share one CUDA graph (and the attention mask's rows stay aligned for SDPA's kernels).
CACHE_LENGTH_MULTIPLE = 128
# Forwards run before capturing a step: they compile the Triton kernels for its shapes and set up
# cuBLAS, neither of which may happen during capture.
WARMUP_STEPS = 2


class CUDAGraphStep:
    """A step over fixed buffers, `forward(*args) -> output`, defined by a subclass. With capture
    (on the GPU) the first call captures it in a CUDA graph and every call replays the graph,
    which reruns the captured call (same buffers; the arguments of later calls are not read) and
    returns the same output tensor, overwritten. Without, or where capture fails, each call runs
    forward eagerly.

    state: the buffers forward changes in place that must be put back after each warm-up call.
    """

    what = "the step"  # for the warning when capture fails

    def __init__(self, state: Sequence[torch.Tensor], capture: bool):
        self.state = tuple(state)
        self.eager = not capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None  # the graph's output

    def forward(self, *args) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, *args) -> torch.Tensor:
        if self.graph is None and not self.eager:
            self._capture(args)
        if self.eager:
            return self.forward(*args)
        self.graph.replay()
        return self.output

    def _capture(self, args: tuple) -> None:
        saved = [buffer.clone() for buffer in self.state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.forward(*args)
                for buffer, value in zip(self.state, saved, strict=True):
                    buffer.copy_(value)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self.forward(*args)
        except RuntimeError as error:  # e.g. an op that syncs with the host
            warnings.warn(f"{self.what} could not be captured in a CUDA graph, so it runs eagerly (slower): "
                          f"{error}", stacklevel=3)  # the line of the generation function that called
            self.eager = True
            return
        self.graph, self.output = graph, output


def graph_key(length: int, *modules: torch.nn.Module) -> tuple[int, tuple[int, ...]]:
    """(cache length rounded up to CACHE_LENGTH_MULTIPLE, the modules' parameter addresses): what
    a kept CUDA graph must match. It reads the parameters at fixed addresses, so after
    `model.to(...)` it must be redone."""
    rounded = -(-length // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
    return rounded, tuple(p.data_ptr() for module in modules for p in module.parameters())


Step = TypeVar("Step", bound=CUDAGraphStep)


class KeptGraphs:
    """model -> the last step built for it on the GPU and the key it was built for (weak: it goes
    with the model). One per kind of step, so that plain and Medusa decoding keep theirs apart."""

    def __init__(self):
        self._kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model: torch.nn.Module) -> CUDAGraphStep | None:
        """The step kept for the model, whatever its key (for tests and profiling)."""
        kept = self._kept.get(model)
        return kept[1] if kept is not None else None

    def reuse(self, model: torch.nn.Module, key, build: Callable[[], Step], keep: bool = True) -> Step:
        """The step kept for the model if it was built for `key`, else build() (kept if `keep`,
        in place of the old one). build must not hold the model (see the module docstring)."""
        kept = self._kept.get(model)
        if kept is not None and kept[0] == key:
            return kept[1]
        if keep:
            self._kept.pop(model, None)  # free the old graph and cache before allocating the new ones
        step = build()
        if keep:
            self._kept[model] = (key, step)
        return step
