"""Chat templates (ligerzoo/tokenizer/chat_template.py): real templates' shapes, written into a byte
tokenizer's tokenizer_config.json, render as transformers' apply_chat_template renders them."""

import json
import re
from datetime import datetime

import pytest

from ligerzoo.tokenizer import ByteTokenizer
from ligerzoo.tokenizer.chat_template import ChatTemplate, special_token_text

transformers = pytest.importorskip("transformers")
chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")

# Llama 3.2 Instruct's template (meta-llama/Llama-3.2-1B-Instruct): the date from strftime_now
# unless date_string is given, the "Cutting Knowledge Date" system header, tools as tojson(indent=4).
LLAMA3 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Mistral-7B-Instruct-v0.3's template without its tool-calling branches: the system message goes
# before the last user message; a namespace counts turns and raise_exception refuses bad roles.
MISTRAL_V3 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# SmolLM2-Instruct's ChatML: a default system prompt when the conversation has none.
CHATML = """{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>' + '
'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}"""

# Llama-2-7b-chat-hf's: <<SYS>> folded into the first user turn, roles checked by loop.index0.
LLAMA2 = r"""{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"""

# TinyLlama-1.1B-Chat-v1.0's Zephyr format: one block tag a line, so trim_blocks shapes all of it.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# Loop controls: system messages skipped with continue, everything from a "stop" flag on cut with
# break. Indented block tags without "-" (lstrip_blocks strips the indent), and a final newline
# that Jinja drops.
LOOP_CONTROLS = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% if message.get('stop') %}
        {% break %}
    {% endif %}
{{ message['role'] | upper }}: {{ message['content'] }}
{% endfor %}
{{ 'ASSISTANT:' if add_generation_prompt else 'END' }}
"""

# tojson in its forms (Hermes / Qwen-style tool prompts): non-ASCII and HTML characters kept,
# indent, separators, sort_keys; content given as a str or as a list of parts.
TOJSON = r"""{%- if tools %}<tools>{{ tools | tojson }}</tools>
{{ tools | tojson(indent=2, sort_keys=true) }}
{% endif %}
{%- for message in messages %}
<|{{ message['role'] }}|>
    {%- if message['content'] is string %}{{ message['content'] }}
    {%- else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}<{{ part['type'] }}>{% endif %}{% endfor %}
    {%- endif %}
    {%- if message['tool_calls'] is defined %}{{ message['tool_calls'] | tojson(separators=(',', ':')) }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|assistant|>
{%- endif %}"""

# ChatML with the assistant's text marked, as templates written for assistant masks do.
CHATML_GENERATION = """{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' }}
{%- if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}
{%- else %}
{{- message['content'] + '<|im_end|>' }}
{%- endif %}
{{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""

TEMPLATES = {"llama3": LLAMA3, "mistral_v3": MISTRAL_V3, "chatml": CHATML, "llama2": LLAMA2,
             "zephyr": ZEPHYR, "loop_controls": LOOP_CONTROLS, "tojson": TOJSON,
             "chatml_generation": CHATML_GENERATION}

SYSTEM = {"role": "system", "content": "  You are terse. Answer in one line.\n"}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello, who are you?"}],
    "system_user": [SYSTEM, {"role": "user", "content": "What is 2 + 2?"}],
    "multi_turn": [
        SYSTEM,
        {"role": "user", "content": " Name a city in Japan. "},
        {"role": "assistant", "content": "東京 (Tokyo) 🗼\n"},
        {"role": "user", "content": "And one in France?\n\nOnly the name."},
    ],
    "finished": [
        {"role": "user", "content": "Say <b>hi</b> & \"bye\"."},
        {"role": "assistant", "content": "hi & bye"},
    ],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo à <ville> & alentours",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def write_model_dir(directory, template=None, bos_token="<s>", **config):
    """A byte tokenizer's files with `template` as tokenizer_config.json's chat_template."""
    ByteTokenizer().save(directory)
    path = directory / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["bos_token"] = bos_token
    if template is not None:
        data["chat_template"] = template
    data.update(config)
    path.write_text(json.dumps(data))
    return directory


def hf_tokenizer(directory):
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def model_dir(request, tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp(request.param), TEMPLATES[request.param])


@pytest.fixture
def frozen_now(monkeypatch):
    """datetime.now() fixed at 2025-02-03 04:05:06, in both renderers."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2025, 2, 3, 4, 5, 6)

    monkeypatch.setattr("ligerzoo.tokenizer.chat_template.datetime", Frozen)
    monkeypatch.setattr(chat_template_utils, "datetime", Frozen)


def render_both(directory, messages, add_generation_prompt, **kwargs):
    template = ChatTemplate.from_model_dir(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    ours = template.render(messages, add_generation_prompt=add_generation_prompt,
                           bos_token=special_token_text(config["bos_token"]),
                           eos_token=special_token_text(config["eos_token"]), **kwargs)
    theirs = hf_tokenizer(directory).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    return ours, theirs


# --- equal to transformers ----------------------------------------------------------------------
@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["finished", "generation_prompt"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_rendering_equals_transformers_apply_chat_template(model_dir, conversation, add_generation_prompt,
                                                           frozen_now):
    messages = CONVERSATIONS[conversation]
    if model_dir.name.startswith(("mistral_v3", "llama2")) and messages[-1]["role"] == "assistant":
        messages = messages + [{"role": "user", "content": "Again?"}]  # they require user turns to close
    ours, theirs = render_both(model_dir, messages, add_generation_prompt)
    assert ours == theirs
    assert ours.count(messages[-1]["content"].strip()) >= 1  # the conversation is in it


def test_llama3_date_comes_from_strftime_now_unless_date_string_is_given(tmp_path, frozen_now):
    directory = write_model_dir(tmp_path, LLAMA3)
    ours, theirs = render_both(directory, CONVERSATIONS["user"], True)
    assert ours == theirs
    assert "Cutting Knowledge Date: December 2023\nToday Date: 03 Feb 2025\n\n" in ours
    ours, theirs = render_both(directory, CONVERSATIONS["user"], True, date_string="26 Jul 2024")
    assert ours == theirs and "Today Date: 26 Jul 2024\n" in ours


def test_loop_controls_skip_and_stop(tmp_path):
    directory = write_model_dir(tmp_path, LOOP_CONTROLS)
    messages = CONVERSATIONS["multi_turn"][:3] + [{"role": "user", "content": "cut here", "stop": True}]
    ours, theirs = render_both(directory, messages, True)
    assert ours == theirs == "<s>\nUSER:  Name a city in Japan. \nASSISTANT: 東京 (Tokyo) 🗼\n\n" \
                             "ASSISTANT:"


def test_strftime_now_reads_the_clock():
    template = ChatTemplate("{{ strftime_now('%Y-%m-%d %H') }}")
    before = datetime.now().strftime("%Y-%m-%d %H")
    rendered = template.render([{"role": "user", "content": "hi"}])
    assert rendered in (before, datetime.now().strftime("%Y-%m-%d %H"))  # an hour may turn between


def test_tools_render_through_tojson_as_transformers_does(tmp_path, frozen_now):
    for name in ("llama3", "tojson"):
        directory = write_model_dir(tmp_path / name, TEMPLATES[name])
        messages = CONVERSATIONS["multi_turn"][1:]
        if name == "tojson":
            messages = messages + [{"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]}]
        ours, theirs = render_both(directory, messages, True, tools=TOOLS)
        assert ours == theirs
        assert "Météo à <ville> & alentours" in ours  # not \u00e9, not \u003c
    assert '"arguments":{"city":"Zürich"}' in ours  # separators=(',', ':')


def test_variables_the_template_sees_are_those_transformers_gives(tmp_path):
    directory = write_model_dir(tmp_path, "{{ tools is none }} {{ documents is none }} "
                                          "{{ custom is defined }} {{ bos_token }}{{ eos_token }}"
                                          "{{ pad_token is defined }} {{ add_generation_prompt }} "
                                          "{{ messages | length }}")
    ours, theirs = render_both(directory, CONVERSATIONS["user"], False)
    assert ours == theirs == "True True False <s></s>False False 1"
    documents = [{"title": "Doc", "text": "Body"}]
    ours, theirs = render_both(directory, CONVERSATIONS["user"], True, documents=documents, custom=1)
    assert ours == theirs == "True False True <s></s>False True 1"


def test_content_as_a_list_of_parts(tmp_path):
    directory = write_model_dir(tmp_path, TOJSON)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
    ours, theirs = render_both(directory, messages, False)
    assert ours == theirs == "<|user|><image>What is this?<|assistant|>A cat."  # trim_blocks ate the \n


def test_chatml_gives_its_default_system_prompt_only_without_a_system_message(tmp_path):
    directory = write_model_dir(tmp_path, CHATML)
    default = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
               "<|im_end|>\n")
    assert ChatTemplate.from_model_dir(directory).render(CONVERSATIONS["user"]).startswith(default)
    assert default not in ChatTemplate.from_model_dir(directory).render(CONVERSATIONS["system_user"])


def test_generation_spans_equal_transformers_assistant_indices():
    template = ChatTemplate(CHATML_GENERATION)
    messages = CONVERSATIONS["multi_turn"][1:] + [{"role": "assistant", "content": "Paris"}]
    text, spans = template.render_with_spans(messages)
    rendered, indices = chat_template_utils.render_jinja_template(
        [messages], chat_template=CHATML_GENERATION, return_assistant_tokens_mask=True)
    assert text == rendered[0] == template.render(messages)
    assert spans == indices[0]
    assert [text[start:end] for start, end in spans] == ["東京 (Tokyo) 🗼\n<|im_end|>", "Paris<|im_end|>"]
    assert ChatTemplate(CHATML).render_with_spans(messages) == (ChatTemplate(CHATML).render(messages), [])


# --- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mistral_v3", "llama2"])
def test_template_that_refuses_bad_role_order_raises_value_error_with_its_message(tmp_path, name):
    directory = write_model_dir(tmp_path, TEMPLATES[name])
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception) as hf_error:
        hf_tokenizer(directory).apply_chat_template(messages, tokenize=False)
    message = str(hf_error.value)
    assert "roles must alternate user/assistant/user/assistant/..." in message
    with pytest.raises(ValueError) as error:
        ChatTemplate.from_model_dir(directory).render(messages, bos_token="<s>", eos_token="</s>")
    assert message in str(error.value)
    assert "tokenizer_config.json" in str(error.value)


def test_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "chat_template.jinja"
    path.write_text("{{ bos_token }}\n{% for m in messages %}\n{{ m['content'] ) }}\n{% endfor %}\n")
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"\({where}\) is not valid Jinja: line 3: unexpected '\)'"):
        ChatTemplate.from_model_dir(tmp_path)


def test_error_while_rendering_names_the_template_line():
    template = ChatTemplate("{% for m in messages %}\n{{ m['content'] + 1 }}\n{% endfor %}")
    with pytest.raises(ValueError, match=r"\(given as a string, line 2\) failed on these messages: "
                                         r"TypeError: can only concatenate str"):
        template.render([{"role": "user", "content": "hi"}])


def test_template_cannot_mutate_its_inputs_or_reach_python_internals():
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="SecurityError"):
        ChatTemplate("{{ messages.append(1) }}").render(messages)
    with pytest.raises(ValueError, match="SecurityError"):
        ChatTemplate("{% set ns = namespace() %}{% set ns.__class__ = 1 %}").render(messages)
    with pytest.raises(ValueError, match="SecurityError"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_messages_must_be_a_nonempty_list_of_dicts():
    template = ChatTemplate(CHATML)
    with pytest.raises(TypeError, match="list of dicts, got str"):
        template.render("hello")
    with pytest.raises(TypeError, match=r"messages\[1\] must be a dict"):
        template.render([{"role": "user", "content": "a"}, "b"])
    with pytest.raises(ValueError, match="empty"):
        template.render([])


# --- where the template is found ----------------------------------------------------------------
def test_chat_template_jinja_comes_before_tokenizer_config(tmp_path):
    directory = write_model_dir(tmp_path, CHATML)
    (directory / "chat_template.jinja").write_text(ZEPHYR)
    template = ChatTemplate.from_model_dir(directory)
    assert template.text == ZEPHYR == hf_tokenizer(directory).chat_template
    assert template.source == directory / "chat_template.jinja"


def test_named_templates_in_tokenizer_config_give_the_default(tmp_path):
    directory = write_model_dir(tmp_path, [{"name": "tool_use", "template": TOJSON},
                                           {"name": "default", "template": CHATML}])
    template = ChatTemplate.from_model_dir(directory)
    assert template.text == CHATML == hf_tokenizer(directory).get_chat_template()
    assert template.source == directory / "tokenizer_config.json"


def test_named_templates_without_a_default_are_refused(tmp_path):
    directory = write_model_dir(tmp_path, [{"name": "tool_use", "template": TOJSON}])
    with pytest.raises(ValueError, match=r"names templates \['tool_use'\] but none \"default\""):
        ChatTemplate.from_model_dir(directory)


def test_chat_template_json_is_read_last(tmp_path):
    directory = write_model_dir(tmp_path)
    assert ChatTemplate.from_model_dir(directory) is None
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": LLAMA2}))
    assert ChatTemplate.from_model_dir(directory) == ChatTemplate(LLAMA2, directory / "chat_template.json")
    (directory / "chat_template.json").write_text(json.dumps({"template": LLAMA2}))
    with pytest.raises(ValueError, match="holds no \"chat_template\" string"):
        ChatTemplate.from_model_dir(directory)


def test_no_template_in_an_empty_directory(tmp_path):
    assert ChatTemplate.from_model_dir(tmp_path) is None


def test_a_template_is_compiled_once():
    from ligerzoo.tokenizer.chat_template import _compile

    text = CHATML + "{# compiled once #}"
    before = _compile.cache_info().misses
    for _ in range(3):
        ChatTemplate(text).render(CONVERSATIONS["user"])
    assert _compile.cache_info().misses == before + 1


# --- special tokens -----------------------------------------------------------------------------
def test_special_token_text_of_a_string_or_an_added_token_dict(tmp_path):
    added = {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
             "rstrip": False, "single_word": False, "special": True}
    assert special_token_text("<s>") == "<s>"
    assert special_token_text(added) == "<|begin_of_text|>"
    assert special_token_text(None) is None
    with pytest.raises(ValueError, match="a string or a dict"):
        special_token_text(42)
    directory = write_model_dir(tmp_path, LLAMA2, bos_token={**added, "content": "<s>"})
    ours, theirs = render_both(directory, CONVERSATIONS["system_user"], False)
    assert ours == theirs and ours.startswith("<s>[INST] <<SYS>>\n")


def test_message_keys_set_to_none_are_dropped_before_rendering():
    """As transformers 5.25 does (5.17 passed them on: the templates then saw `tool_calls` defined)."""
    template = ChatTemplate("{% for m in messages %}{{ m.role }}:{{ 'tool_calls' in m }};{% endfor %}")
    messages = [{"role": "assistant", "content": "hi", "tool_calls": None}]
    assert template.render(messages) == "assistant:False;"
