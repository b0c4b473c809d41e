"""Mistral's tekken.json (ligerzoo/tokenizer/tekken.py) against mistral-common's Tekkenizer: the
files mistral-common ships, and one built here that lists its own special tokens."""

import json
import random
import shutil
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from ligerzoo.tokenizer import TekkenTokenizer, TokenizerError, load_tokenizer

MISTRAL_DATA = Path(mistral_common.__file__).parent / "data"
FILES = sorted(MISTRAL_DATA.glob("tekken_*.json"))
TEXTS = [
    "", " ", "Hello, world! The quick brown fox.", "日本語のテキストと中文字符，还有한국어 문장도 있습니다。",
    "👩\u200d👩\u200d👧\u200d👦 family, 🤗🚀🏳️\u200d🌈 flags 🇫🇷 skin 👍🏽",
    "naïve café Ωmega ǅ ﬁ e\u0301 Ångström",
    'def f(x):\n    return {"a": [1, 2, 3]}  # comment\n\tif x != 0:\n\t\tprint(x ** 2)\n',
    "  lead and trail  \n\n\n\t\r\n mixed\u00a0nbsp\u2003em\u3000ideographic \x1c ",
    "3.14159 1234567890 -42e-10", "<s>[INST] looks special [/INST]</s> <unk> [TOOL_CALLS]",
    "a" * 30_000, "中文" * 10_000, "🙂" * 5_000,
]


@pytest.fixture(scope="module", params=[path.name for path in FILES])
def pair(request):
    """(ours, mistral-common's Tekkenizer) for one shipped tekken file."""
    path = MISTRAL_DATA / request.param
    return load_tokenizer(path), Tekkenizer.from_file(path)


def test_mistral_common_ships_tekken_files():
    assert len(FILES) >= 1


def test_encode_decode_match_mistral_common(pair):
    ours, reference = pair
    assert isinstance(ours, TekkenTokenizer)
    for text in TEXTS:
        for bos, eos in ((True, False), (False, False), (True, True)):
            ids = ours.encode(text, bos=bos, eos=eos)
            assert ids == reference.encode(text, bos=bos, eos=eos), (text[:40], bos, eos)
        assert ours.decode(ids) == reference.decode(ids) == text


def test_special_ids_match_mistral_common(pair):
    ours, reference = pair
    assert (ours.bos_id, ours.eos_id) == (reference.bos_id, reference.eos_id)
    assert (ours.bos_token, ours.eos_token, ours.vocab_size) == ("<s>", "</s>", reference.n_words)
    assert set(ours.special_tokens.values()) == reference.special_ids == set(range(ours._num_special))
    assert ours.special_tokens["[INST]"] == reference.get_special_token("[INST]")
    assert ours.special_tokens["<SPECIAL_20>"] == 20  # the fillers mistral-common names
    assert ours.stop_ids == {reference.eos_id} and ours.added_tokens == ours.special_tokens
    assert ours.model_dir == MISTRAL_DATA


def test_stream_decoder_equals_decode_on_random_ids(pair):
    """Special ids among split characters: mistral-common decodes the bytes between two special
    tokens on their own (a character cut by one becomes U+FFFD), and so does the stream."""
    ours, reference = pair
    rng = random.Random(0)
    special = range(25)
    byte_like = range(ours._num_special, ours._num_special + 256)
    pools = [special, byte_like, range(ours.vocab_size)]
    for _ in range(500):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 15))]
        decoder = ours.decoder()
        streamed = "".join(decoder.step(i) for i in ids) + decoder.flush()
        assert streamed == ours.decode(ids) == reference.decode(ids), ids
    decoder = ours.decoder()
    ids = ours.encode("🤗!", bos=False)
    assert [decoder.step(i) for i in ids] == [""] * (len(ids) - 2) + ["🤗", "!"]


CONVERSATION = [
    (SystemMessage, "system", "Be brief."),
    (UserMessage, "user", "Hi there"),
    (UserMessage, "user", "I have two questions."),
    (AssistantMessage, "assistant", "Hello! Ask away."),
    (UserMessage, "user", "2+2? And 日本語 🤗"),
]


def test_chat_matches_mistral_common(pair):
    ours, _ = pair
    reference = MistralTokenizer.from_file(str(ours.path))
    request = ChatCompletionRequest(messages=[cls(content=content) for cls, _, content in CONVERSATION])
    expected = reference.encode_chat_completion(request).tokens
    assert ours.chat_format == "mistral-v3"
    messages = [{"role": role, "content": content} for _, role, content in CONVERSATION]
    assert ours.format_chat(messages) == expected
    # the rendered text, encoded with its special tokens read as such (how a chat template is encoded)
    tekken = reference.instruct_tokenizer.tokenizer
    text = tekken.decode(expected, special_token_policy=SpecialTokenPolicy.KEEP)
    assert text.startswith("<s>[INST]") and ours.encode(text, bos=False, allow_special=True) == expected
    assert ours.encode(text, bos=False)[:3] == ours.encode("<s>[", bos=False)  # plain text otherwise


def test_whitespace_run_too_long_for_tiktoken_encodes_as_mistral_common(pair):
    """Such a run is split with Python's re instead of tiktoken's regex engine, identically."""
    ours, reference = pair
    text = "x" + " " * 150_000 + "y\n" + "\n" * 120_000 + "z \t" * 10
    assert ours.encode(text) == reference.encode(text, bos=True, eos=False)


@pytest.fixture
def listed_specials(tmp_path) -> Path:
    """A newer tekken file: its special tokens listed, more of them than named, a smaller vocabulary."""
    spec = json.loads(FILES[-1].read_text())
    names = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[THINK]"]
    spec["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(names)]
    spec["config"].update(version="v11", default_num_special_tokens=100, default_vocab_size=60_000)
    spec.pop("image", None)
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(spec))
    return path


def test_listed_special_tokens_and_vocabulary_size_are_read(listed_specials):
    ours, reference = load_tokenizer(listed_specials), Tekkenizer.from_file(listed_specials)
    assert ours.vocab_size == reference.n_words == 60_000
    assert ours.special_tokens["[THINK]"] == 7 and ours.special_tokens["<SPECIAL_99>"] == 99
    assert ours.chat_format is None  # v7 and later: no hand-written format
    for text in TEXTS:
        assert ours.encode(text, bos=True, eos=True) == reference.encode(text, bos=True, eos=True), text[:40]
    ids = ours.encode("[THINK]hmm[/THINK]", bos=False, allow_special=True)
    assert ids[0] == 7 and ours.decode(ids) == reference.decode(ids) == "hmm[/THINK]"


def test_newer_file_without_its_special_tokens_is_refused(listed_specials):
    spec = json.loads(listed_specials.read_text())
    del spec["special_tokens"]
    listed_specials.write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=r"tekken.json \(tekken v11\) does not list its special tokens"):
        load_tokenizer(listed_specials)


def test_tekken_json_is_read_before_a_tokenizer_json_beside_it(tmp_path):
    shutil.copy(FILES[0], tmp_path / "tekken.json")
    (tmp_path / "tokenizer.json").write_text("{}")
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, TekkenTokenizer) and tokenizer.path == tmp_path / "tekken.json"
    with pytest.raises(ValueError, match="is Mistral's tekken tokenizer; chat_format 'llama3' is for other"):
        load_tokenizer(tmp_path, chat_format="llama3")
