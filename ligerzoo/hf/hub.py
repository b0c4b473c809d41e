"""Model names to local directories: an existing directory as is, or a Hugging Face Hub repo id
fetched into huggingface_hub's cache.

huggingface_hub does the fetching, so its settings apply: the cache (`HF_HOME`, `HF_HUB_CACHE`),
the token (`HF_TOKEN` or `hf auth login`), `HF_HUB_OFFLINE=1` (the cache only) and `HF_ENDPOINT`.
It reads them when it is imported: set them before the process starts. A repo already cached is
found again without the network when the Hub cannot be reached.

Only the files ligerzoo reads are fetched, in two steps: the config, the tokenizer files, and the
single weights file or the shard index; then the shards that index lists. A pattern such as
`*.safetensors` would also fetch files the loader never reads, such as Mistral's
`consolidated.safetensors`, a second copy of the whole model.

huggingface_hub writes each file under a temporary name and links it into the snapshot only when
complete, so a failed or interrupted fetch leaves no partial file under a final name (an
interrupted file is resumed next time). What a failure can leave in the repo's cache folder is
metadata: `refs/<revision>` and, with huggingface_hub 2.x, the file listing `trees/<commit>.json`.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
from pathlib import Path

# The file names of a Hugging Face model directory that ligerzoo reads or writes, defined here once.
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CONFIG_FILES = [CONFIG_FILE, GENERATION_CONFIG_FILE]
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_JSON_FILE = "tokenizer.json"
LLAMA3_TIKTOKEN_FILE = "original/tokenizer.model"  # Meta's file, beside the converted tokenizer.json
TEKKEN_FILE = "tekken.json"  # Mistral's tiktoken-style file (Mistral-Nemo, Ministral, Mistral Small 3)
TOKENIZER_FILES = [
    SENTENCEPIECE_FILE, TOKENIZER_JSON_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE,
    LLAMA3_TIKTOKEN_FILE, TEKKEN_FILE,
    CHAT_TEMPLATE_FILE,  # where transformers >= 4.50 saves the chat template
]


class HubError(ValueError):
    """A Hub repo that cannot be fetched or found in the cache: the message says why and what to do."""


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    *,
    weights: bool = True,
    tokenizer: bool = True,
) -> Path:
    """The local directory holding the model `name_or_path` names.

    name_or_path: a local directory (returned as is), or a Hub repo id such as
        "meta-llama/Llama-3.2-1B", whose snapshot is fetched into (or found in) the cache.
    revision: a branch, tag or commit hash of the Hub repo (default: its main branch).
    weights: fetch the safetensors weights; tokenizer: fetch the tokenizer files. The configs
        (`config.json`, `generation_config.json`) are always fetched.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise HubError(f"{str(name_or_path)!r} is a local directory; revision={revision!r} applies "
                           "only to Hub repo ids")
        return path
    if path.exists():
        raise NotADirectoryError(f"{str(path)!r} is a file; pass the model's directory or a Hub repo id")
    repo_id = str(name_or_path)
    if _looks_local(repo_id):
        raise FileNotFoundError(f"no such directory: {repo_id!r}{_nearest_hint(path)}")
    _check_repo_id(repo_id)

    patterns = list(CONFIG_FILES)
    if weights:
        patterns += [SINGLE_WEIGHTS_FILE, WEIGHTS_INDEX_FILE]
    if tokenizer:
        patterns += TOKENIZER_FILES
    directory = _download(repo_id, revision, patterns)
    if weights and not (directory / SINGLE_WEIGHTS_FILE).is_file():
        shards = _indexed_shards(repo_id, revision, directory)
        # At the commit the index came from (the snapshot folder's name), should the branch move
        # meanwhile. glob.escape: huggingface_hub matches patterns with fnmatch, a name is no pattern.
        patterns = [glob.escape(name) for name in shards]
        directory = _download(repo_id, revision, patterns, commit=directory.name)
        _check_present(repo_id, revision, directory, shards, f"shards listed in {WEIGHTS_INDEX_FILE}")
    if weights:
        _check_present(repo_id, revision, directory, [CONFIG_FILE], "model config")
    if tokenizer and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        _check_present(repo_id, revision, directory, TOKENIZER_FILES, "tokenizer (any one of these files)")
    return directory


def _looks_local(name: str) -> bool:
    """Whether `name` can only mean a local path: Hub repo ids are 'name' or 'owner/name', never
    absolute, never starting with '.' or '~', and their owner is no directory here (a typo in
    `runs/defualt` is not a Hub repo that cannot be reached)."""
    return (Path(name).is_absolute() or name.startswith((".", "~")) or "\\" in name
            or name.count("/") > 1 or ("/" in name and Path(name.split("/")[0]).is_dir()))


def _nearest_hint(path: Path) -> str:
    """Where `path` first goes astray, and the closest existing name there: "; did you mean ...?"."""
    missing = path
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    try:
        names = [entry.name for entry in missing.parent.iterdir()]
    except OSError:  # unreadable: no hint
        names = []
    nearest = difflib.get_close_matches(missing.name, names, n=1)
    where = f"; {str(missing)!r} does not exist" if missing != path else ""
    return where + (f"; did you mean {str(missing.parent / nearest[0])!r}?" if nearest else "")


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(f"{repo_id!r} is not a local directory, nor a Hugging Face Hub repo id "
                                "('name' or 'namespace/name')") from None


def _download(repo_id: str, revision: str | None, patterns: list[str], commit: str | None = None) -> Path:
    """huggingface_hub's snapshot_download of the files matching `patterns` at `commit` if given,
    else at `revision` (with its progress bars); its errors made HubErrors."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=commit or revision, allow_patterns=patterns))
    except Exception as error:
        hub_error = _explain(error, repo_id, revision)
        if hub_error is None:
            raise
        raise hub_error from error


def _explain(error: Exception, repo_id: str, revision: str | None) -> HubError | None:
    """The HubError that says what `error` (raised by huggingface_hub) means for `repo_id`; None for
    an error that is not about reaching the repo. Only exception names that huggingface_hub 1.x
    and 2.x both define are used."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    endpoint = constants.ENDPOINT
    if isinstance(error, GatedRepoError):  # before RepositoryNotFoundError: a subclass of it
        if get_token() is None:
            return HubError(
                f"{where} is a gated repo and no Hugging Face token is set: accept its terms at "
                f"{endpoint}/{repo_id}, then set HF_TOKEN (or run `hf auth login`)"
            )
        return HubError(
            f"{where} is a gated repo and your Hugging Face token has no access to it: request access at "
            f"{endpoint}/{repo_id} (or use a token of an account that has it)"
        )
    if isinstance(error, RepositoryNotFoundError):
        hint = "" if get_token() else "; if it is private, set HF_TOKEN (or run `hf auth login`)"
        return HubError(f"{where} is not a local directory, nor a model repo on {endpoint}{hint}")
    if isinstance(error, RevisionNotFoundError):
        return HubError(f"{repo_id!r} has no revision {revision!r} (a branch, tag or commit hash) "
                        f"on {endpoint}")
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or _is_transport_error(error):
        # The Hub was not asked (offline mode) or not reached, and the cache does not hold it all.
        cache = constants.HF_HUB_CACHE
        in_cache = "in the cache at {} only in part" if _cached(cache, repo_id) else "not in the cache at {}"
        in_cache = in_cache.format(cache)
        if constants.HF_HUB_OFFLINE or _caused_by(error, OfflineModeIsEnabled):
            return HubError(
                f"{where} is {in_cache}, and HF_HUB_OFFLINE=1 forbids fetching it: unset HF_HUB_OFFLINE, "
                f"or run `ligerzoo download {repo_id}` where the Hub is reachable, with the same cache"
            )
        cause = error.__cause__ if error.__cause__ is not None else error
        return HubError(
            f"could not reach the Hub at {endpoint} ({type(cause).__name__}: {cause}) and {where} is "
            f"{in_cache}: check the network and HF_ENDPOINT"
        )
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        said = getattr(error, "server_message", None) or str(error)
        if status == 401:  # neither a missing repo nor a gated one: the token itself
            return HubError(f"the Hub at {endpoint} refused the Hugging Face token (HF_TOKEN or `hf auth "
                            f"login`) while fetching {where}: {said}")
        return HubError(f"the Hub at {endpoint} answered {status or 'with an error'} while fetching {where}: "
                        f"{said}")
    return None


def _is_transport_error(error: Exception) -> bool:
    # A connection that failed or broke: huggingface_hub 1.x raises httpx's TransportError, 2.x
    # httpx2's; matched by name so that neither needs importing.
    return any(kind.__name__ == "TransportError" for kind in type(error).__mro__)


def _cached(cache: str, repo_id: str) -> bool:
    """Whether the cache holds any snapshot of the repo (huggingface_hub's cache layout)."""
    return (Path(cache) / ("models--" + repo_id.replace("/", "--")) / "snapshots").is_dir()


def _caused_by(error: BaseException, kind: type) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__ or error.__context__
    return False


def _indexed_shards(repo_id: str, revision: str | None, directory: Path) -> list[str]:
    """The shard file names the index lists, in first-use order."""
    index_path = directory / WEIGHTS_INDEX_FILE
    if not index_path.is_file():
        _check_present(repo_id, revision, directory, [SINGLE_WEIGHTS_FILE, WEIGHTS_INDEX_FILE],
                       "safetensors weights (either of these files; ligerzoo reads no other format)")
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise HubError(f"{index_path} of {repo_id!r} is not a JSON object ({error})") from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise HubError(f"{index_path} of {repo_id!r} has no 'weight_map' object")
    names = list(dict.fromkeys(weight_map.values()))
    bad = [name for name in names if not isinstance(name, str) or not _is_plain_relative(name)]
    if bad:
        raise HubError(f"{index_path} of {repo_id!r} lists shard names that are not files of the repo: {bad}")
    return names


def _is_plain_relative(name: str) -> bool:
    parts = name.split("/")
    return "\\" not in name and ".." not in parts and "" not in parts  # "" also: empty, or a leading /


def _check_present(repo_id: str, revision: str | None, directory: Path, names: list[str], what: str) -> None:
    """Raise a HubError if any of `names` is not in `directory`: the repo lacks them, or the cache
    holds the snapshot only in part (huggingface_hub 1.x returns a partial snapshot from the cache
    as is when the Hub cannot be asked)."""
    from huggingface_hub import constants

    missing = [name for name in names if not (directory / name).is_file()]
    if not missing:
        return
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    if constants.HF_HUB_OFFLINE:
        raise HubError(
            f"the cached snapshot of {where} at {directory} lacks its {what}: {', '.join(missing)}, and "
            f"HF_HUB_OFFLINE=1 forbids fetching them: unset it, or run `ligerzoo download {repo_id}` where "
            "the Hub is reachable, with the same cache"
        )
    raise HubError(
        f"{where} lacks its {what}: {', '.join(missing)} are not in {directory}; either the repo has "
        "none, or the Hub could not be reached and the cache holds the snapshot only in part"
    )
