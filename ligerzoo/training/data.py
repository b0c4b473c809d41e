"""Training data: documents tokenised, packed into rows of `seq_len`, read in a fixed order.

Documents are concatenated (each with BOS and EOS) and cut into rows; the position ids restart at
every document start (and at every row start), so the model attends within each document, and the
first token of a document is never a target of the previous one. Each step reads the next
`world_size * batch_size` rows of a seeded permutation (reshuffled each epoch); rank r takes its
slice, so the rows a step sees do not depend on how they are split across ranks. The only data
state is the number of rows consumed, saved in checkpoints.

A large corpus is tokenised once into a token file (`ligerzoo prepare`, write_token_file) that
training maps into memory: rows are cut from the map as batches need them, the same rows a text
file of the same documents gives.
"""

import array
import codecs
import itertools
import json
import mmap
import os
import random
import shutil
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ligerzoo.checkpoint import _fsync_directory
from ligerzoo.tokenizer import ByteTokenizer, tokenizer_fingerprint  # noqa: F401 (re-exported)

IGNORE_INDEX = -100


def builtin_corpus(num_documents: int, seed: int = 0) -> list[str]:
    """A deterministic toy corpus: short stories from a small grammar, learnable in minutes."""
    rng = random.Random(seed)
    names = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal"]
    adjectives = ["red", "small", "quiet", "old", "bright", "heavy", "round", "green"]
    nouns = ["box", "bird", "lamp", "boat", "stone", "cup", "kite", "door"]
    verbs = ["found", "painted", "carried", "lost", "opened", "watched", "sold", "fixed"]
    places = ["in the garden", "by the river", "at the market", "on the hill", "under the bridge"]
    documents = []
    for _ in range(num_documents):
        who = rng.choice(names)
        sentences = [f"{who} {rng.choice(verbs)} the {rng.choice(adjectives)} {rng.choice(nouns)} "
                     f"{rng.choice(places)}." for _ in range(rng.randint(2, 6))]
        sentences.append(f"Then {who} went home.")
        documents.append(" ".join(sentences))
    return documents


def read_documents(path: str) -> list[str]:
    """The documents of a UTF-8 corpus file, by its suffix (in any case): .jsonl, one {"text": ...}
    record per line; .json, one array of {"text": ...} records or strings; anything else, text
    whose blank-line-separated paragraphs are the documents. A file without documents, or one
    that is not UTF-8 text, raises a ValueError that says where."""
    with _open_corpus(path) as file:
        return list(_documents(file, path))


def _open_corpus(path: str):
    """A corpus file opened for _documents (a UTF-8 byte-order mark, as Windows writes, skipped)."""
    return open(path, encoding="utf-8-sig")


def _documents(file, path: str) -> Iterator[str]:
    """The documents of a corpus file opened by _open_corpus, one at a time, as read_documents
    reads them; .txt and .jsonl files are streamed."""
    suffix = Path(path).suffix.lower()
    read = {".jsonl": _jsonl_documents, ".json": _json_array_documents}.get(suffix, _paragraphs)
    found = False
    try:
        for text in read(file, path):
            found = True
            yield text
    except UnicodeDecodeError as error:
        raise _not_utf8_error(path, error) from None
    if not found:
        raise ValueError(f"{path} holds no documents (it is empty or blank): pass a corpus with text in it")


def _paragraphs(file, path: str) -> Iterator[str]:
    """A text file's paragraphs, which end at an empty line, as `text.split("\n\n")` cuts them,
    but streamed."""
    lines = []
    for number, line in enumerate(itertools.chain(file, ["\n"]), 1):  # the end ends the last one
        if line != "\n":
            if "\0" in line:
                raise _binary_file_error(path, number)
            lines.append(line)
            continue
        text = "".join(lines).strip()
        lines.clear()
        if text:
            yield text


def _jsonl_documents(file, path: str) -> Iterator[str]:
    """The "text" of each line's record (blank lines skipped)."""
    for number, line in enumerate(file, 1):
        if "\0" in line:
            raise _binary_file_error(path, number)
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not a line of JSON ({error})") from None
        yield _record_text(record, where, strings=False)


def _json_array_documents(file, path: str) -> Iterator[str]:
    """The texts of a .json file holding one array of records or strings (read whole: a corpus
    too large for memory belongs in a .jsonl file)."""
    expected = 'one JSON array of {"text": ...} records or of strings (one record per line is .jsonl)'
    try:
        records = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); a .json corpus is {expected}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}; a .json corpus is {expected}")
    for index, record in enumerate(records):
        yield _record_text(record, f"{path}: record {index}", strings=True)


def _record_text(record, where: str, strings: bool) -> str:
    """The text of one JSON record: its "text" string, or (where `strings`) the record itself."""
    if strings and isinstance(record, str):
        return record
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        rule = 'a JSONL record needs a "text" string'
        if strings:
            rule = 'a record needs a "text" string or is a string'
        raise ValueError(f"{where}: {rule}, got {json.dumps(record, ensure_ascii=False)[:80]}")
    return record["text"]


def _binary_file_error(path: str, line: int) -> ValueError:
    return ValueError(f"{path}:{line}: holds a NUL byte, so it is not a text file (binary data, or "
                      "UTF-16 text): pass the corpus as UTF-8 .txt, .jsonl or .json")


_SCAN_CHUNK = 1 << 20  # bytes read at a time by _not_utf8_error


def _not_utf8_error(path: str, error: UnicodeDecodeError) -> ValueError:
    """Where `path` first fails to decode as UTF-8: found again from the start of the file, since
    the text reader's error counts from a buffer of unknown offset."""
    offset = newlines = 0  # in what has been decoded so far
    pending = b""  # the first bytes of a character split across chunks
    with open(path, "rb") as file:
        while True:
            chunk = file.read(_SCAN_CHUNK)
            data = pending + chunk
            try:
                _, used = codecs.utf_8_decode(data, "strict", not chunk)  # final at the end
            except UnicodeDecodeError as found:
                bad, line = offset + found.start, newlines + data.count(b"\n", 0, found.start) + 1
                return ValueError(
                    f"{path} is not UTF-8 text: byte {bad} (line {line}) is 0x{data[found.start]:02x}; "
                    "a corpus must be UTF-8 text (convert one in another encoding, e.g. with "
                    "`iconv -f latin1 -t utf-8`), not a binary file")
            if not chunk:  # not found again: the file changed while it was read
                return ValueError(f"{path} is not UTF-8 text ({error})")
            offset, newlines, pending = offset + used, newlines + data.count(b"\n", 0, used), data[used:]


class PackedData:
    """Rows of packed documents, handed out step by step, deterministically sharded over ranks.

    tokens: every document's ids end to end [N], of any integer dtype; a memory map is read only
        where a batch falls. Row i is tokens[i * seq_len : (i + 1) * seq_len]; the tail is dropped.
    document_starts: the index in `tokens` where each document begins [D], ascending, from 0.
    """

    def __init__(self, tokens: torch.Tensor, document_starts: torch.Tensor, seq_len: int, seed: int):
        self.num_rows = len(tokens) // seq_len
        if self.num_rows == 0:
            raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than one row of seq_len={seq_len}")
        self.tokens, self.document_starts, self.seq_len = tokens, document_starts, seq_len
        self.seed = seed
        self.rows_consumed = 0

    @classmethod
    def from_documents(cls, documents: list[list[int]], seq_len: int, seed: int) -> "PackedData":
        """Pack tokenised documents held in memory."""
        tokens = torch.tensor([t for doc in documents for t in doc], dtype=torch.long)
        starts = torch.tensor([0] + [len(doc) for doc in documents[:-1]], dtype=torch.long).cumsum(0)
        return cls(tokens, starts, seq_len, seed)

    def __len__(self) -> int:
        return self.num_rows

    def next_batch(self, batch_size: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """This rank's `batch_size` rows of the next `world_size * batch_size`."""
        first = self.rows_consumed + rank * batch_size
        rows = [self._row_index(i) for i in range(first, first + batch_size)]
        self.rows_consumed += world_size * batch_size
        return self._rows(rows)

    def _rows(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Input ids, labels and position ids of the rows numbered `rows`."""
        length = self.seq_len
        tokens = torch.stack([self.tokens[r * length:(r + 1) * length].long() for r in rows])  # [B, T]
        begins = torch.tensor(rows, dtype=torch.long) * length
        spans = torch.searchsorted(self.document_starts, torch.stack([begins, begins + length], dim=1))
        is_start = torch.zeros(len(rows), length, dtype=torch.bool)
        for row, (begin, (first, end)) in enumerate(zip(begins.tolist(), spans.tolist())):
            is_start[row, self.document_starts[first:end] - begin] = True
        labels = tokens.masked_fill(is_start, IGNORE_INDEX)  # never predict across documents
        is_start[:, 0] = True
        column = torch.arange(length).expand(len(rows), length)
        last_start = torch.where(is_start, column, 0).cummax(dim=1).values
        positions = column - last_start  # restarts at each document and each row
        return {"input_ids": tokens, "labels": labels, "position_ids": positions}

    def _row_index(self, i: int) -> int:
        epoch, offset = divmod(i, len(self))
        if getattr(self, "_epoch", None) != epoch:  # one permutation per epoch, cached
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self), generator=generator)
        return int(self._order[offset])

    def state_dict(self) -> dict:
        return {"rows_consumed": self.rows_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.rows_consumed = state["rows_consumed"]


# ---------------------------------------------------------------------------------------------
# Token files: a corpus tokenised once (`ligerzoo prepare`), memory-mapped by every run.
#
# Layout, little-endian: the ids of all documents end to end (uint16 where the vocabulary fits,
# else uint32; each document with BOS and EOS), zero padding to a multiple of 8 bytes, the
# document starts (int64), a JSON header, then a 16-byte trailer: the header's length (uint64)
# and the magic b"LZTOKEN1". The ids begin at byte 0, so `numpy.fromfile(path, dtype,
# count=num_tokens)` reads them too. The header records the dtype, the counts, where the starts
# lie, the largest id, the sources, and the tokenizer: its name (its file, or "bytes") and its
# `tokenizer_fingerprint` (kind, vocab_size, bos_id, eos_id, and `probe`, its ids of a probe text).
# Files written before the fingerprint record only vocab_size and probe, and are checked on those.

TOKEN_FILE_SUFFIX = ".tokens"
_TRAILER = struct.Struct("<Q8s")
_MAGIC = b"LZTOKEN1"
_TYPECODES = {"uint16": "H", "uint32": "I"}
_CHUNK_TOKENS = 1 << 20  # ids buffered between writes


def write_token_file(inputs: list[str], tokenizer, output: str,
                     on_progress: Callable[[int, int, int], None] | None = None) -> dict:
    """Tokenise the documents of `inputs` (read as read_documents reads them) one at a time into the
    token file `output`, and return its header.

    The file is written under a temporary name, synced, and renamed: `output` is complete or absent
    (or, after a failed rewrite, still the earlier file).
    on_progress: called after each chunk written with (documents, tokens, input bytes read).
    """
    output = Path(output)
    if output.suffix.lower() != TOKEN_FILE_SUFFIX:
        raise ValueError(f"the output {str(output)!r} does not end in {TOKEN_FILE_SUFFIX}, "
                         "the suffix by which training recognises a token file")
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    ids, starts = array.array(_TYPECODES[dtype]), array.array("q")
    documents = tokens = max_id = bytes_done = 0
    staging = output.with_name(f"{output.name}.{os.getpid()}.tmp")
    starts_staging = output.with_name(f"{output.name}.{os.getpid()}.starts.tmp")
    try:
        with open(staging, "wb") as out, open(starts_staging, "w+b") as starts_out:
            for path in inputs:
                with _open_corpus(path) as file:
                    for text in _documents(file, path):
                        document = tokenizer.encode(text, bos=True, eos=True)
                        starts.append(tokens)
                        ids.extend(document)
                        documents += 1
                        tokens += len(document)
                        max_id = max(max_id, max(document))
                        if len(ids) >= _CHUNK_TOKENS:
                            _append(out, ids)
                            _append(starts_out, starts)
                            if on_progress is not None:
                                on_progress(documents, tokens, bytes_done + file.buffer.tell())
                    bytes_done += file.buffer.tell()
            if documents == 0:
                raise ValueError(f"no documents in {', '.join(map(str, inputs))}")
            _append(out, ids)
            _append(starts_out, starts)
            out.write(bytes(-out.tell() % 8))  # the int64 starts aligned
            starts_offset = out.tell()
            starts_out.seek(0)
            shutil.copyfileobj(starts_out, out)
            header = {"format": "ligerzoo-tokens", "version": 1, "dtype": dtype, "num_tokens": tokens,
                      "num_documents": documents, "starts_offset": starts_offset, "max_id": max_id,
                      "tokenizer": _tokenizer_record(tokenizer), "sources": [str(path) for path in inputs]}
            encoded = json.dumps(header, ensure_ascii=False).encode("utf-8")
            out.write(encoded + _TRAILER.pack(len(encoded), _MAGIC))
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, output)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    finally:
        starts_staging.unlink(missing_ok=True)
    _fsync_directory(output.parent)
    if on_progress is not None:
        on_progress(documents, tokens, bytes_done)
    return header


def _append(file, values: array.array) -> None:
    """Write `values` to `file` little-endian, and empty them."""
    if sys.byteorder == "big":
        values.byteswap()
    file.write(values)
    del values[:]


def read_token_file(path: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A token file's ids [N] (in its dtype) and document starts [D] (int64), memory-mapped, and
    its header."""
    if sys.byteorder == "big":
        raise ValueError(f"{path}: token files are little-endian and mapped as they are; this machine is not")
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(size - _TRAILER.size, 0))
        length, magic = _TRAILER.unpack(file.read().rjust(_TRAILER.size, b"\0"))
        if magic != _MAGIC or length > size - _TRAILER.size:
            raise ValueError(f"{path} is not a complete token file (no trailer at its end): "
                             "write it again with `ligerzoo prepare`")
        # Read-only: a private, writable map of a corpus larger than memory can be refused, since
        # it counts against the commit limit. Nothing writes to these tensors.
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    header = json.loads(mapped[size - _TRAILER.size - length:size - _TRAILER.size])
    expected = header["starts_offset"] + 8 * header["num_documents"] + length + _TRAILER.size
    if size != expected:
        raise ValueError(f"{path} has {size} bytes but its header describes {expected}: "
                         "write it again with `ligerzoo prepare`")
    with warnings.catch_warnings():  # torch warns that the map is not writable: nothing writes
        warnings.simplefilter("ignore", UserWarning)
        tokens = torch.frombuffer(mapped, dtype=getattr(torch, header["dtype"]), count=header["num_tokens"])
        starts = torch.frombuffer(mapped, dtype=torch.int64, count=header["num_documents"],
                                  offset=header["starts_offset"])
    return tokens, starts, header


def _tokenizer_record(tokenizer) -> dict:
    """A token file's record of its tokenizer: its file (or "bytes") and its fingerprint."""
    path = getattr(tokenizer, "path", None)
    return {"name": "bytes" if path is None else str(path), **tokenizer_fingerprint(tokenizer)}


def _check_tokenizer(header: dict, tokenizer, path: str) -> None:
    """Raise unless `tokenizer` is the one that wrote the token file (by the fingerprint's fields
    that the file records: older files lack kind, bos_id and eos_id)."""
    written, used = header["tokenizer"], _tokenizer_record(tokenizer)
    differ = {key for key, value in used.items() if key in written and written[key] != value} - {"name"}
    if differ:
        if "vocab_size" in differ:
            how = "has another vocab_size"
        elif differ & {"probe", "bos_id", "eos_id"}:
            how = "encodes text differently"
        else:
            how = f"is another kind of tokenizer ({used['kind']}, the file's {written['kind']})"
        raise ValueError(
            f"{path} was tokenised with {written['name']} (vocab_size {written['vocab_size']}), but training "
            f"uses {used['name']} (vocab_size {used['vocab_size']}), which {how}: prepare the file again "
            "with the model's tokenizer (`ligerzoo prepare --tokenizer`), or set --data.tokenizer to the "
            "file's")
    if header["max_id"] >= tokenizer.vocab_size:
        raise ValueError(f"{path} holds id {header['max_id']}, outside the tokenizer's "
                         f"{tokenizer.vocab_size} ids: write it again with `ligerzoo prepare`")


def build_data(data_config, tokenizer, seed: int) -> PackedData:
    """Pack the configured corpus: a token file, memory-mapped, or a text file (or the built-in
    corpus) tokenised here."""
    path = data_config.path
    if path is not None and Path(path).suffix.lower() == TOKEN_FILE_SUFFIX:
        tokens, starts, header = read_token_file(path)
        _check_tokenizer(header, tokenizer, path)
        return PackedData(tokens, starts, data_config.seq_len, seed)
    texts = builtin_corpus(data_config.num_documents, seed) if path is None else read_documents(path)
    documents = [tokenizer.encode(text, bos=True, eos=True) for text in texts]
    return PackedData.from_documents(documents, data_config.seq_len, seed)
