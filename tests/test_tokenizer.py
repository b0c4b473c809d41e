"""Tokenizers against the real files that llama-models (Llama 3) and mistral-common (Mistral)
ship, compared with those packages' own encoders, decoders and chat formats."""

import json
import random
import shutil
from pathlib import Path

import mistral_common
import pytest
import tokenizers
import torch
from llama_models.datatypes import RawMessage, StopReason
from llama_models.llama3 import tokenizer as llama_tokenizer
from llama_models.llama3.chat_format import ChatFormat
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from tokenizers import processors
from transformers.convert_slow_tokenizer import TikTokenConverter

from ligerzoo.tokenizer import (
    MAX_ENCODE_CHARS,
    MAX_RUN_CHARS,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TokenizerError,
    load_tokenizer,
)
from ligerzoo.tokenizer.tiktoken_bpe import split_long_runs

LLAMA3_FILE = Path(llama_tokenizer.__file__).parent / "tokenizer.model"
MISTRAL_DATA = Path(mistral_common.__file__).parent / "data"
MISTRAL_FILES = {
    "v1": MISTRAL_DATA / "tokenizer.model.v1",
    "v2": MISTRAL_DATA / "mistral_instruct_tokenizer_240216.model.v2",
    "v3": MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3",
}

TEXTS = {
    "empty": "",
    "plain": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "code": 'def f(x):\n    return {"a": [1, 2, 3]}  # comment\n\tif x != 0:\n\t\tprint(x ** 2, end="")\n',
    "cjk": "日本語のテキストと中文字符，还有한국어 문장도 있습니다。",
    "emoji": "👩\u200d👩\u200d👧\u200d👦 family, 🤗🚀🏳️\u200d🌈 flags 🇫🇷🇯🇵 skin 👍🏽",
    "special_looking": "<|begin_of_text|><|eot_id|> [INST] hi [/INST] <s></s> <unk> <<SYS>> <0x0A>",
    "whitespace": "  lead and trail  \n\n\n\t\r\n mixed\u00a0nbsp\u2003em\u3000ideographic \x1c ",
    "accents": "naïve café Ωmega ǅ ﬁ ℌ e\u0301 Ångström",
    "numbers": "3.14159 1234567890 1,000,000 -42e-10 0x1F",
    "json_url": '{"url": "https://example.com/a?b=c&d=e#f", "ok": true, "n": null}',
}
LONG_TEXTS = {
    "run_letters": "a" * 60_000,
    "run_spaces": " " * 30_000 + "x",
    "run_boundary": "x" * MAX_RUN_CHARS + " " + "y" * (MAX_RUN_CHARS + 1) + "\n" * (2 * MAX_RUN_CHARS + 3),
    "run_random_letters": "".join(random.Random(0).choices("abcdefghijklmnopqrstuvwxyzABCXYZ", k=70_000)),
    "run_emoji": "🙂" * 30_000,
    "run_cjk": "中文" * 20_000,
    "past_encode_limit": "z" * (MAX_ENCODE_CHARS + 50_001),
}
ALL_TEXTS = {**TEXTS, **LONG_TEXTS}


@pytest.fixture(scope="module")
def llama3_reference():
    return llama_tokenizer.Tokenizer(LLAMA3_FILE)


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(LLAMA3_FILE)


@pytest.fixture(scope="module", params=sorted(MISTRAL_FILES))
def mistral_pair(request):
    """(ours, mistral-common's MistralTokenizer) for one SentencePiece version."""
    path = MISTRAL_FILES[request.param]
    return load_tokenizer(path), MistralTokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def llama3_json_dir(tmp_path_factory, llama3_reference):
    """A Llama 3 repository that ships only tokenizer.json, converted from Meta's tiktoken file by
    transformers' own converter (as the Hub's Llama 3 tokenizer.json files were made), with the
    post-processor the Hub's files have: <|begin_of_text|> before each text."""
    specials = sorted(llama3_reference.special_tokens, key=llama3_reference.special_tokens.get)
    hf = TikTokenConverter(vocab_file=str(LLAMA3_FILE), extra_special_tokens=specials).converted()
    bos = ("<|begin_of_text|>", llama3_reference.special_tokens["<|begin_of_text|>"])
    template = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                             special_tokens=[bos])
    hf.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    directory = tmp_path_factory.mktemp("llama3_json")
    hf.save(str(directory / "tokenizer.json"))
    return directory


# ---------------------------------------------------------------------------------------------
# Llama 3 (tiktoken)


@pytest.mark.parametrize("name", ALL_TEXTS)
def test_llama3_encode_decode_match_llama_models(llama3, llama3_reference, name):
    text = ALL_TEXTS[name]
    for bos, eos in ((True, False), (False, False), (True, True)):
        ids = llama3.encode(text, bos=bos, eos=eos)
        assert ids == llama3_reference.encode(text, bos=bos, eos=eos), (name, bos, eos)
    plain = llama3.encode(text, bos=False)
    assert llama3.decode(plain) == text
    assert llama3.decode(ids) == llama3_reference.decode(ids)


def test_split_long_runs_cuts_where_llama_models_cuts(llama3_reference):
    cases = [
        "",
        "short text",
        LONG_TEXTS["run_boundary"],
        "\x1c" * (MAX_RUN_CHARS + 5) + "a" * (3 * MAX_RUN_CHARS),  # \x1c is whitespace to str.isspace
        "\u2028\u00a0" * MAX_RUN_CHARS + "b",
        ("w " * 10 + "q" * (MAX_RUN_CHARS * 2 + 1)) * 3,
        "a" * (MAX_ENCODE_CHARS + 10) + " b",  # chunked at the encode limit first, then cut
    ]
    for text in cases:
        # llama-models' Tokenizer.encode: 400k-character chunks, each split at long runs
        expected = [
            part
            for start in range(0, len(text), MAX_ENCODE_CHARS)
            for part in llama3_reference._split_whitespaces_or_nonwhitespaces(
                text[start : start + MAX_ENCODE_CHARS], MAX_RUN_CHARS
            )
        ]
        assert list(split_long_runs(text)) == expected, text[:20]


def test_llama3_special_ids_match_llama_models(llama3, llama3_reference):
    assert isinstance(llama3, TiktokenTokenizer)
    assert llama3.special_tokens == llama3_reference.special_tokens
    assert len(llama3.special_tokens) == 256 and min(llama3.special_tokens.values()) == 128_000
    assert (llama3.bos_id, llama3.eos_id) == (128_000, 128_001)
    assert llama3.special_tokens["<|eot_id|>"] == 128_009
    assert llama3.stop_ids == set(llama3_reference.stop_tokens) == {128_001, 128_008, 128_009}
    assert llama3.vocab_size == llama3_reference.n_words == 128_256


def test_llama3_allow_special_matches_llama_models(llama3, llama3_reference):
    """Special-token text read as the tokens (llama-models' allowed_special="all"), long runs
    included; without allow_special it stays text."""
    for name, text in ALL_TEXTS.items():
        expected = llama3_reference.encode(text, bos=True, eos=False, allowed_special="all")
        assert llama3.encode(text, allow_special=True) == expected, name
    text = TEXTS["special_looking"]
    assert llama3.encode(text, bos=False, allow_special=True)[:2] == [128_000, 128_009]
    assert 128_009 not in llama3.encode(text, bos=False)


def test_llama3_chat_matches_llama_models(llama3, llama3_reference):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?\n"},
        {"role": "assistant", "content": " 4, of course."},
        {"role": "user", "content": "And <|eot_id|> in 日本語?"},
    ]
    raw = [
        RawMessage(role=m["role"], content=m["content"],
                   stop_reason=StopReason.end_of_turn if m["role"] == "assistant" else None)
        for m in messages
    ]
    expected = ChatFormat(llama3_reference).encode_dialog_prompt(raw).tokens
    assert llama3.format_chat(messages) == expected
    header = llama3.format_chat(messages)[-4:]
    assert llama3.decode(header) == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert llama3.format_chat(messages, add_generation_prompt=False) == expected[: -len(header)]


def test_tokenizer_json_encodes_like_the_tiktoken_file(llama3, llama3_json_dir):
    from_json = load_tokenizer(llama3_json_dir)
    assert isinstance(from_json, TiktokenTokenizer) and from_json.path.name == "tokenizer.json"
    assert from_json.special_tokens == llama3.special_tokens
    assert (from_json.bos_id, from_json.eos_id) == (llama3.bos_id, llama3.eos_id)
    assert from_json.stop_ids == llama3.stop_ids
    assert from_json.vocab_size == llama3.vocab_size
    for name, text in TEXTS.items():  # long runs: llama-models cuts them, Hugging Face does not
        assert from_json.encode(text) == llama3.encode(text), name
    ids = list(range(0, 128_256, 97))
    assert from_json.decode(ids) == llama3.decode(ids)


def test_tokenizer_json_agrees_with_hf_tokenizers(llama3_json_dir):
    """The same file read by Hugging Face's own `tokenizers` library, long runs included (which
    it does not cut as llama-models does); special-looking text is test_tokenizer_json.py's."""
    hf = tokenizers.Tokenizer.from_file(str(llama3_json_dir / "tokenizer.json"))
    ours = load_tokenizer(llama3_json_dir / "tokenizer.json")
    for name, text in ALL_TEXTS.items():
        if name != "special_looking":
            assert ours.encode(text) == hf.encode(text).ids, name


# ---------------------------------------------------------------------------------------------
# Mistral (SentencePiece)


@pytest.mark.parametrize("name", ALL_TEXTS)
def test_mistral_encode_decode_match_mistral_common(mistral_pair, name):
    ours, reference = mistral_pair
    reference = reference.instruct_tokenizer.tokenizer
    text = ALL_TEXTS[name]
    for bos, eos in ((True, False), (False, False), (True, True)):
        ids = ours.encode(text, bos=bos, eos=eos)
        assert ids == reference.encode(text, bos=bos, eos=eos), (name, bos, eos)
    assert ours.decode(ours.encode(text, bos=True, eos=True)) == text
    assert ours.decode(ids) == reference.decode(ids)


def test_mistral_special_ids_match_mistral_common(mistral_pair):
    ours, reference = mistral_pair
    reference = reference.instruct_tokenizer.tokenizer
    assert isinstance(ours, SentencePieceTokenizer)
    assert (ours.bos_id, ours.eos_id) == (reference.bos_id, reference.eos_id)
    assert ours.stop_ids == {reference.eos_id}
    assert ours.vocab_size == reference.n_words
    assert set(ours.special_tokens.values()) == reference.special_ids


def test_mistral_chat_matches_mistral_common(mistral_pair):
    ours, reference = mistral_pair
    assert ours.chat_format == f"mistral-{reference.instruct_tokenizer.tokenizer.version.value}"
    conversation = [
        (SystemMessage, "system", "Be brief."),
        (SystemMessage, "system", "Answer in English."),
        (UserMessage, "user", "Hi there"),
        (UserMessage, "user", "I have two questions."),
        (AssistantMessage, "assistant", "Hello! Ask away.  "),
        (UserMessage, "user", "2+2? And 日本語 🤗"),
    ]
    request = ChatCompletionRequest(messages=[cls(content=content) for cls, _, content in conversation])
    expected = reference.encode_chat_completion(request).tokens
    messages = [{"role": role, "content": content} for _, role, content in conversation]
    assert ours.format_chat(messages) == expected

    finished = conversation[2:5]  # ends with the assistant's turn, closed by </s>
    finetuning = MistralTokenizer.from_file(str(ours.path), mode=ValidationMode.finetuning)
    request = ChatCompletionRequest(messages=[cls(content=content) for cls, _, content in finished])
    expected = finetuning.encode_chat_completion(request).tokens
    messages = [{"role": role, "content": content} for _, role, content in finished]
    assert ours.format_chat(messages, add_generation_prompt=False) == expected
    with pytest.raises(ValueError, match="last message is the assistant's"):
        ours.format_chat(messages)


def test_mistral_allow_special_encodes_a_rendered_chat_like_mistral_common(mistral_pair):
    """A chat rendered as text (as a Jinja template renders it) and encoded with allow_special
    gives mistral-common's ids: control tokens as such, and no "▁" prefix after them, as
    Hugging Face's conversion of the model encodes (Metaspace's prepend_scheme "first")."""
    ours, reference = mistral_pair
    if "[INST]" not in ours.special_tokens:  # v1: [INST] is text, test_..._tokenizer_json_beside_it
        return
    conversation = [UserMessage(content="Hi there"), AssistantMessage(content="Hello! Ask away."),
                    UserMessage(content="2+2? And 日本語 🤗")]
    expected = reference.encode_chat_completion(ChatCompletionRequest(messages=conversation)).tokens
    rendered = "<s>[INST] Hi there[/INST] Hello! Ask away.</s>[INST] 2+2? And 日本語 🤗[/INST]"
    assert ours.encode(rendered, bos=False, allow_special=True) == expected
    assert ours.encode(rendered, bos=False) == ours.encode(rendered, bos=False, allow_special=False)
    assert ours.special_tokens["[INST]"] not in ours.encode(rendered, bos=False)


def test_sentencepiece_allow_special_follows_the_tokenizer_json_beside_it(tmp_path):
    """Text after a special token gets no "▁" prefix, as transformers' conversion of the model
    encodes, unless a tokenizer.json beside it prepends to every piece (Llama 2's legacy files),
    as Meta's Llama 2 recipe does: `<s>` then the encoded "[INST] ..." text."""
    from transformers import AutoTokenizer

    shutil.copy(MISTRAL_FILES["v1"], tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    rendered = "<s>[INST] Tell me a joke. [/INST] No. </s><s>[INST] Please? [/INST]"
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    expected = hf(rendered, add_special_tokens=False)["input_ids"]
    assert tok.encode(rendered, bos=False, allow_special=True) == expected
    legacy = {"type": "Sequence", "normalizers": [  # Llama 2's tokenizer.json
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"normalizer": legacy}))
    sp = tok._sp
    meta = [1, *sp.encode("[INST] Tell me a joke. [/INST] No. "), 2, 1, *sp.encode("[INST] Please? [/INST]")]
    assert load_tokenizer(tmp_path).encode(rendered, bos=False, allow_special=True) == meta


def test_llama2_chat_follows_metas_recipe():
    """Meta's llama/generation.py chat_completion, written out over SentencePiece's own encoder."""
    tok = load_tokenizer(MISTRAL_FILES["v1"], chat_format="llama2")
    sp = tok._sp

    def encode(text, bos, eos):
        return [sp.bos_id()] * bos + sp.encode(text) + [sp.eos_id()] * eos

    expected = (
        encode("[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHello there [/INST] Hi! How can I help? ", True, True)
        + encode("[INST] Tell me a joke. [/INST]", True, False)
    )
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": " Hi! How can I help?\n"},
        {"role": "user", "content": "Tell me a joke. "},
    ]
    assert tok.format_chat(messages) == expected
    with pytest.raises(ValueError, match="turn 1 is the user's, expected the assistant's"):
        tok.format_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# ---------------------------------------------------------------------------------------------
# Streaming decode


def _streamed(tokenizer, ids):
    decoder = tokenizer.decoder()
    pieces = [decoder.step(i) for i in ids]
    return pieces, pieces + [decoder.flush()]


@pytest.fixture(scope="module", params=["llama3", "mistral-v1", "mistral-v3"])
def any_tokenizer(request):
    if request.param == "llama3":
        return load_tokenizer(LLAMA3_FILE)
    return load_tokenizer(MISTRAL_FILES[request.param.split("-")[1]])


@pytest.mark.parametrize("name", TEXTS)
def test_stream_decoder_emits_only_whole_characters(any_tokenizer, name):
    text = TEXTS[name]
    ids = any_tokenizer.encode(text, bos=True, eos=True)
    pieces, everything = _streamed(any_tokenizer, ids)
    assert "".join(everything) == any_tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces), pieces  # no half characters shown


def test_stream_decoder_holds_back_a_character_split_over_tokens(any_tokenizer):
    ids = any_tokenizer.encode("🤗!", bos=False)
    pieces, _ = _streamed(any_tokenizer, ids)
    assert len(ids) >= 3 and pieces[:-2] == [""] * (len(ids) - 2) and pieces[-2:] == ["🤗", "!"]


def test_stream_decoder_equals_decode_on_random_ids(any_tokenizer):
    """Any id sequence, bytes that never complete a character included: the stream and decode
    agree (SentencePiece and tiktoken replace invalid bytes differently; each is followed)."""
    rng = random.Random(0)
    byte_like = [i for i in range(any_tokenizer.vocab_size)
                 if len(any_tokenizer.decode([i]).encode()) != len(any_tokenizer.decode([i]))][:2000]
    special = sorted(any_tokenizer.special_tokens.values())[:20]
    everything = range(any_tokenizer.vocab_size)
    for _ in range(300):
        pools = rng.choices([byte_like, special, everything], weights=[5, 1, 4], k=rng.randrange(1, 12))
        ids = [rng.choice(pool) for pool in pools]
        assert "".join(_streamed(any_tokenizer, ids)[1]) == any_tokenizer.decode(ids), ids


def test_stream_decoder_equals_decode_on_byte_pieces():
    """SentencePiece's byte pieces in every invalid arrangement: truncated, overlong, surrogate."""
    tok = load_tokenizer(MISTRAL_FILES["v3"])
    byte_id = {b: tok._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    word = tok.encode("word", bos=False)
    rng = random.Random(1)
    sequences = [[0xE4, 0xB8], [0xED, 0xA0, 0x80], [0xC0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xE4, 0x41]]
    edge_bytes = [0x41, 0x80, 0xBF, 0xC2, 0xE4, 0xED, 0xF0, 0xF4, 0xFF]
    sequences += [rng.choices(edge_bytes, k=6) for _ in range(200)]
    for seq in sequences:
        pieces = [byte_id[b] for b in seq]
        for ids in (pieces, pieces + word, word + pieces):
            assert "".join(_streamed(tok, ids)[1]) == tok.decode(ids), seq


# ---------------------------------------------------------------------------------------------
# Finding files, and bad input


def test_tokenizers_say_their_added_tokens_bos_eos_text_and_model_dir(tmp_path, llama3):
    assert llama3.added_tokens == llama3.special_tokens and len(llama3.added_tokens) == 256
    assert (llama3.bos_token, llama3.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    (tmp_path / "original").mkdir()
    shutil.copy(LLAMA3_FILE, tmp_path / "original" / "tokenizer.model")
    assert load_tokenizer(tmp_path).model_dir == tmp_path  # the repository, not original/
    mistral = load_tokenizer(MISTRAL_FILES["v3"])
    assert (mistral.bos_token, mistral.eos_token, mistral.model_dir) == ("<s>", "</s>", MISTRAL_DATA)
    assert mistral.added_tokens == {**mistral.special_tokens, "<unk>": 0}
    assert mistral.encode("<unk>[INST]", bos=False, allow_special=True) == [0, 3]


def test_generation_config_adds_stop_ids(tmp_path):
    shutil.copy(MISTRAL_FILES["v3"], tmp_path / "tokenizer.model")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 4]}')
    assert load_tokenizer(tmp_path).stop_ids == {2, 4}


def test_load_finds_each_kind_in_a_directory_by_content(tmp_path):
    llama3_repo = tmp_path / "llama3"
    (llama3_repo / "original").mkdir(parents=True)
    shutil.copy(LLAMA3_FILE, llama3_repo / "original" / "tokenizer.model")
    assert isinstance(load_tokenizer(llama3_repo), TiktokenTokenizer)

    renamed = tmp_path / "renamed"  # a tiktoken file under the SentencePiece name: sniffed, not named
    renamed.mkdir()
    shutil.copy(LLAMA3_FILE, renamed / "tokenizer.model")
    assert isinstance(load_tokenizer(renamed / "tokenizer.model"), TiktokenTokenizer)

    mistral_repo = tmp_path / "mistral"
    mistral_repo.mkdir()
    shutil.copy(MISTRAL_FILES["v3"], mistral_repo / "tokenizer.model")
    tok = load_tokenizer(str(mistral_repo))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.chat_format == "mistral-v3"  # from its [INST] control token


def test_hub_repo_id_fetches_the_tokenizer_files_only(tmp_path, monkeypatch):
    from ligerzoo.hf import hub

    snapshot = tmp_path / "snapshot"
    (snapshot / "original").mkdir(parents=True)
    shutil.copy(LLAMA3_FILE, snapshot / "original" / "tokenizer.model")
    calls = []

    def fake_resolve(name_or_path, revision=None, *, weights=True, tokenizer=True):
        calls.append((name_or_path, revision, weights, tokenizer))
        return snapshot

    monkeypatch.setattr(hub, "resolve_model_dir", fake_resolve)
    tok = load_tokenizer("meta-llama/Llama-3.2-1B-Instruct", revision="main")
    assert isinstance(tok, TiktokenTokenizer)
    assert calls == [("meta-llama/Llama-3.2-1B-Instruct", "main", False, True)]


def test_revision_applies_only_to_hub_ids(tmp_path):
    shutil.copy(MISTRAL_FILES["v1"], tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="is a local file; revision='v2' applies only to Hub repo ids"):
        load_tokenizer(tmp_path / "tokenizer.model", revision="v2")
    with pytest.raises(ValueError, match="local directory; revision='v2' applies only to Hub repo ids"):
        load_tokenizer(tmp_path, revision="v2")


def test_chat_format_from_tokenizer_config(tmp_path):
    shutil.copy(MISTRAL_FILES["v1"], tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path).chat_format is None  # Llama 2 and Mistral v1 files look alike
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ \'<<SYS>>\\\\n\' }}"}')
    assert load_tokenizer(tmp_path).chat_format == "llama2"
    with pytest.raises(ValueError, match="does not say which chat format.*chat_format="):
        load_tokenizer(MISTRAL_DATA / "mistral_instruct_tokenizer_241114.model.v7").format_chat(
            [{"role": "user", "content": "hi"}]
        )


def test_missing_and_unknown_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file in .*: looked for tokenizer.model"):
        load_tokenizer(tmp_path)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty.model is empty"):
        load_tokenizer(empty)
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\x00\x01binary junk")
    with pytest.raises(TokenizerError, match=r"neither a SentencePiece model, a tiktoken BPE file"):
        load_tokenizer(garbage)
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(MISTRAL_FILES["v1"].read_bytes()[:5000])
    with pytest.raises(TokenizerError, match="truncated.model is not a readable SentencePiece model"):
        load_tokenizer(truncated)
    bad_line = tmp_path / "bad_tiktoken.model"
    bad_line.write_bytes(b"IQ== 0\nIg== 1\nnot base64! 2\n")
    with pytest.raises(TokenizerError, match=r"line 3 is not 'base64-token rank'"):
        load_tokenizer(bad_line)
    gapped = tmp_path / "gapped.model"
    gapped.write_bytes(b"IQ== 0\nIg== 5\n")
    with pytest.raises(TokenizerError, match=r"ranks are not 0\.\.1, each once"):
        load_tokenizer(gapped)


def test_tokenizer_json_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    spec = {"model": {"type": "WordPiece", "vocab": {}}, "pre_tokenizer": {"type": "BertPreTokenizer"}}
    path.write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="not a byte-level BPE .*'WordPiece'.*BertPreTokenizer"):
        load_tokenizer(tmp_path)
    path.write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json is not valid JSON"):
        load_tokenizer(path)


def test_tokenizer_json_with_merges_out_of_id_order_encodes_as_hf(tmp_path, llama3_json_dir):
    spec = json.loads((llama3_json_dir / "tokenizer.json").read_text())
    merges = spec["model"]["merges"]
    merges[0], merges[-1] = merges[-1], merges[0]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    for name, text in TEXTS.items():
        if name != "special_looking":
            assert ours.encode(text) == hf.encode(text).ids, name


def test_bad_arguments_get_clear_errors(llama3):
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        llama3.encode(b"bytes")
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 128256\): \[128256, -1\]"):
        llama3.decode([1, 128_256, -1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llama3.decoder().step(10**6)
    with pytest.raises(ValueError, match=r"messages\[1\] has role 'robot'; llama3 takes system, user"):
        llama3.format_chat([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(TypeError, match=r"messages\[0\] must be a dict with a str 'content'"):
        llama3.format_chat([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="chat_format 'chatml' is not one of"):
        load_tokenizer(LLAMA3_FILE, chat_format="chatml")
    with pytest.raises(ValueError, match="Llama 3's tiktoken BPE; chat_format 'mistral-v3'"):
        load_tokenizer(LLAMA3_FILE, chat_format="mistral-v3")
    with pytest.raises(ValueError, match="SentencePiece model; chat_format 'llama3'"):
        load_tokenizer(MISTRAL_FILES["v1"], chat_format="llama3")


def test_decode_takes_a_tensor(llama3):
    ids = llama3.encode("tensor ids")
    assert llama3.decode(torch.tensor(ids)) == llama3.decode(ids)
