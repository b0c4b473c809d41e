"""Hub resolution (ligerzoo/hf/hub.py) against a fake Hub on 127.0.0.1 that answers the way
huggingface.co does, with HF_ENDPOINT pointing at it: only the files needed are fetched, the repo
loads as its local copy does, it is found again offline from the cache, and each failure (gated,
unknown repo or revision, offline or unreachable and not cached, no safetensors weights, a shard
missing) gives its own message and leaves no file in the cache.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so every
resolution runs in a fresh Python process with those variables set (the fake Hub stays in this
one, on a thread).
"""

import hashlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from ligerzoo.hf.hub import HubError, resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
# Files the Hub stores through LFS: the tree listing gives their sha256, and it is their ETag.
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".model")
WEIGHT_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "original/tokenizer.model"}


# --- a fake Hub -------------------------------------------------------------------------------
class FakeHub:
    """Repos held in memory, served on 127.0.0.1 at the endpoints huggingface_hub 1.x and 2.x
    call: model info (`/api/models/{repo}/revision/{rev}`, with `sha` and `siblings`), the tree
    listing (`/api/models/{repo}/tree/{rev}`), and files (`HEAD`/`GET /{repo}/resolve/{rev}/{path}`
    with ETag, X-Repo-Commit and Content-Length, no Xet headers: the plain HTTP path). Errors carry
    the Hub's X-Error-Code: RepoNotFound (401 without a token, as the Hub answers), RevisionNotFound,
    EntryNotFound, and GatedRepo on a gated repo's files (401 without a token, 403 with one).
    The token "hf_invalid" is refused (401, "Invalid credentials in Authorization header").
    Every request is logged in `requests`; one no route matches also in `unknown`."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers in lower case)
        self.unknown: list[tuple[str, str]] = []

    def add_repo(self, repo_id: str, files: dict[str, bytes], gated: bool = False) -> str:
        """Serve `files` as `repo_id`; returns the commit hash of its main branch."""
        digest = hashlib.sha1(json.dumps({p: hashlib.sha256(d).hexdigest() for p, d in files.items()},
                                         sort_keys=True).encode())
        self.repos[repo_id] = dict(files=files, sha=digest.hexdigest(), gated=gated)
        return self.repos[repo_id]["sha"]

    def fetched(self, repo_id: str) -> set[str]:
        """The files of `repo_id` that were asked for (HEAD or GET)."""
        pattern = re.compile(rf"/{re.escape(repo_id)}/resolve/[^/]+/(.+)")
        matches = (pattern.fullmatch(urlsplit(path).path) for _, path, _ in self.requests)
        return {unquote(m.group(1)) for m in matches if m}

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                hub._route(self, send_body=True)

            def do_HEAD(self):
                hub._route(self, send_body=False)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _route(self, handler, send_body: bool) -> None:
        path = urlsplit(handler.path).path
        headers = {key.lower(): value for key, value in handler.headers.items()}
        self.requests.append((handler.command, handler.path, headers))
        routes = [
            (r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", self._info),
            (r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", self._tree),
            (r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self._file),
        ]
        for pattern, answer in routes:
            if match := re.fullmatch(pattern, path):
                repo_id, revision, *rest = (unquote(g) if g else g for g in match.groups())
                repo = self._repo(handler, repo_id, revision or "main", answer == self._file)
                if repo is not None:
                    status, body, headers = answer(repo_id, repo, *rest)
                    self._send(handler, status, body, headers, send_body)
                else:
                    handler.close_connection = True
                return
        self.unknown.append((handler.command, handler.path))
        self._send(handler, 404, b"", {}, send_body)

    def _repo(self, handler, repo_id: str, revision: str, is_file: bool) -> dict | None:
        """The repo, or None once an error has been sent."""
        repo = self.repos.get(repo_id)
        token = handler.headers.get("Authorization")
        if token == "Bearer hf_invalid":
            error = (401, None, "Invalid credentials in Authorization header")
        elif repo is None:
            error = (404 if token else 401, "RepoNotFound", "Repository not found")
        elif revision not in ("main", repo["sha"]):
            error = (404, "RevisionNotFound", f"Invalid rev id: {revision}")
        elif is_file and repo["gated"]:
            restricted = f"Access to model {repo_id} is restricted"
            error = ((403, "GatedRepo", f"{restricted} and you are not in the authorized list.") if token else
                     (401, "GatedRepo", f"{restricted}. You must have access to it and be authenticated to "
                                        "access it. Please log in."))
        else:
            return repo
        status, code, message = error
        body = json.dumps({"error": message}).encode()
        headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
        # The connection is closed after an error (handler.close_connection in _route): say so, or
        # the client may send its next request down it before the close reaches it, and read
        # "Server disconnected" instead of the answer (seen once in CI, under load).
        headers["Connection"] = "close"
        self._send(handler, status, body, headers, handler.command != "HEAD")
        return None

    def _info(self, repo_id, repo):
        info = {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "private": False,
                "gated": "manual" if repo["gated"] else False,
                "siblings": [{"rfilename": name} for name in repo["files"]]}
        return 200, json.dumps(info).encode(), {"Content-Type": "application/json"}

    def _tree(self, repo_id, repo):
        entries = [_tree_entry(name, data) for name, data in repo["files"].items()]
        return 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}

    def _file(self, repo_id, repo, filename):
        if filename not in repo["files"]:
            return 404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}
        data = repo["files"][filename]
        entry = _tree_entry(filename, data)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        return 200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": repo["sha"],
                           "Content-Type": "application/octet-stream"}

    @staticmethod
    def _send(handler, status: int, body: bytes, headers: dict, send_body: bool) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if send_body:
            handler.wfile.write(body)


def _tree_entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "path": path, "size": len(data),
             "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}  # git's blob id
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


# --- tiny repos -------------------------------------------------------------------------------
def tiny_checkpoint(directory: Path, max_shard_size="5GB") -> Path:
    """A tiny random transformers Llama saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


def llama3_tokenizer_file() -> bytes:
    """Llama 3's tiktoken file as llama-models ships it, else stand-in bytes (only fetched here)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "llama3" / "tokenizer.model"
        if path.is_file():
            return path.read_bytes()
    return b"stand-in tokenizer.model\n"


def repo_files(directory: Path) -> dict[str, bytes]:
    """A Hub repo as Meta or Mistral lay it out: the checkpoint and tokenizer files ligerzoo reads,
    and files it must not fetch (another copy of the weights among them)."""
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    shard = next(data for name, data in files.items() if name.endswith(".safetensors"))
    files.update({
        "original/tokenizer.model": llama3_tokenizer_file(),
        "tokenizer.json": b'{"model": {"type": "BPE"}}',
        "tokenizer_config.json": b"{}",
        "special_tokens_map.json": b"{}",
        "README.md": b"# tiny\n",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "consolidated.safetensors": shard,
        "pytorch_model.bin": b"pickle",
        "original/consolidated.00.pth": b"pickle",
        "original/params.json": b"{}",
    })
    return files


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    # ~0.3 MB of float32 weights over several shards: the index decides what is fetched.
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), max_shard_size="100KB")


@pytest.fixture(scope="module")
def hub(checkpoint_dir):
    hub = FakeHub()
    files = repo_files(checkpoint_dir)
    hub.add_repo("org/tiny", files)
    hub.add_repo("org/gated", files, gated=True)
    hub.add_repo("org/pickles", {"config.json": files["config.json"], "pytorch_model.bin": b"pickle"})
    hub.add_repo("org/shard-missing", {k: v for k, v in files.items() if not k.startswith("model-00002")})
    hub.start()
    yield hub
    hub.stop()


def closed_port_url() -> str:
    """The URL of a port nothing listens on: a Hub that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# --- resolution in a fresh process ------------------------------------------------------------
CHILD = """
import json, sys
import torch
from ligerzoo.hf.pretrained import from_pretrained
from ligerzoo.hf.hub import resolve_model_dir

results = []
for op, args, kwargs in json.loads(sys.argv[1]):
    try:
        if op == "resolve":
            results.append({"path": str(resolve_model_dir(*args, **kwargs))})
        elif op == "load_equals_local":  # from_pretrained(repo id) against from_pretrained(local dir)
            hub, local = from_pretrained(args[0], **kwargs), from_pretrained(args[1])
            a, b = dict(hub.named_parameters()), dict(local.named_parameters())
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            results.append({"equal": same, "parameters": len(a)})
    except Exception as error:
        results.append({"error": type(error).__name__, "message": str(error)})
print("RESULTS " + json.dumps(results))
"""


def hub_env(hf_home: Path, endpoint: str, offline: bool = False, token: str | None = None) -> dict:
    """This process's environment with huggingface_hub's settings replaced."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    # Generous timeouts: on a loaded 2-core CI machine the fake Hub can be slow to answer, and a
    # timed-out request would read as "Hub unreachable".
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="60", HF_HUB_DOWNLOAD_TIMEOUT="60",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if token:
        env["HF_TOKEN"] = token
    return env


def run_child(calls: list, env: dict) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(calls)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


def cached_files(hf_home: Path, repo_id: str) -> list[str]:
    """Files under the repo's cache folder other than huggingface_hub's metadata (refs/ and the
    tree listing trees/, which it writes before fetching)."""
    folder = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).parts[0] not in ("refs", "trees"))


@pytest.fixture(scope="module")
def downloaded(hub, checkpoint_dir, tmp_path_factory):
    """org/tiny loaded by repo id, then resolved for its tokenizer only, online; with the files
    the fake Hub was asked for by each."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    env = hub_env(hf_home, hub.url)
    loaded = run_child([("load_equals_local", ["org/tiny", str(checkpoint_dir)], {})], env)[0]
    fetched_by_load = hub.fetched("org/tiny")
    tokenizer = run_child([("resolve", ["org/tiny"], {"weights": False})], env)[0]
    return dict(hf_home=hf_home, loaded=loaded, tokenizer=tokenizer, fetched_by_load=fetched_by_load,
                fetched_by_tokenizer=hub.fetched("org/tiny") - fetched_by_load)


# --- tests --------------------------------------------------------------------------------------
def test_repo_id_fetches_only_configs_index_and_listed_shards(hub, downloaded, checkpoint_dir):
    shards = {p.name for p in checkpoint_dir.glob("model-*.safetensors")}
    assert len(shards) >= 2
    assert downloaded["fetched_by_load"] == WEIGHT_FILES | shards
    assert hub.unknown == []


def test_repo_id_loads_equal_to_its_local_copy(downloaded):
    assert downloaded["loaded"]["equal"] is True


def test_tokenizer_only_resolution_fetches_only_tokenizer_files(downloaded):
    assert downloaded["fetched_by_tokenizer"] == TOKENIZER_FILES
    directory = Path(downloaded["tokenizer"]["path"])
    assert (directory / "original" / "tokenizer.model").read_bytes() == llama3_tokenizer_file()


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-down"])
def test_cached_repo_is_found_again_without_the_hub(hub, downloaded, checkpoint_dir, offline):
    env = hub_env(downloaded["hf_home"], closed_port_url(), offline=offline)
    commit = hub.repos["org/tiny"]["sha"]
    results = run_child([("load_equals_local", ["org/tiny", str(checkpoint_dir)], {}),
                         ("load_equals_local", ["org/tiny", str(checkpoint_dir)], {"revision": commit}),
                         ("resolve", ["org/tiny"], {})], env)
    assert results[0]["equal"] is True and results[1]["equal"] is True
    assert results[2]["path"] == downloaded["tokenizer"]["path"]


@pytest.fixture(scope="module")
def failures(hub, tmp_path_factory):
    """Each failing resolution, in one fresh process against the fake Hub: name -> result."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    calls = {
        "gated": ("resolve", ["org/gated"], {}),
        "unknown repo": ("resolve", ["org/missing"], {}),
        "unknown revision": ("load_equals_local", ["org/tiny", None], {"revision": "v9"}),
        "pickles only": ("resolve", ["org/pickles"], {}),
        "shard missing": ("resolve", ["org/shard-missing"], {}),
    }
    results = run_child(list(calls.values()), hub_env(hf_home, hub.url))
    return hf_home, dict(zip(calls, results, strict=True))


def test_gated_repo_without_token_says_accept_terms_and_set_hf_token(failures, hub):
    hf_home, results = failures
    assert results["gated"]["error"] == "HubError"
    assert re.search(r"'org/gated' is a gated repo and no Hugging Face token is set: accept its terms at "
                     rf"{hub.url}/org/gated, then set HF_TOKEN", results["gated"]["message"])
    assert cached_files(hf_home, "org/gated") == []


def test_gated_repo_with_token_without_access_says_request_access(hub, tmp_path):
    results = run_child([("resolve", ["org/gated"], {})], hub_env(tmp_path, hub.url, token="hf_noaccess"))
    assert results[0]["error"] == "HubError"
    assert "your Hugging Face token has no access to it: request access at" in results[0]["message"]
    tokens = {h.get("authorization") for _, path, h in hub.requests if "org/gated" in path}
    assert "Bearer hf_noaccess" in tokens
    assert cached_files(tmp_path, "org/gated") == []


def test_refused_token_says_so(hub, tmp_path):
    results = run_child([("resolve", ["org/tiny"], {})], hub_env(tmp_path, hub.url, token="hf_invalid"))
    assert results[0]["error"] == "HubError"
    assert results[0]["message"] == (
        f"the Hub at {hub.url} refused the Hugging Face token (HF_TOKEN or `hf auth login`) while fetching "
        "'org/tiny': Invalid credentials in Authorization header")
    assert not (tmp_path / "hub" / "models--org--tiny").exists()


def test_unknown_repo_says_not_found(failures, hub):
    hf_home, results = failures
    assert results["unknown repo"] == {
        "error": "HubError",
        "message": f"'org/missing' is not a local directory, nor a model repo on {hub.url}; "
                   "if it is private, set HF_TOKEN (or run `hf auth login`)",
    }
    assert not (hf_home / "hub" / "models--org--missing").exists()


def test_unknown_revision_says_so(failures, hub):
    _, results = failures
    assert results["unknown revision"] == {
        "error": "HubError",
        "message": f"'org/tiny' has no revision 'v9' (a branch, tag or commit hash) on {hub.url}",
    }


def test_repo_without_safetensors_weights_is_rejected(failures, hub):
    _, results = failures
    assert results["pickles only"]["error"] == "HubError"
    assert re.match(r"'org/pickles' lacks its safetensors weights \(either of these files; ligerzoo reads no "
                    r"other format\): model.safetensors, model.safetensors.index.json",
                    results["pickles only"]["message"])
    assert hub.fetched("org/pickles") == {"config.json"}


def test_shard_listed_in_index_but_absent_from_repo_is_named(failures):
    _, results = failures
    assert results["shard missing"]["error"] == "HubError"
    assert re.match(r"'org/shard-missing' lacks its shards listed in model.safetensors.index.json: "
                    r"model-00002-of-\d{5}.safetensors are not in", results["shard missing"]["message"])


def test_offline_and_not_cached_says_so_and_writes_nothing(hub, tmp_path):
    results = run_child([("resolve", ["org/tiny"], {})], hub_env(tmp_path, hub.url, offline=True))
    assert results[0]["error"] == "HubError"
    assert re.match(r"'org/tiny' is not in the cache at .*, and HF_HUB_OFFLINE=1 forbids fetching it: unset "
                    r"HF_HUB_OFFLINE, or run `ligerzoo download org/tiny`", results[0]["message"])
    assert not (tmp_path / "hub" / "models--org--tiny").exists()


def test_offline_with_only_the_weights_cached_asks_for_the_tokenizer(hub, checkpoint_dir, tmp_path):
    run_child([("load_equals_local", ["org/tiny", str(checkpoint_dir)], {})], hub_env(tmp_path, hub.url))
    offline = hub_env(tmp_path, hub.url, offline=True)
    results = run_child([("resolve", ["org/tiny"], {"weights": False})], offline)
    assert results[0]["error"] == "HubError"
    assert "HF_HUB_OFFLINE=1 forbids fetching" in results[0]["message"]


def test_unreachable_hub_and_not_cached_says_so(tmp_path):
    endpoint = closed_port_url()
    results = run_child([("resolve", ["org/tiny"], {})], hub_env(tmp_path, endpoint))
    assert results[0]["error"] == "HubError"
    assert re.match(rf"could not reach the Hub at {endpoint} \(ConnectError: .*\) and 'org/tiny' is not "
                    r"in the cache at .*: check the network and HF_ENDPOINT", results[0]["message"])
    assert not (tmp_path / "hub" / "models--org--tiny").exists()


# --- local paths (never reach the Hub) -------------------------------------------------------
def test_local_directory_is_returned_as_is(tmp_path):
    assert resolve_model_dir(tmp_path) == tmp_path
    assert resolve_model_dir(str(tmp_path), weights=False) == tmp_path


def test_local_directory_with_a_revision_is_rejected(tmp_path):
    with pytest.raises(HubError, match="is a local directory; revision='main' applies only to Hub repo ids"):
        resolve_model_dir(tmp_path, revision="main")


@pytest.mark.parametrize("name", ["{tmp}/nothing", "./nothing", "~/nothing/at/all", "a/b/c", "a\\b"])
def test_missing_local_path_is_reported_as_no_such_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    name = name.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match=f"^no such directory: {re.escape(repr(name))}"):
        resolve_model_dir(name)


def test_mistyped_run_directory_is_not_taken_for_a_hub_repo(tmp_path, monkeypatch):
    (tmp_path / "runs" / "default").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        resolve_model_dir("runs/defualt")
    assert str(error.value) == "no such directory: 'runs/defualt'; did you mean 'runs/default'?"


def test_missing_parent_of_a_local_path_is_named_with_the_nearest_name(tmp_path):
    (tmp_path / "default").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        resolve_model_dir(tmp_path / "defualt" / "step_100")
    assert str(error.value).endswith(f"; {str(tmp_path / 'defualt')!r} does not exist; "
                                     f"did you mean {str(tmp_path / 'default')!r}?")


def test_file_instead_of_directory_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="is a file; pass the model's directory"):
        resolve_model_dir(tmp_path / "config.json")
