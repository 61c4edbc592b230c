"""`aigc-jax eval --model SRC --data TEXT` against transformers: the same tokens (the model's tokenizer, documents
ending in end-of-text, no BOS) in the same windows (non-overlapping windows of the context, then one window ending
at the text's end for the rest) give HF's mean token NLL, for a tiny GPT-2 and a tiny Llama; bad input is one line."""

import json
import math

import pytest
from helpers.hf_models import build_hf_gpt2, load_hf_model, make_hf, save_random_hf_gpt2, torch_or_skip
from helpers.tokenizer_styles import qwen2_style

from aigc_jax import api, modeldir
from aigc_jax.cli import main as cli_main

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness — naïve café owners counted 3.14159 ducats.\n") * 4


def _eval(capsys, *args):
    assert cli_main(["eval", *map(str, args), "--no-progress"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def hf_windows_nll(m, tokens, T):
    """HF's summed NLL and count over the windows the module docstring of aigc_jax/train/perplexity.py names."""
    torch, _ = torch_or_skip()
    spans = [(i * T, 0) for i in range((len(tokens) - 1) // T)]  # (window start, first position counted)
    tail = (len(tokens) - 1) % T
    if tail:
        spans.append((len(tokens) - T - 1, T - tail))
    nll, count = 0.0, 0
    for start, first in spans:
        window = torch.tensor([tokens[start:start + T + 1]])
        with torch.no_grad():
            logp = torch.log_softmax(m(window[:, :-1]).logits[0].double(), -1)
        picked = logp[torch.arange(T), window[0, 1:]][first:]
        nll, count = nll - float(picked.sum()), count + len(picked)
    return nll, count


def _check(out, m, tokens, T, n_bytes):
    nll, count = hf_windows_nll(m, tokens, T)
    assert out["tokens"] == count == len(tokens) - 1 and out["seq_len"] == T
    assert out["loss"] == pytest.approx(nll / count, rel=2e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert out["bits_per_byte"] == pytest.approx(nll / count / math.log(2) * len(tokens) / n_bytes, rel=2e-5)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_gpt2_loss_equals_hf_in_the_same_windows_for_an_hf_dir_and_a_model_dir(text_file, capsys, tmp_path):
    _, transformers = torch_or_skip()
    path = save_random_hf_gpt2(tmp_path / "gpt2")  # context 48, byte-level tokenizer
    m = load_hf_model(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    tokens = hf_tok(TEXT)["input_ids"] + [hf_tok.eos_token_id]
    assert (len(tokens) - 1) % 48  # the tail window is exercised
    out = _eval(capsys, "--model", path, "--data", text_file)
    _check(out, m, tokens, 48, len(TEXT.encode()))
    lm = api.load(path)  # the same weights as an aigc_jax model dir, in shorter windows and smaller batches
    modeldir.save_model_dir(str(tmp_path / "md"), lm.config, lm.params, lm.tokenizer)
    out = _eval(capsys, "--model", tmp_path / "md", "--data", text_file, "--seq-len", 20, "--batch-size", 3)
    _check(out, m, tokens, 20, len(TEXT.encode()))


def test_llama_loss_equals_hf_and_a_short_text_is_one_window(capsys, tmp_path):
    t = qwen2_style(tmp_path)  # byte-level BPE; its <|endoftext|> ends each document
    m = make_hf(tmp_path, "Llama", vocab_size=len(t), noise=0.3)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(TEXT[:150])
    (docs / "b.txt").write_text(TEXT[150:400])
    tokens = [i for d in (TEXT[:150], TEXT[150:400]) for i in t(d, add_special_tokens=False)["input_ids"]
              + [t.eos_token_id]]
    assert len(tokens) > 64  # more than one window of the context
    n_bytes = len(TEXT[:400].encode())
    _check(_eval(capsys, "--model", tmp_path, "--data", f"{docs}/*.txt"), m, tokens, 64, n_bytes)
    (docs / "short.txt").write_text("Short text.")
    short = t("Short text.", add_special_tokens=False)["input_ids"] + [t.eos_token_id]
    _check(_eval(capsys, "--model", tmp_path, "--data", docs / "short.txt"), m, short, len(short) - 1, 11)


def _error(capsys, *args):
    rc = cli_main(["eval", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    return err[0]


def test_bad_input_is_one_line(text_file, capsys, tmp_path):
    build_hf_gpt2(tmp_path / "untokenized", vocab_size=97)
    capsys.readouterr()  # transformers' save progress bar
    assert "no tokenizer" in _error(capsys, "--model", tmp_path / "untokenized", "--data", text_file)
    model = save_random_hf_gpt2(tmp_path / "gpt2")
    assert "no such file" in _error(capsys, "--model", model, "--data", tmp_path / "missing.txt")
    assert "does not exist" in _error(capsys, "--model", tmp_path / "nope", "--data", text_file)
    assert "not both" in _error(capsys, "--model", model, "--workdir", model)
    assert "--seq-len" in _error(capsys, "--model", model, "--data", text_file, "--seq-len", 49)
    assert "--split" in _error(capsys, "--model", model, "--split", "train")
    (tmp_path / "examples.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    assert "plain text" in _error(capsys, "--model", model, "--data", tmp_path / "examples.jsonl")
