"""Chat templates render exactly as HF's apply_chat_template (three template styles), and bad input is one line."""

import pytest

from aigc_jax import chat
from aigc_jax.errors import UserError
from helpers.text import LLAMA3, MISTRAL, QWEN2

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief. «Ünïcode» & <tags>"}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "  And 3+3?  "}],
]


def hf_tokenizer(template: str):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import models

    hf = tokenizers.Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", chat_template=template)


@pytest.mark.parametrize("template", [LLAMA3, QWEN2, MISTRAL], ids=["llama3", "qwen2", "mistral"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_apply_chat_template(template, conversation, add_generation_prompt):
    tokenizer = hf_tokenizer(template)
    messages = CONVERSATIONS[conversation]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = chat.render(template, messages, add_generation_prompt=add_generation_prompt,
                      special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    assert got == expected


def test_tools_render_as_hf():
    tokenizer = hf_tokenizer(QWEN2)
    tools = [{"type": "function", "function": {"name": "add", "description": "Adds «two» numbers",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "int"}}}}}]
    messages = CONVERSATIONS[0]
    expected = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert chat.render(QWEN2, messages, tools=tools) == expected


def test_template_errors_are_one_line_user_errors(tmp_path):
    bad_roles = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(UserError, match="roles must alternate"):
        chat.render(MISTRAL, bad_roles, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(UserError, match="does not parse"):
        chat.render("{% for m in messages %}", CONVERSATIONS[0])
    for messages, needle in [([], "non-empty list"), ("hi", "non-empty list"), ([{"role": "bot", "content": "x"}], "role"),
                             ([{"role": "user", "content": 3}], "string 'content'"), ([["user", "x"]], "object")]:
        with pytest.raises(UserError, match=needle):
            chat.render(QWEN2, messages)
    # The sandbox refuses what a hostile template on the Hub might try.
    with pytest.raises(UserError):
        chat.render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", CONVERSATIONS[0])


def test_templates_load_from_hf_directories(tmp_path):
    import json

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN2}))
    assert chat.load_template(str(tmp_path / "a")) == QWEN2
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": MISTRAL}]}))
    assert chat.load_template(str(tmp_path / "b")) == MISTRAL
    chat.save_template(str(tmp_path / "b"), LLAMA3)  # the .jinja file wins, as in transformers
    assert chat.load_template(str(tmp_path / "b")) == LLAMA3
    (tmp_path / "c").mkdir()
    assert chat.load_template(str(tmp_path / "c")) is None
