"""Byte-level BPE tokenizers, where every id stands for a run of bytes: Llama 3 read from Meta's
`original/tokenizer.model` (tiktoken's format, encoded as llama-models encodes), and every
byte-level tokenizer.json (`tokenizer_json.py` builds those)."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import tiktoken

from ligerzoo.tokenizer.base import (
    ByteStreamDecoder,
    SpecialTokens,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    split_on_tokens,
)
from ligerzoo.tokenizer.files import ModelFiles, model_dir_of

# Llama 3's pre-tokenizer pattern and special tokens, as llama-models' llama3/tokenizer.py
# defines them: 256 specials at ids 128000.. right after the 128000 ranked tokens.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    "<|image|>",
)
LLAMA3_NUM_SPECIALS = 256
LLAMA3_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
LLAMA3_REQUIRED_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)

# tiktoken's limits, handled as llama-models handles them so that encodings match it exactly: one
# call takes at most ~400k characters, and one pre-token (a run of whitespace or of
# non-whitespace) longer than ~25k characters is slow to merge
# (https://github.com/openai/tiktoken/issues/195), so such runs are cut every 25k characters.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# A run longer than MAX_RUN_CHARS, matched only from its first character (the look-behind), so
# that the scan stays linear. `\s` matches what str.isspace() accepts, the test llama-models uses.
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}|(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}")
# tiktoken's regex engine overflows its stack (and panics) on whitespace runs of some hundred
# thousand characters, where a look-ahead such as `\s+(?!\S)` backtracks through them.
_OVERFLOWING_RUN = re.compile(r"\s{100000}")


class TiktokenTokenizer(Tokenizer):
    """A byte-level BPE: Llama 3's tiktoken file, or a byte-level tokenizer.json (GPT-2, Llama 3,
    SmolLM2, Qwen2, DeepSeek-R1-Distill-Llama). Every id decodes to its bytes (a special token
    to its text), and the bytes of a run of ids decode together.

    What the file's reader found: encode_text(text, allow_special) gives the ids of a text,
    token_bytes[id] the bytes of an id.
    """

    def __init__(self, path: Path, encode_text: Callable[[str, bool], list[int]], token_bytes: list[bytes],
                 specials: SpecialTokens, chat_format: str | None):
        self.path = path
        self.model_dir = model_dir_of(path)
        self.vocab_size = len(token_bytes)
        self.chat_format = chat_format
        self._adopt(specials)
        self._encode_with = encode_text
        self._bytes = token_bytes

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        return self._encode_with(text, allow_special)

    def _decode(self, ids: list[int]) -> str:
        return b"".join([self._bytes[i] for i in ids]).decode("utf-8", errors="replace")

    def decoder(self) -> StreamDecoder:
        return ByteStreamDecoder(self)

    def _token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]


def read_tiktoken_file(path: Path, chat_format: str | None = None) -> TiktokenTokenizer:
    """Meta's Llama 3 `tokenizer.model` (lines of `base64-token rank`), with the 256 special
    tokens placed after the vocabulary and encoded as llama-models encodes (long runs cut)."""
    ranks = _read_ranks(path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: the vocabulary lacks single-byte tokens for bytes {missing[:8]}")
    specials = _llama3_special_tokens(len(ranks))
    try:
        encoding = tiktoken.Encoding(path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={})
    except ValueError as error:
        raise TokenizerError(f"{path}: tiktoken rejects this vocabulary ({error})") from error

    def encode_text(text: str, allow_special: bool) -> list[int]:
        ids: list[int] = []
        for part in split_long_runs(text):
            pieces = split_on_tokens(part, specials) if allow_special else [part]
            for piece in pieces:
                if isinstance(piece, int):
                    ids.append(piece)
                else:
                    ids += encoding.encode_ordinary(piece)
        return ids

    token_bytes = [b""] * (len(ranks) + len(specials))
    for token, rank in ranks.items():
        token_bytes[rank] = token
    for name, token_id in specials.items():
        token_bytes[token_id] = name.encode()
    bos = ("<|begin_of_text|>", specials["<|begin_of_text|>"])
    eos = ("<|end_of_text|>", specials["<|end_of_text|>"])
    stop_ids = {specials[name] for name in LLAMA3_STOP_TOKENS}
    stop_ids |= {i for i in ModelFiles(model_dir_of(path)).generation_stop_ids() if i < len(token_bytes)}
    found = SpecialTokens(specials, specials, bos, eos, stop_ids, [bos[1]], [eos[1]])
    return TiktokenTokenizer(path, encode_text, token_bytes, found, chat_format or "llama3")


def encode_ordinary_or_none(encoding: tiktoken.Encoding, text: str) -> list[int] | None:
    """tiktoken's `encode_ordinary(text)`, or None where its regex engine would overflow (the
    caller then splits with Python's re) instead of ending the process with a Rust panic."""
    if len(text) >= 100_000 and _OVERFLOWING_RUN.search(text):
        return None
    try:
        return encoding.encode_ordinary(text)
    except BaseException as error:  # pyo3's PanicException derives from BaseException
        if type(error).__name__ != "PanicException":
            raise
        return None


def split_long_runs(text: str) -> Iterator[str]:
    """`text` in pieces of at most MAX_ENCODE_CHARS characters, each run of whitespace or of
    non-whitespace longer than MAX_RUN_CHARS cut every MAX_RUN_CHARS characters (counted from
    the run's start in its piece): the same pieces as llama-models'
    `_split_whitespaces_or_nonwhitespaces`, found with one regex scan instead of a Python loop."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        cut = 0
        for run in _LONG_RUN.finditer(chunk):
            for end in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[cut:end]
                cut = end
        yield chunk[cut:]


def _read_ranks(path: Path) -> dict[bytes, int]:
    """Meta's tokenizer.model: one `base64-token rank` per line."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:  # also binascii.Error
            raise TokenizerError(f"{path}: line {number} is not 'base64-token rank': {line[:80]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def _llama3_special_tokens(num_ranked: int) -> dict[str, int]:
    num_reserved = LLAMA3_NUM_SPECIALS - len(_LLAMA3_NAMED_SPECIALS)
    names = [*_LLAMA3_NAMED_SPECIALS, *(f"<|reserved_special_token_{2 + i}|>" for i in range(num_reserved))]
    return {name: num_ranked + i for i, name in enumerate(names)}
