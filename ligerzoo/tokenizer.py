"""Tokenizers for the Llama and Mistral families, behind one interface.

- SentencePiece (`tokenizer.model` as a SentencePiece proto): Llama 2, Mistral, Mixtral.
- tiktoken byte-level BPE: Llama 3 (3.1, 3.2, 3.3), read from Meta's `original/tokenizer.model`
  (lines of `base64-token rank`, with the 256 special tokens placed after the vocabulary as
  llama-models does), or from a Hugging Face `tokenizer.json` when a repository ships only that
  (its vocabulary mapped back to bytes, its added tokens as the specials).
- Bytes: UTF-8 bytes as ids 0-255, <s> 256, </s> 257, for models trained from scratch; it needs
  no file, and `ByteTokenizer.save` writes it as a `tokenizer.json` that Hugging Face reads too.

`load_tokenizer` finds the file in a directory, a path, or a Hub repo id, and tells the kinds
apart by their content, not their name. Encodings equal the reference implementations'
(llama-models' `Tokenizer`, mistral-common's `SentencePieceTokenizer`) token for token, and
text that looks like a special token (`<|eot_id|>`, `[INST]`) is encoded as plain text: only
`format_chat` places special tokens.
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import sentencepiece
import tiktoken


class TokenizerError(ValueError):
    """A tokenizer file that is unreadable, of an unknown kind, or inconsistent."""


CHAT_FORMATS = ("llama2", "llama3", "mistral-v1", "mistral-v2", "mistral-v3")

# Where a tokenizer may live in a model directory, in order of preference. Llama 3 repositories
# keep Meta's tiktoken file under original/ beside an equivalent tokenizer.json (slower to load);
# mistral-inference directories name the file after its mistral-common version.
_CANDIDATE_FILES = ("tokenizer.model", "original/tokenizer.model", "tokenizer.model.v*", "tokenizer.json")

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
_LLAMA3_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
_LLAMA3_REQUIRED_TOKENS = (
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


# ---------------------------------------------------------------------------------------------
# The interface


class Tokenizer:
    """Text <-> token ids, the special ids generation needs, and chat prompts.

    Attributes: bos_id, eos_id, stop_ids (the ids that end a reply), vocab_size (the number of
    ids, specials included), special_tokens (name -> id), chat_format (one of CHAT_FORMATS, or
    None where the files do not say), path (the file it was read from; None for a ByteTokenizer
    made in memory).
    """

    bos_id: int
    eos_id: int
    stop_ids: set[int]
    vocab_size: int
    special_tokens: dict[str, int]
    chat_format: str | None
    path: Path | None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """The ids of `text`, with the begin-of-text id first if `bos` and the end id last if `eos`."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [self.bos_id] * bos + self._encode_plain(text) + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (a list, or a 1-D tensor); invalid UTF-8 becomes U+FFFD."""
        return self._decode(self._check_ids(ids))

    def decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for one stream of generated ids."""
        raise NotImplementedError

    def format_chat(self, messages: list[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids of a conversation in the model family's instruct format.

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...] (Llama 3 also
            takes "ipython", or "tool" for it).
        add_generation_prompt: end with what opens the assistant's reply (Llama 3's assistant
            header); Llama 2 and Mistral prompts end a user turn with [/INST], which is their
            generation prompt, so there the last message must then be the user's. False encodes
            a finished conversation (every assistant turn closed with its end token).
        """
        if self.chat_format is None:
            raise ValueError(
                f"{self.path or type(self).__name__} does not say which chat format it belongs to; pass "
                f"load_tokenizer(..., chat_format=...) with one of {', '.join(CHAT_FORMATS)}"
            )
        formatter, roles = _CHAT_FORMATTERS[self.chat_format]
        return formatter(self, _check_messages(messages, roles, self.chat_format), add_generation_prompt)

    def __repr__(self) -> str:
        path = None if self.path is None else str(self.path)
        return (
            f"{type(self).__name__}({path!r}, vocab_size={self.vocab_size}, "
            f"chat_format={self.chat_format!r})"
        )

    # -- what each kind provides

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

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


# The text whose ids a fingerprint records: accents, CJK, an emoji, digits, a blank line, a tab,
# doubled spaces. Token files written by `ligerzoo prepare` hold its ids: never change it.
_PROBE = "Probe: the café at 東京 opened in 1987 🙂\n\n\tLet's see,  twice-spaced text… THE END."


def tokenizer_fingerprint(tokenizer: Tokenizer) -> dict:
    """What identifies a tokenizer, as JSON-serialisable data: its kind (class name), vocab_size,
    bos_id, eos_id, and `probe`, its ids of a fixed text (with BOS and EOS), which tells apart
    tokenizers of one size (Llama 2 and Mistral 7B both have 32000 ids). Equal fingerprints mean
    the same encoding as far as the probe can tell; the file a tokenizer was read from is no part
    of it."""
    return {
        "kind": type(tokenizer).__name__,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "probe": tokenizer.encode(_PROBE, bos=True, eos=True),
    }


# ---------------------------------------------------------------------------------------------
# SentencePiece: Llama 2, Mistral, Mixtral


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (`tokenizer.model` in Llama 2 and Mistral repositories)."""

    def __init__(self, path: Path, chat_format: str | None = None):
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{path} is not a readable SentencePiece model ({error})") from error
        sp = self._sp
        self.path = path
        self.vocab_size = sp.vocab_size()
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(
                f"{path} has no <s> or </s> control piece (bos id {self.bos_id}, eos id {self.eos_id})"
            )
        self.stop_ids = {self.eos_id}
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        self.chat_format = chat_format or _sentencepiece_chat_format(path, self.special_tokens)
        self._unknown_text = sp.decode([sp.unk_id()]) if sp.unk_id() >= 0 else ""
        self._start_space_rule = _leading_space_rule(sp)

    def _encode_plain(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def decoder(self) -> StreamDecoder:
        return _SentencePieceStreamDecoder(self)


def _leading_space_rule(sp: sentencepiece.SentencePieceProcessor) -> str:
    """How decoding treats the "▁" that starts a text (the dummy prefix encoding added): "one"
    (add_dummy_prefix: the first is dropped, as for Llama 2 and Mistral), "all" (with
    remove_extra_whitespaces: every leading one), or "none". Read from the model's own decoding
    rather than its normaliser settings, which need protobuf to parse."""
    space = sp.piece_to_id("▁")
    if sp.is_unknown(space):
        return "one"
    return {"": "all", " ": "one"}.get(sp.decode([space, space]), "none")


class _SentencePieceStreamDecoder(StreamDecoder):
    """SentencePiece's decoding (src/sentencepiece_processor.cc, `Decode`), one id at a time.

    Byte pieces (<0xE4>) gather until they make whole UTF-8 characters; a byte that cannot start
    or continue one becomes U+FFFD on its own, as SentencePiece does (Python's "replace" would
    merge some runs). Control pieces are invisible, the unknown piece is " ⁇ ", and the "▁" that
    opens the text is dropped while nothing visible has been produced yet."""

    def __init__(self, tokenizer: SentencePieceTokenizer):
        self._tok = tokenizer
        self._bytes = bytearray()
        self._at_start = True  # SentencePiece's `is_bos_ws`
        self._start_space_dropped = False  # `bos_ws_seen`
        self._produced_text = False

    def step(self, token_id: int) -> str:
        (token_id,) = self._tok._check_ids([token_id])
        sp = self._tok._sp
        piece = sp.id_to_piece(token_id)
        if sp.is_byte(token_id):
            self._bytes.append(int(piece[3:5], 16))  # "<0xE4>"
            return self._drain_bytes(final=False)
        text = self._drain_bytes(final=True)
        if self._start_space_dropped or self._produced_text:
            self._at_start = False
        dropped = False
        if sp.is_control(token_id):
            piece = ""
        elif sp.is_unknown(token_id):
            piece = self._tok._unknown_text
        else:
            rule = self._tok._start_space_rule
            if self._at_start and rule != "none" and piece.startswith("▁"):
                piece = piece[1:]
                dropped = rule == "one"
            piece = piece.replace("▁", " ")
        self._start_space_dropped = dropped
        self._produced_text |= bool(piece)
        return text + piece

    def flush(self) -> str:
        return self._drain_bytes(final=True)

    def _drain_bytes(self, final: bool) -> str:
        """The whole characters at the front of the byte buffer; with `final`, all of it."""
        out = []
        while self._bytes:
            try:
                text, used = codecs.utf_8_decode(bytes(self._bytes), "strict", final)
            except UnicodeDecodeError as error:
                out.append(self._bytes[: error.start].decode() + "\ufffd")
                del self._bytes[: error.start + 1]
                continue
            out.append(text)
            del self._bytes[:used]
            break  # what is left (not final) is the start of a character still arriving
        text = "".join(out)
        self._produced_text |= bool(text)
        return text


def _sentencepiece_chat_format(path: Path, special_tokens: dict[str, int]) -> str | None:
    """The instruct format a SentencePiece model belongs to, from what its files say."""
    version = re.search(r"\.model\.(v\d+)$", path.name)  # mistral-common's file names
    if version:
        name = f"mistral-{version.group(1)}"
        return name if name in CHAT_FORMATS else None
    if "[SYSTEM_PROMPT]" in special_tokens:  # mistral-common v7 and later: not supported
        return None
    if "[INST]" in special_tokens:  # v2 and v3 differ only in how tool calls are encoded
        return "mistral-v3"
    template = _read_json(path.parent / "tokenizer_config.json").get("chat_template")
    if isinstance(template, str):
        if "<<SYS>>" in template:
            return "llama2"
        if "[INST]" in template:
            return "mistral-v1"
    return None


# ---------------------------------------------------------------------------------------------
# tiktoken byte-level BPE: Llama 3


class TiktokenTokenizer(Tokenizer):
    """Llama 3's byte-level BPE: ranked tokens, a pre-tokenizer pattern, special tokens."""

    def __init__(self, path: Path, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str):
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(f"{path}: the vocabulary lacks single-byte tokens for bytes {missing[:8]}")
        for name in _LLAMA3_REQUIRED_TOKENS:
            if name not in special_tokens:
                raise TokenizerError(f"{path} has no {name} special token: it is not a Llama 3 tokenizer")
        try:
            self._encoding = tiktoken.Encoding(
                name=path.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
            )
        except ValueError as error:  # duplicate ids, specials colliding with ranks, a bad pattern
            raise TokenizerError(f"{path}: tiktoken rejects this vocabulary ({error})") from error
        self.path = path
        self.special_tokens = dict(special_tokens)
        self.vocab_size = self._encoding.n_vocab
        self.bos_id = special_tokens["<|begin_of_text|>"]
        self.eos_id = special_tokens["<|end_of_text|>"]
        self.stop_ids = {special_tokens[name] for name in _LLAMA3_STOP_TOKENS if name in special_tokens}
        self.chat_format = "llama3"

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _split_long_runs(text):
            ids.extend(self._encoding.encode_ordinary(part))
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)  # errors="replace", as llama-models decodes

    def decoder(self) -> StreamDecoder:
        return _ByteStreamDecoder(self)

    def _token_bytes(self, token_id: int) -> bytes:
        return self._encoding.decode_single_token_bytes(token_id)


class _ByteStreamDecoder(StreamDecoder):
    """Every id is a run of bytes (the tokenizer's `_token_bytes`); Python's incremental UTF-8
    decoder holds back a character's first bytes until the rest arrive, and replaces invalid
    bytes exactly as `bytes.decode` does."""

    def __init__(self, tokenizer: TiktokenTokenizer | ByteTokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def step(self, token_id: int) -> str:
        (token_id,) = self._tok._check_ids([token_id])
        return self._utf8.decode(self._tok._token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _split_long_runs(text: str) -> Iterator[str]:
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


def _read_tiktoken_file(path: Path) -> dict[bytes, int]:
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (tokenizer.json's vocab
    is written in it): printable Latin-1 bytes stand for themselves, the others for U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _read_tokenizer_json(path: Path, spec: dict) -> tuple[dict[bytes, int], dict[str, int], str]:
    """(ranks, special tokens, pattern) of a Hugging Face tokenizer.json (`spec`, read from `path`)
    holding a byte-level BPE with a split pattern, as Llama 3's does. Ranks are the token ids:
    tiktoken merges the pair whose merged token ranks lowest, which is Hugging Face's merge order
    wherever the merges are listed by the id of the token they make (checked)."""
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split" and "Regex" in s.get("pattern", {})]
    patterns = [s["pattern"]["Regex"] for s in splits]
    byte_level = any(s.get("type") == "ByteLevel" for s in steps)
    if model.get("type") != "BPE" or not byte_level or len(patterns) != 1 or spec.get("normalizer"):
        raise TokenizerError(
            f"{path} is not a byte-level BPE with one split pattern and no normaliser, as Llama 3's is "
            f"(model {model.get('type')!r}, pre-tokenizers {[s.get('type') for s in steps]}, "
            f"normaliser {(spec.get('normalizer') or {}).get('type')!r}); SentencePiece models need "
            "their tokenizer.model"
        )
    special_tokens = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    special_ids = set(special_tokens.values())
    to_byte = {char: b for b, char in _bytes_to_unicode().items()}
    vocab = model.get("vocab", {})
    ranks = {}
    for token, rank in vocab.items():
        if rank in special_ids:
            continue
        try:
            ranks[bytes(to_byte[char] for char in token)] = rank
        except KeyError:
            raise TokenizerError(
                f"{path}: vocabulary entry {token!r} (id {rank}) is not in the byte-level alphabet"
            ) from None
    previous = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made = vocab.get(left + right, -1)
        if made < previous:
            raise TokenizerError(
                f"{path}: merge {left!r} + {right!r} is not in token-id order, so token ids cannot "
                "serve as BPE ranks; only tokenizer.json files converted from a tiktoken BPE are supported"
            )
        previous = made
    return ranks, special_tokens, patterns[0]


# ---------------------------------------------------------------------------------------------
# Bytes: models trained from scratch


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, <s> 256, </s> 257: needs no files, for models trained from scratch.

    path: the tokenizer.json it was read from (load_tokenizer reads what `save` writes), or None.
    """

    bos_id, eos_id, vocab_size = 256, 257, 258
    chat_format = None

    def __init__(self, path: Path | None = None):
        self.path = path
        self.stop_ids = {self.eos_id}
        self.special_tokens = {"<s>": self.bos_id, "</s>": self.eos_id}

    def _encode_plain(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def decoder(self) -> StreamDecoder:
        return _ByteStreamDecoder(self)

    def _token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b""  # <s> and </s> show nothing

    def save(self, directory: str | os.PathLike, model_max_length: int | None = None) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory` (made if missing), from
        which load_tokenizer and Hugging Face's AutoTokenizer both read this tokenizer; return the
        tokenizer.json path.

        transformers then encodes as `encode(text)` does, <s> first; so does the `tokenizers`
        library, except that it reads a literal "<s>" or "</s>" in the text as the special token
        unless `encode_special_tokens` is set (transformers sets it from split_special_tokens).
        model_max_length: the longest sequence the model takes, recorded for transformers.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "add_bos_token": True,
            "add_eos_token": False,
            "split_special_tokens": True,  # "<s>" in a text is text, as in `encode`
            "clean_up_tokenization_spaces": False,  # decode as `decode` does: " ," stays
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        _write_json(directory / "tokenizer_config.json", config)
        path = directory / "tokenizer.json"
        _write_json(path, _byte_tokenizer_json())
        return path


def _byte_vocab() -> dict[str, int]:
    """The 256 byte tokens of a byte-level BPE, each at its byte value."""
    return {char: b for b, char in _bytes_to_unicode().items()}


def _byte_tokenizer_json() -> dict:
    """ByteTokenizer as a Hugging Face tokenizer.json, as the `tokenizers` library writes one: a
    byte-level BPE without merges (each byte its own token; no regex split, as nothing merges),
    <s> and </s> as added specials, and a post-processor that puts <s> first."""
    specials = {"<s>": ByteTokenizer.bos_id, "</s>": ByteTokenizer.eos_id}
    added = [
        {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for name, i in specials.items()
    ]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    text_a, text_b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
    post_processor = {  # "<s> $A"; a pair: "<s> $A <s> $B"
        "type": "TemplateProcessing",
        "single": [bos, text_a],
        "pair": [bos, text_a, bos, text_b],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [ByteTokenizer.bos_id], "tokens": ["<s>"]}},
    }
    model = {
        "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
        "vocab": _byte_vocab(), "merges": [],
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False,
        },
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": model,
    }


def _is_byte_tokenizer_json(spec: dict) -> bool:
    """Whether a tokenizer.json encodes as ByteTokenizer: a byte-level BPE without merges, prefix
    space or normaliser, whose vocabulary is the 256 bytes at their byte values and whose added
    tokens are <s> at 256 and </s> at 257 (the post-processor and decoder do not change the ids)."""
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    added = {token.get("content"): token.get("id") for token in spec.get("added_tokens", [])}
    return (
        model.get("type") == "BPE"
        and not model.get("merges")
        and model.get("vocab") == _byte_vocab()
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space")
        and not spec.get("normalizer")
        and added == {"<s>": ByteTokenizer.bos_id, "</s>": ByteTokenizer.eos_id}
    )


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(
    name_or_path: str | os.PathLike, revision: str | None = None, *, chat_format: str | None = None
) -> Tokenizer:
    """The tokenizer of a model: a local directory, a path to the tokenizer file itself, or a
    Hugging Face Hub repo id (with `revision`), whose tokenizer files alone are downloaded.

    chat_format: one of CHAT_FORMATS, where the files do not tell (e.g. a Llama 2 chat model's
        tokenizer.model without its tokenizer_config.json).
    """
    if chat_format is not None and chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format {chat_format!r} is not one of {', '.join(CHAT_FORMATS)}")
    file = Path(name_or_path).expanduser()
    if file.is_file():
        if revision is not None:
            raise ValueError(
                f"{str(file)!r} is a local file; revision={revision!r} applies only to Hub repo ids"
            )
    else:
        from ligerzoo.hub import resolve_model_dir  # a local directory as is, else a Hub repo id

        file = _find_tokenizer_file(resolve_model_dir(name_or_path, revision, weights=False, tokenizer=True))
    kind = _sniff(file)
    if kind == "sentencepiece":
        if chat_format == "llama3":
            raise ValueError(
                f"{file} is a SentencePiece model; chat_format 'llama3' needs Llama 3's tiktoken BPE"
            )
        return SentencePieceTokenizer(file, chat_format)
    spec = _read_json(file) if kind == "json" else None
    if spec is not None and _is_byte_tokenizer_json(spec):
        if chat_format is not None:
            raise ValueError(
                f"{file} is a byte tokenizer, which has no chat format; drop chat_format={chat_format!r}"
            )
        return ByteTokenizer(file)
    if chat_format not in (None, "llama3"):
        raise ValueError(
            f"{file} is Llama 3's tiktoken BPE; chat_format {chat_format!r} is for SentencePiece models"
        )
    if kind == "tiktoken":
        ranks = _read_tiktoken_file(file)
        return TiktokenTokenizer(file, ranks, _llama3_special_tokens(len(ranks)), LLAMA3_PATTERN)
    return TiktokenTokenizer(file, *_read_tokenizer_json(file, spec))


def _find_tokenizer_file(directory: Path) -> Path:
    for name in _CANDIDATE_FILES:
        found = sorted(directory.glob(name))
        if len(found) > 1:
            raise TokenizerError(
                f"{directory} holds several tokenizer files ({', '.join(p.name for p in found)}); "
                "pass the path of the one to use"
            )
        if found and found[0].is_file():
            return found[0]
    raise FileNotFoundError(
        f"no tokenizer file in {directory}: looked for {', '.join(_CANDIDATE_FILES)} "
        "(a Hub download needs tokenizer=True)"
    )


def _sniff(path: Path) -> str:
    """"sentencepiece", "tiktoken" or "json", from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head:
        raise TokenizerError(f"{path} is empty")
    if head.lstrip().startswith(b"{"):
        return "json"
    if re.match(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n", head):
        return "tiktoken"
    if head[0] == 0x0A:  # protobuf field 1 (the pieces), length-delimited: a SentencePiece ModelProto
        return "sentencepiece"
    raise TokenizerError(
        f"{path} is neither a SentencePiece model, a tiktoken BPE file (base64-token rank lines) "
        f"nor a tokenizer.json (it starts with {head[:16]!r})"
    )


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; {} when the file does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Chat prompts


def _check_messages(messages, roles: tuple[str, ...], chat_format: str) -> list[dict[str, str]]:
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Iterable):
        raise TypeError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise TypeError(f"messages[{i}] must be a dict with a str 'content', got {message!r:.100}")
        if message.get("role") not in roles:
            raise ValueError(
                f"messages[{i}] has role {message.get('role')!r}; {chat_format} takes {', '.join(roles)}"
            )
        checked.append({"role": message["role"], "content": message["content"]})
    if not checked:
        raise ValueError("messages is empty")
    return checked


def _require_user_last(messages, add_generation_prompt: bool, chat_format: str) -> None:
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise ValueError(
            f"{chat_format} prompts a reply by closing a user turn, but the last message is the "
            f"{messages[-1]['role']}'s; pass add_generation_prompt=False to encode a finished conversation"
        )


def _llama3_chat(tok: Tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    """llama-models' ChatFormat.encode_dialog_prompt: <|begin_of_text|>, then per message
    <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> (role, "\\n\\n" and content
    each encoded on their own)."""
    special = tok.special_tokens

    def header(role: str) -> list[int]:
        return [
            special["<|start_header_id|>"], *tok.encode("ipython" if role == "tool" else role, bos=False),
            special["<|end_header_id|>"], *tok.encode("\n\n", bos=False),
        ]

    ids = [tok.bos_id]
    for message in messages:
        ids += [*header(message["role"]), *tok.encode(message["content"], bos=False), special["<|eot_id|>"]]
    if add_generation_prompt:
        ids += header("assistant")
    return ids


def _llama2_chat(tok: Tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    """Meta's llama/generation.py `chat_completion`: a system message folds into the first user
    turn inside <<SYS>> tags; each user/assistant pair is `<s>[INST] user [/INST] answer </s>`
    (contents stripped), a final user turn `<s>[INST] user [/INST]`."""
    _require_user_last(messages, add_generation_prompt, "llama2")
    if messages[0]["role"] == "system":
        if len(messages) < 2:
            raise ValueError("llama2: a system message must be followed by a user message")
        system, first = messages[0]["content"], messages[1]["content"]
        folded = {"role": messages[1]["role"], "content": f"<<SYS>>\n{system}\n<</SYS>>\n\n{first}"}
        messages = [folded, *messages[2:]]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"llama2 takes an optional system message, then user and assistant turns alternating; "
                f"turn {i} is the {message['role']}'s, expected the {expected}'s"
            )
    ids = []
    for user, answer in zip(messages[::2], messages[1::2]):
        text = f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} "
        ids += tok.encode(text, bos=True, eos=True)
    if len(messages) % 2:
        ids += tok.encode(f"[INST] {messages[-1]['content'].strip()} [/INST]", bos=True)
    return ids


def _mistral_turns(messages) -> tuple[str | None, list[dict[str, str]]]:
    """mistral-common's InstructRequestNormalizer (v1-v3): the system messages' contents joined
    into one system prompt; consecutive messages of one role merged (contents joined by a blank
    line); an empty user turn first if the conversation does not open with one."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"]) or None
    groups: list[list[dict[str, str]]] = []
    for message in messages:
        if groups and groups[-1][0]["role"] == message["role"]:
            groups[-1].append(message)
        else:
            groups.append([message])
    turns = [
        {"role": group[0]["role"], "content": "\n\n".join(m["content"] for m in group if m["content"])}
        for group in groups
        if group[0]["role"] != "system"
    ]
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": ""})
    return system, turns


def _mistral_v1_chat(tok: Tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    """mistral-common's InstructTokenizerV1: `<s>`, each user turn the text "[INST] content [/INST]"
    (the system prompt before the first user turn's content), each assistant turn its content
    and `</s>`."""
    _require_user_last(messages, add_generation_prompt, "mistral-v1")
    system, turns = _mistral_turns(messages)
    first_user = next(i for i, turn in enumerate(turns) if turn["role"] == "user")
    ids = [tok.bos_id]
    for i, turn in enumerate(turns):
        if turn["role"] == "user":
            content = f"{system}\n\n{turn['content']}" if system and i == first_user else turn["content"]
            ids += tok.encode(f"[INST] {content} [/INST]", bos=False)
        else:
            ids += tok.encode(turn["content"], bos=False, eos=True)
    return ids


def _mistral_v3_chat(tok: Tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    """mistral-common's InstructTokenizerV2/V3 (the same without tools): `<s>`, each user turn
    [INST] content [/INST] with the control tokens (the system prompt before the *last* user
    turn's content), each assistant turn its content right-stripped of spaces and `</s>`."""
    _require_user_last(messages, add_generation_prompt, tok.chat_format)
    for name in ("[INST]", "[/INST]"):
        if name not in tok.special_tokens:
            raise ValueError(
                f"{tok.path} has no {name} control token, which {tok.chat_format} needs; try mistral-v1"
            )
    system, turns = _mistral_turns(messages)
    last_user = max(i for i, turn in enumerate(turns) if turn["role"] == "user")
    begin, end = tok.special_tokens["[INST]"], tok.special_tokens["[/INST]"]
    ids = [tok.bos_id]
    for i, turn in enumerate(turns):
        if turn["role"] == "user":
            content = f"{system}\n\n{turn['content']}" if system and i == last_user else turn["content"]
            ids += [begin, *tok.encode(content, bos=False), end]
        else:
            ids += tok.encode(turn["content"].rstrip(" "), bos=False, eos=True)
    return ids


_BASIC_ROLES = ("system", "user", "assistant")
_CHAT_FORMATTERS = {
    "llama2": (_llama2_chat, _BASIC_ROLES),
    "llama3": (_llama3_chat, (*_BASIC_ROLES, "ipython", "tool")),
    "mistral-v1": (_mistral_v1_chat, _BASIC_ROLES),
    "mistral-v2": (_mistral_v3_chat, _BASIC_ROLES),
    "mistral-v3": (_mistral_v3_chat, _BASIC_ROLES),
}
