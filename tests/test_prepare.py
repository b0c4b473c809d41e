"""Token files (ligerzoo/training/token_file.py, `ligerzoo prepare`): written a document at a time and
atomically, mapped by training, giving exactly the batches of the same documents read as text, or
as chat and instruction data, masks included; files of the first version still read."""

import json
import struct
from pathlib import Path

import pytest
import torch
from test_sft_data import CONVERSATION, LLAMA3_FILE
from test_train import losses, run_train

from ligerzoo import load_tokenizer
from ligerzoo.cli import main
from ligerzoo.kernels import IGNORE_INDEX
from ligerzoo.tokenizer import ByteTokenizer, tokenizer_fingerprint
from ligerzoo.training import token_file
from ligerzoo.training.config import DataSection
from ligerzoo.training.data import PackedData, build_datasets, builtin_corpus
from ligerzoo.training.formats import read_documents
from ligerzoo.training.token_file import read_token_file, write_token_file


class ReversedBytes(ByteTokenizer):
    """As many ids as the byte tokenizer, other ids for the same text."""

    def encode(self, text, bos=True, eos=False):
        return [i if i >= 256 else 255 - i for i in super().encode(text, bos, eos)]


class WideBytes(ByteTokenizer):
    """Bytes at ids 65536.., a vocabulary too large for uint16."""

    bos_id, eos_id, vocab_size = 65536 + 256, 65536 + 257, 70_000

    def encode(self, text, bos=True, eos=False):
        return [65536 + i for i in ByteTokenizer().encode(text, bos, eos)]


def write_corpus(path: Path, documents: list[str]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
    else:
        path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def eager_packing(documents: list[list[int]], seq_len: int):
    """The packing PackedData did before token files, all rows at once: (tokens, labels, positions) [R, T]."""
    flat = torch.tensor([t for doc in documents for t in doc], dtype=torch.long)
    starts = torch.zeros(len(flat), dtype=torch.bool)
    starts[torch.tensor([0] + [len(doc) for doc in documents[:-1]]).cumsum(0)] = True
    n_rows = len(flat) // seq_len
    tokens = flat[: n_rows * seq_len].view(n_rows, seq_len)
    is_start = starts[: n_rows * seq_len].view(n_rows, seq_len)
    labels = tokens.masked_fill(is_start, IGNORE_INDEX)
    is_start[:, 0] = True
    column = torch.arange(seq_len).expand(n_rows, seq_len)
    return tokens, labels, column - torch.where(is_start, column, 0).cummax(dim=1).values


def test_packing_equals_the_eager_packing_in_the_same_seeded_order():
    generator = torch.Generator().manual_seed(0)
    documents = [torch.randint(0, 258, (int(n),), generator=generator).tolist()
                 for n in torch.randint(2, 90, (40,), generator=generator)]  # shorter and longer than a row
    seq_len, seed = 32, 7
    tokens, labels, positions = eager_packing(documents, seq_len)
    data = PackedData.from_documents(documents, seq_len, seed)
    for epoch in range(2):
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        batch = data.next_batch(len(tokens), rank=0, world_size=1)
        assert torch.equal(batch["input_ids"], tokens[order])
        assert torch.equal(batch["labels"], labels[order])
        assert torch.equal(batch["position_ids"], positions[order])


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_token_file_gives_the_batches_of_the_text_file(tmp_path, suffix):
    texts = builtin_corpus(60, seed=3) + ["Ünïcödé 東京 🙂, a line\nand another."]
    corpus = write_corpus(tmp_path / f"corpus{suffix}", texts)
    write_token_file([str(corpus)], ByteTokenizer(), str(tmp_path / "corpus.tokens"))

    def packed(path):
        return build_datasets(DataSection(path=str(path), seq_len=48), ByteTokenizer(), seed=5)[0]

    from_text, from_file = packed(corpus), packed(tmp_path / "corpus.tokens")
    assert len(from_file) == len(from_text) > 4
    for step in range(3 * len(from_text) // 4):  # three epochs of steps of 2 ranks x 2 rows
        if step == 5:  # a resume from the saved position
            from_file = packed(tmp_path / "corpus.tokens")
            from_file.load_state_dict(from_text.state_dict())
        for rank in range(2):
            text_batch = from_text.next_batch(2, rank, world_size=2)
            file_batch = from_file.next_batch(2, rank, world_size=2)
            for key in text_batch:
                assert torch.equal(text_batch[key], file_batch[key]), (step, rank, key)
        assert from_file.state_dict() == from_text.state_dict()


def test_training_on_a_token_file_logs_the_losses_of_the_same_corpus_in_memory(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", builtin_corpus(300, seed=0))  # train.py's corpus
    write_token_file([str(corpus)], ByteTokenizer(), str(tmp_path / "corpus.tokens"))
    run_train(tmp_path / "builtin", "--max_steps", "3", "--checkpoint_every", "0", nproc=1)
    run_train(tmp_path / "file", "--max_steps", "3", "--checkpoint_every", "0",
              "--data.path", str(tmp_path / "corpus.tokens"), nproc=1)
    assert losses(tmp_path / "file") == losses(tmp_path / "builtin")


def test_text_paragraphs_stream_as_the_whole_file_splits(tmp_path):
    text = "\n\nfirst\nstill first\n\n\n\nsecond \n \nstill second\n\n  \n\nthird\r\n\r\nfourth\n\n\n\nfifth"
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    whole = path.read_text(encoding="utf-8")
    assert read_documents(str(path)) == [part.strip() for part in whole.split("\n\n") if part.strip()]
    assert len(read_documents(str(path))) == 5


def test_token_file_records_documents_and_tokenizer(tmp_path):
    texts = ["one", "two words", "three"]
    corpus = write_corpus(tmp_path / "corpus.jsonl", texts)
    header = write_token_file([str(corpus)], ByteTokenizer(), str(tmp_path / "corpus.tokens"))
    corpus, read_header = read_token_file(str(tmp_path / "corpus.tokens"))
    tokens, starts = corpus.tokens, corpus.starts
    expected = [t for text in texts for t in ByteTokenizer().encode(text, bos=True, eos=True)]
    assert read_header == header
    assert (header["dtype"], header["num_tokens"], header["num_documents"]) == ("uint16", len(expected), 3)
    assert (header["tokenizer"]["name"], header["tokenizer"]["vocab_size"]) == ("bytes", 258)
    assert tokens.long().tolist() == expected
    assert starts.tolist() == [0, 5, 16]


def test_large_vocabularies_are_stored_as_uint32(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", ["a document", "another"])
    header = write_token_file([str(corpus)], WideBytes(), str(tmp_path / "corpus.tokens"))
    tokens = read_token_file(str(tmp_path / "corpus.tokens"))[0].tokens
    assert header["dtype"] == "uint32" and tokens.dtype == torch.uint32
    wide = WideBytes()
    assert tokens.long().tolist() == wide.encode("a document", eos=True) + wide.encode("another", eos=True)
    assert header["max_id"] == WideBytes.eos_id


def test_progress_counts_documents_tokens_and_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(token_file, "_CHUNK_TOKENS", 64)
    texts = builtin_corpus(30)
    corpus = write_corpus(tmp_path / "corpus.txt", texts)
    reports = []
    write_token_file([str(corpus)], ByteTokenizer(), str(tmp_path / "corpus.tokens"),
                     on_progress=lambda *counts: reports.append(counts))
    total_tokens = sum(len(text.encode()) + 2 for text in texts)
    assert len(reports) > 10
    assert reports == sorted(reports)
    assert reports[-1] == (30, total_tokens, corpus.stat().st_size)


def test_bad_jsonl_line_names_it_and_leaves_the_earlier_file(tmp_path):
    output = tmp_path / "corpus.tokens"
    write_token_file([str(write_corpus(tmp_path / "good.txt", ["kept"]))], ByteTokenizer(), str(output))
    before = output.read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "cut off\n{"text": "never read"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not a line of JSON"):
        write_token_file([str(bad)], ByteTokenizer(), str(output))
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: a record holds .*; its keys are \"title\""):
        write_token_file([str(bad)], ByteTokenizer(), str(tmp_path / "fresh.tokens"))
    assert output.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.jsonl", "corpus.tokens", "good.txt"]


def test_truncated_token_file_is_refused(tmp_path):
    output = tmp_path / "corpus.tokens"
    corpus = write_corpus(tmp_path / "corpus.txt", builtin_corpus(5))
    write_token_file([str(corpus)], ByteTokenizer(), str(output))
    output.write_bytes(output.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a complete token file"):
        build_datasets(DataSection(path=str(output)), ByteTokenizer(), seed=0)


@pytest.mark.parametrize("tokenizer, reason", [(WideBytes(), "has another vocab_size"),
                                               (ReversedBytes(), "encodes text differently")])
def test_token_file_of_another_tokenizer_is_refused(tmp_path, tokenizer, reason):
    output = tmp_path / "corpus.tokens"
    corpus = write_corpus(tmp_path / "corpus.txt", builtin_corpus(20))
    write_token_file([str(corpus)], ByteTokenizer(), str(output))
    with pytest.raises(ValueError, match=f"tokenised with bytes .vocab_size 258.*{reason}"):
        build_datasets(DataSection(path=str(output), seq_len=32), tokenizer, seed=0)


def test_prepare_command_writes_the_token_file_and_prints_its_path(tmp_path, capsys):
    txt = write_corpus(tmp_path / "a.txt", builtin_corpus(10, seed=1))
    jsonl = write_corpus(tmp_path / "b.jsonl", builtin_corpus(15, seed=2))
    output = tmp_path / "both.tokens"
    assert main(["prepare", str(txt), str(jsonl), "--output", str(output)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{output}\n"
    assert "25 documents" in err and "uint16" in err
    corpus, header = read_token_file(str(output))
    assert header["sources"] == [str(txt), str(jsonl)] and len(corpus.starts) == 25


def test_prepare_command_refuses_an_output_without_the_suffix(tmp_path, capsys):
    txt = write_corpus(tmp_path / "a.txt", ["text"])
    assert main(["prepare", str(txt), "--output", str(tmp_path / "a.bin")]) == 1
    assert "does not end in .tokens" in capsys.readouterr().err
    assert not (tmp_path / "a.bin").exists()


def test_token_file_of_chat_and_instruction_data_gives_the_batches_and_masks_of_the_jsonl_file(tmp_path):
    tokenizer = load_tokenizer(LLAMA3_FILE)
    records = [{"text": "plain text first, before any masked example"}] + [
        record for i in range(8) for record in (
            {"messages": CONVERSATION[:3 + 2 * (i % 2)]},
            {"prompt": f"Q{i}: 2+{i}=", "completion": f" {2 + i}"},
            {"instruction": f"Count to {i}.", "input": "" if i % 2 else "in French", "output": "un " * i},
            {"text": f"text {i} " * (3 * i)})]
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    header = write_token_file([str(corpus)], tokenizer, str(tmp_path / "mixed.tokens"))
    assert header["formats"] == {"text": 9, "chat": 8, "prompt_completion": 8, "alpaca": 8}
    for train_on_prompt in (False, True):
        built = [build_datasets(DataSection(path=str(path), seq_len=64, val_fraction=0.25,
                                            train_on_prompt=train_on_prompt), tokenizer, seed=1)
                 for path in (corpus, tmp_path / "mixed.tokens")]
        (text_train, text_val, text_stats), (file_train, file_val, file_stats) = built
        assert file_stats == text_stats and text_stats["train"]["cut"] > 0
        for from_text, from_file in ((text_train, file_train), (text_val, file_val)):
            rows = list(range(len(from_text)))
            assert len(from_file) == len(from_text)
            for key, value in from_text._rows(rows).items():
                assert torch.equal(from_file._rows(rows)[key], value), (train_on_prompt, key)


def test_plain_text_token_file_keeps_the_version_1_layout(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", builtin_corpus(5))
    header = write_token_file([str(corpus)], ByteTokenizer(), str(tmp_path / "corpus.tokens"))
    encoded = json.dumps(header, ensure_ascii=False).encode()
    assert header["roles_offset"] is None and header["formats"] == {"text": 5}
    assert (tmp_path / "corpus.tokens").stat().st_size == header["starts_offset"] + 8 * 5 + len(encoded) + 16


def write_version_1_token_file(path: Path, documents: list[list[int]]) -> None:
    """A token file as ligerzoo wrote it before roles: uint16 ids, padding to 8 bytes, int64 starts,
    the JSON header, its length and the magic."""
    ids = struct.pack(f"<{sum(map(len, documents))}H", *(t for document in documents for t in document))
    header = {"format": "ligerzoo-tokens", "version": 1, "dtype": "uint16", "num_tokens": len(ids) // 2}
    ids += bytes(-len(ids) % 8)
    offsets = [sum(map(len, documents[:i])) for i in range(len(documents))]
    fingerprint = tokenizer_fingerprint(ByteTokenizer())
    header |= {"num_documents": len(documents), "starts_offset": len(ids),
               "max_id": max(map(max, documents)), "sources": ["old.txt"],
               "tokenizer": {"name": "bytes", "vocab_size": 258, "probe": fingerprint["probe"]}}
    encoded = json.dumps(header).encode()
    path.write_bytes(ids + struct.pack(f"<{len(offsets)}q", *offsets) + encoded
                     + struct.pack("<Q8s", len(encoded), b"LZTOKEN1"))


def test_version_1_token_file_reads_as_plain_text(tmp_path):
    texts = builtin_corpus(20, seed=4)
    documents = [ByteTokenizer().encode(text, eos=True) for text in texts]
    write_version_1_token_file(tmp_path / "old.tokens", documents)
    corpus = write_corpus(tmp_path / "corpus.txt", texts)
    from_old, from_text = (build_datasets(DataSection(path=str(path), seq_len=32), ByteTokenizer(), seed=2)[0]
                           for path in (tmp_path / "old.tokens", corpus))
    assert from_old.loss_mask is None and len(from_old) == len(from_text)
    old_batch = from_old.next_batch(len(from_old), 0, 1)
    text_batch = from_text.next_batch(len(from_text), 0, 1)
    for key, value in text_batch.items():
        assert torch.equal(old_batch[key], value), key
