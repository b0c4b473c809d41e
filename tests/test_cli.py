"""The command line (ligerzoo/cli.py), run as `python -m ligerzoo` in a fresh process: `download`
against the fake Hub of test_hub.py, `generate` on a tiny local checkpoint with a real tokenizer,
its streamed text equal to decoding what ligerzoo.generate returns."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hub import FakeHub, hub_env, repo_files, tiny_checkpoint

from ligerzoo.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]


def ligerzoo_command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    if env is None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ligerzoo", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


# --- download -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    files = repo_files(tiny_checkpoint(tmp_path_factory.mktemp("tiny")))  # one model.safetensors
    hub = FakeHub()
    hub.add_repo("org/tiny", files)
    hub.start()
    yield hub
    hub.stop()


def test_download_fetches_checkpoint_and_tokenizer_and_prints_the_directory(hub, tmp_path):
    result = ligerzoo_command("download", "org/tiny", env=hub_env(tmp_path, hub.url))
    assert result.returncode == 0, result.stderr
    directory = Path(result.stdout.strip())
    assert directory.parent == tmp_path / "hub" / "models--org--tiny" / "snapshots"
    fetched = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "original/tokenizer.model"}
    assert {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} == fetched
    assert hub.fetched("org/tiny") == fetched
    assert "Fetching 7 files" in result.stderr and "100%" in result.stderr  # huggingface_hub's progress


def test_download_at_a_revision_without_weights(hub, tmp_path):
    commit = hub.repos["org/tiny"]["sha"]
    result = ligerzoo_command("download", "org/tiny", "--revision", commit, "--no-weights",
                              env=hub_env(tmp_path, hub.url))
    assert result.returncode == 0, result.stderr
    directory = Path(result.stdout.strip())
    assert directory.name == commit
    assert (directory / "tokenizer.json").is_file() and not (directory / "model.safetensors").exists()


def test_download_of_an_unknown_repo_exits_1_with_the_reason(hub, tmp_path):
    result = ligerzoo_command("download", "org/missing", env=hub_env(tmp_path, hub.url))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().endswith(
        f"ligerzoo download: error: 'org/missing' is not a local directory, nor a model repo on {hub.url}; "
        "if it is private, set HF_TOKEN (or run `hf auth login`)")


def test_bad_sampling_flag_is_rejected_before_loading(tmp_path):
    result = ligerzoo_command("generate", str(tmp_path), "hi", "--top-p", "1.5")
    assert result.returncode == 2
    assert "argument --top-p: 1.5 is not in (0, 1]" in result.stderr


# --- generate -----------------------------------------------------------------------------------
def sentencepiece_file() -> Path | None:
    """Mistral's v1 SentencePiece model as mistral-common ships it (a Llama 2-style tokenizer)."""
    spec = importlib.util.find_spec("mistral_common")
    path = Path(spec.origin).parent / "data" / "tokenizer.model.v1" if spec and spec.origin else None
    return path if path is not None and path.is_file() else None


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory) -> Path:
    for module in ("ligerzoo.tokenizer", "ligerzoo.generate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not written yet")
    tokenizer = sentencepiece_file()
    if tokenizer is None:
        pytest.skip("mistral-common (a test extra) is not installed: no SentencePiece tokenizer file")
    directory = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    config = ModelConfig(model_type="mistral", vocab_size=32000, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    build_model(config).save_pretrained(directory)
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    return directory


def expected_text(directory: Path, prompt: str, chat: bool, max_new_tokens: int) -> str:
    """What the command should print: the decoded new tokens, the stop token left out."""
    from ligerzoo.checkpoint import from_pretrained
    from ligerzoo.generate import generate
    from ligerzoo.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(directory, chat_format="mistral-v1")
    if chat:
        ids = tokenizer.format_chat([{"role": "user", "content": prompt}])
    else:
        ids = tokenizer.encode(prompt, bos=True)
    model = from_pretrained(directory, dtype=torch.float32, device="cpu")
    new = generate(model, [ids], max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids)[0]
    return tokenizer.decode([t for t in new if t not in tokenizer.stop_ids]) + "\n"


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_generate_streams_the_decoded_greedy_continuation(checkpoint_with_tokenizer, chat):
    prompt = "Fourscore and seven years ago, 東京 🚀"
    flags = ["--chat", "--chat-format", "mistral-v1"] if chat else ["--chat-format", "mistral-v1"]
    result = ligerzoo_command("generate", str(checkpoint_with_tokenizer), prompt, "--max-new-tokens", "12",
                              "--device", "cpu", "--dtype", "fp32", *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(checkpoint_with_tokenizer, prompt, chat, max_new_tokens=12)
    assert "tokens/s" in result.stderr


def test_generate_without_a_tokenizer_exits_1_naming_the_directory(checkpoint_with_tokenizer, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(checkpoint_with_tokenizer / name, tmp_path / name)
    result = ligerzoo_command("generate", str(tmp_path), "hi", "--device", "cpu")
    assert result.returncode == 1
    assert f"ligerzoo generate: error: no tokenizer file in {tmp_path}" in result.stderr
