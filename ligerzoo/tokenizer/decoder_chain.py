"""Hugging Face's SentencePiece-style decoders (Replace, ByteFallback, Fuse, Strip, Metaspace),
run one token at a time so that a stream of ids decodes as the whole sequence does."""

from __future__ import annotations

import re

from ligerzoo.tokenizer.pretokenize import metaspace_scheme


def steps_of(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    return spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]


class DecoderChain:
    """A SentencePiece-style decoder chain (Replace, ByteFallback, Fuse, Strip, Metaspace) run on
    token strings one at a time; what it releases, joined, equals `tokenizers`' decode of the
    whole sequence. ByteFallback holds a run of <0xNN> tokens until it ends (an invalid run
    becomes one U+FFFD per byte, a valid one its text); Strip after Fuse strips the whole text's
    ends, so trailing characters it could strip wait for what follows."""

    def __init__(self, steps: list[dict]):
        self._steps = steps
        self._bytes = bytearray()  # a ByteFallback run
        self._count = 0  # tokens seen: Metaspace treats the first apart
        self._left = next((step.get("start", 0) for step in steps if step["type"] == "Strip"), 0)
        self._held = ""  # trailing characters Strip may yet remove

    @staticmethod
    def check(steps: list[dict], problems: list[str]) -> None:
        """Add to `problems` what this chain cannot run as `tokenizers` does."""
        kinds = [step.get("type") for step in steps]
        for i, kind in enumerate(kinds):
            if kind not in ("Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"):
                problems.append(f"decoder {kind!r} (supported: Replace, ByteFallback, Fuse, Strip, "
                                "Metaspace)")
            elif kind == "Strip" and "Fuse" not in kinds[:i]:
                problems.append("decoder Strip before Fuse")
            elif kind == "Metaspace" and i != 0:
                problems.append("decoder Metaspace after another decoder")
            elif kind == "Replace" and "String" not in steps[i].get("pattern", {}):
                problems.append("decoder Replace with a regex")
            elif kind == "Replace" and "Fuse" in kinds[:i] and len(steps[i]["pattern"]["String"]) != 1:
                problems.append("decoder Replace of several characters after Fuse")
            elif kind == "Strip" and kinds.count("Strip") > 1:
                problems.append("several Strip decoders")

    def push(self, token: str) -> str:
        return self._run([token], final=False)

    def finish(self) -> str:
        return self._run([], final=True)

    def _run(self, items: list[str], final: bool) -> str:
        index = self._count
        self._count += len(items)
        for step in self._steps:
            kind = step["type"]
            if kind == "Replace":
                old, new = step["pattern"]["String"], step["content"]
                items = [item.replace(old, new) for item in items]
            elif kind == "Metaspace":
                replacement = step.get("replacement", "▁")
                first_dropped = index == 0 and metaspace_scheme(step) != "never"
                items = [item.replace(replacement, "" if first_dropped else " ") for item in items]
            elif kind == "ByteFallback":
                items = self._byte_fallback(items, final)
            elif kind == "Fuse":
                items = ["".join(items)] if items else []
            elif kind == "Strip":
                items = [self._strip(step, "".join(items), final)]
        return "".join(items)

    def _byte_fallback(self, items: list[str], final: bool) -> list[str]:
        out = []
        for item in items:
            if _BYTE_TOKEN.fullmatch(item):
                self._bytes.append(int(item[3:5], 16))
                continue
            out += self._release_bytes()
            out.append(item)
        if final:
            out += self._release_bytes()
        return out

    def _release_bytes(self) -> list[str]:
        if not self._bytes:
            return []
        try:
            released = [self._bytes.decode("utf-8")]
        except UnicodeDecodeError:
            released = ["\ufffd"] * len(self._bytes)
        self._bytes.clear()
        return released

    def _strip(self, step: dict, text: str, final: bool) -> str:
        """Strip's cut of the whole text: up to `start` leading and `stop` trailing `content`."""
        content, stop = step.get("content", " "), step.get("stop", 0)
        while self._left and text.startswith(content):
            text, self._left = text[1:], self._left - 1
        if text:
            self._left = 0  # past the start of the text
        text, self._held = self._held + text, ""
        if stop:
            kept = text.rstrip(content)
            text, self._held = kept, text[len(kept) :]
            if final:
                text, self._held = text + self._held[: max(0, len(self._held) - stop)], ""
        return text


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # ByteFallback's tokens
