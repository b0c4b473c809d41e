"""The command line (ligerzoo/cli.py), run as `python -m ligerzoo` in a fresh process: `download`
against the fake Hub of test_hub.py, `generate` on a tiny local checkpoint with a real tokenizer,
its streamed text equal to decoding what ligerzoo.generate returns."""

import importlib
import importlib.util
import io
import json
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
    for module in ("ligerzoo.tokenizer", "ligerzoo.inference"):
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
    from ligerzoo.hf.pretrained import from_pretrained
    from ligerzoo.inference import generate
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


# --- chat ---------------------------------------------------------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SYSTEM = {"role": "system", "content": "Be brief."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.fixture
def chat_model(tmp_path, monkeypatch) -> Path:
    """A tiny random model (a context of 128 tokens) on the byte tokenizer, CHAT_TEMPLATE in its
    tokenizer_config.json."""
    from ligerzoo.tokenizer import ByteTokenizer

    directory = tmp_path / "chat-model"
    torch.manual_seed(0)
    config = ModelConfig(model_type="llama", vocab_size=258, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    build_model(config).save_pretrained(directory)
    ByteTokenizer().save(directory)
    config_path = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**tokenizer_config, "chat_template": CHAT_TEMPLATE}))
    return directory


@pytest.fixture
def calls(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, new ids) of each ligerzoo.generate call, recorded."""
    module = importlib.import_module("ligerzoo.inference")  # where the command imports it from
    recorded, generate = [], module.generate

    def recording_generate(model, input_ids, **kwargs):
        new = generate(model, input_ids, **kwargs)
        recorded.append((list(input_ids[0]), new[0]))
        return new

    monkeypatch.setattr(module, "generate", recording_generate)
    return recorded


def run_chat(monkeypatch, capsys, lines: str, *flags: str, tty: bool = False) -> tuple[int, str, str]:
    stdin = io.StringIO(lines)
    stdin.isatty = lambda: tty
    monkeypatch.setattr(sys, "stdin", stdin)
    status = main(["chat", *flags, "--max-new-tokens", "4", "--device", "cpu"])
    out, err = capsys.readouterr()
    return status, out, err


def test_chat_keeps_the_history_streams_each_reply_and_reset_forgets(chat_model, calls, monkeypatch, capsys):
    from ligerzoo.tokenizer import load_tokenizer

    status, out, err = run_chat(monkeypatch, capsys, "Hello there\n\nAnd again?\n/reset\nHello there\n",
                                str(chat_model), "--system", "Be brief.")
    assert status == 0, err
    tokenizer = load_tokenizer(chat_model)
    replies = [tokenizer.decode([t for t in new if t not in tokenizer.stop_ids]) for _, new in calls]
    assert out == "".join(f"{reply}\n" for reply in replies)  # what was generated, streamed
    history = [SYSTEM, user("Hello there"), {"role": "assistant", "content": replies[0]}, user("And again?")]
    # The blank line is no turn; after /reset the conversation starts again.
    expected = [history[:2], history, history[:2]]
    assert [prompt for prompt, _ in calls] == [tokenizer.format_chat(messages) for messages in expected]
    assert calls[2][1] == calls[0][1]  # greedy
    assert "(conversation cleared)" in err and "> " not in err  # no prompt when stdin is no terminal


def test_chat_drops_the_oldest_exchanges_when_the_context_is_full(chat_model, calls, monkeypatch, capsys):
    # A context of 128 tokens and --max-new-tokens 4: a prompt of at most 124, one exchange (73 tokens).
    first, second, third = "first " + "?" * 44, "second " + "!" * 43, "third " + "." * 44
    status, _, err = run_chat(monkeypatch, capsys, f"{first}\n{second}\n{third}\n", str(chat_model))
    assert status == 0, err
    note = "the conversation outgrew the model's context of 128 tokens: dropped its oldest 2 messages"
    assert err.count(note) == 2  # each time the one exchange before, the older ones already gone
    from ligerzoo.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(chat_model)
    assert [prompt for prompt, _ in calls] == [tokenizer.format_chat([user(text)])
                                               for text in (first, second, third)]
    assert len(calls[0][0]) == 73


def test_chat_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(chat_model, calls,
                                                                               monkeypatch, capsys):
    status, out, err = run_chat(monkeypatch, capsys, "x" * 150 + "\nshort\n", str(chat_model))
    assert status == 0
    assert ("ligerzoo chat: error: this message makes a prompt of 173 tokens, which with --max-new-tokens 4 "
            "exceeds the model's context of 128 tokens: shorten it, or lower --max-new-tokens") in err
    assert len(calls) == 1 and out.count("\n") == 1


def test_chat_exit_ends_the_session_and_a_terminal_gets_a_prompt(chat_model, calls, monkeypatch, capsys):
    status, out, err = run_chat(monkeypatch, capsys, "/exit\nnever read\n", str(chat_model), tty=True)
    assert (status, out, calls) == (0, "", [])
    assert err.count("> ") == 1


def test_chat_without_a_chat_format_fails_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from ligerzoo.tokenizer import ByteTokenizer

    ByteTokenizer().save(tmp_path)  # no template, no config.json, no weights
    status, out, err = run_chat(monkeypatch, capsys, "hi\n", str(tmp_path))
    assert status == 1 and out == ""
    assert err.startswith("ligerzoo chat: error: ") and err.count("\n") == 1
    assert "config.json" not in err


def test_chat_sampling_flags_need_a_temperature(tmp_path, monkeypatch, capsys):
    status, _, err = run_chat(monkeypatch, capsys, "", str(tmp_path), "--top-p", "0.9")
    assert status == 1
    assert err == ("ligerzoo chat: error: --top-k and --top-p restrict sampling: set --temperature > 0 "
                   "(0 is greedy)\n")


def test_chat_max_new_tokens_must_leave_room_for_a_prompt(chat_model, monkeypatch, capsys):
    stdin = io.StringIO("hi\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["chat", str(chat_model), "--max-new-tokens", "128", "--device", "cpu"]) == 1
    assert capsys.readouterr().err == (
        "ligerzoo chat: error: --max-new-tokens 128 leaves no room for a prompt in the model's context of "
        "128 tokens (max_position_embeddings): lower it\n")


def test_chat_command_answers_each_line_of_stdin(chat_model, calls):
    from ligerzoo.tokenizer import load_tokenizer

    command = [sys.executable, "-m", "ligerzoo", "chat", str(chat_model), "--max-new-tokens", "4",
               "--device", "cpu"]
    result = subprocess.run(command, input="Hello there\nAnd again?\n", capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer(chat_model)
    model = importlib.import_module("ligerzoo.hf.pretrained").from_pretrained(chat_model, dtype=torch.float32)
    history, expected = [], ""
    for line in ("Hello there", "And again?"):
        history.append(user(line))
        new = importlib.import_module("ligerzoo.inference").generate(
            model, [tokenizer.format_chat(history)], max_new_tokens=4, stop_ids=tokenizer.stop_ids)[0]
        reply = tokenizer.decode([t for t in new if t not in tokenizer.stop_ids])
        history.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert result.stdout == expected
