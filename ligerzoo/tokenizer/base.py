"""The interface every tokenizer offers, and what several kinds share."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ligerzoo.tokenizer.chat import CHAT_FORMATS, CHAT_FORMATTERS, check_messages
from ligerzoo.tokenizer.chat_template import ChatTemplate


class TokenizerError(ValueError):
    """A tokenizer file that is unreadable, of an unknown or unsupported kind, or inconsistent."""


@dataclass
class SpecialTokens:
    """What a tokenizer's files say about its special tokens (the public attributes of
    `Tokenizer` of the same names, and what encode adds with bos and eos)."""

    special_tokens: dict[str, int]
    added_tokens: dict[str, int]
    bos: tuple[str, int] | None  # (text, id)
    eos: tuple[str, int] | None
    stop_ids: set[int]
    start_ids: list[int] = field(default_factory=list)  # what encode(bos=True) puts first
    end_ids: list[int] = field(default_factory=list)  # what encode(eos=True) puts last


class Tokenizer:
    """Text <-> token ids, the special ids generation needs, and chat prompts.

    Attributes: vocab_size (the number of ids, specials included), bos_id and eos_id (None where
    the files declare no such token), bos_token and eos_token (their text, or None), stop_ids
    (the ids that end a reply), special_tokens (text -> id of the special tokens),
    added_tokens (text -> id of every token the files declare as added or special: what
    `encode(..., allow_special=True)` recognises in text), chat_template (the model's own Jinja
    template, or None), chat_format (one of CHAT_FORMATS, or None where the files do not say), path (the file it was read from; None for a ByteTokenizer
    made in memory), model_dir (the model directory the files came from, or None).
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    bos_token: str | None
    eos_token: str | None
    stop_ids: set[int]
    special_tokens: dict[str, int]
    added_tokens: dict[str, int]
    chat_format: str | None
    path: Path | None
    model_dir: Path | None
    chat_template: ChatTemplate | None = None  # the model's own, set by load_tokenizer
    _start: list[int] | None = None  # what encode(bos=True) adds, where it is not [bos_id]
    _end: list[int] | None = None  # what encode(eos=True) adds, where it is not [eos_id]

    def encode(self, text: str, bos: bool = True, eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """The ids of `text`.

        bos: put first what the model's files put before a text: the BOS token for SentencePiece
            models, Meta's Llama 3 file and tekken; for a tokenizer.json, what its post-processor
            adds (or, without one, add_bos_token in tokenizer_config.json asks), which is nothing
            for models trained without a BOS (GPT-2, SmolLM2, Qwen2). bos=True is thus always
            right for a model's own training format, even where it adds nothing.
        eos: put last the post-processor's closing tokens, else the EOS token (what separates
            documents in training); a ValueError where the files declare neither.
        allow_special: read the text of added and special tokens (`<|eot_id|>`, `[INST]`) as
            those tokens, as transformers does when it encodes a rendered chat template; False
            encodes the text of special tokens as plain text (a tokenizer.json's added tokens that
            are not special are recognised either way, as transformers does).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._encode_text(text, allow_special)
        if bos:
            ids = self._start_ids() + ids
        if eos:
            end = self._end_ids()
            if not end:
                raise ValueError(
                    f"{self.path or type(self).__name__} declares no end-of-text token; pass eos=False")
            ids = ids + end
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (a list, or a 1-D tensor); invalid UTF-8 becomes U+FFFD."""
        return self._decode(self._check_ids(ids))

    def decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for one stream of generated ids."""
        raise NotImplementedError

    def format_chat(self, messages: list[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids of a conversation: the model's own chat template rendered with Hugging
        Face's semantics and encoded as transformers' `apply_chat_template` encodes it, or where
        the files carry no template (Meta's original/tokenizer.model), or `load_tokenizer` was
        given a chat_format, the model family's hand-written instruct format.

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...] (Llama 3 also
            takes "ipython", or "tool" for it; a template takes whatever it takes).
        add_generation_prompt: end with what opens the assistant's reply (Llama 3's assistant
            header); Llama 2 and Mistral prompts end a user turn with [/INST], which is their
            generation prompt, so there the last message must then be the user's. False encodes
            a finished conversation (every assistant turn closed with its end token).
        """
        if self.chat_template is not None:
            text = self.chat_template.render(list(messages), add_generation_prompt=add_generation_prompt,
                                             bos_token=self.bos_token, eos_token=self.eos_token)
            return self.encode(text, bos=False, allow_special=True)
        if self.chat_format is None:
            raise ValueError(
                f"{self.path or type(self).__name__} does not say which chat format it belongs to; pass "
                f"load_tokenizer(..., chat_format=...) with one of {', '.join(CHAT_FORMATS)}"
            )
        formatter, roles = CHAT_FORMATTERS[self.chat_format]
        return formatter(self, check_messages(messages, roles, self.chat_format), add_generation_prompt)

    def __repr__(self) -> str:
        path = None if self.path is None else str(self.path)
        return (
            f"{type(self).__name__}({path!r}, vocab_size={self.vocab_size}, "
            f"chat_format={self.chat_format!r})"
        )

    # -- what each kind provides

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _start_ids(self) -> list[int]:
        """What encode(bos=True) puts first."""
        if self._start is not None:
            return list(self._start)
        return [] if self.bos_id is None else [self.bos_id]

    def _end_ids(self) -> list[int]:
        """What encode(eos=True) puts last."""
        if self._end is not None:
            return list(self._end)
        return [] if self.eos_id is None else [self.eos_id]

    def _adopt(self, specials: SpecialTokens) -> None:
        """Take the special tokens a file reader found."""
        self.special_tokens, self.added_tokens = specials.special_tokens, specials.added_tokens
        self.bos_token, self.bos_id = specials.bos or (None, None)
        self.eos_token, self.eos_id = specials.eos or (None, None)
        self.stop_ids = specials.stop_ids
        self._start, self._end = specials.start_ids, specials.end_ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:8]}")
        return ids


class StreamDecoder:
    """Turns generated ids into text as they arrive: `step(id)` returns the text that id
    completes ("" while a character's bytes are split across ids), `flush()` what remains at the
    end. The pieces joined equal `tokenizer.decode(ids)`."""

    def step(self, token_id: int) -> str:
        raise NotImplementedError

    def flush(self) -> str:
        raise NotImplementedError


class ByteStreamDecoder(StreamDecoder):
    """For tokenizers whose every id is a run of bytes (`tokenizer._token_bytes(id)`): Python's
    incremental UTF-8 decoder holds back a character's first bytes until the rest arrive, and
    replaces invalid bytes exactly as `bytes.decode(errors="replace")` does.

    breaks: ids that end a run of bytes, as if decoded apart from what follows (mistral-common
    decodes the text between special tokens piece by piece).
    """

    def __init__(self, tokenizer: Tokenizer, breaks: frozenset[int] = frozenset()):
        self._tok = tokenizer
        self._breaks = breaks
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def step(self, token_id: int) -> str:
        (token_id,) = self._tok._check_ids([token_id])
        if token_id in self._breaks:
            return self.flush()
        return self._utf8.decode(self._tok._token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def split_on_tokens(text: str, tokens: Mapping[str, int]) -> Iterator[str | int]:
    """`text` cut at every occurrence of a token of `tokens` (text -> id), leftmost first and the
    longest where several start at one place: the pieces of text between them (never empty), and
    the tokens' ids."""
    if not tokens or not text:
        if text:
            yield text
        return
    pattern = _alternation(tuple(sorted(tokens)))
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            yield text[start : match.start()]
        yield tokens[match.group()]
        start = match.end()
    if start < len(text):
        yield text[start:]


_ALTERNATIONS: dict[tuple[str, ...], re.Pattern] = {}


def _alternation(contents: tuple[str, ...]) -> re.Pattern:
    """A regex matching any of `contents`, the longest first where several match at one place."""
    pattern = _ALTERNATIONS.get(contents)
    if pattern is None:
        ordered = sorted((c for c in contents if c), key=len, reverse=True)
        pattern = _ALTERNATIONS[contents] = re.compile("|".join(map(re.escape, ordered)))
    return pattern


# The text whose ids a fingerprint records: accents, CJK, an emoji, digits, a blank line, a tab,
# doubled spaces. Token files written by `ligerzoo prepare` hold its ids: never change it.
_PROBE = "Probe: the café at 東京 opened in 1987 🙂\n\n\tLet's see,  twice-spaced text… THE END."


def tokenizer_fingerprint(tokenizer: Tokenizer) -> dict:
    """What identifies a tokenizer, as JSON-serialisable data: its kind (class name), vocab_size,
    bos_id, eos_id, and `probe`, its ids of a fixed text (with BOS and EOS where the tokenizer
    adds them), which tells apart tokenizers of one size (Llama 2 and Mistral 7B both have 32000
    ids). Equal fingerprints mean the same encoding as far as the probe can tell; the file a
    tokenizer was read from is no part of it."""
    return {
        "kind": type(tokenizer).__name__,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "probe": tokenizer.encode(_PROBE, bos=True, eos=bool(tokenizer._end_ids())),
    }
