"""What a model directory says about its tokenizer beside the tokenizer file itself:
tokenizer_config.json (bos_token, eos_token, add_bos_token, chat_template) and
generation_config.json (eos_token_id, one id or a list)."""

from __future__ import annotations

import json
from pathlib import Path

from ligerzoo.hf import json_file
from ligerzoo.hf.hub import (
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)
from ligerzoo.tokenizer.base import TokenizerError


def read_json(path: Path) -> dict:
    """A JSON object from `path`; {} when the file does not exist."""
    return json_file.read_json(path, required=False, error=TokenizerError)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def model_dir_of(path: Path) -> Path:
    """The model directory a tokenizer file was read from (Llama 3 keeps Meta's under original/)."""
    return path.parent.parent if path.parent.name == "original" else path.parent


class ModelFiles:
    """The JSON files beside a tokenizer file, read once."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.tokenizer_config = read_json(model_dir / TOKENIZER_CONFIG_FILE)
        self.special_tokens_map = read_json(model_dir / SPECIAL_TOKENS_MAP_FILE)
        self.generation_config = read_json(model_dir / GENERATION_CONFIG_FILE)

    def token(self, name: str) -> tuple[bool, str | None]:
        """(declared, text) of `name` ("bos_token", "eos_token") in tokenizer_config.json, else in
        special_tokens_map.json: declared is False where neither has the key, and text None where
        it is null (Qwen2's "bos_token": null). Either file writes a string or an AddedToken
        object ({"content": ...})."""
        for source in (self.tokenizer_config, self.special_tokens_map):
            if name in source:
                value = source[name]
                if isinstance(value, dict):
                    value = value.get("content")
                return True, value if isinstance(value, str) else None
        return False, None

    def flag(self, name: str) -> bool | None:
        value = self.tokenizer_config.get(name)
        return value if isinstance(value, bool) else None

    def generation_stop_ids(self) -> set[int]:
        """generation_config.json's eos_token_id: an id, or a list of them."""
        value = self.generation_config.get("eos_token_id")
        values = value if isinstance(value, list) else [value]
        return {v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0}

    def chat_template(self) -> str | None:
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            for entry in template:
                if isinstance(entry, dict) and entry.get("name") == "default":
                    return entry.get("template")
        path = self.model_dir / CHAT_TEMPLATE_FILE
        return path.read_text(encoding="utf-8") if path.is_file() else None
