"""experiments/: the evaluation and data pieces against outside oracles (HF transformers' own loss and greedy
generate on the same tiny model), the SFT task generator and its loss mask, and each script end to end at toy size."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, python_module

sys.path.insert(0, str(ROOT / "experiments"))

import common  # noqa: E402
import finetune_sft  # noqa: E402
import gpt2_124m  # noqa: E402
import gpt2_zero_shot as zs  # noqa: E402
import shakespeare_char  # noqa: E402

from aigc_jax import configs, data, model  # noqa: E402
from aigc_jax import tokenizers as tok  # noqa: E402

TINY = configs.ModelConfig(vocab_size=257, n_positions=64, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Random weights perturbed so distributions are peaked, exported as an HF GPT-2 dir with the byte tokenizer."""
    params = model.init_params(TINY, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [np.asarray(x) + rng.normal(0, 0.3, x.shape).astype(np.float32) for x in leaves])
    from aigc_jax.interop import hf

    directory = tmp_path_factory.mktemp("tiny_hf")
    hf.save_hf_dir(directory, TINY, params, tok.byte_level())
    return directory, params


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return torch, transformers.GPT2LMHeadModel.from_pretrained(str(tiny_model[0])).eval()


# ------------------------------------------------------------------------------------------- zero-shot


def hf_sliding_window(torch, hf, ids, max_length, stride):
    """HF's documented perplexity loop (transformers docs, "Perplexity of fixed-length models") with the exact number
    of scored labels: the oracle for total NLL and token count."""
    x = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = x[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target).loss.item()
        n = int((target[:, 1:] != -100).sum())  # HF shifts labels by one inside the model
        nll, count = nll + loss * n, count + n
        prev_end = end
        if end == len(ids):
            break
    return nll, count


@pytest.mark.parametrize("max_length,stride", [(64, 16), (64, 64), (40, 7), (64, 1)])
def test_sliding_window_nll_matches_hf(tiny_model, hf_model, max_length, stride):
    torch, hf = hf_model
    ids = np.random.default_rng(1).integers(0, 256, 203).tolist() if stride > 1 else list(range(90))
    scorer = zs.Scorer(TINY, tiny_model[1], batch_size=4)
    nll, count = zs.sliding_window_nll(scorer, ids, max_length, stride)
    ref_nll, ref_count = hf_sliding_window(torch, hf, ids, max_length, stride)
    assert count == ref_count
    assert nll == pytest.approx(ref_nll, rel=1e-5)


def test_sliding_windows_score_every_token_once():
    for n, L, s in [(203, 64, 16), (203, 64, 64), (50, 64, 16), (1000, 128, 100)]:
        scored = [t for _, e, f in zs.sliding_windows(n, L, s) for t in range(f, e)]
        per_window = [e - b for b, e, _ in zs.sliding_windows(n, L, s)]
        assert len(scored) == len(set(scored)) and max(per_window) <= L
        lost = n - 1 - len(scored)  # token 0 has no context; stride == max_length also loses each window's first
        assert lost == (0 if s < L else -(-n // L) - 1)


def test_last_word_accuracy_matches_hf_greedy(tiny_model, hf_model):
    """Targets equal to HF's greedy continuation are correct; changing any target token makes it wrong, and the
    NLL is HF's loss over the target tokens."""
    torch, hf = hf_model
    rng = np.random.default_rng(2)
    contexts = [rng.integers(0, 256, n).tolist() for n in (5, 17, 30)]
    pairs, expected = [], []
    for ctx in contexts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False, pad_token_id=256,
                              attention_mask=torch.ones(1, len(ctx), dtype=torch.long))
        greedy = out[0, len(ctx):].tolist()
        assert len(greedy) == 3
        wrong_last = greedy[:2] + [(greedy[2] + 1) % 256]
        wrong_first = [(greedy[0] + 1) % 256] + greedy[1:]
        pairs += [(ctx, greedy), (ctx, wrong_last), (ctx, wrong_first), (ctx, greedy[:1])]
        expected += [(True, True), (False, True), (False, False), (True, True)]
    scores = zs.last_word_scores(zs.Scorer(TINY, tiny_model[1], batch_size=4), pairs)
    assert [(s["correct"], s["first_token_correct"]) for s in scores] == expected
    for (ctx, tgt), s in zip(pairs, scores):
        labels = torch.tensor([[-100] * len(ctx) + tgt])
        with torch.no_grad():
            loss = hf(torch.tensor([ctx + tgt]), labels=labels).loss.item()
        assert s["nll"] == pytest.approx(loss * len(tgt), rel=1e-5)


def test_lambada_split_and_aggregates(tiny_model):
    assert zs.split_last_word("He looked at the  dog\n") == ("He looked at the ", " dog")
    scorer = zs.Scorer(TINY, tiny_model[1], batch_size=2)
    passages = ["a b cat", "the quick fox", "to be or not to be", "x y z"]
    out = zs.lambada(scorer, tok.byte_level(), passages)
    # Oracle: greedy decoding from each context, compared with the last word token by token.
    from aigc_jax.decode import GenerationConfig, Generator

    generator, correct, first = Generator(TINY, tiny_model[1]), 0, 0
    for passage in passages:
        context, word = (list(t.encode()) for t in zs.split_last_word(passage))
        (greedy,) = generator.generate([context], GenerationConfig(max_new_tokens=len(word), temperature=0, eos_ids=()))
        correct, first = correct + (greedy == word), first + (greedy[0] == word[0])
    assert out["examples"] == 4
    assert (out["acc"], out["acc_first_token"]) == (100.0 * correct / 4, 100.0 * first / 4)
    pairs = [tuple(list(t.encode()) for t in zs.split_last_word(p)) for p in passages]
    scores = zs.last_word_scores(scorer, pairs)
    assert out["ppl"] == pytest.approx(math.exp(sum(s["nll"] for s in scores) / 4))
    with pytest.raises(Exception, match="last word"):
        zs.split_last_word("single")


def test_word_count_and_detokenizers():
    raw = ' = Valkyria = \n The 1 @,@ 000 km @-@ long road , built in 1 @.@ 5 years ( roughly ) , is " big " . \n'
    assert zs.word_count(raw) == 27
    assert zs.detokenize(raw, "wikitext") == (
        ' = Valkyria =\nThe 1,000 km-long road, built in 1.5 years (roughly), is "big".\n')
    assert zs.detokenize("it 's not the dog 's fault , is n't it \n", "ptb") == "it's not the dog's fault , isn't it\n"


def test_perplexity_word_level_normalisation(tiny_model):
    scorer = zs.Scorer(TINY, tiny_model[1], batch_size=4)
    text = "the cat sat on the mat . " * 8
    out = zs.perplexity(scorer, tok.byte_level(), text, 64, 16, "none")
    assert out["tokens"] == len(text.encode()) and out["words"] == 56  # with <|endoftext|> first, every byte scored
    assert out["word_ppl"] == pytest.approx(math.exp(out["nll"] / 56))
    assert out["token_ppl"] == pytest.approx(math.exp(out["nll"] / out["tokens"]))


def test_zero_shot_script_end_to_end(tiny_model, tmp_path):
    (tmp_path / "wiki.txt").write_text(" = Title = \n Some text , with 3 @,@ 000 words . \n" * 20)
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps({"text": f"passage {i} ends with word"}) + "\n"
                                                    for i in range(5)))
    proc = run_script("gpt2_zero_shot.py", "--model", tiny_model[0], "--wikitext2", tmp_path / "wiki.txt",
                      "--lambada", tmp_path / "lambada.jsonl", "--stride", "32", "--results-dir", tmp_path / "res")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "res" / "summary.json").read_text())["results"]
    assert results["wikitext2"]["published"] == {"word_ppl": 29.41}
    # The script wires the library's sliding-window scorer (checked against HF above) with its defaults: the same
    # number in process, from the file's text with the WikiText detokenizer and an end-of-text first.
    direct = zs.perplexity(zs.Scorer(TINY, tiny_model[1], 8), tok.byte_level(), (tmp_path / "wiki.txt").read_text(),
                           TINY.n_positions, 32, "wikitext", True)
    assert results["wikitext2"]["word_ppl"] == pytest.approx(direct["word_ppl"], rel=1e-6)
    assert results["lambada"]["examples"] == 5
    assert_one_line_error(run_script("gpt2_zero_shot.py", "--model", tiny_model[0], "--ptb", tmp_path / "missing.txt"),
                          "missing.txt")


# ------------------------------------------------------------------------------------------- data pieces


def test_direct_tokens_equal_the_library_loader(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    text = "".join(f"line {i}: some text, naïve café\n" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    tokenizer = tok.char_level(text)
    lib = data.load(str(tmp_path / "corpus.txt"), tokenizer, data_dir=tmp_path / "data")
    direct = common.direct_tokens(str(tmp_path / "corpus.txt"), tokenizer)
    np.testing.assert_array_equal(np.asarray(lib.train), direct.train)
    np.testing.assert_array_equal(np.asarray(lib.validation), direct.validation)
    assert direct.bytes_per_token == pytest.approx(lib.bytes_per_token)


def test_sft_generator_and_loss_mask(tmp_path):
    train, test = finetune_sft.make_split("upper", 300, 50, seed=3)
    assert (train, test) == finetune_sft.make_split("upper", 300, 50, seed=3)
    words = lambda rows: {r["prompt"].split("\n")[0][len("word: "):] for r in rows}
    assert len(words(train)) == 300 and not words(train) & words(test)
    assert finetune_sft.example("reverse", "abc") == {"prompt": "word: abc\nreverse:", "completion": " cba"}
    assert finetune_sft.example("upper", "abc")["completion"] == " ABC"
    table = finetune_sft.cipher_table()
    assert sorted(table.values()) == sorted(table) and finetune_sft.answer("cipher", "ab") == table["a"] + table["b"]
    # Through the library's JSONL loader: the loss covers the completion and <|endoftext|>, never the prompt.
    finetune_sft.write_jsonl(str(tmp_path / "sft.jsonl"), train)
    tokenizer = tok.byte_level()
    examples = data.load(str(tmp_path / "sft.jsonl"), tokenizer, data_dir=tmp_path / "data").train
    batch = data.Batches(examples, 32, 8).batch(0)
    completions = {r["prompt"]: r["completion"] for r in train}
    for tokens, mask in zip(batch["tokens"], batch["loss_mask"]):
        targets = tokens[1:][mask > 0].tolist()
        assert targets[-1] == tokenizer.eot_id
        prompt = tokenizer.decode(tokens[: int(np.argmax(mask > 0)) + 1].tolist())
        assert tokenizer.decode(targets[:-1]) == completions[prompt]


# ------------------------------------------------------------------------------------------- the scripts


def run_script(script, *args, timeout=300):
    """The script as a user runs it: a fresh process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def run_main(module, *args) -> int:
    """The script's main in this process (no second JAX start-up), with its one-line error handling."""
    return common.main_guard(module.main, [str(a) for a in args])


@pytest.mark.parametrize("module", [shakespeare_char, gpt2_124m, zs, finetune_sft])
def test_script_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_help_does_not_load_jax():
    argv, env = python_module("isolated.experiment_help")
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert proc.stdout.strip().endswith("False"), proc.stderr


def test_shakespeare_char_small_run_without_tfds(shakespeare_path, tmp_path, capsys):
    """The GPU machine's path: tensorflow-datasets cannot be imported, so data comes from `direct_tokens`."""
    text = shakespeare_path.read_text()[:60000]
    (tmp_path / "shakespeare.txt").write_text(text)
    args = ["--text-file", tmp_path / "shakespeare.txt", "--variant", "cpu-small", "--steps", "4", "--workdir",
            tmp_path / "run", "--results-dir", tmp_path / "res", "--set", "n_layer=1", "--set", "eval_every=2"]
    argv, env = python_module("isolated.shakespeare_char_without_tfds", *args, env={"JAX_PLATFORMS": "cpu"})
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["published"] == {"val_loss": 1.88} and summary["final_step"] == 4 and summary["shift_windows"]
    assert summary["vocab_size"] == len(set(text)) + 1 and summary["final_val_loss"] < math.log(summary["vocab_size"])
    assert summary["train_tokens"] == int(len(text) * 0.9) + 1  # nanoGPT's split, plus the end-of-text token
    assert [m["step"] for m in common.read_metrics(tmp_path / "run")["eval"]] == [2, 4]
    assert (tmp_path / "res" / "loss.png").stat().st_size > 10_000
    assert run_main(shakespeare_char, "--text-file", tmp_path / "nope.txt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.txt" in err[0]


def test_gpt2_124m_cpu_smoke(tmp_path):
    (tmp_path / "code.txt").write_text((ROOT / "aigc_jax" / "model.py").read_text() * 3)
    # --skip-unreadable reads the files directly (as without tfds), sparing a tfds build.
    data_args = ["--data", tmp_path / "code.txt", "--skip-unreadable"]
    assert run_main(gpt2_124m, "--save-tokenizer", tmp_path / "bpe", "--tokenizer", "bpe:300", *data_args) == 0
    args = ["--recipe", "cpu-smoke", *data_args, "--tokenizer", tmp_path / "bpe", "--steps", "2", "--workdir",
            tmp_path / "run", "--results-dir", tmp_path / "res", "--set", "n_layer=1", "--set", "seq_len=32",
            "--set", "eval_batches=1"]
    assert run_main(gpt2_124m, *args) == 0
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["train"]["grad_accum"] == 4 and summary["tokens_per_step"] == 16 * 32
    assert summary["vocab_size"] == 300 and summary["final_step"] == 2
    with pytest.raises(Exception, match="micro-batch"):
        gpt2_124m.configs_for("smoke", None, 7, [], "cpu")


def test_finetune_sft_demo_from_random_weights(tmp_path):
    args = ["--init-from", "random", "--task", "reverse", "--steps", "2", "--train-examples", "40",
            "--test-examples", "4", "--batch-size", "8", "--workdir", tmp_path / "run",
            "--results-dir", tmp_path / "res", "--set", "n_layer=1"]
    assert run_main(finetune_sft, *args) == 0
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    # The reported outputs are the trained model's own greedy completions, and the score is their exact-match rate.
    from aigc_jax import api

    lm, graded = api.load(str(tmp_path / "run")), summary["examples_after"]
    assert summary["test_examples"] == len(graded) == 4
    assert [e["output"] for e in graded] == lm.generate([e["prompt"] for e in graded], max_new_tokens=12,
                                                         temperature=0)
    assert all(e["correct"] == (e["output"] == e["completion"]) for e in graded)
    assert summary["exact_match_after"] == 100.0 * sum(e["correct"] for e in graded) / 4
