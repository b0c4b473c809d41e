"""Medusa tree decoding: several tokens per forward of the base model, verified by it.

The prompt goes through the model once (the prefill); the base head's choice at its last position
is the first new token, the root, and the Medusa heads' top-k lists at that position are the
candidates for the tokens after it. Each step then:

1. lays the root and the candidates out as the tree (tree.py) and runs it through the model's
   trunk in one forward over the KV cache (tree_attention.py), every node attending to the
   prompt, its ancestors and itself;
2. scores every node with the base head: a node is accepted when its token is what the base model
   chooses after its parent (greedy: the argmax; typical: likely enough, below), and the longest
   root-to-leaf prefix of accepted nodes wins;
3. keeps that path's keys and values in the cache (TreeCache.keep), takes the base model's choice
   after its last node as the next root, and the heads' top-k lists at that node as the next
   candidates. The step emits the accepted tokens and the new root: accepted + 1 tokens.

Greedy acceptance is lossless: every emitted token is the base model's argmax after the tokens
before it, so the output is plain greedy decoding's, token for token (up to float rounding: the
tree forward sums attention over other slots than a one-token step does).

Typical acceptance (Medusa paper, section 2.3.1) accepts a candidate x after its parent when
p(x) > min(posterior_threshold, posterior_alpha * exp(-H(p))), p the base model's distribution at
the temperature and H its entropy; the next root is sampled from p restricted to the tokens that
pass the same test (the likeliest always does).

Everything is chosen on the device; the host reads one small tensor per step (the path's tokens,
the new root and the accepted count) to stream the tokens and to stop. On the GPU a greedy step
is captured in a CUDA graph and replayed, as plain decoding's step is (inference/cuda_graphs.py):
eagerly its few hundred small kernels take longer to launch than to run, on models small enough
to decode fast.
"""

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ligerzoo.inference import (
    CUDAGraphStep,
    KeptGraphs,
    KVCache,
    check_request,
    graph_key,
    prompt_lists,
    sample,
)
from ligerzoo.medusa.heads import MedusaHeads
from ligerzoo.medusa.tree import Choices, MedusaTree, medusa_tree
from ligerzoo.medusa.tree_attention import TreeCache
from ligerzoo.models import Transformer

ACCEPTANCE = ("greedy", "typical")


@dataclass
class MedusaStats:
    """What a medusa_generate call did: per tree forward, how many candidates were accepted."""

    accepted: list[int] = field(default_factory=list)

    @property
    def forwards(self) -> int:
        """Tree forwards (the prefill not counted)."""
        return len(self.accepted)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per tree forward: the accepted candidates plus the base model's own token
        (1.0 means the heads never helped; Medusa's "acceleration rate")."""
        return 1 + sum(self.accepted) / len(self.accepted) if self.accepted else 1.0


@torch.no_grad()
def medusa_generate(
    model: Transformer,
    heads: MedusaHeads,
    input_ids: torch.Tensor | list[list[int]],
    max_new_tokens: int = 64,
    tree: str | Choices | MedusaTree = "small",
    stop_ids: Iterable[int] | None = None,
    acceptance: str = "greedy",
    temperature: float = 0.0,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    on_token: Callable[[int, int], None] | None = None,
    seed: int | None = None,
    stats: MedusaStats | None = None,
) -> list[list[int]]:
    """The new token ids of one prompt ([[...]], as `generate` returns them): max_new_tokens, or
    fewer ending with a stop token.

    input_ids: a [1, T] tensor or [prompt token ids] (batch 1 only).
    tree: a name in tree.TREES (cut to the heads' depth), a list of Medusa choices, or a MedusaTree.
    acceptance: "greedy" (temperature 0; the output is plain greedy decoding's) or "typical"
        (temperature > 0; posterior_threshold and posterior_alpha as in the Medusa paper).
    on_token: called as on_token(0, token_id) for every returned token, in order.
    seed: seeds the sampling of typical acceptance.
    stats: filled with the number of candidates accepted at each step.
    """
    config = model.config
    prompts = prompt_lists(input_ids)
    if len(prompts) != 1:
        raise ValueError(f"Medusa decoding takes one prompt (batch 1), got {len(prompts)}: "
                         f"call it once per prompt, or use ligerzoo.generate for batches")
    stop_set = check_request(config, prompts, max_new_tokens, temperature, None, None, stop_ids)
    _check_medusa(model, heads, acceptance, temperature, posterior_threshold, posterior_alpha)
    device = model.output_weight.device
    tree = medusa_tree(tree, heads.num_heads, device)
    if tree.top_k > config.vocab_size:
        raise ValueError(f"the tree uses the top {tree.top_k} tokens of each head but the vocabulary has "
                         f"{config.vocab_size}")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stats = stats if stats is not None else MedusaStats()
    if acceptance == "typical":
        def choose(logits: torch.Tensor) -> torch.Tensor:
            """A typical sample of the base model's next token after logits [V]."""
            probs = (logits.float() / temperature).softmax(-1)
            kept = probs >= _typical_threshold(probs, posterior_threshold, posterior_alpha)
            kept[probs.argmax(-1)] = True
            return sample(logits.masked_fill(~kept, float("-inf"))[None], temperature, generator=generator)[0]
        acceptance_test = functools.partial(_typical_acceptance, temperature=temperature,
                                            threshold=posterior_threshold, alpha=posterior_alpha)
        step = MedusaStep(model, heads, tree, len(prompts[0]) + max_new_tokens, choose, acceptance_test)
    else:
        step = _greedy_step(model, heads, tree, len(prompts[0]) + max_new_tokens)

    hidden, _ = model.trunk(torch.tensor(prompts, device=device), cache=step.cache)  # the prefill
    step.start(model, hidden[0, -1])
    out = []

    def emit(tokens: list[int]) -> bool:
        """Append tokens up to a stop token or max_new_tokens; True when generation is over."""
        for token in tokens:
            out.append(token)
            if on_token is not None:
                on_token(0, token)
            if token in stop_set or len(out) == max_new_tokens:
                return True
        return False

    done = emit([step.root.item()])
    while not done:
        report = step(model).tolist()  # the step's one host sync
        n_accepted = report[-1] - 1
        stats.accepted.append(n_accepted)
        done = emit(report[1:1 + n_accepted] + [report[-2]])
    return [out]


class MedusaStep(CUDAGraphStep):
    """A KV cache for one prompt of up to max_len tokens, and the Medusa step over it: step(model)
    runs one tree forward and acceptance. It reads its inputs (the root and the heads' candidates)
    from fixed buffers and writes the next ones there, so on the GPU a greedy step (no
    acceptance_test) is captured once in a CUDA graph at its first call and replayed after.
    Typical acceptance samples with the caller's generator, which a graph would replay with the
    same numbers, so it runs eagerly."""

    what = "the Medusa step"

    def __init__(self, model: Transformer, heads: MedusaHeads, tree: MedusaTree, max_len: int,
                 choose=None, acceptance_test=None):
        weight = model.output_weight  # the model itself is not held: see inference/cuda_graphs.py
        self.heads, self.tree = heads, tree
        self.choose = choose if choose is not None else lambda logits: logits.argmax(-1)
        self.acceptance_test = acceptance_test
        self.cache = KVCache(model.config, 1, max_len + tree.size, device=weight.device, dtype=weight.dtype)
        self.tree_cache = TreeCache(self.cache, tree)
        self.root = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.guesses = torch.zeros(tree.depth * tree.top_k, dtype=torch.long, device=weight.device)
        # The warm-up steps claim and keep tree slots after the prefix, which the first real step
        # writes again; what is put back after each: where the cache ends and the step's inputs.
        super().__init__(state=[self.cache.position, self.root, self.guesses],
                         capture=weight.device.type == "cuda" and acceptance_test is None)

    def start(self, model: Transformer, hidden: torch.Tensor) -> None:
        """The first root and candidates, from the prompt's last hidden state [H] (the prefill)."""
        self.root.copy_(self.choose(F.linear(hidden, model.output_weight)).view(1))
        self.guesses.copy_(self._candidates(model, hidden))

    def forward(self, model: Transformer) -> torch.Tensor:
        """One tree forward and acceptance: [the kept path's tokens (D + 1), the next root, the
        path's length]."""
        tree = self.tree
        tokens = torch.cat([self.root, self.guesses])[tree.sources]  # [N]
        hidden = model.trunk(tokens[None], cache=self.tree_cache)[0][0]  # [N, H]
        logits = F.linear(hidden, model.output_weight)  # [N, V]
        if self.acceptance_test is not None:
            accepted, log_probs = self.acceptance_test(logits[tree.parents], tokens)
        else:
            accepted = tokens == logits.argmax(-1)[tree.parents]  # [N]: the root's entry is overwritten below
            log_probs = None
        # The root is the base model's own choice. fill_, not `accepted[0] = True`, which copies a
        # host scalar to the GPU: a CUDA graph cannot capture that copy.
        accepted[0].fill_(True)
        on_path = (accepted[tree.paths] & tree.path_valid).long().cumprod(-1)  # [P, D + 1]
        lengths = on_path.sum(-1)  # [P], root included
        # index_select with one-element index tensors: indexing with a 0-dim tensor reads it on
        # the host, a sync that a CUDA graph cannot capture.
        best = _best_path(lengths, on_path, log_probs, tree).view(1)
        length = lengths.index_select(0, best)  # [1]
        path = tree.paths.index_select(0, best)[0]  # [D + 1]
        self.tree_cache.keep(path, length[0])
        last_node = path.index_select(0, length - 1)  # [1]
        root = self.choose(logits.index_select(0, last_node)[0])
        self.root.copy_(root.view(1))
        self.guesses.copy_(self._candidates(model, hidden.index_select(0, last_node)[0]))
        return torch.cat([tokens[path], root.view(1), length])

    def _candidates(self, model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
        """[D * top_k]: heads 1..D's top-k tokens after hidden [H]."""
        tree = self.tree
        if tree.depth == 0:
            return hidden.new_empty(0, dtype=torch.long)
        head_logits = self.heads.logits(hidden, model.output_weight)[:tree.depth]  # [K, V] -> [D, V]
        return head_logits.topk(tree.top_k, dim=-1).indices.reshape(-1)


# model -> its last greedy Medusa step on the GPU, kept for the next call.
KEPT_STEPS = KeptGraphs()


def _greedy_step(model: Transformer, heads: MedusaHeads, tree: MedusaTree, max_len: int) -> MedusaStep:
    """A greedy Medusa step over a cache of max_len tokens and the tree's: on the GPU the kept one
    (its captured graph, its cache emptied) when model, heads, tree and rounded length are those of
    the last call, else a new one, kept."""
    if model.output_weight.device.type != "cuda":
        return MedusaStep(model, heads, tree, max_len)
    max_len, where = graph_key(max_len, model, heads)
    key = (tuple(tree.choices), tree.top_k, max_len, where)  # the kept step keeps its own tree's buffers
    step = KEPT_STEPS.reuse(model, key, lambda: MedusaStep(model, heads, tree, max_len))
    step.cache.reset()
    return step


def _typical_threshold(probs: torch.Tensor, threshold: float, alpha: float) -> torch.Tensor:
    """[..., 1]: min(threshold, alpha * exp(-entropy)) of distributions probs [..., V]."""
    entropy = -(probs * torch.log(probs.clamp(min=torch.finfo(probs.dtype).tiny))).sum(-1, keepdim=True)
    return torch.clamp(alpha * torch.exp(-entropy), max=threshold)


def _typical_acceptance(parent_logits, tokens, temperature, threshold, alpha):
    """Whether each node's token passes the typical test under its parent's logits [N, V], and its
    log-probability there ([N] each)."""
    probs = (parent_logits.float() / temperature).softmax(-1)
    token_probs = probs.gather(-1, tokens[:, None])  # [N, 1]
    accepted = (token_probs > _typical_threshold(probs, threshold, alpha))[:, 0]
    return accepted, torch.log(token_probs[:, 0].clamp(min=torch.finfo(probs.dtype).tiny))


def _best_path(lengths, on_path, log_probs, tree: MedusaTree) -> torch.Tensor:
    """The index of a longest accepted path: greedy, the first (every longest path holds the same
    tokens); typical, the likeliest of them under the base model, as Medusa picks."""
    if log_probs is None:
        return lengths.argmax()
    node_log_probs = log_probs.masked_fill(tree.depths == 0, 0.0)  # the root is given
    likelihood = (node_log_probs[tree.paths] * on_path).sum(-1)  # [P]
    return likelihood.masked_fill(lengths != lengths.max(), float("-inf")).argmax()


def _check_medusa(model, heads, acceptance, temperature, posterior_threshold, posterior_alpha) -> None:
    config = model.config
    if (heads.hidden_size, heads.vocab_size) != (config.hidden_size, config.vocab_size):
        raise ValueError(f"the Medusa heads are for hidden size {heads.hidden_size} and vocabulary "
                         f"{heads.vocab_size}, the model has {config.hidden_size} and {config.vocab_size}: "
                         f"they were trained on another base model")
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance must be one of {ACCEPTANCE}, got {acceptance!r}")
    if acceptance == "greedy" and temperature != 0:
        raise ValueError(f"greedy acceptance decodes at temperature 0, got {temperature}: "
                         f"pass acceptance='typical' to sample")
    if acceptance == "typical" and temperature == 0:
        raise ValueError("typical acceptance samples: set temperature > 0 (or use acceptance='greedy')")
    for name, value in (("posterior_threshold", posterior_threshold), ("posterior_alpha", posterior_alpha)):
        if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
