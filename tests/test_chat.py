"""Chat templates: same text as transformers' apply_chat_template, one BOS, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_llama.chat import apply_chat_template, render_chat_template, render_fallback, validate_messages
from mlx_llama.errors import MlxLlamaError
from mlx_llama.tokenizer import load_tokenizer

try:
    import tok_fixtures as F
except ImportError:  # tests/ imported as a package
    from tests import tok_fixtures as F

CONVERSATIONS = F.conversations()



def _reference(folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


# ------------------------------------------------------------------------------------------
# Same text as transformers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name,messages", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_llama3_style_template_matches_transformers(llama3_dir, name, messages, add_generation_prompt):
    ours = load_tokenizer(llama3_dir)
    ref = _reference(llama3_dir)
    expected = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == expected
    assert text.startswith("<|begin_of_text|><|start_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") == add_generation_prompt

    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ref_ids = ref.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ids == list(ref_ids)
    assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name,messages", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_llama2_style_template_matches_transformers(llama2_dir, name, messages, add_generation_prompt):
    ours = load_tokenizer(llama2_dir)
    ref = _reference(llama2_dir)
    expected = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == expected
    assert text.startswith("<s>[INST] ")

    # The template writes <s> and the tokenizer adds BOS: the ids must still start with one BOS.
    # (Llama 2's format repeats <s> before every later [INST], so count only the start.)
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id
    user_turns = sum(m["role"] == "user" for m in messages)
    assert ids.count(ours.bos_token_id) == user_turns
    assert ids == ours.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name,messages", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_smollm2_gguf_template_matches_transformers(smol_dir, name, messages, add_generation_prompt):
    ref = F.smollm2_reference_tokenizer()
    template = F.smollm2_gguf_chat_template()
    ours = load_tokenizer(smol_dir)
    expected = ref.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert render_chat_template(
        template, messages, add_generation_prompt=add_generation_prompt, special_tokens=ours.special_tokens
    ) == expected
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ref_ids = ref.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ids == list(ref_ids)


FEATURE_TEMPLATE = """\
{%- set ns = namespace(count=0, system='') %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% set ns.system = message.content %}{% continue %}{% endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- if ns.count > 3 %}{% break %}{% endif %}
<{{ message.role }}>{{ message.content | tojson }}</{{ message.role }}>
    {% if message.role == 'assistant' %}{% generation %}[done]{% endgeneration %}{% endif %}
{%- endfor %}
{%- if tools is not none %}TOOLS {{ tools | tojson(indent=2) }}{% endif %}
sys={{ ns.system | tojson }} bos={{ bos_token }} eos={{ eos_token }} extra={{ custom | default('none') }}
{%- if add_generation_prompt %}
<assistant>
{%- endif %}
"""


@pytest.mark.parametrize("tools", [None, [{"name": "search", "parameters": {"q": "<string> & 'more'"}}]])
def test_template_features_match_transformers(llama3_dir, tools):
    """namespace, loop controls, {% generation %}, tojson (no HTML escaping), tools, extra vars."""
    ours = load_tokenizer(llama3_dir)
    ref = _reference(llama3_dir)
    messages = CONVERSATIONS[2][1] + [{"role": "assistant", "content": "<b>bold</b> & 'quoted' 한국어"}]
    kwargs = {"custom": "value"}
    expected = ref.apply_chat_template(
        messages, chat_template=FEATURE_TEMPLATE, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
    )
    got = ours.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, tools=tools, **kwargs)
    assert got == expected
    assert "\\u" not in got and "&amp;" not in got


def test_strftime_now_and_special_token_variables():
    text = render_chat_template(
        "{{ strftime_now('%Y') }}|{{ bos_token }}|{{ pad_token }}|{{ messages | length }}",
        [{"role": "user", "content": "hi"}],
        special_tokens={"bos_token": "<s>", "pad_token": "<pad>"},
    )
    year, bos, pad, count = text.split("|")
    assert len(year) == 4 and year.isdigit()
    assert (bos, pad, count) == ("<s>", "<pad>", "1")


# ------------------------------------------------------------------------------------------
# Models without a template
# ------------------------------------------------------------------------------------------


def test_fallback_without_template(llama2_dir, tmp_path):
    single = [{"role": "user", "content": "Once upon a time"}]
    assert render_fallback(single) == "Once upon a time"
    chat = CONVERSATIONS[2][1]
    assert render_fallback(chat) == (
        "System: Answer in Korean: 한국어.\n\nUser: What is 2 + 2?\n\nAssistant: 4 😀\n\n"
        "User:   And 3 + 3?  \n\nAssistant:"
    )
    assert render_fallback(chat, add_generation_prompt=False).endswith("User:   And 3 + 3?  ")
    assert apply_chat_template(None, single) == "Once upon a time"

    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((llama2_dir / "tokenizer.model").read_bytes())
    tok = load_tokenizer(folder)
    assert tok.chat_template is None
    assert tok.apply_chat_template(single) == "Once upon a time"
    ids = tok.apply_chat_template(chat, tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


# ------------------------------------------------------------------------------------------
# Errors users can cause
# ------------------------------------------------------------------------------------------

BAD_MESSAGES = {
    "not-a-list": "hello",
    "dict-not-list": {"role": "user", "content": "hi"},
    "empty": [],
    "not-a-dict": ["hello"],
    "no-role": [{"content": "hi"}],
    "empty-role": [{"role": "", "content": "hi"}],
    "no-content": [{"role": "user"}],
    "none-content": [{"role": "user", "content": None}],
    "int-content": [{"role": "user", "content": 3}],
    "list-content": [{"role": "user", "content": [{"type": "image", "url": "x"}]}],
    "second-bad": [{"role": "user", "content": "hi"}, {"role": 1, "content": "x"}],
}


@pytest.mark.parametrize("key", list(BAD_MESSAGES))
def test_malformed_messages_raise_one_line_error(llama3_dir, key):
    tok = load_tokenizer(llama3_dir)
    for call in (
        lambda: validate_messages(BAD_MESSAGES[key]),
        lambda: tok.apply_chat_template(BAD_MESSAGES[key]),
        lambda: render_fallback(BAD_MESSAGES[key]),
    ):
        with pytest.raises(MlxLlamaError) as excinfo:
            call()
        message = str(excinfo.value)
        assert "\n" not in message and "role" in message and "content" in message


def test_validation_copies_and_drops_none_keys():
    original = [{"role": "user", "content": "hi", "name": None, "extra": 1}]
    clean = validate_messages(original)
    assert clean == [{"role": "user", "content": "hi", "extra": 1}]
    clean[0]["content"] = "changed"
    assert original[0]["content"] == "hi"


def test_template_raise_exception_becomes_mlx_llama_error(llama2_dir):
    tok = load_tokenizer(llama2_dir)
    bad_order = [{"role": "assistant", "content": "first"}, {"role": "user", "content": "second"}]
    with pytest.raises(MlxLlamaError) as excinfo:
        tok.apply_chat_template(bad_order)
    assert "alternate" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_invalid_template_syntax(tmp_path):
    folder = F.write_llama3_folder(tmp_path / "m", tokenizer_config={"chat_template": "{% for m in messages %}"})
    tok = load_tokenizer(folder)
    with pytest.raises(MlxLlamaError) as excinfo:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "chat template" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_template_sandbox_blocks_python_internals():
    for template in (
        "{{ messages.__class__.__mro__ }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ messages.append(1) }}",
    ):
        with pytest.raises(MlxLlamaError):
            render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_chat_template_json_file(tmp_path):
    folder = F.write_llama3_folder(tmp_path / "m")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "X{{ messages[0].content }}"}))
    assert load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "y"}]) == "Xy"


@pytest.mark.parametrize("folder", ["llama3_dir", "llama2_dir"])
def test_continue_final_message_matches_transformers(request, folder):
    """The last (assistant) message is left open for the model to continue, not closed."""
    path = request.getfixturevalue(folder)
    ours, ref = load_tokenizer(path), _reference(path)
    messages = [{"role": "user", "content": "Write a poem"},
                {"role": "assistant", "content": "Roses are "}]
    text = ours.apply_chat_template(messages, add_generation_prompt=False,
                                    continue_final_message=True)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=False,
                                           continue_final_message=True, tokenize=False)
    assert text.rstrip().endswith("Roses are")
    closed = ours.apply_chat_template(messages, add_generation_prompt=False)
    assert closed.startswith(text) and len(closed) > len(text)
    with pytest.raises(MlxLlamaError, match="only one"):
        ours.apply_chat_template(messages, continue_final_message=True)
    assert apply_chat_template(None, messages, add_generation_prompt=False,
                               continue_final_message=True).endswith("Assistant: Roses are ")
    # Short texts were found inside the closing tag ("|" in "<|eot_id|>") and the cut left
    # part of it in the prompt; an empty one was refused (transformers leaves the turn open).
    for final in ("|", "<", ">", "end", "m", "\n", "", "Sure, ", "  spaced  "):
        messages[-1]["content"] = final
        text = ours.apply_chat_template(messages, add_generation_prompt=False,
                                        continue_final_message=True)
        assert text == ref.apply_chat_template(messages, add_generation_prompt=False,
                                               continue_final_message=True, tokenize=False), final


def test_a_python_error_inside_a_template_is_one_line():
    template = ("{% for m in messages %}{% if m.tool_calls %}"
                "{{ m.content + m.tool_calls[0].function.name }}{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": 5}}]}]
    with pytest.raises(MlxLlamaError) as excinfo:
        render_chat_template(template, messages)
    message = str(excinfo.value)
    assert "TypeError" in message and "tool_calls" in message and "\n" not in message


def test_text_content_parts_are_joined_as_the_server_joins_them():
    parts = [{"type": "text", "text": "Translate:"}, {"type": "text", "text": "bonjour"}]
    assert validate_messages([{"role": "user", "content": parts}])[0]["content"] == \
        "Translate:\nbonjour"
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(MlxLlamaError, match="image_url"):
        validate_messages([{"role": "user", "content": image}])


def test_a_tool_result_may_be_a_json_object_as_in_transformers(llama3_dir):
    # Llama 3.1's template: a tool message's mapping content is written with tojson.
    template = ("{% for m in messages %}<{{ m.role }}>"
                "{% if m.role in ['tool', 'ipython'] and m.content is mapping %}{{ m.content | tojson }}"
                "{% else %}{{ m.content }}{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"type": "function",
                                 "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": {"temperature": 21, "sky": "clear"}}]
    got = load_tokenizer(llama3_dir).apply_chat_template(messages, chat_template=template)
    expected = _reference(llama3_dir).apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    assert got == expected
    assert '<tool>{"temperature": 21, "sky": "clear"}' in got
    with pytest.raises(MlxLlamaError, match="dict"):  # a user's text must still be text
        validate_messages([{"role": "user", "content": {"text": "hi"}}])
