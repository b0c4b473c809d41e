"""Oniguruma patterns, as tokenizer.json files write them, compiled by Python's `re`.

Hugging Face's `tokenizers` matches Split patterns with Oniguruma (Ruby syntax); Python's `re`
knows neither `\\p{L}` nor Oniguruma's meaning of `\\s`, `\\h`, `$`. `compile_pattern` rewrites
what differs: Unicode general categories become explicit character ranges (from `unicodedata`,
so the Unicode version is Python's), `\\s` is White_Space (Python's also takes U+001C-U+001F),
`\\w` and `\\d` are Oniguruma's Unicode classes, `\\h` a hex digit, and `^`/`$` match at line
boundaries (`re.MULTILINE`), as in Ruby. What `re` cannot express (POSIX brackets, class
intersections, multi-character case folding such as (?i)ss matching "ß") is refused or, for
the folding, documented here: no pre-tokenizer pattern in a Llama-family file relies on it.
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
import unicodedata

# Unicode White_Space: what Oniguruma's and Rust's `\s` and `char::is_whitespace` accept.
WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)

_LONG_CATEGORY_NAMES = {
    "Letter": "L", "Uppercase_Letter": "Lu", "Lowercase_Letter": "Ll", "Titlecase_Letter": "Lt",
    "Modifier_Letter": "Lm", "Other_Letter": "Lo", "Mark": "M", "Number": "N",
    "Decimal_Number": "Nd", "Letter_Number": "Nl", "Other_Number": "No", "Punctuation": "P",
    "Symbol": "S", "Separator": "Z", "Other": "C", "Control": "Cc",
}


class PatternError(ValueError):
    """A pattern that Python's `re` cannot match as Oniguruma would."""


Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code point ranges


@functools.cache
def _ranges_by_category() -> dict[str, Ranges]:
    """Every two-letter general category as code point ranges (one pass over all code points)."""
    by_category: dict[str, list[tuple[int, int]]] = {}
    code = 0
    for category, run in itertools.groupby(map(unicodedata.category, map(chr, range(sys.maxunicode + 1)))):
        length = sum(1 for _ in run)
        by_category.setdefault(category, []).append((code, code + length - 1))
        code += length
    return {category: tuple(ranges) for category, ranges in by_category.items()}


def _union(*range_lists: Ranges) -> Ranges:
    merged: list[list[int]] = []
    for start, end in sorted(r for ranges in range_lists for r in ranges):
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((start, end) for start, end in merged)


def _complement(ranges: Ranges) -> Ranges:
    out, next_code = [], 0
    for start, end in ranges:
        if start > next_code:
            out.append((next_code, start - 1))
        next_code = end + 1
    if next_code <= sys.maxunicode:
        out.append((next_code, sys.maxunicode))
    return tuple(out)


def _chars_ranges(chars: str) -> Ranges:
    return _union(tuple((ord(c), ord(c)) for c in chars))


@functools.cache
def category_ranges(name: str) -> Ranges:
    """A general category, one letter ("L") or two ("Lu"), or its long name ("Letter")."""
    name = _LONG_CATEGORY_NAMES.get(name, name)
    by_category = _ranges_by_category()
    if len(name) not in (1, 2) or not any(category.startswith(name) for category in by_category):
        raise PatternError(f"Unicode property \\p{{{name}}} is not supported (only general categories)")
    return _union(*(ranges for category, ranges in by_category.items() if category.startswith(name)))


_CLASS_ESCAPES = {  # Oniguruma's meaning, in Unicode mode
    "s": lambda: _chars_ranges("".join(WHITE_SPACE)),
    "d": lambda: category_ranges("Nd"),
    "w": lambda: _union(*(category_ranges(name) for name in ("L", "M", "Nd", "Pc"))),
    "h": lambda: _chars_ranges("0123456789abcdefABCDEF"),
}


def _class_body(ranges: Ranges) -> str:
    """The inside of a `[...]` that matches `ranges`."""
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


def translate(pattern: str) -> str:
    """`pattern` (Oniguruma, Ruby syntax) rewritten for Python's `re` (compiled with MULTILINE)."""
    out: list[str] = []
    in_class = False
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\":
            if i + 1 >= n:
                raise PatternError("pattern ends with a lone backslash")
            escape = pattern[i + 1]
            i += 2
            if escape in "pP":
                if i < n and pattern[i] == "{":
                    end = pattern.find("}", i)
                    if end < 0:
                        raise PatternError("unterminated \\p{...}")
                    name, i = pattern[i + 1 : end], end + 1
                else:
                    name, i = pattern[i : i + 1], i + 1
                negate = escape == "P"
                if name.startswith("^"):
                    name, negate = name[1:], not negate
                ranges = category_ranges(name)
            elif escape.lower() in _CLASS_ESCAPES:
                ranges, negate = _CLASS_ESCAPES[escape.lower()](), escape.isupper()
            elif escape == "z":
                out.append(r"\Z")
                continue
            elif escape == "Z":
                out.append(r"(?=\n?\Z)")
                continue
            elif escape == "x" and i < n and pattern[i] == "{":
                end = pattern.find("}", i)
                if end < 0:
                    raise PatternError("unterminated \\x{...}")
                out.append(f"\\U{int(pattern[i + 1 : end], 16):08x}")
                i = end + 1
                continue
            elif escape == "e":
                out.append(r"\x1b")
                continue
            elif escape in "AbBnrtfvaux0123456789" or not escape.isalnum():
                out.append("\\" + escape)
                continue
            else:
                raise PatternError(f"escape \\{escape} is not supported")
            body = _class_body(_complement(ranges) if negate else ranges)
            out.append(body if in_class else f"[{body}]")
            continue
        if in_class:
            if char == "[":
                raise PatternError("nested character classes and POSIX brackets are not supported")
            if char == "&" and pattern.startswith("&&", i):
                raise PatternError("character class intersections (&&) are not supported")
            if char == "]":
                in_class = False
            out.append(char)
            i += 1
            continue
        if char == "[":
            in_class = True
            out.append(char)
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            if i < n and pattern[i] == "]":  # a literal ] first in the class
                out.append(r"\]")
                i += 1
            continue
        if pattern.startswith("(?<", i) and i + 3 < n and pattern[i + 3] not in "=!":
            out.append("(?P<")  # a named group: (?<name>...) in Ruby, (?P<name>...) in Python
            i += 3
            continue
        out.append(char)
        i += 1
    return "".join(out)


@functools.cache
def compile_pattern(pattern: str, multiline: bool = True) -> re.Pattern:
    """Oniguruma's `pattern` as a compiled Python regex; PatternError if it cannot be.

    multiline: ^ and $ match at line boundaries, as in Oniguruma's Ruby syntax; False for a
    pattern written for Rust's regex engines (tiktoken's), where they match at the text's ends.
    """
    try:
        return re.compile(translate(pattern), re.MULTILINE if multiline else 0)
    except re.error as error:
        raise PatternError(f"Python's re cannot compile it ({error})") from None


def strip_white_space(text: str, left: bool, right: bool) -> str:
    """`text` without White_Space at the chosen ends (Rust's `trim_start`/`trim_end`)."""
    chars = "".join(WHITE_SPACE)
    if left:
        text = text.lstrip(chars)
    if right:
        text = text.rstrip(chars)
    return text
