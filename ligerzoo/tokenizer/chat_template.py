"""A model's own Jinja chat template, rendered as Hugging Face's tokenizers render it.

Where the template comes from, as transformers reads a model directory: `chat_template.jinja`,
else `chat_template` in `tokenizer_config.json` (a string, or a list of {"name", "template"} of
which "default" is used), else `chat_template.json`'s "chat_template" (the file processors, and
transformers' Mistral tekken loader, read).

How it is rendered, as transformers' `apply_chat_template` renders it: a sandbox that forbids
mutating what the template is given, `trim_blocks` and `lstrip_blocks`, the `break`/`continue`
loop controls, `raise_exception(message)`, `strftime_now(format)`, `tojson` that leaves non-ASCII
and HTML characters as they are and takes `indent`, `separators` and `sort_keys`, and the
`{% generation %}...{% endgeneration %}` block, which marks the assistant's text. The template
sees `messages` (keys whose value is None dropped), `add_generation_prompt`, `tools` and
`documents` (None unless given), `bos_token` and `eos_token` where given, and any other keyword.
Not done here: `continue_final_message`, tools given as Python functions, and the copying of
`reasoning`/`thinking` into `reasoning_content`.

jinja2 is the one dependency; templates are untrusted code from the Hub, hence the sandbox and
jinja2 >= 3.1.6 (older versions have known sandbox escapes).
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ligerzoo.hf.hub import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE
from ligerzoo.hf.json_file import read_json

LEGACY_TEMPLATE_FILE = "chat_template.json"
MIN_JINJA_VERSION = (3, 1, 6)


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template; `source` is the file it was read from (None if made from a string).
    A template that is not valid Jinja raises ValueError here, naming the file and line."""

    text: str
    source: Path | None = None

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise TypeError(f"a chat template is a str, got {type(self.text).__name__}")
        _compile(self.text, self._where())

    @classmethod
    def from_model_dir(cls, directory: str | Path) -> ChatTemplate | None:
        """The chat template in a model directory, looked for where transformers looks; None if
        there is none."""
        directory = Path(directory)
        path = directory / CHAT_TEMPLATE_FILE
        if path.is_file():
            return cls(path.read_text(encoding="utf-8"), path)
        path = directory / TOKENIZER_CONFIG_FILE
        template = read_json(path, required=False).get("chat_template")
        if template is not None:
            return cls(_default_template(template, path), path)
        path = directory / LEGACY_TEMPLATE_FILE
        if path.is_file():
            template = read_json(path, required=False).get("chat_template")
            if not isinstance(template, str):
                raise ValueError(f"{path} holds no \"chat_template\" string (got {template!r:.80}); "
                                 f"write the template into {directory / CHAT_TEMPLATE_FILE} instead")
            return cls(template, path)
        return None

    def render(self, messages: Iterable[Mapping], add_generation_prompt: bool = False,
               bos_token: str | None = None, eos_token: str | None = None, **kwargs) -> str:
        """The text of a conversation.

        messages: [{"role": ..., "content": str or a list of parts, ...}, ...], passed as they are.
        add_generation_prompt: end with what opens the assistant's reply, where the template has one.
        kwargs: more variables for the template, e.g. tools, documents, date_string.
        Raises ValueError where the template refuses the conversation (its raise_exception message)
        or fails on it (with the template line).
        """
        return self._render(messages, add_generation_prompt, bos_token, eos_token, kwargs, track=False)[0]

    def render_with_spans(self, messages: Iterable[Mapping], add_generation_prompt: bool = False,
                          bos_token: str | None = None, eos_token: str | None = None,
                          **kwargs) -> tuple[str, list[tuple[int, int]]]:
        """The text, as `render` gives it, and the [start, end) character ranges of what the
        template's {% generation %} blocks wrote (the assistant's text, in templates that mark it;
        none in the others)."""
        return self._render(messages, add_generation_prompt, bos_token, eos_token, kwargs, track=True)

    def _render(self, messages, add_generation_prompt, bos_token, eos_token, kwargs, track):
        variables = {"tools": None, "documents": None}
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None:
                variables[name] = token
        variables.update(kwargs)
        variables.update(messages=_plain_messages(messages), add_generation_prompt=add_generation_prompt)
        marker = f"\x00generation-{uuid.uuid4().hex}\x00" if track else None  # unique to this call
        state = _generation_marker.set(marker)
        try:
            text = _compile(self.text, self._where()).render(**variables)
        except _TemplateRaised as error:
            raise ValueError(f"the chat template ({self._where()}) refuses these messages: {error}") from None
        except (jinja2.TemplateError, TypeError, ValueError) as error:
            line = _template_line(error.__traceback__)
            at = f", line {line}" if line is not None else ""
            raise ValueError(f"the chat template ({self._where()}{at}) failed on these messages: "
                             f"{type(error).__name__}: {error}") from error
        finally:
            _generation_marker.reset(state)
        return _cut_spans(text, marker) if track else (text, [])

    def _where(self) -> str:
        if self.source is None:
            return "given as a string"
        if self.source.name == CHAT_TEMPLATE_FILE:
            return str(self.source)
        return f"\"chat_template\" in {self.source}"


def special_token_text(value) -> str | None:
    """The text of a special token as tokenizer_config.json gives it: a string, or an AddedToken
    written as a dict {"content": ..., ...}; None stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"a special token is a string or a dict with a \"content\" string, got {value!r:.100}")


# ---------------------------------------------------------------------------------------------
# Reading


def _default_template(template, path: Path) -> str:
    """tokenizer_config.json's chat_template: the string, or the "default" of a list of named ones."""
    if isinstance(template, str):
        return template
    if isinstance(template, list) and all(isinstance(t, Mapping) and {"name", "template"} <= t.keys()
                                          for t in template):
        named = {t["name"]: t["template"] for t in template}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"\"chat_template\" in {path} names templates {sorted(named)} but none \"default\"; "
                         f"write the one to use into {path.parent / CHAT_TEMPLATE_FILE}")
    raise ValueError(f"\"chat_template\" in {path} is neither a string nor a list of "
                     f"{{\"name\", \"template\"}} objects: {template!r:.100}")


def _plain_messages(messages) -> list[dict]:
    """The messages as fresh dicts, without the keys whose value is None (templates test whether a
    key is defined, and would print "None")."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Iterable):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict, got {message!r:.100}")
        plain.append({key: value for key, value in message.items() if value is not None})
    if not plain:
        raise ValueError("the conversation is empty: give at least one message")
    return plain


# ---------------------------------------------------------------------------------------------
# The Jinja environment


class _TemplateRaised(jinja2.TemplateError):
    """What a template's raise_exception(message) raises."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the JSON as it is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the dict type
    itself (whose attributes reach further than a template needs)."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args) -> dict:
        return dict.fromkeys(*args)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace(), refusing attribute names that start with "_" (the way to CPython's
    internals)."""

    def __init__(*args, **kwargs):  # no named `self`, so that namespace(self=...) works, as in Jinja
        self, attributes = args[0], dict(*args[1:], **kwargs)
        for name in attributes:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace: "
                                                  "names starting with '_' are refused")


# While render_with_spans runs: the string that brackets each {% generation %} block's text.
_generation_marker: ContextVar[str | None] = ContextVar("generation_marker", default=None)


class _GenerationBlock(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: writes its body, bracketed by the marker while
    spans are asked for."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_write"), [], [], body).set_lineno(lineno)

    def _write(self, caller) -> str:
        text, marker = caller(), _generation_marker.get()
        return text if marker is None else f"{marker}{text}{marker}"


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    version = tuple(int(part) for part in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < MIN_JINJA_VERSION:
        raise ImportError(f"chat templates need jinja2 >= 3.1.6 (older versions have sandbox escapes), "
                          f"this is {jinja2.__version__}: pip install -U jinja2")
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                               dict=_TemplateDict(), namespace=_Namespace)
    return environment


@functools.lru_cache(maxsize=16)
def _compile(text: str, where: str) -> jinja2.Template:
    """The compiled template (once per text; `where` only names it in errors)."""
    try:
        return _environment().from_string(text)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"the chat template ({where}) is not valid Jinja: line {error.lineno}: "
                         f"{error.message}") from None


def _template_line(traceback) -> int | None:
    """The template line a rendering error came from (Jinja rewrites the traceback so that the
    template's frames carry the template's line numbers)."""
    line = None
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == "<template>":
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line


def _cut_spans(text: str, marker: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without the markers, and the ranges the marker pairs enclosed."""
    pieces = text.split(marker)
    if len(pieces) % 2 == 0:
        raise ValueError("the chat template's {% generation %} blocks came out unbalanced "
                         "(a filter cut one?): no spans can be given for it")
    out, spans, length = [], [], 0
    for i, piece in enumerate(pieces):
        if i % 2 == 1:
            spans.append((length, length + len(piece)))
        out.append(piece)
        length += len(piece)
    return "".join(out), spans
