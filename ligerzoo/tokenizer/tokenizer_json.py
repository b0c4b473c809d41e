"""Hugging Face tokenizer.json files, read without the `tokenizers` library: byte-level BPE
(GPT-2, Llama 3, SmolLM2, Qwen2, DeepSeek-R1-Distill-Llama) and SentencePiece-style BPE with byte
fallback (the tokenizer.json of Llama 2, Mistral and TinyLlama repositories).

Encoding follows `tokenizers`' pipeline step for step, so that ids equal transformers':
1. added tokens are cut out of the text: those with normalized=false on the raw text, then,
   after the normaliser has run on each remaining piece, those with normalized=true (special
   tokens only with allow_special, which is transformers' split_special_tokens=False; added
   tokens that are not special always, as transformers does either way);
2. the pre-tokenizer splits each piece (Split, ByteLevel, Digits, Metaspace, Punctuation, and
   Sequences of them), the patterns matched as Oniguruma matches them (`unicode_regex`);
3. the BPE model merges each pre-token: through tiktoken where the file is of a kind for which
   tiktoken's rule (merge the pair whose merged token ranks lowest) gives Hugging Face's (merge
   the pair listed first), checked when the file is read (`_tiktoken_ranks`), with ranks taken
   from the merge order and mapped to ids where the two differ; else with Hugging Face's own
   algorithm in Python (`bpe.py`).
Where the whole pre-tokenizer is one regex, tiktoken splits too (its regex engine reads \\p{L}).

`encode(text, bos=True)` adds what the post-processor's template puts before the text (nothing
for GPT-2 or SmolLM2, whose files add no BOS); a file without a post-processor adds the BOS and
EOS that tokenizer_config.json's add_bos_token / add_eos_token ask for (transformers 5 ignores
those flags beside a tokenizer.json that has a post-processor, and so do we). `eos=True` adds the
template's closing tokens, or the EOS token where the template has none. Decoding is
transformers' `decode(ids)`: special tokens show as their text; clean_up_tokenization_spaces is
not applied (decode inverts encode).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import tiktoken

from ligerzoo.tokenizer.base import SpecialTokens, StreamDecoder, Tokenizer, TokenizerError
from ligerzoo.tokenizer.bpe import BPE, BPEError
from ligerzoo.tokenizer.decoder_chain import DecoderChain, steps_of
from ligerzoo.tokenizer.files import ModelFiles, model_dir_of
from ligerzoo.tokenizer.pretokenize import (
    ALPHABET_CHARS,
    FROM_ALPHABET,
    AddedToken,
    AddedTokenMatcher,
    alphabet_bytes,
    build_normalizer,
    pre_tokenize_step,
    pre_tokenizer_steps,
    single_regex,
)
from ligerzoo.tokenizer.sentencepiece_model import sentencepiece_family_chat_format
from ligerzoo.tokenizer.tiktoken_bpe import (
    LLAMA3_REQUIRED_TOKENS,
    LLAMA3_STOP_TOKENS,
    TiktokenTokenizer,
    encode_ordinary_or_none,
)

# Where the files name no BOS or EOS token: the usual names, first found wins.
# (DeepSeek's are spelt with U+FF5C, a full-width vertical line.)
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<\uff5cbegin▁of▁sentence\uff5c>", "<|startoftext|>", "<bos>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<\uff5cend▁of▁sentence\uff5c>", "<|endoftext|>", "<eos>")
# Tokens that end a reply besides the EOS token, where the vocabulary has them as specials:
# Llama 3's end of turn and of message, ChatML's end of turn.
_END_OF_TURN = (*LLAMA3_STOP_TOKENS, "<|im_end|>")
_ANY_SPLIT = r"\S+|\s+"  # tiktoken's pattern where it only merges pieces split elsewhere


# ---------------------------------------------------------------------------------------------
# The BPE model: tiktoken where it is exact, else Hugging Face's algorithm


def _merge_pairs(model: dict, vocab: dict[str, int], path: Path) -> list[tuple[str, str]]:
    """The merges as (left, right) pairs, from "left right" strings or [left, right] lists, each
    checked to join tokens of the vocabulary into one."""
    merges = model.get("merges") or []
    try:
        pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        if all(len(pair) == 2 and pair[0] in vocab and pair[1] in vocab and pair[0] + pair[1] in vocab
               for pair in pairs):
            return pairs
    except TypeError:  # not strings: reported below
        pass
    for i, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise TokenizerError(f"{path}: merge {i} is not 'a b' nor [a, b]: {merge!r}")
        missing = next((t for t in (parts[0], parts[1], parts[0] + parts[1]) if t not in vocab), None)
        if missing is not None:
            raise TokenizerError(f"{path}: merge {i} ({parts[0]!r} + {parts[1]!r}) needs {missing!r}, which "
                                 "is not in the vocabulary")
    raise AssertionError("unreachable")


def _tiktoken_ranks(
    vocab: dict[str, int], pairs: list[tuple[str, str]], ignore_merges: bool, added_ids: set[int],
    token_bytes: list[bytes],
) -> tuple[dict[bytes, int], list[int] | None] | None:
    """tiktoken's mergeable ranks for a byte-level vocabulary, and the id of each rank (None
    where ranks are the ids), when tiktoken's merging gives Hugging Face's; else None.

    Two kinds of file qualify. Files converted from a tiktoken BPE (Llama 3's): ignore_merges,
    merges listed by the id of the token they make, and every split of a token into two tokens
    listed, so that the pairs Hugging Face may merge are the pairs tiktoken may, in the same
    order; the ids are tiktoken's ranks. Files of a BPE trained by merges (GPT-2's, SmolLM2's):
    each token made by one merge, whose parts earlier merges made; a token's rank is the index
    of its merge, mapped to its id where ids are in another order. (tiktoken also returns a
    pre-token found whole in the vocabulary: `_every_token_reachable` checks that merging agrees
    where ignore_merges is false.) Every token but the 256 single bytes must come from a merge."""
    singles = [char for char in ALPHABET_CHARS if char in vocab]
    merged = [token for token in vocab if len(token) > 1 and vocab[token] not in added_ids]
    first: dict[str, int] = {}
    for i, (left, right) in enumerate(pairs):
        first.setdefault(left + right, i)
    if len(singles) != 256 or any(token not in first for token in merged):
        return None
    merged.sort(key=first.__getitem__)
    ids = [vocab[token] for token in merged]
    ids_in_merge_order = all(a < b for a, b in itertools.pairwise(ids))
    if ignore_merges and ids_in_merge_order and _every_split_listed(vocab, merged, pairs):
        pass
    elif len(first) != len(pairs) or any(
        first[left + right] == i and any(len(part) > 1 and first.get(part, i) >= i for part in (left, right))
        for i, (left, right) in enumerate(pairs)
    ):
        return None
    if ids_in_merge_order:  # single bytes' ranks are never compared: their ids serve
        return {token_bytes[vocab[token]]: vocab[token] for token in (*singles, *merged)}, None
    by_rank = [vocab[token] for token in (*sorted(singles, key=alphabet_bytes), *merged)]
    return {token_bytes[token_id]: rank for rank, token_id in enumerate(by_rank)}, by_rank


def _every_split_listed(vocab: dict[str, int], merged: list[str], pairs: list[tuple[str, str]]) -> bool:
    listed = set(pairs)
    for token in merged:
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab and (left, right) not in listed:
                return False
    return True


def _every_token_reachable(encoding: tiktoken.Encoding, ranks: dict[bytes, int]) -> bool:
    """Whether BPE of each token's own bytes gives that token, so that tiktoken's shortcut (a
    pre-token in the vocabulary is that token) agrees with merging. Each token is merged with a
    byte no merge uses appended, which tiktoken cannot shortcut."""
    used = set().union(*(token for token in ranks if len(token) > 1))
    spare = next((b for b in range(255, -1, -1) if b not in used), None)
    if spare is None:
        return False
    spare_rank = ranks[bytes([spare])]
    for token, rank in ranks.items():
        if len(token) > 1 and encoding._encode_single_piece(token + bytes([spare])) != [rank, spare_rank]:
            return False
    return True


class _TiktokenModel:
    """A byte-level BPE through tiktoken: pre-tokens (in the byte-level alphabet) to ids."""

    def __init__(self, encoding: tiktoken.Encoding, rank_to_id: list[int] | None):
        self.encoding = encoding
        self._rank_to_id = rank_to_id
        self._cache: dict[str, list[int]] = {}

    def tokenize(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is None:
            ranks = self.encoding._encode_single_piece(piece.translate(FROM_ALPHABET).encode("latin-1"))
            ids = self.to_ids(ranks)
            if len(self._cache) >= 200_000:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def to_ids(self, ranks: list[int]) -> list[int]:
        table = self._rank_to_id
        return ranks if table is None else [table[r] for r in ranks]


# ---------------------------------------------------------------------------------------------
# The pipeline


class _Pipeline:
    """tokenizer.json's encoding: added tokens, normaliser, pre-tokenizer, model."""

    def __init__(self, added: list[AddedToken], normalize, steps: list[dict], model,
                 fast: tuple[str, bool] | None = None, token_lengths: list[int] | None = None):
        self._normalize = normalize
        self._raw = AddedTokenMatcher({t.content: t for t in added if not t.normalized})
        self._normalized = AddedTokenMatcher({(normalize(t.content) if normalize else t.content): t
                                               for t in added if t.normalized})
        self._has_normalized = any(t.normalized for t in added)
        self._step_specs = steps
        self._steps = None  # built on first use: the fast path needs none
        self._model = model
        self._fast = fast  # (pattern, add_prefix_space) for tiktoken alone, or None
        self._token_lengths = token_lengths  # bytes per rank, to check tiktoken covered the text

    def encode(self, text: str, allow_special: bool) -> list[int]:
        ids: list[int] = []
        for piece, token_id, start in self._raw.split(text, allow_special):
            if token_id is not None:
                ids.append(token_id)
                continue
            normalized = self._normalize(piece) if self._normalize else piece
            parts = [(normalized, None, 0)]
            if self._has_normalized:
                parts = self._normalized.split(normalized, allow_special)
            for part, part_id, part_start in parts:
                if part_id is not None:
                    ids.append(part_id)
                else:
                    ids += self._encode_piece(part, start == 0 and part_start == 0)
        return ids

    def _encode_piece(self, text: str, at_start: bool) -> list[int]:
        if not text:
            return []
        if self._fast is not None:
            ids = self._encode_fast(text)
            if ids is not None:
                return ids
        if self._steps is None:
            self._steps = [pre_tokenize_step(step) for step in self._step_specs]
        pieces = [(text, at_start)]
        for step in self._steps:
            pieces = step(pieces)
        tokenize, ids = self._model.tokenize, []
        for piece, _ in pieces:
            ids += tokenize(piece)
        return ids

    def _encode_fast(self, text: str) -> list[int] | None:
        """tiktoken's split and merge of a whole piece, or None where it cannot be trusted: a
        whitespace run long enough to overflow its regex engine, or text its pattern skips
        (tiktoken drops what no match covers; Hugging Face keeps it as a piece)."""
        if self._fast[1] and not text.startswith(" "):
            text = " " + text
        ranks = encode_ordinary_or_none(self._model.encoding, text)
        lengths = self._token_lengths
        if ranks is None or sum([lengths[r] for r in ranks]) != len(text.encode("utf-8")):
            return None
        return self._model.to_ids(ranks)


# ---------------------------------------------------------------------------------------------
# Reading a tokenizer.json


def _template(spec: dict | None, problems: list[str]) -> tuple[list[int], list[int]] | None:
    """(ids before the text, ids after it) of the post-processor for a single text; None when
    the file has no post-processor."""
    if not spec:
        return None
    kind = spec.get("type")
    if kind == "TemplateProcessing":
        specials, start, end, seen_text = spec.get("special_tokens", {}), [], [], False
        for item in spec.get("single", []):
            if "Sequence" in item:
                seen_text = True
                continue
            name = item["SpecialToken"]["id"]
            (end if seen_text else start).extend(specials[name]["ids"])
        return start, end
    if kind in ("RobertaProcessing", "BertProcessing"):
        return [spec["cls"][1]], [spec["sep"][1]]
    if kind == "ByteLevel":
        return [], []
    if kind == "Sequence":
        start, end = [], []
        for part in spec.get("processors", []):
            found = _template(part, problems)
            if found:
                start, end = start + found[0], end + found[1]
        return start, end
    problems.append(f"post-processor {kind!r} (supported: TemplateProcessing, ByteLevel, RobertaProcessing, "
                    "BertProcessing, Sequence)")
    return None


class SentencePieceBPETokenizer(Tokenizer):
    """A SentencePiece-style BPE read from a Hugging Face tokenizer.json (Llama 2, Mistral,
    TinyLlama repositories): "▁" for spaces, byte fallback, decoded through the file's decoder
    chain (Replace "▁" -> " ", ByteFallback, Fuse, Strip)."""

    def __init__(self, path: Path, pipeline: _Pipeline, token_strings: list[str | None],
                 decoder_steps: list[dict], specials: SpecialTokens, chat_format: str | None):
        self.path = path
        self.model_dir = model_dir_of(path)
        self.vocab_size = len(token_strings)
        self.chat_format = chat_format
        self._adopt(specials)
        self._pipeline = pipeline
        self._strings = token_strings  # id -> token text (None for an unused id, as HF skips it)
        self._decoder_steps = decoder_steps

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        return self._pipeline.encode(text, allow_special)

    def _decode(self, ids: list[int]) -> str:
        decoder = self.decoder()
        return "".join([decoder.step(i) for i in ids]) + decoder.flush()

    def decoder(self) -> StreamDecoder:
        return _ChainStreamDecoder(self)


class _ChainStreamDecoder(StreamDecoder):
    def __init__(self, tokenizer: SentencePieceBPETokenizer):
        self._tok = tokenizer
        self._chain = DecoderChain(tokenizer._decoder_steps)

    def step(self, token_id: int) -> str:
        (token_id,) = self._tok._check_ids([token_id])
        string = self._tok._strings[token_id]
        return "" if string is None else self._chain.push(string)

    def flush(self) -> str:
        return self._chain.finish()


def read_tokenizer_json(path: Path, spec: dict, chat_format: str | None = None) -> Tokenizer:
    """The tokenizer of a Hugging Face tokenizer.json (`spec`, read from `path`): a
    TiktokenTokenizer for byte-level BPE, a SentencePieceBPETokenizer for SentencePiece-style BPE.
    One TokenizerError names everything in the file that is not supported."""
    model = spec.get("model") or {}
    normalize, steps, template, decoder_steps = _supported_parts(spec, path)
    vocab: dict[str, int] = model.get("vocab") or {}
    pairs = _merge_pairs(model, vocab, path)
    added = [
        AddedToken(t["id"], t["content"], t.get("special", False), t.get("normalized", not t.get("special")),
                   t.get("lstrip", False), t.get("rstrip", False), t.get("single_word", False))
        for t in spec.get("added_tokens", [])
    ]
    strings: list[str | None] = [None] * (1 + max([*vocab.values(), *(t.id for t in added)], default=-1))
    for token, token_id in vocab.items():
        strings[token_id] = token
    for token in added:
        strings[token.id] = token.content
    files = ModelFiles(model_dir_of(path))
    specials = _special_tokens(added, strings, template, files, path)

    def python_bpe() -> BPE:
        try:
            return BPE(vocab, pairs, unk_token=model.get("unk_token"), fuse_unk=bool(model.get("fuse_unk")),
                       byte_fallback=bool(model.get("byte_fallback")),
                       ignore_merges=bool(model.get("ignore_merges")))
        except BPEError as error:
            raise TokenizerError(f"{path}: {error}") from None

    if not any(step["type"] == "ByteLevel" for step in steps):
        chat_format = chat_format or sentencepiece_family_chat_format(specials.special_tokens, files)
        pipeline = _Pipeline(added, normalize, steps, python_bpe())
        return SentencePieceBPETokenizer(path, pipeline, strings, decoder_steps, specials, chat_format)
    token_bytes = [b"" if s is None else alphabet_bytes(s) for s in strings]
    pipeline = _tiktoken_pipeline(path, model, vocab, pairs, added, normalize, steps, token_bytes)
    if pipeline is None:
        pipeline = _Pipeline(added, normalize, steps, python_bpe())
    if chat_format is None and all(name in specials.special_tokens for name in LLAMA3_REQUIRED_TOKENS):
        chat_format = "llama3"
    return TiktokenTokenizer(path, pipeline.encode, token_bytes, specials, chat_format)


def _supported_parts(spec: dict, path: Path):
    """(normaliser, pre-tokenizer steps, post-processor template, decoder steps), or one
    TokenizerError that lists every part of the file that is not supported."""
    problems: list[str] = []
    model = spec.get("model") or {}
    if model.get("type", "BPE" if "merges" in model else None) != "BPE":
        problems.append(f"model {model.get('type')!r} (only BPE is supported)")
    for option in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            problems.append(f"BPE {option} {model[option]!r}")
    if model.get("dropout"):
        problems.append(f"BPE dropout {model['dropout']} (encoding would be random)")
    normalize = build_normalizer(spec.get("normalizer"), problems)
    steps = pre_tokenizer_steps(spec.get("pre_tokenizer"), problems)
    template = _template(spec.get("post_processor"), problems)
    decoder_steps = steps_of(spec.get("decoder"))
    if any(step["type"] == "ByteLevel" for step in steps):
        if [step.get("type") for step in decoder_steps] != ["ByteLevel"]:
            problems.append(f"decoder {spec.get('decoder')!r} for a byte-level BPE (expected ByteLevel)")
    elif not decoder_steps:
        problems.append("no decoder (tokens would be joined with spaces)")
    else:
        DecoderChain.check(decoder_steps, problems)
    if problems:
        raise TokenizerError(
            f"{path} is not a byte-level BPE nor a SentencePiece-style BPE that ligerzoo can read; "
            f"not supported: {'; '.join(problems)}"
        )
    return normalize, steps, template, decoder_steps


def _special_tokens(added: list[AddedToken], strings: list[str | None], template, files: ModelFiles,
                    path: Path) -> SpecialTokens:
    """BOS and EOS (tokenizer_config.json's, else the template's first token for the BOS, else
    the usual names), what encode adds with bos and eos, and the ids that end a reply: the EOS,
    generation_config.json's eos_token_id, and end-of-turn specials (_END_OF_TURN)."""
    known = {s: i for i, s in enumerate(strings) if s is not None}

    def named(name: str, usual: tuple[str, ...], first_of_template: bool) -> tuple[str, int] | None:
        declared, text = files.token(name)
        if declared:
            if text is not None and text not in known:
                raise TokenizerError(
                    f"{files.model_dir} names {name} {text!r}, which is not in {path}'s vocabulary")
            return None if text is None else (text, known[text])
        if first_of_template and template is not None and len(template[0]) == 1:
            return strings[template[0][0]], template[0][0]
        return next(((text, known[text]) for text in usual if text in known), None)

    bos, eos = named("bos_token", _BOS_NAMES, True), named("eos_token", _EOS_NAMES, False)
    if template is None:  # no post-processor: tokenizer_config.json's flags say what to add
        template = ([bos[1]] if bos and files.flag("add_bos_token") else [],
                    [eos[1]] if eos and files.flag("add_eos_token") else [])
    specials = {t.content: t.id for t in added if t.special}
    stop_ids = {eos[1]} if eos else set()
    stop_ids |= {i for i in files.generation_stop_ids() if i < len(strings)}
    stop_ids |= {specials[name] for name in _END_OF_TURN if name in specials}
    return SpecialTokens(specials, {t.content: t.id for t in added}, bos, eos, stop_ids, template[0],
                         template[1] or ([eos[1]] if eos else []))


def _tiktoken_pipeline(
    path: Path, model: dict, vocab: dict[str, int], pairs: list[tuple[str, str]], added: list[AddedToken],
    normalize, steps: list[dict], token_bytes: list[bytes],
) -> _Pipeline | None:
    """A byte-level pipeline whose merges tiktoken makes (and, for one-regex pre-tokenizers, whose
    splitting too), or None where tiktoken could give other ids than Hugging Face's BPE."""
    ignore_merges = bool(model.get("ignore_merges"))
    found = None if model.get("byte_fallback") else _tiktoken_ranks(
        vocab, pairs, ignore_merges, {t.id for t in added}, token_bytes)
    if found is None:
        return None
    ranks, rank_to_id = found
    fast = single_regex(steps)
    try:
        encoding = tiktoken.Encoding(path.name, pat_str=fast[0] if fast else _ANY_SPLIT,
                                     mergeable_ranks=ranks, special_tokens={})
    except ValueError:  # a pattern tiktoken's regex engine rejects: Python's re splits instead
        fast = None
        encoding = tiktoken.Encoding(path.name, pat_str=_ANY_SPLIT, mergeable_ranks=ranks, special_tokens={})
    if not ignore_merges and not _every_token_reachable(encoding, ranks):
        return None
    lengths = None
    if fast is not None:
        lengths = [0] * (1 + max(ranks.values()))
        for token, rank in ranks.items():
            lengths[rank] = len(token)
    return _Pipeline(added, normalize, steps, _TiktokenModel(encoding, rank_to_id), fast, lengths)
