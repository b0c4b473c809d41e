"""Token files: a corpus tokenised once (`ligerzoo prepare`), memory-mapped by every run.

Layout, little-endian:
- the ids of all examples end to end (uint16 where the vocabulary fits, else uint32), zero
  padding to a multiple of 8 bytes;
- the example starts (int64 [D]);
- only where some example is not plain text: each example's format (uint8 [D], its index in
  formats.FORMATS) and each token's role (uint8 [N]: PADDING, PROMPT, ANSWER);
- a JSON header, then a 16-byte trailer: the header's length (uint64) and the magic b"LZTOKEN1".
The ids begin at byte 0, so `numpy.fromfile(path, dtype, count=num_tokens)` reads them too. The
header records the version, dtype, the counts, where each section lies (formats_offset and
roles_offset None where absent), the examples of each format, the largest id, the sources, and
the tokenizer: its name (its file, or "bytes") and its `tokenizer_fingerprint` (kind, vocab_size,
bos_id, eos_id, and `probe`, its ids of a probe text).

Version 1 files hold plain text only, with no formats or roles (read as all text); a version 2
file of plain text is laid out as version 1 was. Files written before the fingerprint record only
vocab_size and probe, and are checked on those.
"""

import array
import contextlib
import json
import mmap
import os
import shutil
import struct
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ligerzoo.hf.atomic_files import fsync_directory
from ligerzoo.tokenizer import tokenizer_fingerprint
from ligerzoo.training.formats import (
    ANSWER,
    FORMATS,
    TEXT,
    TokenizedCorpus,
    iter_examples,
    open_corpus,
    tokenize_example,
)

TOKEN_FILE_SUFFIX = ".tokens"
VERSION = 2
_TRAILER = struct.Struct("<Q8s")
_MAGIC = b"LZTOKEN1"
_TYPECODES = {"uint16": "H", "uint32": "I"}
_CHUNK_TOKENS = 1 << 20  # ids buffered between writes


def write_token_file(inputs: list[str], tokenizer, output: str,
                     on_progress: Callable[[int, int, int], None] | None = None) -> dict:
    """Tokenise the examples of `inputs` (read as read_examples reads them) one at a time into the
    token file `output`, and return its header.

    The file is written under a temporary name, synced, and renamed: `output` is complete or absent
    (or, after a failed rewrite, still the earlier file).
    on_progress: called after each chunk written with (examples, tokens, input bytes read).
    """
    output = Path(output)
    if output.suffix.lower() != TOKEN_FILE_SUFFIX:
        raise ValueError(f"the output {str(output)!r} does not end in {TOKEN_FILE_SUFFIX}, "
                         "the suffix by which training recognises a token file")
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    buffers = {"ids": array.array(_TYPECODES[dtype]), "starts": array.array("q"),
               "formats": array.array("B"), "roles": array.array("B")}
    counts = dict.fromkeys(FORMATS, 0)
    documents = tokens = max_id = bytes_done = 0
    masked = False  # some example is not plain text: formats and roles are written
    staging = {name: output.with_name(f"{output.name}.{os.getpid()}.{name}.tmp") for name in buffers}
    try:
        with contextlib.ExitStack() as stack:
            files = {name: stack.enter_context(open(path, "w+b")) for name, path in staging.items()}

            def flush():
                for name, values in buffers.items():
                    _append(files[name], values)

            for path in inputs:
                with open_corpus(path) as file:
                    for example in iter_examples(file, path):
                        ids, roles = tokenize_example(example, tokenizer)
                        if example.format != TEXT and not masked:  # the text before it, as text
                            masked = True
                            _append_repeated(files["formats"], FORMATS.index(TEXT), documents)
                            _append_repeated(files["roles"], ANSWER, tokens)
                        buffers["starts"].append(tokens)
                        buffers["ids"].extend(ids)
                        if masked:
                            buffers["formats"].append(FORMATS.index(example.format))
                            buffers["roles"].frombytes(roles)
                        counts[example.format] += 1
                        documents += 1
                        tokens += len(ids)
                        max_id = max(max_id, max(ids))
                        if len(buffers["ids"]) >= _CHUNK_TOKENS:
                            flush()
                            if on_progress is not None:
                                on_progress(documents, tokens, bytes_done + file.buffer.tell())
                    bytes_done += file.buffer.tell()
            if documents == 0:
                raise ValueError(f"no documents in {', '.join(map(str, inputs))}")
            flush()
            out = files["ids"]
            out.write(bytes(-out.tell() % 8))  # the int64 starts aligned
            offsets = {}
            for name in ("starts", "formats", "roles") if masked else ("starts",):
                offsets[name] = out.tell()
                files[name].seek(0)
                shutil.copyfileobj(files[name], out)
            header = {"format": "ligerzoo-tokens", "version": VERSION, "dtype": dtype, "num_tokens": tokens,
                      "num_documents": documents, "starts_offset": offsets["starts"],
                      "formats_offset": offsets.get("formats"), "roles_offset": offsets.get("roles"),
                      "formats": {name: count for name, count in counts.items() if count}, "max_id": max_id,
                      "tokenizer": _tokenizer_record(tokenizer), "sources": [str(path) for path in inputs]}
            encoded = json.dumps(header, ensure_ascii=False).encode("utf-8")
            out.write(encoded + _TRAILER.pack(len(encoded), _MAGIC))
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging["ids"], output)
    finally:
        for path in staging.values():
            path.unlink(missing_ok=True)
    fsync_directory(output.parent)
    if on_progress is not None:
        on_progress(documents, tokens, bytes_done)
    return header


def _append(file, values: array.array) -> None:
    """Write `values` to `file` little-endian, and empty them."""
    if sys.byteorder == "big":
        values.byteswap()
    file.write(values)
    del values[:]


def _append_repeated(file, byte: int, count: int) -> None:
    """Write `count` bytes of value `byte` to `file`, a chunk at a time."""
    chunk = bytes([byte]) * min(count, _CHUNK_TOKENS)
    while count > 0:
        file.write(chunk[:count])
        count -= len(chunk)


def read_token_file(path: str) -> tuple[TokenizedCorpus, dict]:
    """A token file's examples, memory-mapped (ids in the file's dtype), and its header."""
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
    if header.get("version", 1) > VERSION:
        raise ValueError(f"{path} is a token file of version {header['version']}, newer than this "
                         f"ligerzoo reads ({VERSION}): upgrade ligerzoo, or write it again with this "
                         "one's `ligerzoo prepare`")
    num_tokens, num_documents = header["num_tokens"], header["num_documents"]
    roles_offset = header.get("roles_offset")
    end = header["starts_offset"] + 8 * num_documents if roles_offset is None else roles_offset + num_tokens
    if size != end + length + _TRAILER.size:
        raise ValueError(f"{path} has {size} bytes but its header describes {end + length + _TRAILER.size}: "
                         "write it again with `ligerzoo prepare`")
    with warnings.catch_warnings():  # torch warns that the map is not writable: nothing writes
        warnings.simplefilter("ignore", UserWarning)
        tokens = torch.frombuffer(mapped, dtype=getattr(torch, header["dtype"]), count=num_tokens)
        starts = torch.frombuffer(mapped, dtype=torch.int64, count=num_documents,
                                  offset=header["starts_offset"])
        if roles_offset is None:
            formats, roles = torch.zeros(num_documents, dtype=torch.uint8), None  # all text
        else:
            formats = torch.frombuffer(mapped, dtype=torch.uint8, count=num_documents,
                                       offset=header["formats_offset"])
            roles = torch.frombuffer(mapped, dtype=torch.uint8, count=num_tokens, offset=roles_offset)
    return TokenizedCorpus(tokens, starts, formats, roles), header


def _tokenizer_record(tokenizer) -> dict:
    """A token file's record of its tokenizer: its file (or "bytes") and its fingerprint."""
    path = getattr(tokenizer, "path", None)
    return {"name": "bytes" if path is None else str(path), **tokenizer_fingerprint(tokenizer)}


def check_tokenizer(header: dict, tokenizer, path: str) -> None:
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
