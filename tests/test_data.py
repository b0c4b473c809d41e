"""Reading corpora (ligerzoo/training/formats.py, through data.py: read_documents, and
write_token_file through it): the format chosen by suffix in any case, .json arrays, and clear
errors for files that are not UTF-8 text or hold no documents; and the tokenizer a token file
records (token_file.py)."""

import json

import pytest
import torch

from ligerzoo.tokenizer import ByteTokenizer, tokenizer_fingerprint
from ligerzoo.training import formats, token_file
from ligerzoo.training.config import DataSection
from ligerzoo.training.data import build_datasets
from ligerzoo.training.formats import read_documents
from ligerzoo.training.token_file import read_token_file, write_token_file

TEXTS = ["first document", "second, with ünïcödé 東京 🙂", "third\nwith two lines"]


def jsonl(texts: list[str]) -> str:
    return "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)


@pytest.mark.parametrize("name", ["corpus.JSONL", "corpus.Jsonl", "corpus.jsonl"])
def test_jsonl_suffix_is_recognised_in_any_case(tmp_path, name):
    path = tmp_path / name
    path.write_text(jsonl(TEXTS), encoding="utf-8")
    assert read_documents(str(path)) == TEXTS


@pytest.mark.parametrize("name", ["corpus.JSON", "corpus.json"])
def test_json_array_of_records_and_strings_is_read(tmp_path, name):
    path = tmp_path / name
    path.write_text(json.dumps([{"text": TEXTS[0], "id": 1}, TEXTS[1], {"text": TEXTS[2]}]), encoding="utf-8")
    assert read_documents(str(path)) == TEXTS


@pytest.mark.parametrize("content, expected", [
    ('{"text": "one object"}', r"corpus\.json holds a JSON dict; a \.json corpus is one JSON array"),
    (jsonl(TEXTS), r"corpus\.json is not valid JSON .*Extra data.*one record per line is \.jsonl"),
    ("[1, 2]", r"corpus\.json: record 0: a record holds \"messages\" .*or \"text\", or is a string; got 1"),
    ('["fine", {"title": "no text"}]', r"corpus\.json: record 1: a record holds .*; its keys are \"title\""),
])
def test_json_other_than_an_array_of_texts_is_refused(tmp_path, content, expected):
    path = tmp_path / "corpus.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=expected):
        read_documents(str(path))


def test_utf8_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(TEXTS).encode())
    assert read_documents(str(path)) == TEXTS


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.jsonl", "corpus.json"])
def test_latin1_text_is_refused_naming_the_file_byte_and_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes("first line\n\nthe café\n".encode("latin-1"))  # é is byte 0xe9 at offset 19
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text: byte 19 \(line 3\) is 0xe9"):
        read_documents(str(path))


def test_undecodable_byte_is_located_exactly_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "_SCAN_CHUNK", 5)  # characters split between chunks
    text = "東京\n🙂 café\n" * 3 + "é"  # 18 bytes in 2 lines, 3 times; then é at bytes 54-55
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode() + b"\xff")  # in the chunk after the one that ends inside é
    with pytest.raises(ValueError, match=r"byte 56 \(line 7\) is 0xff"):
        read_documents(str(path))


def test_binary_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"weights\.txt is not UTF-8 text: byte 128 \(line 2\) is 0x80"):
        read_documents(str(path))


def test_binary_file_that_decodes_as_utf8_is_refused_for_its_nul_bytes(tmp_path):
    path = tmp_path / "ids.txt"  # e.g. a token file of ASCII bytes as uint16: valid UTF-8, full of NULs
    path.write_bytes(b"".join(i.to_bytes(2, "little") for i in ByteTokenizer().encode("text\n\nmore")))
    with pytest.raises(ValueError, match=r"ids\.txt:1: holds a NUL byte, so it is not a text file"):
        read_documents(str(path))


@pytest.mark.parametrize("name, content", [
    ("empty.txt", ""), ("blank.txt", "\n \n\n\t\n"), ("empty.jsonl", ""), ("blank.jsonl", "\n\n"),
    ("empty.json", "[]"),
])
def test_corpus_without_documents_is_refused_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{name} holds no documents"):
        read_documents(str(path))


def test_prepare_refuses_an_undecodable_input_and_writes_nothing(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("fine text", encoding="utf-8")
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"bad\.txt is not UTF-8 text: byte 3 \(line 1\)"):
        write_token_file([str(good), str(bad)], ByteTokenizer(), str(tmp_path / "corpus.tokens"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.txt", "good.txt"]


def test_token_file_suffix_is_recognised_in_any_case(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS * 10), encoding="utf-8")
    output = tmp_path / "corpus.TOKENS"
    write_token_file([str(corpus)], ByteTokenizer(), str(output))

    def packed(path):
        return build_datasets(DataSection(path=str(path), seq_len=16), ByteTokenizer(), seed=0)[0]

    from_file, from_text = packed(output), packed(corpus)
    assert len(from_file) == len(from_text) > 0
    assert from_file.tokens.dtype == torch.uint16  # mapped, not read as text


class ReversedBytes(ByteTokenizer):
    """As many ids as the byte tokenizer, other ids for the same text."""

    def encode(self, text, bos=True, eos=False):
        return [i if i >= 256 else 255 - i for i in super().encode(text, bos, eos)]


def test_token_file_records_the_tokenizer_fingerprint(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS), encoding="utf-8")
    write_token_file([str(corpus)], ByteTokenizer(), str(tmp_path / "corpus.tokens"))
    _, header = read_token_file(str(tmp_path / "corpus.tokens"))
    assert header["tokenizer"] == {"name": "bytes", **tokenizer_fingerprint(ByteTokenizer())}


def test_token_file_from_before_the_fingerprint_is_checked_on_what_it_records(tmp_path, monkeypatch):
    full_record = token_file._tokenizer_record

    def old_record(tokenizer):  # what files held before kind, bos_id and eos_id
        return {key: full_record(tokenizer)[key] for key in ("name", "vocab_size", "probe")}

    monkeypatch.setattr(token_file, "_tokenizer_record", old_record)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS * 10), encoding="utf-8")
    write_token_file([str(corpus)], ByteTokenizer(), str(tmp_path / "old.tokens"))
    monkeypatch.undo()
    config = DataSection(path=str(tmp_path / "old.tokens"), seq_len=16)
    assert len(build_datasets(config, ByteTokenizer(), seed=0)[0]) > 0
    with pytest.raises(ValueError, match="tokenised with bytes .vocab_size 258.*encodes text differently"):
        build_datasets(config, ReversedBytes(), seed=0)
