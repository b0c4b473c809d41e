"""Medusa tree decoding (ligerzoo/medusa/decoding.py and tree.py) and the tree forward over the KV
cache (tree_attention.py: TreeCache's claim and keep) on tiny float32 models: greedy Medusa decoding against plain greedy
`generate`, token for token; each tree node's logits against a plain forward of its path; the cache
after keeping a path against a cache filled with that path; typical acceptance at its extremes;
malformed trees; the `generate --medusa` command.

The models have weights of unit gain (test_generate.py), so an argmax is not decided by float32
rounding. The heads are the base head plus noise: right after repeated text, mostly wrong elsewhere,
so the decoding both accepts and rejects candidates (each greedy test checks that it did both).
"""

import shutil
import warnings

import pytest
import torch
from conftest import DEVICE
from test_cli import sentencepiece_file
from test_generate import FAMILIES, TINY, VOCAB, prompts, unit_gain_

from ligerzoo import cli
from ligerzoo.inference import KVCache, generate
from ligerzoo.medusa import (
    TREES,
    MedusaConfig,
    MedusaHeads,
    MedusaStats,
    MedusaTree,
    TreeCache,
    medusa_generate,
    medusa_tree,
    save_heads,
)
from ligerzoo.models import ModelConfig, build_model

ISSUE_TREE = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]  # the Medusa paper's example layout


def tiny(family="llama", **overrides):
    config = ModelConfig(**{**TINY, **FAMILIES[family], **overrides})
    return unit_gain_(build_model(config, device=DEVICE, dtype=torch.float32))


def noisy_heads(model, num_heads=4, seed=0, scale=0.02):
    """Heads that start as the base head (identity blocks) plus noise."""
    heads = MedusaHeads(MedusaConfig(num_heads=num_heads), model.config.hidden_size, model.config.vocab_size)
    heads.to(DEVICE).init_weights(model.output_weight)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in heads.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator).to(DEVICE))
    return heads


@pytest.fixture(scope="module")
def llama():
    model = tiny("llama")
    return model, noisy_heads(model)


# --- greedy Medusa decoding is plain greedy decoding -----------------------------------------------
@pytest.mark.parametrize("family, tree, length", [
    ("llama", "chain", 9), ("llama", "small", 3), ("llama", ISSUE_TREE, 14),
    ("mistral_window_6", "small", 9), ("mistral_window_6", ISSUE_TREE, 4),
])
def test_medusa_greedy_equals_plain_greedy_token_for_token(family, tree, length):
    """Mistral's window of 6 is far shorter than prompt + 24 tokens: the tree's mask must apply it."""
    model = tiny(family)
    heads = noisy_heads(model)
    prompt = prompts([length], seed=length)
    stats, streamed = MedusaStats(), []
    out = medusa_generate(model, heads, prompt, max_new_tokens=24, tree=tree, stats=stats,
                          on_token=lambda row, token: streamed.append(token))
    assert out == generate(model, prompt, max_new_tokens=24)
    assert streamed == out[0]
    assert max(stats.accepted) > 0 and min(stats.accepted) == 0  # both paths of the step were taken
    assert stats.mean_accepted_length == 1 + sum(stats.accepted) / stats.forwards
    assert 1 + sum(stats.accepted) + stats.forwards >= 24  # the prefill's token, then accepted + 1 per step


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs")
def test_greedy_steps_replay_one_captured_graph_across_calls(llama):
    """On the GPU the greedy step is captured (a failed capture would warn, and is an error here)
    and kept: later calls with other prompts and lengths replay it over the emptied cache and
    still decode as plain greedy does."""
    from ligerzoo.medusa.decoding import KEPT_STEPS

    model, heads = llama
    graphs = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for length, new_tokens in ((5, 24), (11, 17), (5, 24)):
            prompt = prompts([length], seed=new_tokens + length)
            out = medusa_generate(model, heads, prompt, max_new_tokens=new_tokens, tree="small")
            assert out == generate(model, prompt, max_new_tokens=new_tokens)
            graphs.add(id(KEPT_STEPS.get(model).graph))
    assert len(graphs) == 1 and KEPT_STEPS.get(model).graph is not None


def test_medusa_greedy_with_the_large_tree_and_three_heads(llama):
    """mc_sim_7b_63 goes 4 deep; with 3 heads it is cut to depth 3."""
    model, _ = llama
    heads = noisy_heads(model, num_heads=3, seed=1)
    prompt = prompts([6], seed=11)
    assert medusa_generate(model, heads, prompt, 10, tree="mc_sim_7b_63") == generate(model, prompt, 10)


def test_stop_ids_end_the_output_at_the_first_stop_token(llama):
    model, heads = llama
    prompt = prompts([5], seed=12)
    full = generate(model, prompt, max_new_tokens=20)[0]
    stop = full[7]
    expected = generate(model, prompt, max_new_tokens=20, stop_ids=[stop])
    assert medusa_generate(model, heads, prompt, 20, tree="small", stop_ids=[stop]) == expected
    assert expected[0][-1] == stop and len(expected[0]) <= 8


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5])
def test_output_has_exactly_max_new_tokens(llama, max_new_tokens):
    model, heads = llama
    prompt = prompts([8], seed=13)
    out = medusa_generate(model, heads, prompt, max_new_tokens, tree="chain")
    assert out == generate(model, prompt, max_new_tokens=max_new_tokens)


# --- the tree forward and the cache ----------------------------------------------------------------
def path_tokens(tree: MedusaTree, tokens: list[int], node: int) -> list[int]:
    """The tokens from the root down to `node`."""
    ancestors = tree.ancestors[node].nonzero()[:, 0].tolist()  # in node order: by depth
    return [tokens[i] for i in ancestors]


@torch.no_grad()
def test_tree_forward_gives_each_node_the_logits_of_its_path_alone():
    """Two rows, one left-padded, a window of 4 shorter than prompt + path: each node's logits
    equal a plain forward of its row's prompt followed by the node's path."""
    model = tiny("mistral_window_6", sliding_window=4)
    tree = MedusaTree(ISSUE_TREE + [(1, 0, 0)], device=DEVICE)
    rows = prompts([5, 8], seed=14)
    cache = KVCache(model.config, batch_size=2, max_len=8 + tree.size, device=DEVICE)
    cache.reset([3, 0])
    model(torch.tensor([[0] * 3 + rows[0], rows[1]], device=DEVICE), cache=cache)
    tokens = torch.tensor(prompts([tree.size, tree.size], seed=15), device=DEVICE)
    logits = model(tokens, cache=TreeCache(cache, tree)).logits  # [2, N, V]
    for row, prompt in enumerate(rows):
        for node in range(tree.size):
            sequence = prompt + path_tokens(tree, tokens[row].tolist(), node)
            expected = model(torch.tensor([sequence], device=DEVICE)).logits[0, -1]
            # float32, logits of a few units: only the order of the sums differs (about 1e-6)
            torch.testing.assert_close(logits[row, node], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_keep_leaves_the_cache_as_if_the_path_had_been_fed_in_order():
    model = tiny("llama")
    tree = MedusaTree(ISSUE_TREE, device=DEVICE)
    prompt = prompts([6], seed=16)[0]
    tokens = prompts([tree.size], seed=17)[0]
    cache = KVCache(model.config, batch_size=1, max_len=16, device=DEVICE)
    model(torch.tensor([prompt], device=DEVICE), cache=cache)
    tree_cache = TreeCache(cache, tree)
    model(torch.tensor([tokens], device=DEVICE), cache=tree_cache)
    path = tree.paths[(tree.paths == 6).any(-1).nonzero()[0, 0]]  # root -> (0,) -> (0, 0) -> (0, 0, 0)
    tree_cache.keep(path, torch.tensor(3, device=DEVICE))  # the root, (0,) and (0, 0)
    kept = [tokens[i] for i in path[:3].tolist()]
    next_logits = model(torch.tensor([[5]], device=DEVICE), cache=cache).logits[0, -1]

    reference = KVCache(model.config, batch_size=1, max_len=16, device=DEVICE)
    model(torch.tensor([prompt + kept], device=DEVICE), cache=reference)
    expected = model(torch.tensor([[5]], device=DEVICE), cache=reference).logits[0, -1]
    assert cache.position.item() == reference.position.item() == 10
    for ours, theirs in zip(cache.keys + cache.values, reference.keys + reference.values, strict=True):
        torch.testing.assert_close(ours[:, :, :10], theirs[:, :, :10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(next_logits, expected, atol=1e-5, rtol=1e-5)


def test_tree_forward_needs_a_cached_prefix_and_a_matching_tree(llama):
    model, _ = llama
    tree = MedusaTree(ISSUE_TREE, device=DEVICE)
    tree_cache = TreeCache(KVCache(model.config, batch_size=1, max_len=16, device=DEVICE), tree)
    tokens = torch.zeros(1, tree.size, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="a forward of 3 tokens through a tree of 7 nodes"):
        model(tokens[:, :3], cache=tree_cache)
    with pytest.raises(ValueError, match="run the prompt through the cache first"):
        model(tokens, cache=tree_cache)
    with pytest.raises(ValueError, match="follows a tree forward"):
        tree_cache.keep(tree.paths[0], 1)


# --- typical acceptance ----------------------------------------------------------------------------
def test_typical_acceptance_with_an_unreachable_threshold_is_greedy_decoding(llama):
    """A threshold above 1 accepts no candidate, and the root is then sampled among the tokens
    that pass it, which is the argmax alone."""
    model, heads = llama
    prompt = prompts([7], seed=18)
    stats = MedusaStats()
    out = medusa_generate(model, heads, prompt, 12, tree="small", acceptance="typical", temperature=0.8,
                          posterior_threshold=2.0, posterior_alpha=1e9, seed=0, stats=stats)
    assert out == generate(model, prompt, max_new_tokens=12)
    assert set(stats.accepted) == {0}


def test_typical_acceptance_with_a_zero_threshold_accepts_the_deepest_path(llama):
    model, heads = llama
    stats = MedusaStats()
    out = medusa_generate(model, heads, prompts([7], seed=19), 13, tree=ISSUE_TREE, acceptance="typical",
                          temperature=1.0, posterior_alpha=0.0, seed=0, stats=stats)
    assert len(out[0]) == 13 and stats.accepted == [3, 3, 3]  # 1 + 3 * (3 + 1) tokens


def test_typical_sampling_is_reproducible_with_a_seed(llama):
    model, heads = llama
    prompt = prompts([4], seed=20)

    def run(seed):
        return medusa_generate(model, heads, prompt, 16, tree="small", acceptance="typical", temperature=1.5,
                               seed=seed)

    first = run(1)
    assert run(1) == first and run(2) != first


# --- trees and bad requests ------------------------------------------------------------------------
def test_tree_buffers_of_the_issue_example():
    tree = MedusaTree([(1, 0), (0,), (0, 0, 0), (1,), (0, 1), (0, 0)])  # any order
    assert tree.choices == [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.parents.tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert tree.ancestors[6].nonzero()[:, 0].tolist() == [0, 1, 3, 6]
    assert tree.ancestors.sum().item() == 1 + 2 + 2 + 3 + 3 + 3 + 4
    # candidates [root, head 1's top 2, head 2's top 2, head 3's top 2]: (1, 0) is head 2's first
    assert tree.sources.tolist() == [0, 1, 2, 3, 4, 3, 5]
    # one path per leaf, the leaves in node order, padded with the root
    assert tree.paths.tolist() == [[0, 1, 4, 0], [0, 2, 5, 0], [0, 1, 3, 6]]
    assert tree.path_valid.sum(-1).tolist() == [3, 3, 4]


def test_named_trees_are_cut_to_the_heads_depth():
    assert set(TREES) == set(cli.TREE_NAMES)
    assert medusa_tree("mc_sim_7b_63", num_heads=5).size == 64
    cut = medusa_tree("mc_sim_7b_63", num_heads=2)
    assert cut.depth == 2 and all(len(c) <= 2 for c in cut.choices)
    assert medusa_tree("chain", num_heads=1).choices == [(0,)]


BAD_TREES = {
    "missing parent": ([(0,), (1, 0)], "lacks its parent \\(1,\\)"),
    "duplicate": ([(0,), (0,)], "\\(0,\\) appears twice"),
    "negative index": ([(0,), (0, -1)], "indices >= 0"),
    "empty choice": ([(0,), ()], "non-empty tuple"),
    "not a list": ("chainz", "unknown Medusa tree 'chainz'"),
    "deeper than the heads": ([(0,), (0, 0), (0, 0, 0)], "3 deep but there are 2 Medusa heads"),
}


@pytest.mark.parametrize("name", BAD_TREES)
def test_malformed_tree_raises_a_clear_error(name):
    choices, message = BAD_TREES[name]
    with pytest.raises(ValueError, match=message):
        medusa_tree(choices, num_heads=2)


def test_index_beyond_top_k_is_rejected():
    with pytest.raises(ValueError, match="index 3, beyond top_k=3"):
        MedusaTree([(0,), (3,)], top_k=3)


BAD_REQUESTS = {
    "batch of 2": (dict(input_ids=[[1, 2], [3]]), "one prompt \\(batch 1\\), got 2"),
    "greedy sampling": (dict(temperature=0.5), "greedy acceptance decodes at temperature 0"),
    "typical at temperature 0": (dict(acceptance="typical"), "set temperature > 0"),
    "unknown acceptance": (dict(acceptance="lenient"), "acceptance must be one of"),
    "negative alpha": (dict(acceptance="typical", temperature=1.0, posterior_alpha=-1.0),
                       "posterior_alpha must be a finite number >= 0"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_raises_a_clear_error(llama, name):
    model, heads = llama
    request, message = BAD_REQUESTS[name]
    with pytest.raises(ValueError, match=message):
        medusa_generate(model, heads, **{"input_ids": [[1, 2, 3]], "max_new_tokens": 4, **request})


def test_heads_of_another_model_are_rejected(llama):
    model, _ = llama
    heads = MedusaHeads(MedusaConfig(num_heads=2), 32, VOCAB)
    with pytest.raises(ValueError, match="hidden size 32 and vocabulary 128, the model has 64 and 128"):
        medusa_generate(model, heads, [[1, 2]], 4)


# --- the command -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_and_heads(tmp_path_factory):
    tokenizer = sentencepiece_file()
    if tokenizer is None:
        pytest.skip("mistral-common (a test extra) is not installed: no SentencePiece tokenizer file")
    directory = tmp_path_factory.mktemp("checkpoint")
    model = tiny("mistral_window_6", vocab_size=32000, hidden_size=32, intermediate_size=64,
                 max_position_embeddings=128)
    model.save_pretrained(directory)
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    save_heads(noisy_heads(model, num_heads=3), directory / "medusa", base_model=str(directory))
    save_heads(MedusaHeads(MedusaConfig(num_heads=2), 16, 32000), directory / "other_heads")
    return directory, model


def test_generate_with_medusa_prints_the_greedy_text_and_the_accepted_length(checkpoint_and_heads, capsys):
    from ligerzoo.tokenizer import load_tokenizer

    directory, model = checkpoint_and_heads
    tokenizer = load_tokenizer(directory, chat_format="mistral-v1")
    ids = tokenizer.encode("Fourscore and seven years ago", bos=True)
    new = generate(model, [ids], max_new_tokens=12, stop_ids=tokenizer.stop_ids)[0]
    expected = tokenizer.decode([t for t in new if t not in tokenizer.stop_ids]) + "\n"

    status = cli.main(["generate", str(directory), "Fourscore and seven years ago", "--max-new-tokens", "12",
                       "--device", "cpu", "--dtype", "fp32", "--medusa", str(directory / "medusa"),
                       "--medusa-tree", "small"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out == expected
    assert "medusa (small tree): mean accepted length" in captured.err


def test_generate_with_heads_of_another_model_exits_1_saying_so(checkpoint_and_heads, capsys):
    directory, _ = checkpoint_and_heads
    status = cli.main(["generate", str(directory), "hi", "--max-new-tokens", "4", "--device", "cpu",
                       "--medusa", str(directory / "other_heads")])
    assert status == 1
    assert "error: the Medusa heads are for hidden size 16 and vocabulary 32000, the model has 32" \
        in capsys.readouterr().err
