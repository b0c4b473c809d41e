"""The byte tokenizer: UTF-8 bytes as ids, for models trained from scratch."""

from __future__ import annotations

import os
from pathlib import Path

from ligerzoo.hf.hub import TOKENIZER_CONFIG_FILE, TOKENIZER_JSON_FILE
from ligerzoo.tokenizer.base import ByteStreamDecoder, StreamDecoder, Tokenizer, split_on_tokens
from ligerzoo.tokenizer.files import write_json
from ligerzoo.tokenizer.pretokenize import bytes_to_unicode


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, <s> 256, </s> 257: needs no files, for models trained from scratch.

    path: the tokenizer.json it was read from (load_tokenizer reads what `save` writes), or None.
    """

    bos_id, eos_id, vocab_size = 256, 257, 258
    bos_token, eos_token = "<s>", "</s>"
    chat_format = None

    def __init__(self, path: Path | None = None):
        self.path = path
        self.model_dir = None if path is None else path.parent
        self.stop_ids = {self.eos_id}
        self.special_tokens = {"<s>": self.bos_id, "</s>": self.eos_id}
        self.added_tokens = dict(self.special_tokens)

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for piece in split_on_tokens(text, self.special_tokens):
            ids += [piece] if isinstance(piece, int) else piece.encode("utf-8")
        return ids

    def _decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def decoder(self) -> StreamDecoder:
        return ByteStreamDecoder(self)

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
        write_json(directory / TOKENIZER_CONFIG_FILE, config)
        path = directory / TOKENIZER_JSON_FILE
        write_json(path, _byte_tokenizer_json())
        return path


def _byte_vocab() -> dict[str, int]:
    """The 256 byte tokens of a byte-level BPE, each at its byte value."""
    return {char: b for b, char in bytes_to_unicode().items()}


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


def is_byte_tokenizer_json(spec: dict) -> bool:
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

