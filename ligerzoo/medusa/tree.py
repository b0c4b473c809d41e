"""The tree of candidate continuations that one Medusa verification forward checks.

A tree is given as the Medusa paper's "medusa choices": a list of paths, each a tuple of top-k
indices, one per depth. (0,) is head 1's likeliest token, (0, 1) head 2's second likeliest after
it, (1, 0, 0) head 3's likeliest after head 2's likeliest after head 1's second. Above them all is
the root: the token the base model's own head chose. A node's token depends only on its depth and
its last index (head d's top-k list is computed once, from one hidden state), so the same token can
sit at several nodes, after different parents.

`MedusaTree` turns the choices into the buffers decoding uses: the order of the nodes (by depth,
root first), each node's depth and parent, the [N, N] ancestor mask of the tree attention
(tree_attention.py), where each node's token comes from, and the root-to-leaf paths along which
the accepted prefix is found.
"""

from collections.abc import Sequence

import torch

Choices = Sequence[Sequence[int]]

# A chain: each head's likeliest token only (one path; the least work per forward).
CHAIN = [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)]
# A small tree of 9 candidates: the top 3 of head 1, the top 2 after its likeliest, and a deep spine.
SMALL = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0)]
# The Medusa repo's default, `mc_sim_7b_63` in medusa/model/medusa_choices.py (FasterDecoding/Medusa,
# Apache-2.0): 63 candidates found by simulating the acceptance rates of Vicuna-7B's heads.
MC_SIM_7B_63 = [
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0),
    (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0),
    (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5),
    (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9),
    (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5),
    (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
]
TREES = {"chain": CHAIN, "small": SMALL, "mc_sim_7b_63": MC_SIM_7B_63}


class MedusaTree:
    """The buffers of one tree of candidates. N = 1 + len(choices) nodes, node 0 the root, the
    others in order of depth (so parents come first); D = the deepest choice's length.

    depths [N]: 0 for the root. parents [N]: the parent's node index (0 for the root itself).
    ancestors [N, N] bool: node i attends to node j (j is i or an ancestor of i).
    sources [N]: where node i's token is in the step's candidate list [root, head 1's top_k, head
        2's top_k, ...]: 0 for the root, else 1 + (depth - 1) * top_k + last index.
    paths [P, D + 1]: the node indices of each root-to-leaf path, padded with 0 past the leaf, and
        path_valid [P, D + 1] saying which entries are real.
    """

    def __init__(self, choices: Choices, top_k: int | None = None, device=None):
        self.choices = _validated(choices, top_k)
        self.depth = max((len(c) for c in self.choices), default=0)
        self.top_k = top_k if top_k is not None else 1 + max((c[-1] for c in self.choices), default=0)
        index = {(): 0} | {choice: i + 1 for i, choice in enumerate(self.choices)}
        nodes = [()] + self.choices
        self.size = len(nodes)

        depths = [len(c) for c in nodes]
        parents = [index[c[:-1]] if c else 0 for c in nodes]
        ancestors = torch.zeros(self.size, self.size, dtype=torch.bool)
        for i, choice in enumerate(nodes):
            for d in range(len(choice) + 1):
                ancestors[i, index[choice[:d]]] = True
        sources = [1 + (len(c) - 1) * self.top_k + c[-1] if c else 0 for c in nodes]
        parent_set = {c[:-1] for c in self.choices}
        leaves = [c for c in nodes if c not in parent_set]
        paths = torch.zeros(len(leaves), self.depth + 1, dtype=torch.long)
        path_valid = torch.zeros(len(leaves), self.depth + 1, dtype=torch.bool)
        for p, leaf in enumerate(leaves):
            for d in range(len(leaf) + 1):
                paths[p, d], path_valid[p, d] = index[leaf[:d]], True

        self.depths = torch.tensor(depths, dtype=torch.long, device=device)
        self.parents = torch.tensor(parents, dtype=torch.long, device=device)
        self.ancestors = ancestors.to(device)
        self.sources = torch.tensor(sources, dtype=torch.long, device=device)
        self.paths, self.path_valid = paths.to(device), path_valid.to(device)

    def to(self, device) -> "MedusaTree":
        """The same tree with its buffers on `device`."""
        return MedusaTree(self.choices, self.top_k, device)

    def __repr__(self) -> str:
        return f"MedusaTree({self.size - 1} candidates, depth {self.depth}, top_k {self.top_k})"


def medusa_tree(tree: "str | Choices | MedusaTree", num_heads: int, device=None) -> MedusaTree:
    """A tree for heads numbering `num_heads`: a name in TREES (cut to the heads' depth: a named
    shape suits any number of heads), a list of choices or a MedusaTree (which must fit them)."""
    if isinstance(tree, str):
        if tree not in TREES:
            raise ValueError(f"unknown Medusa tree {tree!r}: pick one of {', '.join(TREES)} or pass a list "
                             f"of choices such as [(0,), (1,), (0, 0)]")
        return MedusaTree([c for c in TREES[tree] if len(c) <= num_heads], device=device)
    if not isinstance(tree, MedusaTree):
        tree = MedusaTree(tree)
    if tree.depth > num_heads:
        raise ValueError(f"the tree is {tree.depth} deep but there are {num_heads} Medusa heads (head d "
                         f"supplies depth d): drop its choices longer than {num_heads}")
    return tree.to(device)


def _validated(choices: Choices, top_k: int | None) -> list[tuple[int, ...]]:
    """The choices as tuples sorted by depth, then index; a ValueError for anything malformed."""
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise ValueError(f"Medusa choices must be a list of tuples of top-k indices, got {choices!r}")
    paths = []
    for choice in choices:
        if (isinstance(choice, (str, bytes)) or not isinstance(choice, Sequence) or not choice
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in choice)):
            raise ValueError(f"each Medusa choice must be a non-empty tuple of top-k indices >= 0, "
                             f"got {choice!r}")
        if top_k is not None and max(choice) >= top_k:
            raise ValueError(f"choice {tuple(choice)} has index {max(choice)}, beyond top_k={top_k}")
        paths.append(tuple(choice))
    present = set(paths)
    if len(present) != len(paths):
        duplicate = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"choice {duplicate} appears twice")
    for path in paths:
        if len(path) > 1 and path[:-1] not in present:
            raise ValueError(f"choice {path} lacks its parent {path[:-1]}: every prefix of a path must be "
                             f"a choice")
    return sorted(paths, key=lambda p: (len(p), p))
