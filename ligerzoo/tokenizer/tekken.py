"""Mistral's tekken.json (Mistral-Nemo, Ministral, Mistral Small 3), read through tiktoken as
mistral-common's `Tekkenizer` reads it: the special tokens take the first ids, so every ranked
token's id is its rank plus their number; the vocabulary is cut to `default_vocab_size`."""

from __future__ import annotations

import base64
import binascii
from itertools import groupby
from pathlib import Path

import tiktoken

from ligerzoo.tokenizer.base import (
    ByteStreamDecoder,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    split_on_tokens,
)
from ligerzoo.tokenizer.files import ModelFiles, model_dir_of
from ligerzoo.tokenizer.tiktoken_bpe import encode_ordinary_or_none
from ligerzoo.tokenizer.unicode_regex import PatternError, compile_pattern

# mistral-common's Tekkenizer.DEPRECATED_SPECIAL_TOKENS: the specials of files (v7 and older)
# that do not list their own.
_DEFAULT_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)
_FILLER = "<SPECIAL_{}>"  # the name of each special token a file leaves unnamed


def is_tekken(spec: dict) -> bool:
    """Whether a JSON object is a tekken file (a config with a pattern, and a list vocabulary)."""
    config = spec.get("config")
    return isinstance(config, dict) and "pattern" in config and isinstance(spec.get("vocab"), list)


class TekkenTokenizer(Tokenizer):
    """A tekken.json tokenizer. Decoding is mistral-common's: special tokens show nothing, and
    the bytes between two of them decode on their own."""

    def __init__(self, path: Path, spec: dict, chat_format: str | None = None):
        config = spec["config"]
        self.path = path
        self.model_dir = model_dir_of(path)
        version = config.get("version", "")
        specials = _special_tokens(spec, version, config.get("default_num_special_tokens"), path)
        self._num_special = len(specials)
        self.vocab_size = config.get("default_vocab_size", len(spec["vocab"]) + self._num_special)
        inner = self.vocab_size - self._num_special
        if not 0 < inner <= len(spec["vocab"]):
            raise TokenizerError(f"{path}: default_vocab_size {self.vocab_size} does not fit "
                                 f"{len(spec['vocab'])} tokens after {self._num_special} special tokens")
        ranks = _ranks(spec["vocab"][:inner], path)
        self._pattern = config["pattern"]
        try:
            self._encoding = tiktoken.Encoding(path.name, pat_str=self._pattern, mergeable_ranks=ranks,
                                               special_tokens={})
        except ValueError as error:
            raise TokenizerError(f"{path}: tiktoken rejects this vocabulary ({error})") from error
        self._bytes = [b""] * self._num_special + [b""] * inner
        for token, rank in ranks.items():
            self._bytes[self._num_special + rank] = token
        self.special_tokens = {name: i for i, name in enumerate(specials)}
        self.added_tokens = dict(self.special_tokens)
        for name in ("<s>", "</s>"):
            if name not in self.special_tokens:
                raise TokenizerError(f"{path} has no {name} special token")
        self.bos_token, self.eos_token = "<s>", "</s>"
        self.bos_id, self.eos_id = self.special_tokens["<s>"], self.special_tokens["</s>"]
        files = ModelFiles(self.model_dir)
        self.stop_ids = {self.eos_id} | {i for i in files.generation_stop_ids() if i < self.vocab_size}
        # mistral-common's v3 instruct format (InstructTokenizerV3) is the hand-written mistral-v3;
        # v7 and later put the system prompt in [SYSTEM_PROMPT] tokens: no hand-written format.
        self.chat_format = chat_format or ("mistral-v3" if version in ("v2", "v3") else None)
        self._python_split = None

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        pieces = split_on_tokens(text, self.special_tokens) if allow_special else [text]
        ids: list[int] = []
        for piece in pieces:
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids += [rank + self._num_special for rank in self._encode_ordinary(piece)]
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        """tiktoken's encoding; where its regex engine would overflow (mistral-common then fails),
        the same split made by Python's re, and tiktoken's merge of each piece."""
        ranks = encode_ordinary_or_none(self._encoding, text)
        if ranks is not None:
            return ranks
        if self._python_split is None:
            try:
                self._python_split = compile_pattern(self._pattern, multiline=False)
            except PatternError as error:
                raise TokenizerError(f"{self.path}: pattern {self._pattern!r}: {error}") from None
        return [r for match in self._python_split.finditer(text)
                for r in self._encoding._encode_single_piece(match.group())]

    def _decode(self, ids: list[int]) -> str:
        return "".join(
            b"".join([self._bytes[i] for i in group]).decode("utf-8", errors="replace")
            for special, group in groupby(ids, lambda i: i < self._num_special)
            if not special
        )

    def decoder(self) -> StreamDecoder:
        return ByteStreamDecoder(self, breaks=frozenset(range(self._num_special)))

    def _token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]


def _special_tokens(spec: dict, version: str, count: int | None, path: Path) -> list[str]:
    listed = spec.get("special_tokens")
    if listed is None:
        if version.startswith("v") and version[1:].isdigit() and int(version[1:]) > 7:
            raise TokenizerError(f"{path} (tekken {version}) does not list its special tokens")
        names = list(_DEFAULT_SPECIALS)
    else:
        by_rank = sorted(listed, key=lambda token: token["rank"])
        if [token["rank"] for token in by_rank] != list(range(len(by_rank))):
            raise TokenizerError(f"{path}: the special tokens' ranks are not 0..{len(by_rank) - 1}")
        names = [token["token_str"] for token in by_rank]
    count = len(names) if count is None else count
    if len(names) > count or len(set(names)) != len(names):
        raise TokenizerError(f"{path}: {len(names)} special tokens (some repeated?) for "
                             f"default_num_special_tokens {count}")
    return names + [_FILLER.format(i) for i in range(len(names), count)]


def _ranks(vocab: list[dict], path: Path) -> dict[bytes, int]:
    ranks = {}
    for i, entry in enumerate(vocab):
        try:
            token = base64.b64decode(entry["token_bytes"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise TokenizerError(
                f"{path}: vocab entry {i} has no base64 token_bytes: {entry!r:.100}") from None
        if entry.get("rank") != i or (i < 256 and token != bytes([i])):
            raise TokenizerError(f"{path}: vocab entry {i} has rank {entry.get('rank')} and bytes {token!r}; "
                                 "entries must be in rank order, the first 256 the single bytes")
        ranks[token] = i
    if len(ranks) != len(vocab):
        raise TokenizerError(f"{path}: the vocabulary repeats a token")
    return ranks
