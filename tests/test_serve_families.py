"""Serving Llama-, Qwen2- and Mistral-style models is what offline generation and transformers give: the same
prompt ids (BOS on text prompts, the chat template with the tokenizer's own special tokens and `tools`), the same
stop ids (generation_config.json's EOS list), the same text (a SentencePiece continuation keeps its leading
space; streamed pieces add up to the final text), fresh seeds for unseeded sampling, and fine-tuning examples that
begin as `generate`'s prompts do.

Each model is a tiny random HF model built with transformers whose lm_head makes an end-of-turn id from the EOS
list likely, so greedy replies end on it, as an Instruct model's do.
"""

import json

import numpy as np
import pytest
from conftest import run_cli
from openai import OpenAI
from serve_util import ServerProcess
from helpers.hf_models import make_hf, transformers_or_skip
from helpers.tokenizer_styles import llama3_style, qwen2_style, sentencepiece_style

from aigc_jax import api
from aigc_jax import tokenizers as tok
from aigc_jax.prompts import Prompter

PROMPTS = ["Hello", "The quick brown fox", "def main():"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
MAX_TOKENS = 12


# (tokenizer builder, HF class, the end-of-turn token made likely, extra config)
STYLES = {
    "llama3": (llama3_style, "Llama", "<|eot_id|>", {}),
    "qwen2": (qwen2_style, "Qwen2", "<|im_end|>", {}),
    "mistral": (sentencepiece_style, "Mistral", "</s>", {"sliding_window": None}),
}


def _hf_greedy(m, ids, eos, max_new_tokens=MAX_TOKENS):
    import torch

    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, eos_token_id=list(eos), pad_token_id=eos[0], do_sample=False)
    return out[0, len(ids):].tolist()


def _build(directory, name):
    """An HF directory of `name`'s style whose end-of-turn logit is raised along the direction of a token greedy
    decoding picks early, so replies end on an EOS-list id that the tokenizer's own eos_token is not (Llama 3)."""
    import torch

    build_tokenizer, kind, end_token, extra = STYLES[name]
    build_tokenizer(directory)
    t = transformers_or_skip().AutoTokenizer.from_pretrained(str(directory))  # as a user loads the directory
    eos = json.loads((directory / "generation_config.json").read_text())["eos_token_id"] if (
        directory / "generation_config.json").exists() else [t.eos_token_id]
    eos = eos if isinstance(eos, list) else [eos]
    m = make_hf(directory, kind, seed=3, noise=0.3, vocab_size=len(t), num_key_value_heads=2,
                max_position_embeddings=512, bos_token_id=t.bos_token_id, eos_token_id=eos, **extra)
    end = t.convert_tokens_to_ids(end_token)
    first = _hf_greedy(m, t(PROMPTS[0])["input_ids"], eos)
    with torch.no_grad():
        m.lm_head.weight[end] = m.lm_head.weight[first[2]] * 1.3
    m.save_pretrained(str(directory))
    return m, t, eos, end


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """The three model directories and one `aigc-jax serve` per directory, started together."""
    transformers_or_skip()
    built, servers = {}, {}
    for name in STYLES:
        directory = tmp_path_factory.mktemp(name)
        built[name] = (directory, *_build(directory, name))
    logs = tmp_path_factory.mktemp("logs")
    try:
        for name, (directory, *_) in built.items():
            servers[name] = ServerProcess(directory, "--no-warmup", "--max-batch", "4", "--max-prefill", "2",
                                          log=logs / f"{name}.log")
        for server in servers.values():
            server.wait_ready()
        yield {name: (*built[name], servers[name], OpenAI(base_url=servers[name].url + "/v1", api_key="x",
                                                           max_retries=0, timeout=300)) for name in STYLES}
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def lms(families):
    return {name: api.load(str(families[name][0])) for name in STYLES}


def _oracle_text(t, prompt, new, eos):
    """transformers' text of a continuation, as its text-generation pipeline cuts it: decode(prompt + new) less
    decode(prompt) (the EOS is not text)."""
    new = new[:-1] if new and new[-1] in eos else new
    return t.decode(prompt + new)[len(t.decode(prompt)):]


@pytest.mark.parametrize("name", list(STYLES))
def test_text_completions_equal_transformers_generate(families, lms, name):
    directory, m, t, eos, end, server, client = families[name]
    r = client.completions.create(model=directory.name, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    stops = 0
    for choice, text in zip(r.choices, PROMPTS):
        ids = t(text)["input_ids"]  # BOS included where the tokenizer adds one
        new = _hf_greedy(m, ids, eos)
        assert choice.text == _oracle_text(t, ids, new, eos) == lms[name].generate(text, max_new_tokens=MAX_TOKENS,
                                                                                     temperature=0)
        assert choice.finish_reason == ("stop" if new[-1] in eos else "length")
        stops += new[-1] in eos
    assert stops >= 1  # the EOS list was exercised: some reply ends on it before max_tokens
    assert r.usage.prompt_tokens == sum(len(t(p)["input_ids"]) for p in PROMPTS)
    assert r.usage.completion_tokens == sum(len(_hf_greedy(m, t(p)["input_ids"], eos)) for p in PROMPTS)


@pytest.mark.parametrize("name", list(STYLES))
def test_chat_equals_apply_chat_template_and_generate(families, lms, name):
    directory, m, t, eos, end, server, client = families[name]
    ids = list(t.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    new = _hf_greedy(m, ids, eos)
    r = client.chat.completions.create(model=directory.name, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(new)
    assert r.choices[0].message.content == _oracle_text(t, ids, new, eos)
    assert r.choices[0].finish_reason == ("stop" if new[-1] in eos else "length")
    assert lms[name].chat_prompt(CHAT) == ids
    assert lms[name].chat(CHAT, max_new_tokens=MAX_TOKENS, temperature=0) == r.choices[0].message.content
    streamed = client.chat.completions.create(model=directory.name, messages=CHAT, max_tokens=MAX_TOKENS,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content


def test_generate_chat_cli_keeps_the_leading_space_and_takes_a_template_file(families, tmp_path):
    directory, m, t, eos, end, server, client = families["mistral"]
    proc = run_cli("generate", "--model", directory, "--user", CHAT[0]["content"], "--max-new-tokens",
                   str(MAX_TOKENS), "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    ids = list(t.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert row["token_ids"] == _hf_greedy(m, ids, eos)
    assert row["text"] == _oracle_text(t, ids, row["token_ids"], eos)
    # Another template from a file, as `serve --chat-template`: the prompt apply_chat_template renders with it.
    template = "{{ bos_token }}{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}<<assistant>>"
    (tmp_path / "chat.jinja").write_text(template)
    proc = run_cli("generate", "--model", directory, "--user", CHAT[0]["content"], "--chat-template",
                   tmp_path / "chat.jinja", "--max-new-tokens", "4", "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    ids = list(t.apply_chat_template(CHAT, chat_template=template, add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"])
    assert json.loads(proc.stdout)["token_ids"] == _hf_greedy(m, ids, eos, 4)


def test_tools_render_as_transformers_renders_them(families):
    directory, m, t, eos, end, server, client = families["qwen2"]
    ids = list(t.apply_chat_template(CHAT, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"])
    assert len(ids) > len(t.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]) + 20  # the tools are in it
    r = client.chat.completions.create(model=directory.name, messages=CHAT, tools=TOOLS, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == _oracle_text(t, ids, _hf_greedy(m, ids, eos, 4), eos)
    import openai

    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model=directory.name, messages=CHAT, tools=TOOLS, max_tokens=4,
                                       tool_choice="required")


def test_leading_space_and_stop_strings_that_begin_with_one(families, lms):
    directory, m, t, eos, end, server, client = families["mistral"]
    spaced = 0
    for text in PROMPTS:
        ids = t(text)["input_ids"]
        new = _hf_greedy(m, ids, eos)
        expected = _oracle_text(t, ids, new, eos)
        r = client.completions.create(model=directory.name, prompt=text, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == expected
        if t.convert_ids_to_tokens(new[0]).startswith("▁"):
            spaced += 1
            assert expected.startswith(" ") and r.choices[0].text.startswith(" ")
        word = expected.find(" ", 1)
        if word > 0:  # a stop string that begins with a space ends the text just before it
            stop = expected[word: word + 3]
            cut = client.completions.create(model=directory.name, prompt=text, max_tokens=MAX_TOKENS, temperature=0,
                                            stop=[stop])
            assert cut.choices[0].text == expected[: expected.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert spaced >= 1


def test_unseeded_sampling_is_fresh_and_seeded_sampling_is_offline_rows(families, lms):
    directory, m, t, eos, end, server, client = families["llama3"]
    kw = dict(model=directory.name, max_tokens=8, temperature=1.0)
    runs = [client.completions.create(prompt=PROMPTS[1], **kw) for _ in range(3)]
    assert len({r.choices[0].text for r in runs}) == 3
    seeds = [r.seed for r in runs]
    assert len(set(seeds)) == 3 and all(isinstance(s, int) for s in seeds)
    twins = client.completions.create(prompt=[PROMPTS[1], PROMPTS[1]], **kw)
    assert twins.choices[0].text != twins.choices[1].text  # identical prompts of one request draw apart
    again = client.completions.create(prompt=PROMPTS[1], seed=seeds[0], **kw)
    assert again.choices[0].text == runs[0].choices[0].text and again.seed == seeds[0]
    # Prompts x n choices sample what offline generate samples for each prompt repeated n times.
    r = client.completions.create(prompt=PROMPTS[:2], n=2, seed=7, **kw)
    offline = lms["llama3"].generate([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, max_new_tokens=8, temperature=1.0, seed=7)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == offline
    greedy = client.completions.create(model=directory.name, prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert greedy.seed is None


def _fuzz_ids(rng, vocab, byte_ids, n):
    """Id sequences rich in byte-fallback / partial-UTF-8 runs: where incremental decoding goes wrong."""
    byte_ids = np.asarray(sorted(byte_ids)) if byte_ids else None
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 24))
        ids = rng.integers(0, vocab, k)
        if byte_ids is not None:
            ids = np.where(rng.random(k) < 0.6, rng.choice(byte_ids, k), ids)
        out.append(ids.tolist())
    return out


@pytest.mark.parametrize("name", list(STYLES))
def test_streamed_pieces_add_up_to_the_final_text(tmp_path, name):
    """For 1,500 fuzzed id sequences per tokenizer style, fed in chunks of random size after a prompt: the
    streamed pieces equal the final text, which equals the continuation decoded whole."""
    transformers_or_skip()
    STYLES[name][0](tmp_path)
    prompts = Prompter(tok.load(tmp_path))
    rng = np.random.default_rng(0)
    vocab = prompts.tokenizer.vocab_size
    prompt = prompts.encode("Hello wörld")
    checked = 0
    for ids in _fuzz_ids(rng, vocab, prompts.unstable_ids, 1500):
        stream = prompts.text_stream(prompt)
        pieces, at = [], 0
        while at < len(ids):
            step = int(rng.integers(1, 4))
            pieces.append(stream.add(ids[at: at + step]))
            at += step
        pieces.append(stream.finish())
        assert "".join(pieces) == stream.text == prompts.continuation(prompt, ids), ids
        checked += 1
    assert checked == 1500


def test_prompt_completion_examples_start_as_generate_prompts_do(tmp_path):
    """A fine-tuning example's prompt ids are the ids `generate` feeds for the same prompt text (BOS first)."""
    transformers_or_skip()
    from aigc_jax.data import corpus

    llama3_style(tmp_path / "tok")
    tokenizer = tok.load(tmp_path / "tok")
    rows = [{"prompt": f"Question {i}: what is {i}+{i}?", "completion": f" {2 * i}"} for i in range(8)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = corpus.load(str(tmp_path / "data.jsonl"), tokenizer, tmp_path / "cache")
    prompts = Prompter(tokenizer)
    seen = 0
    for split in (data.train, data.validation):
        for i in range(len(split)):
            example = split[i].tolist()
            prompt = example[: split.prompt_lens[i]]
            text = tokenizer.decode(prompt[1:])
            assert prompt == prompts.encode(text) and prompt[0] == tokenizer.bos_id
            assert example[-1] == tokenizer.eot_id
            seen += 1
    assert seen == len(rows)
