"""tokenizer.json files (ligerzoo/tokenizer/tokenizer_json.py) of every style a Llama-family model
ships, trained here with the `tokenizers` library on a small multilingual corpus, read by
load_tokenizer and compared with transformers' PreTrainedTokenizerFast on the same file:
ids (with and without BOS, special-token text read both ways), decoded text, streamed text."""

import json
import random
import shutil
import time
from pathlib import Path

import mistral_common
import pytest
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ligerzoo.tokenizer import (
    SentencePieceBPETokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TokenizerError,
    load_tokenizer,
)
from ligerzoo.tokenizer.bpe import BPE
from ligerzoo.tokenizer.tokenizer_json import _TiktokenModel

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
MISTRAL_DATA = Path(mistral_common.__file__).parent / "data"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Hello, world! It's 2024; we've 12,345 items @ $3.99.",
    "日本語のテキストと中文字符，还有한국어 문장도 있습니다。", "Привет, как дела? Всё хорошо.",
    "naïve café Ωmega Ångström e\u0301 ﬁ", "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x:\n\t\tpass\n",
    "emoji 🙂🤗🚀 👩\u200d👩\u200d👧 🇫🇷 👍🏽", "   lots   of    spaces\n\n\n and\ttabs\r\n",
    "1234567890 3.14159 0x1F -42e-10",
    "I'm sure they'll say it's fine, DON'T you think? We'd go.", "مرحبا بالعالم", '<a href="x">Text</a>',
    "numbers ١٢٣ ²³ ⅫⅪ ½", "<think>reasoning</think> and hello world",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Varied text: the corpus's sentences, edge cases, and the text of added and special tokens
# (special ones are plain text unless allow_special; <think> is added but not special).
TEXTS = [
    *SENTENCES, "", " ", "  ", "\n", "a", "x" * 300, " " * 50 + "x", "\u3000\u2028\u00a0 x\x1c\x1d y",
    "ſ 'S 'LL ǅ ß", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "x<|im_end|>y<|endoftext|>",
    "<think>x</think> <think>", " hello world twice hello world", "<s>[INST] a [/INST] b</s><unk>",
    "<0x41> ▁x",
]
PIECES = [*"abc XYZ é日本 \t\n\r'sl0123456789٣².,!?-_/🙂\u0301", *SPECIALS, "<think>", " hello world",
          "[INST]", "<s>", "</s>", "<unk>", "▁"]


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(SENTENCES, k=rng.randint(1, 4))) + "".join(rng.choices("ab .,\n0123", k=8))
            for _ in range(n)]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(PIECES, k=rng.randint(0, 25))) for _ in range(n)]


def train_byte_level(pre_tokenizer, normalizer=None, post_processor=None, vocab_size: int = 900):
    """A byte-level BPE with SPECIALS as special tokens, <think> added (not special, not
    normalised) and " hello world" added (normalised)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = post_processor
    tok.add_tokens([AddedToken("<think>", normalized=False, special=False),
                    AddedToken(" hello world", normalized=True, special=False)])
    return json.loads(tok.to_str())


def train_sentencepiece_style(legacy: bool):
    """A Llama 2 / Mistral-style BPE: "▁" for spaces (a Prepend + Replace normaliser as the
    Hub's Llama 2 files have, or Metaspace prepend_scheme "first" as transformers 5 converts),
    byte fallback (<0x00>..<0xFF> in the vocabulary; rare characters left out of it), <s> first."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  limit_alphabet=100, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["[INST]", "[/INST]"])
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    return spec


def train_metaspace_nfkc():
    """tokenizers' own SentencePieceBPETokenizer: NFKC, Metaspace splitting words, its decoder."""
    tok = tokenizers.implementations.SentencePieceBPETokenizer()
    tok.train_from_iterator(corpus(), vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                            show_progress=False)
    return json.loads(tok.to_str())


def shuffled_ids(spec: dict) -> dict:
    """The same tokenizer with the ids of its merged tokens shuffled: merge order and ids disagree."""
    spec = json.loads(json.dumps(spec))
    vocab = spec["model"]["vocab"]
    fixed = {t["content"] for t in spec["added_tokens"]}
    tokens = [t for t in vocab if t not in fixed]
    ids = sorted(vocab[t] for t in tokens)
    random.Random(3).shuffle(tokens)
    vocab.update(zip(tokens, ids))
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]  # "a b" strings, as older files
    return spec


STYLES = {
    "gpt2": lambda: train_byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False),
                                     post_processor=processors.ByteLevel(trim_offsets=True)),
    "gpt2_prefix_space": lambda: train_byte_level(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    "llama3": lambda: train_byte_level(
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        post_processor=processors.TemplateProcessing(single="<|im_start|> $A",
                                                     special_tokens=[("<|im_start|>", 1)])),
    "smollm2": lambda: train_byte_level(
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])),
    "qwen2": lambda: train_byte_level(
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        normalizer=normalizers.NFC()),
    "sentencepiece_legacy": lambda: train_sentencepiece_style(legacy=True),
    "sentencepiece_metaspace": lambda: train_sentencepiece_style(legacy=False),
    "metaspace_nfkc": train_metaspace_nfkc,
}
BYTE_LEVEL_STYLES = ["gpt2", "gpt2_prefix_space", "llama3", "smollm2", "qwen2", "shuffled_ids"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Each style's tokenizer.json, in a directory of its own."""
    root = tmp_path_factory.mktemp("styles")
    specs = {name: build() for name, build in STYLES.items()}
    specs["shuffled_ids"] = shuffled_ids(specs["gpt2"])
    paths = {}
    for name, spec in specs.items():
        (root / name).mkdir()
        paths[name] = root / name / "tokenizer.json"
        paths[name].write_text(json.dumps(spec, ensure_ascii=False))
    return paths


def transformers_tokenizer(path: Path, allow_special: bool) -> PreTrainedTokenizerFast:
    """The reference: transformers on the same file; split_special_tokens=True reads special-token
    text as text, as encode(allow_special=False) does."""
    return PreTrainedTokenizerFast(tokenizer_file=str(path), split_special_tokens=not allow_special,
                                   clean_up_tokenization_spaces=False)


def assert_encodes_as_transformers(path: Path, texts: list[str], bos_values=(False,)) -> None:
    """load_tokenizer(path) encodes each text as transformers does, special-token text read both ways."""
    ours = load_tokenizer(path)
    for allow_special in (False, True):
        hf = transformers_tokenizer(path, allow_special)
        for text in texts:
            for bos in bos_values:
                expected = hf(text, add_special_tokens=bos)["input_ids"]
                assert ours.encode(text, bos=bos, allow_special=allow_special) == expected, (text, bos)


def streamed(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    decoder = tokenizer.decoder()
    pieces = [decoder.step(i) for i in ids]
    return pieces, "".join(pieces) + decoder.flush()


# ---------------------------------------------------------------------------------------------
# Every style against transformers


@pytest.mark.parametrize("style", [*STYLES, "shuffled_ids"])
def test_encode_equals_transformers(files, style):
    texts = TEXTS + corpus(60, seed=1) + random_texts(150, seed=2)
    assert_encodes_as_transformers(files[style], texts, bos_values=(False, True))


@pytest.mark.parametrize("style", [*STYLES, "shuffled_ids"])
def test_decode_and_stream_equal_transformers_decode(files, style):
    ours, hf = load_tokenizer(files[style]), transformers_tokenizer(files[style], allow_special=True)
    rng = random.Random(4)
    encoded = [hf(text)["input_ids"] for text in TEXTS + random_texts(100, seed=5)]
    arbitrary = [[rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    for ids in encoded + arbitrary:
        expected = hf.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == expected, ids
        assert streamed(ours, ids)[1] == expected, ids


@pytest.mark.parametrize("style", ["gpt2", "sentencepiece_legacy"])
def test_stream_decoder_holds_back_a_character_split_over_tokens(files, style):
    ours = load_tokenizer(files[style])
    ids = ours.encode("🦜 and", bos=False)  # a parrot: no token here, so its four bytes take several ids
    pieces, _ = streamed(ours, ids)
    assert len(ids) >= 4 and pieces[:-2] == [""] * (len(ids) - 2) and "".join(pieces[-2:]) == "🦜 and"
    for text in TEXTS:
        pieces, everything = streamed(ours, ours.encode(text))
        assert everything == ours.decode(ours.encode(text))
        assert not any("\ufffd" in piece for piece in pieces), pieces


# ---------------------------------------------------------------------------------------------
# How the BPE merges: tiktoken where exact, Hugging Face's algorithm elsewhere


def engine(tokenizer):
    """(the model class, whether tiktoken splits too) of a tokenizer.json's pipeline."""
    if isinstance(tokenizer, TiktokenTokenizer):
        pipeline = tokenizer._encode_with.__self__
    else:
        pipeline = tokenizer._pipeline
    return type(pipeline._model), pipeline._fast is not None


def test_byte_level_files_merge_through_tiktoken(files):
    for style in ("gpt2", "gpt2_prefix_space", "llama3", "qwen2", "shuffled_ids"):
        assert engine(load_tokenizer(files[style])) == (_TiktokenModel, True), style  # split by tiktoken too
    assert engine(load_tokenizer(files["smollm2"])) == (_TiktokenModel, False)  # Digits: split by Python's re
    assert engine(load_tokenizer(files["sentencepiece_legacy"])) == (BPE, False)


def test_merges_out_of_training_order_merge_as_hf_does(files, tmp_path):
    spec = json.loads(files["gpt2"].read_text())
    merges = spec["model"]["merges"]
    merges[0], merges[-1] = merges[-1], merges[0]  # "Ġ t" now merges last: tiktoken's rule would differ
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    assert engine(load_tokenizer(path)) == (BPE, False)
    assert_encodes_as_transformers(path, TEXTS + corpus(50, seed=6))


def test_a_token_that_merging_never_makes_is_not_taken_whole(tmp_path):
    """tiktoken returns a pre-token found whole in the vocabulary; Hugging Face merges it, here
    into a + bc + d, since (b, c) merges first and no merge joins a to bc."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(alphabet))}
    merges = [["b", "c"], ["a", "b"], ["c", "d"], ["ab", "cd"]]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    spec = {"version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "vocab": vocab, "merges": merges, "ignore_merges": False}}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    assert load_tokenizer(path).encode("abcd", bos=False) == [vocab["a"], vocab["bc"], vocab["d"]]
    assert_encodes_as_transformers(path, ["abcd", "abcd abc bcd"])
    spec["model"]["ignore_merges"] = True
    path.write_text(json.dumps(spec))
    assert load_tokenizer(path).encode("abcd", bos=False) == [vocab["abcd"]]
    assert_encodes_as_transformers(path, ["abcd", "abcd abc bcd"])


# ---------------------------------------------------------------------------------------------
# Normalisers, pre-tokenizers and added-token options


VARIANTS = {
    "split_removed": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Removed", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}]}},
    "split_merged_with_previous": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}},
    "split_merged_with_next": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{P}"}, "behavior": "MergedWithNext", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}},
    "split_contiguous_inverted": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+"}, "behavior": "Contiguous", "invert": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}},
    "line_anchors": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+$|^\p{Lu}|[一-龥]+"}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}},
    "regex_leaving_gaps": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+|\p{N}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}},
    "punctuation_digits": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "Contiguous"},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        {"type": "Digits", "individual_digits": False}]}},
    "normalisers": {"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Lowercase"}, {"type": "Strip", "strip_left": True, "strip_right": False},
        {"type": "Replace", "pattern": {"Regex": r"\d+"}, "content": "#"}]}},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_pre_tokenizer_and_normaliser_variants_encode_as_transformers(files, tmp_path, variant):
    spec = json.loads(files["gpt2"].read_text())
    spec.update(VARIANTS[variant])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    texts = [*TEXTS, *corpus(40, seed=7), *random_texts(100, seed=8), "Σ ΣΑΣ. Lines\nEnd  \nUp  "]
    assert_encodes_as_transformers(path, texts)


def test_added_token_options_match_transformers(files, tmp_path):
    spec = json.loads(files["gpt2"].read_text())
    next_id = 1 + max(*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"]))
    for i, (content, options) in enumerate([
        ("<mask>", {"lstrip": True, "rstrip": True, "single_word": True, "special": True}),
        ("ony", {"single_word": True}),
        ("[SEP]", {"rstrip": True, "special": False, "normalized": False}),
        ("Café", {"normalized": True}),  # matched in the normalised (lowercased) text: never here
    ]):
        spec["added_tokens"].append({"id": next_id + i, "content": content, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False, "special": False,
                                     **options})
    spec["normalizer"] = {"type": "Lowercase"}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    texts = ["Hi <mask> there\t<mask>\t<mask>\u2000 x", "A<mask> <mask>ony ony, [SEP]  next [SEP]",
             "café Café ony_", "<mask>, <mask>- ◌̰<mask>", *random_texts(100, seed=9)]
    assert_encodes_as_transformers(path, texts)


# ---------------------------------------------------------------------------------------------
# BOS, EOS and stop ids


def test_bos_is_added_only_where_the_files_add_one(files):
    gpt2 = load_tokenizer(files["gpt2"])  # a ByteLevel post-processor: no BOS, as GPT-2 and SmolLM2
    assert gpt2.encode("hi", bos=True) == gpt2.encode("hi", bos=False)
    assert (gpt2.bos_token, gpt2.eos_token, gpt2.eos_id) == (None, "<|endoftext|>", 0)
    assert gpt2.encode("hi", bos=False, eos=True) == [*gpt2.encode("hi", bos=False), 0]  # EOS ends a document
    llama3 = load_tokenizer(files["llama3"])  # TemplateProcessing "<|im_start|> $A"
    assert llama3.encode("hi") == [1, *llama3.encode("hi", bos=False)]
    assert (llama3.bos_token, llama3.bos_id) == ("<|im_start|>", 1)
    sentencepiece = load_tokenizer(files["sentencepiece_legacy"])
    assert (sentencepiece.bos_id, sentencepiece.eos_id) == (1, 2)
    assert sentencepiece.encode("hi", eos=True) == [1, *sentencepiece.encode("hi", bos=False), 2]


def test_roberta_post_processor_gives_the_start_and_end_tokens(files, tmp_path):
    spec = json.loads(files["gpt2"].read_text())
    spec["post_processor"] = {"type": "RobertaProcessing", "sep": ["<|im_end|>", 2], "cls": ["<|im_start|>", 1],
                              "trim_offsets": True, "add_prefix_space": False}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    ours, hf = load_tokenizer(path), transformers_tokenizer(path, allow_special=False)
    for text in TEXTS:
        assert ours.encode(text, bos=True, eos=True) == hf(text)["input_ids"], text
    assert ours.encode("hi", eos=True)[-1] == 2 != ours.eos_id  # the template's end, not <|endoftext|>


def test_add_bos_token_applies_where_the_file_has_no_post_processor(files):
    directory = files["smollm2"].parent  # no post-processor
    tokenizer = load_tokenizer(directory)
    assert tokenizer.encode("hi") == tokenizer.encode("hi", bos=False)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
         "add_bos_token": True, "add_eos_token": True}))
    try:
        tokenizer = load_tokenizer(directory)
        assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
        assert tokenizer.encode("hi") == [1, *tokenizer.encode("hi", bos=False)]
        assert tokenizer.encode("hi", eos=True)[-1] == 2
    finally:
        (directory / "tokenizer_config.json").unlink()


def test_special_ids_come_from_tokenizer_config_and_generation_config(files):
    directory = files["qwen2"].parent
    config = {"bos_token": None, "eos_token": "<|im_end|>"}  # Qwen2's: no BOS
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    try:
        tokenizer = load_tokenizer(directory)
        assert (tokenizer.bos_token, tokenizer.bos_id) == (None, None)
        assert (tokenizer.eos_token, tokenizer.eos_id) == ("<|im_end|>", 2)
        assert tokenizer.stop_ids == {0, 2}
        assert tokenizer.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
        assert tokenizer.added_tokens.keys() == {*tokenizer.special_tokens, "<think>", " hello world"}
        assert tokenizer.model_dir == directory and tokenizer.chat_format is None
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nowhere|>"}))
        with pytest.raises(TokenizerError, match=r"names eos_token '<\|nowhere\|>', which is not in .*vocab"):
            load_tokenizer(directory)
    finally:
        (directory / "tokenizer_config.json").unlink()
        (directory / "generation_config.json").unlink()


def test_eos_is_refused_where_no_end_token_is_declared(tmp_path, files):
    spec = json.loads(files["gpt2"].read_text())
    spec["added_tokens"] = []
    for name in SPECIALS:
        del spec["model"]["vocab"][name]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    tokenizer = load_tokenizer(path)
    assert tokenizer.eos_id is None and tokenizer.stop_ids == set()
    with pytest.raises(ValueError, match="declares no end-of-text token; pass eos=False"):
        tokenizer.encode("hi", eos=True)


# ---------------------------------------------------------------------------------------------
# Real files, speed, errors


@pytest.fixture(scope="module", params=["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3"])
def mistral_json(request, tmp_path_factory):
    """(tokenizer.json converted by transformers from mistral-common's tokenizer.model, the model)."""
    directory = tmp_path_factory.mktemp("mistral")
    shutil.copy(MISTRAL_DATA / request.param, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    converted = directory / "json"
    converted.mkdir()
    AutoTokenizer.from_pretrained(str(directory)).backend_tokenizer.save(str(converted / "tokenizer.json"))
    return converted / "tokenizer.json", directory / "tokenizer.model"


def test_converted_mistral_tokenizer_json_equals_transformers(mistral_json):
    path, _ = mistral_json
    ours, hf = load_tokenizer(path), transformers_tokenizer(path, allow_special=True)
    assert isinstance(ours, SentencePieceBPETokenizer)
    assert_encodes_as_transformers(path, TEXTS + corpus(40, seed=10), (False, True))
    for text in TEXTS:
        ids = ours.encode(text, eos=True)
        assert ours.decode(ids) == hf.decode(ids) == streamed(ours, ids)[1]


def test_tokenizer_model_keeps_priority_over_tokenizer_json(mistral_json, tmp_path):
    path, model = mistral_json
    shutil.copy(path, tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceBPETokenizer)
    shutil.copy(model, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


@pytest.mark.parametrize("style", ["sentencepiece_legacy", "smollm2"])
def test_a_megabyte_encodes_in_seconds(files, style):
    """SentencePiece-style files leave a text between special tokens in one piece, and Digits
    sequences split in Python: neither may be quadratic. Whitespace runs long enough to overflow
    tiktoken's regex engine are split by Python's re (gpt2)."""
    text = "\n".join(corpus(2500, seed=11))[:1_000_000]
    ours = load_tokenizer(files[style])
    start = time.perf_counter()
    ids = ours.encode(text, bos=False)
    assert time.perf_counter() - start < 30  # about 1 s alone; the CPU is shared
    assert ids == tokenizers.Tokenizer.from_file(str(files[style])).encode(text, add_special_tokens=False).ids
    runs = " " * 150_000 + "x\n" + "\n" * 120_000 + "y"
    gpt2 = load_tokenizer(files["gpt2"])
    assert gpt2.encode(runs, bos=False) == tokenizers.Tokenizer.from_file(str(files["gpt2"])).encode(runs).ids


def test_unsupported_file_gets_one_error_naming_each_part(tmp_path):
    spec = {"model": {"type": "WordPiece", "vocab": {}}, "normalizer": {"type": "BertNormalizer"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Whitespace"},
                {"type": "Split", "pattern": {"Regex": "[[:alpha:]]"}, "behavior": "Isolated"}]},
            "decoder": {"type": "WordPiece"}}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(TokenizerError) as error:
        load_tokenizer(path)
    message = str(error.value)
    for part in ("not a byte-level BPE nor a SentencePiece-style BPE", "model 'WordPiece'",
                 "normaliser 'BertNormalizer'", "pre-tokenizer 'Whitespace'", "Split pattern '[[:alpha:]]'",
                 "decoder 'WordPiece'"):
        assert part in message, (part, message)
