"""Finding a model's tokenizer file and telling its kind by content."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ligerzoo.hf.hub import LLAMA3_TIKTOKEN_FILE, SENTENCEPIECE_FILE, TEKKEN_FILE, TOKENIZER_JSON_FILE
from ligerzoo.tokenizer.base import Tokenizer, TokenizerError
from ligerzoo.tokenizer.byte import ByteTokenizer, is_byte_tokenizer_json
from ligerzoo.tokenizer.chat import CHAT_FORMATS
from ligerzoo.tokenizer.chat_template import ChatTemplate
from ligerzoo.tokenizer.files import read_json
from ligerzoo.tokenizer.sentencepiece_model import SentencePieceTokenizer
from ligerzoo.tokenizer.tekken import TekkenTokenizer, is_tekken
from ligerzoo.tokenizer.tiktoken_bpe import TiktokenTokenizer, read_tiktoken_file
from ligerzoo.tokenizer.tokenizer_json import read_tokenizer_json

# Where a tokenizer may live in a model directory, in order of preference. Llama 3 repositories
# keep Meta's tiktoken file under original/ beside an equivalent tokenizer.json (slower to load);
# mistral-inference directories name the file after its mistral-common version; Mistral's
# tekken.json is read as mistral-common reads it, before the tokenizer.json converted from it.
_SENTENCEPIECE_FORMATS = ("llama2", "mistral-v1", "mistral-v2", "mistral-v3")
CANDIDATE_FILES = (SENTENCEPIECE_FILE, LLAMA3_TIKTOKEN_FILE, f"{SENTENCEPIECE_FILE}.v*", TEKKEN_FILE,
                   TOKENIZER_JSON_FILE)


def load_tokenizer(
    name_or_path: str | os.PathLike, revision: str | None = None, *, chat_format: str | None = None
) -> Tokenizer:
    """The tokenizer of a model: a local directory, a path to the tokenizer file itself, or a
    Hugging Face Hub repo id (with `revision`), whose tokenizer files alone are downloaded.

    Reads SentencePiece models, Meta's Llama 3 tiktoken file, Mistral's tekken.json, and Hugging
    Face tokenizer.json files of byte-level or SentencePiece-style BPE.
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
        from ligerzoo.hf.hub import resolve_model_dir  # a local directory as is, else a Hub repo id

        file = find_tokenizer_file(resolve_model_dir(name_or_path, revision, weights=False, tokenizer=True))
    tokenizer = _read_tokenizer(file, chat_format)
    # The model's own chat template, unless a hand-written format was asked for by name.
    if chat_format is None and tokenizer.model_dir is not None:
        tokenizer.chat_template = ChatTemplate.from_model_dir(tokenizer.model_dir)
    return tokenizer


def _read_tokenizer(file: Path, chat_format: str | None) -> Tokenizer:
    """The tokenizer in `file`, of the kind its content tells."""
    kind = _sniff(file)
    if kind == "sentencepiece":
        _check_chat_format(chat_format, *_SENTENCEPIECE_FORMATS, why=f"{file} is a SentencePiece model; "
                           f"chat_format {chat_format!r} needs Llama 3's tiktoken BPE")
        return SentencePieceTokenizer(file, chat_format)
    if kind == "tiktoken":
        _check_chat_format(chat_format, "llama3", why=f"{file} is Llama 3's tiktoken BPE; "
                           f"chat_format {chat_format!r} is for SentencePiece models")
        return read_tiktoken_file(file, chat_format)
    spec = read_json(file)
    if is_byte_tokenizer_json(spec):
        if chat_format is not None:
            raise ValueError(
                f"{file} is a byte tokenizer, which has no chat format; drop chat_format={chat_format!r}"
            )
        return ByteTokenizer(file)
    if is_tekken(spec):
        _check_chat_format(chat_format, "mistral-v1", "mistral-v2", "mistral-v3", why=f"{file} is Mistral's "
                           f"tekken tokenizer; chat_format {chat_format!r} is for other families")
        return TekkenTokenizer(file, spec, chat_format)
    tokenizer = read_tokenizer_json(file, spec, chat_format)
    if isinstance(tokenizer, TiktokenTokenizer):
        _check_chat_format(chat_format, "llama3", why=f"{file} is a byte-level BPE; "
                           f"chat_format {chat_format!r} is for SentencePiece models")
    else:
        _check_chat_format(chat_format, *_SENTENCEPIECE_FORMATS, why=f"{file} is a SentencePiece-style BPE; "
                           f"chat_format {chat_format!r} needs Llama 3's BPE")
    return tokenizer


def _check_chat_format(chat_format: str | None, *allowed: str, why: str) -> None:
    if chat_format is not None and chat_format not in allowed:
        raise ValueError(why)


def find_tokenizer_file(directory: Path) -> Path:
    """The tokenizer file of a model directory, the first of CANDIDATE_FILES found."""
    for name in CANDIDATE_FILES:
        found = sorted(directory.glob(name))
        if len(found) > 1:
            raise TokenizerError(
                f"{directory} holds several tokenizer files ({', '.join(p.name for p in found)}); "
                "pass the path of the one to use"
            )
        if found and found[0].is_file():
            return found[0]
    raise FileNotFoundError(
        f"no tokenizer file in {directory}: looked for {', '.join(CANDIDATE_FILES)} "
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
