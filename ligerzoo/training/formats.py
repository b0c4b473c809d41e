"""Training examples: the records of a corpus file, each of a format its keys choose, tokenised
into ids and a role per token that says whether the loss may see it.

The formats of a record (a .jsonl line, or an element of a .json array), tried in this order:
- chat, {"messages": [{"role": ..., "content": ...}, ...]}: rendered by the tokenizer's chat
  template (`format_chat`); each assistant turn's content and end-of-turn token are the answer,
  everything the template adds around them the prompt.
- prompt_completion, {"prompt": ..., "completion": ...}: BOS, the prompt, the completion, EOS, the
  two texts encoded apart so the boundary is exact; the completion and EOS are the answer.
- alpaca, {"instruction": ..., "input": ... (optional), "output": ...}: the Stanford Alpaca prompt
  (with or without its input section) as the prompt, the output as the completion.
- text, {"text": ...} (or a string in a .json array, or a paragraph of a text file): BOS, the
  text, EOS, all of it the answer.

Roles: PADDING (never a target), PROMPT (a target only with train_on_prompt), ANSWER (always).
"""

import codecs
import itertools
import json
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

FORMATS = ("text", "chat", "prompt_completion", "alpaca")  # a format's index is its code
TEXT, CHAT, PROMPT_COMPLETION, ALPACA = FORMATS
PADDING, PROMPT, ANSWER = 0, 1, 2

# tatsu-lab/stanford_alpaca's train.py; the output follows "### Response:" directly.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

_RECORD_RULE = ('a record holds "messages" (chat), "prompt" and "completion", "instruction" and "output" '
                '(alpaca, with an optional "input"), or "text"')


class Example(NamedTuple):
    """One record of a corpus file, checked.

    format: one of FORMATS.
    content: text: the text; chat: the messages; prompt_completion and alpaca: (prompt, completion).
    where: the file and line (or record) it came from, for errors.
    """

    format: str
    content: str | list[dict] | tuple[str, str]
    where: str


# ---------------------------------------------------------------------------------------------
# Reading: a file's records, checked, one at a time


def read_examples(path: str) -> Iterator[Example]:
    """The examples of a UTF-8 corpus file, by its suffix (in any case): .jsonl, one record per
    line; .json, one array of records (or strings: text); anything else, text whose
    blank-line-separated paragraphs are text examples. A file without examples, a record of no
    format, or a file that is not UTF-8 text raises a ValueError that says where."""
    with open_corpus(path) as file:
        yield from iter_examples(file, path)


def read_documents(path: str) -> list[str]:
    """The texts of a corpus of plain text (every record a text example), as read_examples reads it."""
    texts = []
    for example in read_examples(path):
        if example.format != TEXT:
            raise ValueError(f"{example.where}: a {example.format} example, where plain text was expected")
        texts.append(example.content)
    return texts


def open_corpus(path: str):
    """A corpus file opened for iter_examples (a UTF-8 byte-order mark, as Windows writes, skipped)."""
    return open(path, encoding="utf-8-sig")


def iter_examples(file, path: str) -> Iterator[Example]:
    """The examples of a corpus file opened by open_corpus, one at a time; .txt and .jsonl files
    are streamed."""
    suffix = Path(path).suffix.lower()
    read = {".jsonl": _jsonl_examples, ".json": _json_array_examples}.get(suffix, _paragraphs)
    found = False
    try:
        for example in read(file, path):
            found = True
            yield example
    except UnicodeDecodeError as error:
        raise _not_utf8_error(path, error) from None
    if not found:
        raise ValueError(f"{path} holds no documents (it is empty or blank): pass a corpus with text in it")


def _paragraphs(file, path: str) -> Iterator[Example]:
    """A text file's paragraphs, which end at an empty line, as `text.split("\n\n")` cuts them,
    but streamed."""
    lines, first = [], 1
    for number, line in enumerate(itertools.chain(file, ["\n"]), 1):  # the end ends the last one
        if line != "\n":
            if "\0" in line:
                raise _binary_file_error(path, number)
            first = first if lines else number
            lines.append(line)
            continue
        text = "".join(lines).strip()
        lines.clear()
        if text:
            yield Example(TEXT, text, f"{path}:{first}")


def _jsonl_examples(file, path: str) -> Iterator[Example]:
    """Each line's record (blank lines skipped)."""
    for number, line in enumerate(file, 1):
        if "\0" in line:
            raise _binary_file_error(path, number)
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not a line of JSON ({error})") from None
        yield _example(record, where, strings=False)


def _json_array_examples(file, path: str) -> Iterator[Example]:
    """The records of a .json file holding one array (read whole: a corpus too large for memory
    belongs in a .jsonl file)."""
    expected = "one JSON array of records or of strings (one record per line is .jsonl)"
    try:
        records = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); a .json corpus is {expected}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}; a .json corpus is {expected}")
    for index, record in enumerate(records):
        yield _example(record, f"{path}: record {index}", strings=True)


def _example(record, where: str, strings: bool) -> Example:
    """The example a record holds, of the first format whose keys it has (or, where `strings`, a
    string as text); its values checked."""
    if strings and isinstance(record, str):
        return Example(TEXT, record, where)
    if not isinstance(record, dict):
        rule = f"{_RECORD_RULE}, or is a string" if strings else _RECORD_RULE
        raise ValueError(f"{where}: {rule}; got {json.dumps(record, ensure_ascii=False)[:80]}")
    if "messages" in record:
        return Example(CHAT, _messages(record["messages"], where), where)
    if "prompt" in record and "completion" in record:
        prompt, completion = _string(record, "prompt", where), _string(record, "completion", where)
        return Example(PROMPT_COMPLETION, (prompt, completion), where)
    if "instruction" in record and "output" in record:
        instruction, given = _string(record, "instruction", where), record.get("input")
        if given is not None and not isinstance(given, str):
            raise ValueError(f'{where}: "input" must be a string, got {type(given).__name__}')
        template = ALPACA_PROMPT if given else ALPACA_PROMPT_NO_INPUT
        return Example(ALPACA, (template.format(instruction=instruction, input=given),
                                _string(record, "output", where)), where)
    if "text" in record:
        return Example(TEXT, _string(record, "text", where), where)
    keys = ", ".join(json.dumps(key, ensure_ascii=False) for key in itertools.islice(record, 12)) or "none"
    raise ValueError(f"{where}: {_RECORD_RULE}; its keys are {keys}")


def _string(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {json.dumps(key)} must be a string, got {type(value).__name__}")
    return value


def _messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects, '
                         f"got {json.dumps(messages, ensure_ascii=False)[:80]}")
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f'{where}: messages[{index}] needs a "role" and a "content" string, got '
                             f"{json.dumps(message, ensure_ascii=False)[:80]}")
    return messages


def _binary_file_error(path: str, line: int) -> ValueError:
    return ValueError(f"{path}:{line}: holds a NUL byte, so it is not a text file (binary data, or "
                      "UTF-16 text): pass the corpus as UTF-8 .txt, .jsonl or .json")


_SCAN_CHUNK = 1 << 20  # bytes read at a time by _not_utf8_error


def _not_utf8_error(path: str, error: UnicodeDecodeError) -> ValueError:
    """Where `path` first fails to decode as UTF-8: found again from the start of the file, since
    the text reader's error counts from a buffer of unknown offset."""
    offset = newlines = 0  # in what has been decoded so far
    pending = b""  # the first bytes of a character split across chunks
    with open(path, "rb") as file:
        while True:
            chunk = file.read(_SCAN_CHUNK)
            data = pending + chunk
            try:
                _, used = codecs.utf_8_decode(data, "strict", not chunk)  # final at the end
            except UnicodeDecodeError as found:
                bad, line = offset + found.start, newlines + data.count(b"\n", 0, found.start) + 1
                return ValueError(
                    f"{path} is not UTF-8 text: byte {bad} (line {line}) is 0x{data[found.start]:02x}; "
                    "a corpus must be UTF-8 text (convert one in another encoding, e.g. with "
                    "`iconv -f latin1 -t utf-8`), not a binary file")
            if not chunk:  # not found again: the file changed while it was read
                return ValueError(f"{path} is not UTF-8 text ({error})")
            offset, newlines, pending = offset + used, newlines + data.count(b"\n", 0, used), data[used:]


# ---------------------------------------------------------------------------------------------
# Tokenising: ids and a role per token


def tokenize_example(example: Example, tokenizer) -> tuple[list[int], bytes]:
    """The ids of an example and the role of each (PROMPT or ANSWER)."""
    if example.format == TEXT:
        ids = tokenizer.encode(example.content, bos=True, eos=True)
        return ids, bytes([ANSWER]) * len(ids)
    if example.format == CHAT:
        return _chat_ids_and_roles(example.content, tokenizer, example.where)
    prompt, completion = example.content
    prompt_ids = tokenizer.encode(prompt, bos=True)
    answer_ids = tokenizer.encode(completion, bos=False, eos=True)
    return prompt_ids + answer_ids, bytes([PROMPT]) * len(prompt_ids) + bytes([ANSWER]) * len(answer_ids)


def _chat_ids_and_roles(messages: list[dict], tokenizer, where: str) -> tuple[list[int], bytes]:
    """A conversation's ids, and its assistant turns found by rendering prefixes: the ids of the
    messages before an assistant turn with the generation prompt begin those of the messages up
    to it without, which begin the whole conversation's; the tokens between are the answer.

    A conversation whose template renders earlier turns differently once later ones follow (one
    that drops past reasoning, or moves the system prompt to the last user turn) cannot be split
    so, and is refused.
    """
    def render(turns: list[dict], add_generation_prompt: bool) -> list[int]:
        try:
            return tokenizer.format_chat(turns, add_generation_prompt=add_generation_prompt)
        except Exception as error:  # the template's own errors too (raise_exception, a bad role)
            raise ValueError(f"{where}: the chat template cannot render the conversation: {error}") from error

    ids = render(messages, False)
    roles = bytearray([PROMPT]) * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError(f"{where}: the conversation opens with the assistant's message, so nothing "
                             "renders the prompt before it: open with a system or user message")
        prompt, answered = render(messages[:i], True), render(messages[:i + 1], False)
        _check_prefix(prompt, answered, f"messages[:{i}] with the generation prompt", f"messages[:{i + 1}]",
                      where)
        _check_prefix(answered, ids, f"messages[:{i + 1}]", "the whole conversation", where)
        roles[len(prompt):len(answered)] = bytes([ANSWER]) * (len(answered) - len(prompt))
    return ids, bytes(roles)


def _check_prefix(shorter: list[int], longer: list[int], what: str, whole: str, where: str) -> None:
    if longer[:len(shorter)] != shorter:
        differ = next((k for k, (a, b) in enumerate(zip(shorter, longer)) if a != b), len(longer))
        raise ValueError(
            f"{where}: the chat template renders {what} as ids that do not begin those of {whole} (they "
            f"differ at token {differ}), so the answer cannot be located: the template renders earlier "
            "turns differently once later ones follow (it drops past reasoning, or moves the system "
            "prompt), which prompt-masked training does not support; split the conversation, or train "
            'it as {"text": ...}')


@dataclass
class TokenizedCorpus:
    """Examples tokenised end to end.

    tokens: every example's ids end to end [N], of any integer dtype (a token file's, mapped).
    starts: the index in `tokens` where each example begins [D], int64, ascending from 0.
    formats: each example's format, its index in FORMATS [D], uint8.
    roles: each token's role [N], uint8; None where every example is text (all ANSWER).
    """

    tokens: torch.Tensor
    starts: torch.Tensor
    formats: torch.Tensor
    roles: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.starts)

    def lengths(self) -> torch.Tensor:
        """Each example's number of tokens [D]."""
        return torch.diff(self.starts, append=torch.tensor([len(self.tokens)]))

    def format_counts(self) -> dict[str, int]:
        """The number of examples of each format present."""
        counts = torch.bincount(self.formats.long(), minlength=len(FORMATS)).tolist()
        return {name: count for name, count in zip(FORMATS, counts) if count}

    def select(self, indices: list[int]) -> "TokenizedCorpus":
        """The examples numbered `indices` (ascending), end to end: each run of consecutive
        examples one slice, so the complement of a few held out is a few copies."""
        ends = self.starts[1:].tolist() + [len(self.tokens)]
        runs = []  # [first, last] example of each run
        for index in indices:
            if runs and runs[-1][1] == index - 1:
                runs[-1][1] = index
            else:
                runs.append([index, index])
        spans = [(int(self.starts[first]), ends[last]) for first, last in runs]
        pieces = [self.tokens[begin:end] for begin, end in spans]
        lengths = self.lengths()[indices]
        roles = None if self.roles is None else torch.cat([self.roles[begin:end] for begin, end in spans])
        return TokenizedCorpus(tokens=torch.cat(pieces), starts=torch.cumsum(lengths, 0) - lengths,
                               formats=self.formats[indices], roles=roles)


def tokenize_corpus(examples: Iterable[Example], tokenizer) -> TokenizedCorpus:
    """Tokenise examples into one TokenizedCorpus in memory."""
    ids, starts, formats, roles = array("i"), array("q"), array("B"), array("B")
    for example in examples:
        example_ids, example_roles = tokenize_example(example, tokenizer)
        starts.append(len(ids))
        formats.append(FORMATS.index(example.format))
        ids.extend(example_ids)
        roles.frombytes(example_roles)
    if not starts:
        raise ValueError("no examples to tokenise")
    all_text = not any(formats)
    return TokenizedCorpus(tokens=torch.frombuffer(ids, dtype=torch.int32),
                           starts=torch.frombuffer(starts, dtype=torch.int64),
                           formats=torch.frombuffer(formats, dtype=torch.uint8),
                           roles=None if all_text else torch.frombuffer(roles, dtype=torch.uint8))
