"""From text to pre-tokens, as Hugging Face's `tokenizers` does it: the byte-level alphabet,
NormalizedString::split and its behaviours, the normalisers and pre-tokenizers Llama-family files
use (each built from its JSON into a function), and the search for added tokens in a text."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from ligerzoo.tokenizer.base import TokenizerError
from ligerzoo.tokenizer.unicode_regex import WHITE_SPACE, PatternError, compile_pattern, strip_white_space

# The split ByteLevel makes when use_regex is true (GPT-2's pattern, as `tokenizers` writes it).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# ---------------------------------------------------------------------------------------------
# GPT-2's byte-level alphabet


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
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


_TO_ALPHABET = str.maketrans({chr(b): char for b, char in bytes_to_unicode().items()})
FROM_ALPHABET = str.maketrans({char: chr(b) for b, char in bytes_to_unicode().items()})


def to_alphabet(text: str) -> str:
    """The byte-level spelling of `text`: one alphabet character per UTF-8 byte."""
    return text.encode("utf-8").decode("latin-1").translate(_TO_ALPHABET)


ALPHABET_CHARS = frozenset(bytes_to_unicode().values())


def alphabet_bytes(token: str) -> bytes:
    """The bytes a token stands for, as the ByteLevel decoder reads it: through the alphabet
    when every character is in it, else its own UTF-8 (a special token such as DeepSeek's
    "<\uff5cUser\uff5c>")."""
    if ALPHABET_CHARS.issuperset(token):
        return token.translate(FROM_ALPHABET).encode("latin-1")
    return token.encode()


# ---------------------------------------------------------------------------------------------
# Splitting a text into pieces, as NormalizedString::split does

Piece = tuple[str, bool]  # (text, whether it starts the input text: Metaspace's "first" rule)


def _split(text: str, matches, behavior: str, invert: bool = False) -> list[tuple[int, int]]:
    """The (start, end) of the pieces `text` splits into around `matches` ((start, end) pairs in
    order), for a SplitDelimiterBehavior: Removed drops the matches, Isolated keeps them as
    pieces, MergedWithPrevious/MergedWithNext join each to the piece before/after it,
    Contiguous joins runs of matches. invert: the text between matches is the delimiter."""
    spans, previous = [], 0
    for start, end in matches:
        if start > previous:
            spans.append((previous, start, invert))
        if end > start:
            spans.append((start, end, not invert))
        previous = end
    if previous < len(text):
        spans.append((previous, len(text), invert))
    out: list[list[int]] = []
    previous_match = False
    if behavior == "Removed":
        out = [[s, e] for s, e, is_match in spans if not is_match]
    elif behavior == "Isolated":
        out = [[s, e] for s, e, _ in spans]
    elif behavior == "Contiguous":
        for s, e, is_match in spans:
            if out and is_match == previous_match:
                out[-1][1] = e
            else:
                out.append([s, e])
            previous_match = is_match
    elif behavior == "MergedWithPrevious":
        for s, e, is_match in spans:
            if out and is_match and not previous_match:
                out[-1][1] = e
            else:
                out.append([s, e])
            previous_match = is_match
    elif behavior == "MergedWithNext":
        for s, e, is_match in reversed(spans):
            if out and is_match and not previous_match:
                out[-1][0] = s
            else:
                out.append([s, e])
            previous_match = is_match
        out.reverse()
    else:
        raise TokenizerError(f"split behaviour {behavior!r} is not one of Removed, Isolated, "
                             "MergedWithPrevious, MergedWithNext, Contiguous")
    return [(s, e) for s, e in out if e > s]


def _split_pieces(pieces: list[Piece], find: Callable[[str], list[tuple[int, int]]]) -> list[Piece]:
    out = []
    for text, at_start in pieces:
        out += [(text[s:e], at_start and s == 0) for s, e in find(text)]
    return out


def _regex_spans(pattern: re.Pattern) -> Callable[[str], list[tuple[int, int]]]:
    return lambda text: [match.span() for match in pattern.finditer(text)]


# ---------------------------------------------------------------------------------------------
# Normalisers and pre-tokenizers, each built from its JSON into a function


def build_normalizer(spec: dict | None, problems: list[str]) -> Callable[[str], str] | None:
    if not spec:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [step for s in spec.get("normalizers", []) if (step := build_normalizer(s, problems))]
        return lambda text: functools.reduce(lambda t, step: step(t), steps, text)
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return functools.partial(unicodedata.normalize, kind)
    if kind == "Lowercase":  # char by char, as Rust does: no final-sigma rule
        return lambda text: "".join(c.lower() for c in text) if "Σ" in text else text.lower()
    if kind == "Prepend":
        prepend = spec["prepend"]
        return lambda text: prepend + text if text else text
    if kind == "Strip":
        left, right = spec.get("strip_left", True), spec.get("strip_right", True)
        return lambda text: strip_white_space(text, left, right)
    if kind == "Replace":
        return _replacer(spec, problems)
    problems.append(f"normaliser {kind!r} (supported: Sequence, NFC, NFD, NFKC, NFKD, Lowercase, Prepend, "
                    "Strip, Replace)")
    return None


def _replacer(spec: dict, problems: list[str]) -> Callable[[str], str]:
    pattern, content = spec.get("pattern") or {}, spec.get("content", "")
    if pattern.get("String"):
        old = pattern["String"]
        return lambda text: text.replace(old, content)
    if "Regex" in pattern:
        try:
            regex = compile_pattern(pattern["Regex"])
        except PatternError as error:
            problems.append(f"Replace pattern {pattern['Regex']!r}: {error}")
            return lambda text: text
        return lambda text: regex.sub(lambda _: content, text)
    problems.append(f"Replace pattern {pattern!r}")
    return lambda text: text


def pre_tokenizer_steps(spec: dict | None, problems: list[str]) -> list[dict]:
    """The pre-tokenizer's steps, a Sequence flattened, each checked."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [step for s in spec.get("pretokenizers", []) for step in pre_tokenizer_steps(s, problems)]
    supported = ("ByteLevel", "Split", "Digits", "Metaspace", "Punctuation")
    if spec.get("type") not in supported:
        problems.append(f"pre-tokenizer {spec.get('type')!r} (supported: {', '.join(supported)}, Sequence)")
        return []
    if spec["type"] == "Split":
        pattern = spec.get("pattern") or {}
        if "Regex" in pattern:
            try:
                compile_pattern(pattern["Regex"])
            except PatternError as error:
                problems.append(f"Split pattern {pattern['Regex']!r}: {error}")
        elif not pattern.get("String"):
            problems.append(f"Split pattern {pattern!r}")
    return [spec]


def pre_tokenize_step(spec: dict) -> Callable[[list[Piece]], list[Piece]]:
    kind = spec["type"]
    if kind == "ByteLevel":
        add_prefix_space, use_regex = spec.get("add_prefix_space", True), spec.get("use_regex", True)
        gpt2 = _regex_spans(compile_pattern(GPT2_PATTERN)) if use_regex else None

        def byte_level(pieces: list[Piece]) -> list[Piece]:
            if add_prefix_space:
                pieces = [(t if t.startswith(" ") else " " + t, s) for t, s in pieces]
            if gpt2 is not None:
                pieces = _split_pieces(pieces, lambda t: _split(t, gpt2(t), "Isolated"))
            return [(to_alphabet(t), s) for t, s in pieces]

        return byte_level
    if kind == "Split":
        pattern = spec["pattern"]
        if "Regex" in pattern:
            find = _regex_spans(compile_pattern(pattern["Regex"]))
        else:
            find = _regex_spans(re.compile(re.escape(pattern["String"])))
        behavior, invert = spec.get("behavior", "Isolated"), spec.get("invert", False)
        return lambda pieces: _split_pieces(pieces, lambda t: _split(t, find(t), behavior, invert))
    if kind == "Digits":  # Rust's char::is_numeric: categories Nd, Nl, No
        find = _regex_spans(compile_pattern(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+"))
        return lambda pieces: _split_pieces(pieces, lambda t: _split(t, find(t), "Isolated"))
    if kind == "Punctuation":  # char::is_ascii_punctuation or Unicode punctuation (P*), one by one
        find = _regex_spans(compile_pattern(r"[!-/:-@\[-`{-~\p{P}]"))
        behavior = spec.get("behavior", "Isolated")
        return lambda pieces: _split_pieces(pieces, lambda t: _split(t, find(t), behavior))
    if kind == "Metaspace":
        replacement, scheme = spec.get("replacement", "▁"), metaspace_scheme(spec)
        split = spec.get("split", True)
        find = _regex_spans(re.compile(re.escape(replacement)))

        def metaspace(pieces: list[Piece]) -> list[Piece]:
            out = []
            for text, at_start in pieces:
                text = text.replace(" ", replacement)
                prepend = scheme == "always" or (scheme == "first" and at_start)
                if prepend and not text.startswith(replacement):
                    text = replacement + text
                out.append((text, at_start))
            return _split_pieces(out, lambda t: _split(t, find(t), "MergedWithNext")) if split else out

        return metaspace
    raise AssertionError(kind)


def metaspace_scheme(spec: dict) -> str:
    """A Metaspace pre-tokenizer's or decoder's prepend_scheme ("always", "first", "never"), or
    what the older add_prefix_space meant."""
    return spec.get("prepend_scheme") or ("always" if spec.get("add_prefix_space", True) else "never")


def single_regex(steps: list[dict]) -> tuple[str, bool] | None:
    """(pattern, add_prefix_space) where the whole pre-tokenizer is one regex split followed by
    the byte-level mapping, which tiktoken can do alone; else None. Patterns that mean something
    else to tiktoken's regex engine than to Oniguruma (line anchors, \\h, \\z) are left to re."""
    kinds = [step["type"] for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        pattern, add_prefix_space = GPT2_PATTERN, steps[0].get("add_prefix_space", True)
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        if (split.get("behavior") != "Isolated" or split.get("invert") or "Regex" not in split["pattern"]
                or steps[1].get("add_prefix_space", True)):
            return None
        pattern, add_prefix_space = split["pattern"]["Regex"], False
    else:
        return None
    return None if _has_anchor(pattern) else (pattern, add_prefix_space)


def _has_anchor(pattern: str) -> bool:
    """Whether `pattern` holds what Oniguruma and tiktoken's engine read differently: ^ and $
    outside classes (line anchors in Ruby syntax), or the escapes \\h \\z \\Z \\A \\b \\B \\G \\K \\R \\X."""
    in_class, i = False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if pattern[i + 1 : i + 2] in tuple("hHzZAbBGKRX") and not in_class:
                return True
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            i += 2 if pattern[i + 1 : i + 2] == "^" else 1
            continue
        elif char in "^$":
            return True
        i += 1
    return False


# ---------------------------------------------------------------------------------------------
# Added tokens


@dataclass(frozen=True)
class AddedToken:
    """An entry of tokenizer.json's added_tokens."""

    id: int
    content: str
    special: bool = False
    normalized: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


class AddedTokenMatcher:
    """Finds added tokens in a text as AddedVocabulary::find_matches does: leftmost, longest,
    honouring single_word, lstrip and rstrip; special tokens only when allowed."""

    def __init__(self, tokens: dict[str, AddedToken]):
        self._tokens = tokens  # the text matched -> the token
        contents = sorted(tokens, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._word = compile_pattern(r"\w") if any(t.single_word for t in tokens.values()) else None
        self._any_plain = any(not t.special for t in tokens.values())  # matched even without allow_special

    def split(self, text: str, allow_special: bool) -> list[tuple[str, int | None, int]]:
        """(text, None, start) for the pieces between tokens, (content, id, start) for tokens."""
        if self._pattern is None or not text or not (allow_special or self._any_plain):
            return [(text, None, 0)] if text else []
        out, offset, white = [], 0, WHITE_SPACE
        for match in self._pattern.finditer(text):
            token = self._tokens[match.group()]
            if token.special and not allow_special:
                continue
            start, stop = match.span()
            if token.single_word and (
                (start > 0 and self._word.match(text, start - 1))
                or (stop < len(text) and self._word.match(text, stop))
            ):
                continue
            if token.lstrip:
                while start > offset and text[start - 1] in white:
                    start -= 1
            if token.rstrip:
                while stop < len(text) and text[stop] in white:
                    stop += 1
            if start > offset:
                out.append((text[offset:start], None, offset))
            out.append((text[start:stop], token.id, start))
            offset = stop
        if offset < len(text):
            out.append((text[offset:], None, offset))
        return out
