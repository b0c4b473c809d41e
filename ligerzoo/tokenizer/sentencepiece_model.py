"""SentencePiece models (`tokenizer.model`): Llama 2, Mistral, Mixtral, encoded by SentencePiece
itself, as mistral-common and Meta's code do."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

import sentencepiece

from ligerzoo.hf.hub import TOKENIZER_JSON_FILE
from ligerzoo.tokenizer.base import StreamDecoder, Tokenizer, TokenizerError, split_on_tokens
from ligerzoo.tokenizer.chat import CHAT_FORMATS
from ligerzoo.tokenizer.files import ModelFiles, model_dir_of, read_json
from ligerzoo.tokenizer.pretokenize import metaspace_scheme


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (`tokenizer.model` in Llama 2 and Mistral repositories).

    With allow_special, control pieces (`<s>`, `[INST]`) and `<unk>` in the text become those
    tokens, and the text between them is encoded as Hugging Face's conversion of this model
    encodes it: the text at the very start gets SentencePiece's dummy-prefix "▁", text after a
    special token does not (Metaspace's prepend_scheme "first"), unless a tokenizer.json beside
    the model prepends to every piece (the legacy Llama 2 files, whose normaliser is Prepend).
    """

    def __init__(self, path: Path, chat_format: str | None = None):
        try:
            self._model_proto = path.read_bytes()
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._model_proto)
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{path} is not a readable SentencePiece model ({error})") from error
        sp = self._sp
        self.path = path
        self.model_dir = model_dir_of(path)
        files = ModelFiles(self.model_dir)
        self.vocab_size = sp.vocab_size()
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(
                f"{path} has no <s> or </s> control piece (bos id {self.bos_id}, eos id {self.eos_id})"
            )
        self.bos_token, self.eos_token = sp.id_to_piece(self.bos_id), sp.id_to_piece(self.eos_id)
        self.stop_ids = {self.eos_id} | {i for i in files.generation_stop_ids() if i < self.vocab_size}
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        self.added_tokens = dict(self.special_tokens)
        if sp.unk_id() >= 0:
            self.added_tokens[sp.id_to_piece(sp.unk_id())] = sp.unk_id()
        self.chat_format = chat_format or _sentencepiece_chat_format(path, self.special_tokens, files)
        self._unknown_text = sp.decode([sp.unk_id()]) if sp.unk_id() >= 0 else ""
        self._start_space_rule = _leading_space_rule(sp)
        self._prefix_every_piece = None  # read from a tokenizer.json beside, on first use
        self._sp_without_prefix = None  # made on first use

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        if not allow_special:
            return self._sp.encode(text)
        if self._prefix_every_piece is None:
            self._prefix_every_piece = _prepends_every_piece(self.model_dir / TOKENIZER_JSON_FILE)
        ids, at_start = [], True
        for piece in split_on_tokens(text, self.added_tokens):
            if isinstance(piece, int):
                ids.append(piece)
            elif at_start or self._prefix_every_piece:
                ids += self._sp.encode(piece)
            else:
                ids += self._without_prefix().encode(piece)
            at_start = False
        return ids

    def _without_prefix(self) -> sentencepiece.SentencePieceProcessor:
        if self._sp_without_prefix is None:
            proto = _without_dummy_prefix(self._model_proto)
            self._sp_without_prefix = sentencepiece.SentencePieceProcessor(model_proto=proto)
        return self._sp_without_prefix

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def decoder(self) -> StreamDecoder:
        return _SentencePieceStreamDecoder(self)


def _prepends_every_piece(tokenizer_json: Path) -> bool:
    """Whether the Hugging Face tokenizer.json beside a model gives every piece of text between
    special tokens the "▁" prefix: a Prepend normaliser, or Metaspace with prepend_scheme "always"."""
    if not tokenizer_json.is_file():
        return False
    try:
        spec = read_json(tokenizer_json)
    except TokenizerError:
        return False
    steps = []
    for part in (spec.get("normalizer"), spec.get("pre_tokenizer")):
        if isinstance(part, dict):
            steps += part.get("normalizers") or part.get("pretokenizers") or [part]
    for step in steps:
        if step.get("type") == "Prepend":
            return True
        if step.get("type") == "Metaspace":
            return metaspace_scheme(step) == "always"
    return False


def _without_dummy_prefix(model_proto: bytes) -> bytes:
    """The serialised SentencePiece ModelProto with normalizer_spec.add_dummy_prefix = false
    (the sentencepiece package offers no runtime switch). Protobuf: ModelProto field 3 is the
    NormalizerSpec message, whose field 3 is add_dummy_prefix (a varint)."""
    fields = _proto_fields(model_proto)
    spec = b"".join(raw for number, _, raw in _proto_fields(_field_payload(fields, 3)) if number != 3)
    spec += b"\x18\x00"  # field 3, varint, false
    out = b"".join(raw for number, _, raw in fields if number != 3)
    return out + b"\x1a" + _varint(len(spec)) + spec  # field 3, length-delimited


def _proto_fields(data: bytes) -> list[tuple[int, int, bytes]]:
    """(field number, payload start within raw, raw bytes of the whole field) of each field."""
    fields, i = [], 0
    while i < len(data):
        start = i
        key, i = _read_varint(data, i)
        wire = key & 7
        if wire == 0:
            _, i = _read_varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            length, i = _read_varint(data, i)
            i += length
        elif wire == 5:
            i += 4
        else:
            raise TokenizerError(f"unexpected protobuf wire type {wire} in a SentencePiece model")
        fields.append((key >> 3, start, data[start:i]))
    return fields


def _field_payload(fields: list[tuple[int, int, bytes]], number: int) -> bytes:
    for field_number, _, raw in fields:
        if field_number == number:
            _, i = _read_varint(raw, 0)
            _, i = _read_varint(raw, i)
            return raw[i:]
    return b""


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


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


def _sentencepiece_chat_format(path: Path, special_tokens: dict[str, int], files: ModelFiles) -> str | None:
    """The instruct format a SentencePiece model belongs to, from what its files say."""
    version = re.search(r"\.model\.(v\d+)$", path.name)  # mistral-common's file names
    if version:
        name = f"mistral-{version.group(1)}"
        return name if name in CHAT_FORMATS else None
    return sentencepiece_family_chat_format(special_tokens, files)


def sentencepiece_family_chat_format(special_tokens, files: ModelFiles) -> str | None:
    """Llama 2's or Mistral's hand-written format, told apart by the control tokens and the
    chat template (Llama 2 and Mistral v1 vocabularies look alike)."""
    if "[SYSTEM_PROMPT]" in special_tokens:  # mistral-common v7 and later: not supported
        return None
    if "[INST]" in special_tokens:  # v2 and v3 differ only in how tool calls are encoded
        return "mistral-v3"
    template = files.chat_template()
    if isinstance(template, str):
        if "<<SYS>>" in template:
            return "llama2"
        if "[INST]" in template:
            return "mistral-v1"
    return None
