"""The hand-written instruct formats of the families whose files carry no chat template (Meta's
Llama 2 and Llama 3 recipes, mistral-common's v1-v3), encoded id by id as their reference
implementations encode them. A model's own Jinja template is rendered elsewhere
(`ligerzoo.tokenizer.chat_template`) and encoded with `encode(text, bos=False, allow_special=True)`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

CHAT_FORMATS = ("llama2", "llama3", "mistral-v1", "mistral-v2", "mistral-v3")


def check_messages(messages, roles: tuple[str, ...], chat_format: str) -> list[dict[str, str]]:
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


def _llama3_chat(tok, messages, add_generation_prompt: bool) -> list[int]:
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


def _llama2_chat(tok, messages, add_generation_prompt: bool) -> list[int]:
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


def _mistral_v1_chat(tok, messages, add_generation_prompt: bool) -> list[int]:
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


def _mistral_v3_chat(tok, messages, add_generation_prompt: bool) -> list[int]:
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
CHAT_FORMATTERS = {
    "llama2": (_llama2_chat, _BASIC_ROLES),
    "llama3": (_llama3_chat, (*_BASIC_ROLES, "ipython", "tool")),
    "mistral-v1": (_mistral_v1_chat, _BASIC_ROLES),
    "mistral-v2": (_mistral_v3_chat, _BASIC_ROLES),
    "mistral-v3": (_mistral_v3_chat, _BASIC_ROLES),
}
