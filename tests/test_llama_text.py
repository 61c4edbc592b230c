"""The Llama family's text side against transformers: its tokenizers (SentencePiece-converted as Llama 2 /
Mistral, byte-level BPE as Qwen2 and Llama 3), chat templates tokenized as apply_chat_template, `generate --chat`
and `lm.chat` equal to HF generate on the same conversation (stopping at any EOS id), and fine-tuning: one AdamW
step on imported weights equals transformers + torch.optim.AdamW, and `train --init-from` an HF Llama dir."""

import json

import numpy as np
import pytest
import tokenizers
from conftest import assert_one_line_error, run_cli
from helpers.hf_models import make_hf, transformers_or_skip
from helpers.text import CORPUS, TEXTS, random_texts
from helpers.tokenizer_styles import llama3_style, qwen2_style, sentencepiece_file_style, sentencepiece_style

from aigc_jax import api
from aigc_jax import tokenizers as tok
from aigc_jax.interop import hf

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
STYLES = {"sentencepiece": sentencepiece_style, "qwen2": qwen2_style, "llama3": llama3_style,
          "sentencepiece-v4-file": sentencepiece_file_style,
          "sentencepiece-v4-file-nonlegacy": lambda d: sentencepiece_file_style(d, legacy=False)}


@pytest.fixture(scope="module", params=list(STYLES))
def style(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, STYLES[request.param](directory)


def test_tokenizers_encode_and_decode_as_transformers(style):
    name, directory, oracle = style
    transformers = transformers_or_skip()
    oracle = transformers.AutoTokenizer.from_pretrained(str(directory))  # as a user loads the directory
    ours = tok.load(directory)
    assert ours.vocab_size == len(oracle)
    assert ours.eot_id == oracle.eos_token_id and ours.bos_id == oracle.bos_token_id
    assert ours.special_tokens["eos_token"] == oracle.eos_token
    texts = [t for t in TEXTS + random_texts(200) if t]
    for text in texts:
        with_specials = oracle.encode(text)
        assert ours.encode(text, add_special_tokens=True) == with_specials, repr(text)
        assert ours.encode(text) == oracle.encode(text, add_special_tokens=False), repr(text)
        assert ours.decode(with_specials) == oracle.decode(with_specials), repr(text)
        assert ours.decode(with_specials, skip_special_tokens=True) == oracle.decode(with_specials,
                                                                                     skip_special_tokens=True)
    assert (ours.encode("Hi", add_special_tokens=True)[0] == oracle.bos_token_id) == (name != "qwen2")


def test_tokenizer_save_load_keeps_specials_eos_ids_and_template(style, tmp_path):
    _, directory, _ = style
    original = tok.load(directory)
    original.save(tmp_path)
    restored = tok.load(tmp_path)
    assert (restored.special_tokens, restored.eos_ids, restored.chat_template) == (
        original.special_tokens, original.eos_ids, original.chat_template)
    assert restored.encode_batch(TEXTS, True) == original.encode_batch(TEXTS, True)


def test_chat_prompt_ids_equal_apply_chat_template(style):
    name, directory, oracle = style
    transformers = transformers_or_skip()
    oracle = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = tok.load(directory)
    for messages in (CONVERSATION[1:2], CONVERSATION if not name.startswith("sentencepiece") else CONVERSATION[1:]):
        expected = oracle.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        text = ours.render_chat(messages)
        assert text == oracle.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.encode(text) == list(expected)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny LlamaForCausalLM with the Llama 3 style tokenizer (two EOS ids) and chat template beside it."""
    directory = tmp_path_factory.mktemp("chat_model")
    t = llama3_style(directory)
    eos = t.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])  # save_pretrained rewrites generation_config
    m = make_hf(directory, "Llama", seed=2, noise=0.3, vocab_size=len(t), num_key_value_heads=2,
                max_position_embeddings=128, bos_token_id=t.bos_token_id, eos_token_id=eos)
    return directory, m, t


def test_lm_chat_and_generate_chat_equal_hf_generate(chat_model, tmp_path):
    directory, m, t = chat_model
    lm = api.load(str(directory))
    assert lm.tokenizer.eos_ids == tuple(t.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"]))
    prompt = t.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert lm.chat_prompt(CONVERSATION) == prompt
    # Stop at either EOS id, as the model's generation_config.json says.
    from helpers.hf_models import hf_generate

    ref = hf_generate(m, [prompt], 24, list(lm.tokenizer.eos_ids), do_sample=False)[0].tolist()
    reply_ids = lm.generate_ids(prompt, max_new_tokens=24, temperature=0)
    assert reply_ids == ref[: len(reply_ids)]
    assert lm.chat(CONVERSATION, max_new_tokens=24, temperature=0) == lm.decode(lm.strip_eos(reply_ids,
                                                                                            lm.tokenizer.eos_ids))
    # The CLI: repeated --system/--user/--assistant, and the same messages as JSON lines.
    flags = sum(([f"--{m['role']}", m["content"]] for m in CONVERSATION), [])
    messages = tmp_path / "messages.jsonl"
    messages.write_text("\n".join(json.dumps(m) for m in CONVERSATION) + "\n")
    for args in (flags, ["--messages", str(messages)]):
        proc = run_cli("generate", "--model", directory, "--chat", *args, "--max-new-tokens", "24", "--temperature",
                       "0", "--json")
        assert proc.returncode == 0, proc.stderr
        row = json.loads(proc.stdout)
        assert row["messages"] == CONVERSATION and row["token_ids"] == reply_ids
    proc = run_cli("generate", "--model", directory, "--chat", "--prompt", "hi")
    assert_one_line_error(proc, "--chat", "--prompt")


def test_chat_errors_are_one_line(chat_model, tmp_path, capsys):
    from helpers.cli import generate_error

    directory, _, _ = chat_model
    (tmp_path / "bad.jsonl").write_text('{"role": "user", "content": "hi"}\nnot json\n')
    bad = str(tmp_path / "bad.jsonl")
    assert "line 2 is not JSON" in generate_error(capsys, "--model", str(directory), "--messages", bad)
    assert "role" in generate_error(capsys, "--model", str(directory), "--messages", str(_write(tmp_path, [{"role": "x"}])))
    assert "needs a conversation" in generate_error(capsys, "--model", str(directory), "--chat")


def _write(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_export_writes_tokenizer_eos_ids_and_template_transformers_loads(chat_model, tmp_path):
    transformers = transformers_or_skip()
    directory, m, _ = chat_model
    config, params, tokenizer = hf.load_hf_dir(directory)
    hf.save_hf_dir(tmp_path, config, params, tokenizer)
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    original = transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in TEXTS:
        assert exported.encode(text) == original.encode(text), repr(text)
    assert exported.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    assert list(generation.eos_token_id) == list(tokenizer.eos_ids)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 20))
    import torch

    with torch.no_grad():
        theirs, original_logits = (x(torch.tensor(tokens)).logits.numpy() for x in (reloaded, m))
    np.testing.assert_array_equal(theirs, original_logits)


def test_model_dir_keeps_config_weights_tokenizer_and_template(chat_model, tmp_path, capsys):
    from flax import traverse_util
    from helpers.cli import cli_in_process

    from aigc_jax import modeldir

    directory, _, _ = chat_model
    proc = cli_in_process(capsys, "convert", "--from-hf", directory, "--out", tmp_path / "ours")
    assert proc.returncode == 0, proc.stderr
    config, params, tokenizer = hf.load_hf_dir(directory)
    got_config, got_params, got_tokenizer = modeldir.load_any(str(tmp_path / "ours"))
    assert got_config == config and got_config.family == "llama"
    flat = lambda p: traverse_util.flatten_dict(p, sep="/")
    for k, v in flat(params).items():
        np.testing.assert_array_equal(flat(got_params)[k], v, err_msg=k)
    assert (got_tokenizer.eos_ids, got_tokenizer.chat_template, got_tokenizer.special_tokens) == (
        tokenizer.eos_ids, tokenizer.chat_template, tokenizer.special_tokens)
    assert got_tokenizer.render_chat(CONVERSATION) == tokenizer.render_chat(CONVERSATION)


# ------------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("kind,kwargs", [("Qwen2", dict(num_key_value_heads=2)),
                                         ("Llama", dict(num_key_value_heads=1, tie_word_embeddings=True))])
def test_one_adamw_step_on_imported_weights_equals_torch(kind, kwargs, tmp_path):
    """Our step (clipping active, decay on matrices only) = transformers + clip_grad_norm_ + torch AdamW."""
    from helpers.train_step import our_step, torch_adamw_step

    from aigc_jax.train.config import TrainConfig

    m = make_hf(tmp_path, kind, seed=3, **kwargs)
    config, params, _ = hf.load_hf_dir(tmp_path)
    tokens = np.random.default_rng(0).integers(0, 101, (4, 17), dtype=np.int32)
    tc = TrainConfig(steps=10, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0,
                     weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=0.5)
    loss, norm, grads, expected = torch_adamw_step(m, tokens, tc)
    assert norm > tc.grad_clip
    got, metrics = our_step(config, params, tokens, tc)
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    assert got.keys() == {k for k in expected if not (config.tie_word_embeddings and k == "lm_head.weight")}
    noise = 0
    for key, value in got.items():
        # Adam's first step is ~lr·sign(g): a gradient at rounding-noise level (the key bias, whose true gradient
        # is 0 since softmax ignores q·b; a rare weight with |g| ~ 1e-7) becomes a ±lr step either way.
        g = grads[key]
        exact = (np.abs(g) > 1e-6) | (g == 0) if not key.endswith("k_proj.bias") else np.zeros(g.shape, bool)
        noise += int((~exact).sum()) if not key.endswith("k_proj.bias") else 0
        np.testing.assert_array_less(np.abs(value - expected[key])[~exact], 2 * tc.lr)
        np.testing.assert_allclose(value[exact], expected[key][exact], rtol=1e-5, atol=1e-6, err_msg=key)
    assert noise < 0.01 * sum(v.size for v in got.values()), noise  # the exact check covers the rest


def test_train_init_from_hf_llama_dir_and_export(chat_model, tmp_path):
    """Fine-tune an HF Llama dir with its own tokenizer through the CLI, then export it back to HF."""
    directory, _, t = chat_model
    text = tmp_path / "text.txt"
    text.write_text("".join(CORPUS) * 3)
    proc = run_cli("train", "--init-from", directory, "--data", text, "--data-dir", tmp_path / "data", "--workdir",
                   tmp_path / "run", "--steps", "12", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3",
                   "--warmup-steps", "0", "--eval-every", "0", "--no-progress", "--log-every", "1",
                   "--set", "remat=full", "--sample-every", "12")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0], losses
    # The samples logged at the end are what `generate` gives the trained model for an empty prompt (its BOS),
    # with the same knobs and seed, decoded the same way.
    samples = [r for r in records if r["kind"] == "sample"]
    assert len(samples) == 2
    lm = api.load(str(tmp_path / "run"))
    assert lm.encode("") == [t.bos_token_id]
    for r in samples:
        assert r["text"] == lm.generate("", max_new_tokens=112, temperature=0.8, top_k=40,
                                        seed=12 + r["index"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model"]["family"] == "llama" and run["model"]["n_kv_head"] == 2
    # Runtime keys: the one set (remat), the source's for the rest (no dropout, not the default preset's 0.2).
    assert (run["model"]["remat"], run["model"]["dropout"]) == ("full", 0.0)
    proc = run_cli("convert", "--to-hf", tmp_path / "run", "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    transformers = transformers_or_skip()
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert exported.encode(TEXTS[1]) == t.encode(TEXTS[1])
    assert type(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))).__name__ == "LlamaForCausalLM"
