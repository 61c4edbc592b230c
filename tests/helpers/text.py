"""Texts shared by the tokenizer and chat tests: a training corpus, the GPT-2 pre-tokenizer's corner cases, random
texts from awkward pieces, and three chat templates written in the manner of each family's published one."""

import random

EOT = "<|endoftext|>"


CORPUS = [
    "Once upon a time, there was a tokenizer. It's small; isn't it? We'll see, they'd say, I'M sure.\n\n",
    "    indented code:\n\tif x:\n\t\treturn y  # trailing   \r\n",
    "Unicode: café naïve Ünïcödé 日本語のテキスト 🙂🚀👨‍👩‍👧 ﬁ Ⅻ 𝔘𝔫𝔦 e\u0301 \u00a0nbsp\u2028",
    "Numbers 12345 and 3.14159, punctuation!?... (brackets) [more] {braces} <tags> $5 100%",
] * 20



# Cover the GPT-2 pre-tokenizer's corner cases: whitespace runs before words and at the end, contractions,
# digits, multi-byte characters split across tokens, and the separator inside, around and doubled.
TEXTS = [
    "",
    "Once upon a time",
    " leading space",
    "  two leading spaces",
    "runs   of    spaces\n\n\nand newlines\t\ttabs\r\n",
    "trailing spaces   ",
    "\n",
    "   \n  \n",
    "it's don't we'll they'd I'M YOU'RE she’s",
    "emoji 🙂🚀 family 👨‍👩‍👧 and 日本語 and café / cafe\u0301",
    "doc one.<|endoftext|>doc two",
    f"{EOT}starts with the separator",
    f"ends with it{EOT}",
    f"x  {EOT}  y",
    f"{EOT}{EOT}",
    "<|endoftext| almost <|endoftext",
    "numbers 1234567890 3.14 -42",
    "\x00 control \x7f chars \u200b zero width",
]


PIECES = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "a", "Z", "the", " the", "'s", "'S", "'ll", "’s", "123", "4",
          "é", "e\u0301", "日本", "🙂", "👨‍👩‍👧", EOT, "<|endoftext", "|>", ".", "!?", "\u00a0", "𝔘", "ﬁ"]


def random_texts(n, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14))) for _ in range(n)]


# Three template styles, written here in the manner of each family's published template.
LLAMA3 = (
    "{{- bos_token }}{% set date_string = strftime_now('%d %b %Y') %}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system }}{{- '<|eot_id|>' }}"
    "{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


QWEN2 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}"
    "{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- set ns = namespace(turn=0) %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}{%- set ns.turn = ns.turn + 1 %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
