"""The command line (ligerzoo/cli.py), run as `python -m ligerzoo` in a fresh process: `download`
against the fake Hub of test_hub.py, `generate` on a tiny local checkpoint with a real tokenizer,
its streamed text equal to decoding what ligerzoo.generate returns."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hub import FakeHub, hub_env, repo_files, tiny_checkpoint

from ligerzoo.cli import main
from ligerzoo.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]


def ligerzoo_command(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    if env is None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ligerzoo", *args], env=env, cwd=cwd,
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


def test_mistyped_local_directory_is_reported_missing_not_as_a_hub_problem(tmp_path):
    (tmp_path / "runs" / "default").mkdir(parents=True)
    result = ligerzoo_command("generate", "runs/defualt", "hi", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == ("ligerzoo generate: error: no such directory: 'runs/defualt'; "
                             "did you mean 'runs/default'?\n")


# --- --device ------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_device_cuda_without_a_gpu_is_one_line_before_loading_anything(tmp_path):
    # The model directory does not exist: the device is checked first.
    for device in ("cuda", "cuda:3"):
        result = ligerzoo_command("generate", str(tmp_path / "nothing"), "hi", "--device", device)
        assert result.returncode == 1
        assert re.fullmatch(rf"ligerzoo generate: error: --device {device}: [^\n]+; use --device cpu\n",
                            result.stderr), result.stderr


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "", "meta", "cpu:1"])
def test_device_that_is_no_device_ligerzoo_runs_on_is_one_line(tmp_path, device):
    result = ligerzoo_command("generate", str(tmp_path / "nothing"), "hi", "--device", device)
    assert result.returncode == 1
    assert result.stderr.startswith(f"ligerzoo generate: error: --device {device!r}")
    assert result.stderr.endswith("cpu, cuda or cuda:N\n") and result.stderr.count("\n") == 1


def test_device_index_past_the_gpus_names_the_gpus_there_are(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["generate", str(tmp_path / "nothing"), "hi", "--device", "cuda:3"]) == 1
    assert capsys.readouterr().err == (
        "ligerzoo generate: error: --device cuda:3: this machine has 2 CUDA GPUs (cuda:0 to cuda:1)\n")


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


def test_absurd_max_new_tokens_says_how_many_fit_beside_the_prompt(checkpoint_with_tokenizer):
    result = ligerzoo_command("generate", str(checkpoint_with_tokenizer), "hi", "--device", "cpu",
                              "--max-new-tokens", "1000000000", "--chat-format", "mistral-v1")
    assert result.returncode == 1
    match = re.search(r"ligerzoo generate: error: max_new_tokens=1000000000 leaves no room for a prompt of "
                      r"(\d+) tokens in the model's context of 128 tokens \(max_position_embeddings\): lower "
                      r"max_new_tokens to at most (\d+)\n\Z", result.stderr)
    assert match is not None, result.stderr
    assert int(match.group(1)) + int(match.group(2)) == 128
