"""format_chat against transformers' apply_chat_template as token ids: real templates' shapes on
tokenizer.json files of each style (trained in tests/test_tokenizer_json.py), the rendered text
encoded with its special tokens read as specials, as transformers encodes it."""

import json

import pytest
from transformers import AutoTokenizer

from ligerzoo.tokenizer import load_tokenizer
from test_chat_template import CHATML, CONVERSATIONS, LLAMA2, LLAMA3, MISTRAL_V3, ZEPHYR
from test_tokenizer_json import STYLES

# (tokenizer style, template, bos, eos): each template on a tokenizer whose specials it uses.
CASES = {
    "chatml_gpt2": ("gpt2", CHATML, None, "<|im_end|>"),
    "llama3_split": ("llama3", LLAMA3, "<|im_start|>", "<|endoftext|>"),
    "zephyr_smollm2": ("smollm2", ZEPHYR, "<|endoftext|>", "<|endoftext|>"),
    "llama2_sentencepiece": ("sentencepiece_legacy", LLAMA2, "<s>", "</s>"),
    "mistral_v3_metaspace": ("sentencepiece_metaspace", MISTRAL_V3, "<s>", "</s>"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model_dir(request, tmp_path_factory):
    style, template, bos, eos = CASES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    (directory / "tokenizer.json").write_text(json.dumps(STYLES[style](), ensure_ascii=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": eos,
              "clean_up_tokenization_spaces": False}
    if bos is not None:
        config["bos_token"] = bos
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("name, add_generation_prompt", [("user", True), ("system_user", True),
                                                         ("multi_turn", True), ("finished", False)])
def test_format_chat_ids_equal_apply_chat_template(model_dir, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    theirs = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    ours = load_tokenizer(model_dir).format_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ours == list(theirs)
