"""ByteTokenizer (ligerzoo/tokenizer/byte.py): UTF-8 bytes as ids, saved as a tokenizer.json that
load_tokenizer, Hugging Face's `tokenizers` and transformers all read alike; and
tokenizer_fingerprint, which tells tokenizers apart."""

import json
import random
from pathlib import Path

import pytest
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from ligerzoo.tokenizer import (
    LLAMA3_PATTERN,
    ByteTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
)
from ligerzoo.training.data import builtin_corpus

TEXT = (
    "Plain ASCII, then naïve café Ångström e\u0301, 日本語と中文, emoji 🙂👩\u200d👩\u200d👧 🇫🇷,\n"
    "new\nlines\r\n\ttabs\t\tand    runs of     spaces  \u00a0nbsp\u3000ideographic \n\n\n"
    "punctuation , spaced . like this ! ? and 'quotes' n't"
)
BYTE_TEXTS = [TEXT, "", " ", "\n", "a", "  leading and trailing  "]


@pytest.fixture
def saved(tmp_path) -> Path:
    """A directory holding ByteTokenizer's files, as ByteTokenizer.save writes them."""
    ByteTokenizer().save(tmp_path / "bytes", model_max_length=512)
    return tmp_path / "bytes"


def test_ids_are_the_utf8_bytes_with_bos_256_and_eos_257():
    tokenizer = ByteTokenizer()
    assert tokenizer.encode("aé🙂", bos=True, eos=True) == [256, 97, 0xC3, 0xA9, 0xF0, 0x9F, 0x99, 0x82, 257]
    assert tokenizer.encode("a", bos=False) == [97]
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (258, 256, 257)
    assert tokenizer.stop_ids == {257}
    assert tokenizer.special_tokens == {"<s>": 256, "</s>": 257}


@pytest.mark.parametrize("text", BYTE_TEXTS)
def test_decode_inverts_encode_and_specials_decode_to_nothing(text):
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True)) == text
    assert tokenizer.decode([256, *tokenizer.encode(text, bos=False), 257, 256]) == text


def test_ids_outside_the_vocabulary_are_refused():
    tokenizer = ByteTokenizer()
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 258\): \[258, -1\]"):
        tokenizer.decode([97, 258, -1])
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 258\): \[300\]"):
        tokenizer.decoder().step(300)


def random_ids(rng: random.Random, valid: list[int]) -> list[int]:
    """Runs of valid UTF-8 cut at any byte, stray bytes (mostly invalid UTF-8), and specials."""
    ids = []
    while len(ids) < 60:
        draw = rng.random()
        if draw < 0.6:
            start = rng.randrange(len(valid))
            ids += valid[start : start + rng.randint(1, 12)]
        elif draw < 0.8:
            ids.append(rng.randrange(256))
        else:
            ids.append(rng.choice([256, 257]))
    return ids


def test_stream_decoder_equals_decode_on_random_byte_splits():
    tokenizer = ByteTokenizer()
    rng = random.Random(0)
    valid = tokenizer.encode(TEXT, bos=False)
    for _ in range(200):
        ids = random_ids(rng, valid)
        decoder = tokenizer.decoder()
        pieces = [decoder.step(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tokenizer.decode(ids), ids


def test_stream_decoder_holds_back_a_character_until_its_last_byte():
    decoder = ByteTokenizer().decoder()
    assert [decoder.step(i) for i in "é🙂".encode()] == ["", "é", "", "", "", "🙂"]
    assert decoder.step(257) == "" and decoder.flush() == ""


def test_repr_works_without_a_file(saved):
    assert repr(ByteTokenizer()) == "ByteTokenizer(None, vocab_size=258, chat_format=None)"
    path = str(saved / "tokenizer.json")
    assert repr(load_tokenizer(saved)) == f"ByteTokenizer({path!r}, vocab_size=258, chat_format=None)"


def test_saved_directory_loads_as_a_byte_tokenizer(saved):
    for where in (saved, saved / "tokenizer.json"):
        loaded = load_tokenizer(where)
        assert isinstance(loaded, ByteTokenizer) and loaded.path == saved / "tokenizer.json"
        assert loaded.encode(TEXT, eos=True) == ByteTokenizer().encode(TEXT, eos=True)
    assert json.loads((saved / "tokenizer_config.json").read_text())["model_max_length"] == 512


def test_saved_file_with_a_merge_is_read_as_a_byte_level_bpe(saved):
    spec = json.loads((saved / "tokenizer.json").read_text())
    spec["model"]["merges"] = ["a b"]
    spec["model"]["vocab"]["ab"] = 258
    (saved / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = load_tokenizer(saved)
    assert isinstance(tokenizer, TiktokenTokenizer) and tokenizer.encode("cab", bos=False) == [99, 258]
    spec["model"]["vocab"].pop("ab")
    (saved / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"merge 0 \('a' \+ 'b'\) needs 'ab', which is not in the vocab"):
        load_tokenizer(saved)


def test_saved_tokenizer_refuses_a_chat_format(saved):
    with pytest.raises(ValueError, match="is a byte tokenizer, which has no chat format"):
        load_tokenizer(saved, chat_format="llama2")


@pytest.mark.parametrize("text", BYTE_TEXTS)
def test_tokenizers_library_encodes_and_decodes_the_saved_file_alike(saved, text):
    hf = tokenizers.Tokenizer.from_file(str(saved / "tokenizer.json"))
    ours = ByteTokenizer()
    assert hf.encode(text).ids == ours.encode(text)  # <s> first, from the post-processor
    assert hf.encode(text, add_special_tokens=False).ids == ours.encode(text, bos=False)
    assert hf.decode(ours.encode(text, eos=True)) == text


@pytest.mark.parametrize("text", [*BYTE_TEXTS, "text that looks special: <s> and </s>, <|eot_id|>"])
def test_transformers_encodes_and_decodes_the_saved_directory_alike(saved, text):
    hf = AutoTokenizer.from_pretrained(str(saved))
    ours = ByteTokenizer()
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (256, 257, 258)
    assert hf(text)["input_ids"] == ours.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text, bos=False)
    ids = ours.encode(text, eos=True)
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)


def test_allow_special_reads_the_text_of_s_and_eos_as_those_tokens(saved):
    hf = AutoTokenizer.from_pretrained(str(saved), split_special_tokens=False)
    text = "a<s>b</s>c <s"
    ours = ByteTokenizer().encode(text, allow_special=True)
    assert ours == [256, 97, 256, 98, 257, 99, 32, 60, 115] == hf(text)["input_ids"]
    assert ByteTokenizer().encode(text) == [256, *text.encode()]
    assert ByteTokenizer().added_tokens == {"<s>": 256, "</s>": 257}
    assert (ByteTokenizer().bos_token, ByteTokenizer().model_dir) == ("<s>", None)
    assert load_tokenizer(saved).model_dir == saved


def train_bpe(texts: list[str], vocab_size: int, directory: Path) -> Path:
    """A byte-level BPE trained by `tokenizers` on `texts`, with Llama 3's split pattern and
    special tokens (after the vocabulary), saved as tokenizer.json: load_tokenizer reads it."""
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    bpe.add_special_tokens(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    )
    directory.mkdir()
    bpe.save(str(directory / "tokenizer.json"))
    return directory


def test_fingerprint_tells_bytes_from_a_trained_bpe(tmp_path):
    bpe = load_tokenizer(train_bpe(builtin_corpus(200), 300, tmp_path / "bpe"))
    assert isinstance(bpe, TiktokenTokenizer) and bpe.vocab_size == 305
    bytes_print, bpe_print = tokenizer_fingerprint(ByteTokenizer()), tokenizer_fingerprint(bpe)
    assert (bytes_print["kind"], bpe_print["kind"]) == ("ByteTokenizer", "TiktokenTokenizer")
    assert (bpe_print["vocab_size"], bpe_print["bos_id"], bpe_print["eos_id"]) == (305, 300, 301)
    assert bytes_print["probe"] != bpe_print["probe"]


def test_fingerprint_tells_apart_two_bpes_of_one_size(tmp_path):
    stories = load_tokenizer(train_bpe(builtin_corpus(200), 300, tmp_path / "stories"))
    rng = random.Random(0)
    words = ["".join(rng.choices("zyxwvuqk", k=rng.randint(2, 7))) for _ in range(300)]
    other_texts = [" ".join(rng.choices(words, k=50)) for _ in range(100)]
    other = load_tokenizer(train_bpe(other_texts, 300, tmp_path / "other"))
    first, second = tokenizer_fingerprint(stories), tokenizer_fingerprint(other)
    probe_first, probe_second = first.pop("probe"), second.pop("probe")
    assert first == second  # kind, vocab_size, bos_id, eos_id
    assert probe_first != probe_second


def test_fingerprint_is_json_and_the_same_for_the_same_tokenizer_from_anywhere(saved):
    fingerprint = tokenizer_fingerprint(ByteTokenizer())
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    assert tokenizer_fingerprint(load_tokenizer(saved)) == fingerprint
    assert fingerprint["probe"][0] == 256 and fingerprint["probe"][-1] == 257
