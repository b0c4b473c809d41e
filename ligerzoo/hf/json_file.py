"""The one reader of a model directory's JSON files (config.json, tokenizer_config.json, ...)."""

import json
from pathlib import Path


def read_json(path: Path, *, required: bool, error: type[ValueError] = ValueError) -> dict:
    """The JSON object in `path`. A missing file is an `error` when required, else {}; so is
    a file that is not valid JSON or holds something other than an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        if required:
            raise error(f"{path} does not exist") from None
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path} is not valid JSON ({problem})") from problem
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data
