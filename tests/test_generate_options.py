"""HF generate's habits offline, against transformers where it has an answer: repetition_penalty (greedy and beam),
num_return_sequences (beam order, distinct samples), per-token log-probabilities (teacher-forced HF logits), stop
strings (text cut, decoding stopped), the model's generation_config.json as the defaults (HF's reading of it, and
HF's greedy `generate()` without one), no seed reported for greedy or beam results, and the CLI flags."""

import json
import shutil

import numpy as np
import pytest
from helpers.hf_models import build_hf_gpt2, hf_generate, load_hf_model, save_random_hf_gpt2, torch_or_skip

from aigc_jax import api, completions, modeldir
from aigc_jax.cli import main as cli_main
from aigc_jax.decode import GenerationConfig, Generator, trim
from aigc_jax.interop import hf as hf_interop

N = 12
EOS = (96,)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_gpt2_options")
    m = build_hf_gpt2(path, vocab_size=97)
    config, params, _ = hf_interop.load_hf_dir(path)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 96, n).tolist() for n in (5, 11, 2)]
    return m, Generator(config, params), prompts


def _ours(gen, prompts, **kwargs):
    return gen.decode_padded(prompts, GenerationConfig(max_new_tokens=N, eos_ids=EOS, **kwargs))


def test_repetition_penalty_equals_hf_greedy_and_beam(hf_model):
    m, gen, prompts = hf_model
    plain = _ours(gen, prompts).tokens
    for kwargs in (dict(repetition_penalty=1.5), dict(repetition_penalty=0.8), dict(repetition_penalty=1.5,
                                                                                      num_beams=3)):
        ref = hf_generate(m, prompts, N, list(EOS), do_sample=False, **kwargs)
        got = _ours(gen, prompts, **kwargs).tokens
        np.testing.assert_array_equal(got, ref, err_msg=str(kwargs))
        if "num_beams" not in kwargs:
            assert not np.array_equal(got, plain), kwargs  # the penalty changed the answer: equality is evidence


def test_num_return_sequences_beam_order_equals_hf(hf_model):
    m, gen, prompts = hf_model
    kwargs = dict(num_beams=3, num_return_sequences=3, length_penalty=0.8)
    ref = hf_generate(m, prompts, N, list(EOS), do_sample=False, **kwargs)
    out = _ours(gen, prompts, **kwargs)
    assert out.tokens.shape == (9, N)
    np.testing.assert_array_equal(out.tokens, ref)
    assert all(len({r.tobytes() for r in out.tokens[p * 3:p * 3 + 3]}) == 3 for p in range(3))
    assert (np.diff(out.scores.reshape(3, 3), axis=1) <= 0).all()  # best first


def test_num_return_sequences_samples_differ_and_are_hfs_expanded_rows(hf_model):
    _, gen, prompts = hf_model
    knobs = dict(temperature=1.2, top_k=40, min_p=0.02, repetition_penalty=1.1, seed=5)
    rows = _ours(gen, prompts, num_return_sequences=3, **knobs).tokens
    assert rows.shape == (9, N)
    for p in range(3):
        assert len({r.tobytes() for r in rows[p * 3:p * 3 + 3]}) == 3, p
    # HF expands prompt p to rows p*n .. p*n+n-1; each row samples with its own key, as a batch of those prompts.
    expanded = [p for p in prompts for _ in range(3)]
    np.testing.assert_array_equal(_ours(gen, expanded, **knobs).tokens, rows)
    np.testing.assert_array_equal(_ours(gen, prompts, num_return_sequences=3, **knobs).tokens, rows)


def _teacher_forced_logprobs(m, prompt, ids):
    """log-softmax of HF's logits at each generated position, read at the generated id."""
    torch, _ = torch_or_skip()
    with torch.no_grad():
        logits = m(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.double(), -1)[torch.arange(len(ids)), torch.tensor(ids)].numpy()


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3, num_return_sequences=2),
                                    dict(temperature=0.7, top_k=20, repetition_penalty=1.3, seed=2)],
                         ids=["greedy", "beam", "sample"])
def test_logprobs_are_the_models_raw_log_softmax(hf_model, kwargs):
    """Before temperature, penalty or filtering (as the server's logprobs), for whichever ids were chosen."""
    m, gen, prompts = hf_model
    g = GenerationConfig(max_new_tokens=N, eos_ids=EOS, logprobs=True, **kwargs)
    out = gen.decode_padded(prompts, g)
    n = g.num_return_sequences
    for i, (row, lp) in enumerate(zip(out.tokens, out.logprobs)):
        ids = trim(row, EOS)
        np.testing.assert_allclose(lp[: len(ids)], _teacher_forced_logprobs(m, prompts[i // n], ids), atol=2e-4)
        assert (lp[len(ids):] == 0).all() and (lp[: len(ids)] < 0).all()


# ---------------------------------------------------------------------------------------- text: stop strings, API


@pytest.fixture(scope="module")
def text_dirs(tmp_path_factory):
    """An HF GPT-2 dir without sampling settings (do_sample false: HF decodes greedily), and a copy whose
    generation_config.json samples as Llama 3 Instruct's does."""
    root = tmp_path_factory.mktemp("text_options")
    greedy = save_random_hf_gpt2(root / "greedy")
    (root / "greedy" / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 256}))
    shutil.copytree(greedy, root / "sampled")
    (root / "sampled" / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 256}))
    return {"greedy": greedy, "sampled": str(root / "sampled")}


@pytest.fixture(scope="module")
def lm(text_dirs):
    return api.load(text_dirs["greedy"])


def test_without_sampling_settings_generate_is_hfs_default_greedy(text_dirs, lm):
    torch, _ = torch_or_skip()
    m = load_hf_model(text_dirs["greedy"])
    ids = lm.encode("Once upon a time")
    with torch.no_grad():
        ref = m.generate(torch.tensor([ids]), max_new_tokens=N, pad_token_id=256)[0, len(ids):].tolist()
    assert lm.generate_ids(ids, max_new_tokens=N) == ref
    assert lm.config_for().strategy_kind == "greedy" and lm.last_seed is None


def test_generation_config_json_sets_the_defaults_as_hf_reads_it(text_dirs, tmp_path):
    _, transformers = torch_or_skip()
    lm = api.load(text_dirs["sampled"])
    gen = lm.config_for(seed=1)
    assert gen == GenerationConfig(temperature=0.6, top_p=0.9, top_k=50, eos_ids=(256,), seed=1)
    hf_cfg = transformers.GenerationConfig.from_pretrained(text_dirs["sampled"])
    hf_top_k = hf_cfg.top_k if hf_cfg.top_k is not None else hf_cfg._get_default_generation_params()["top_k"]
    assert (hf_cfg.do_sample, hf_cfg.temperature, hf_cfg.top_p, hf_top_k) == (True, gen.temperature, gen.top_p,
                                                                              gen.top_k)
    # Explicit arguments win; beam search drops the sampling defaults (it does not sample).
    assert lm.config_for(temperature=0).strategy_kind == "greedy"
    assert lm.config_for(top_p=0.5).temperature == 0.6
    beams = lm.config_for(num_beams=2)
    assert (beams.strategy_kind, beams.top_k, beams.top_p, beams.seed) == ("beam", 0, 1.0, None)
    # A conversion to a model dir keeps them.
    modeldir.save_model_dir(str(tmp_path / "md"), lm.config, lm.params, lm.tokenizer)
    assert api.load(str(tmp_path / "md")).generation_defaults == lm.generation_defaults


def test_stop_strings_cut_the_text_and_stop_decoding(lm, monkeypatch):
    prompt = lm.encode("Once upon a time")
    full = lm.generate_ids(prompt, max_new_tokens=30, eos_ids=())
    text = lm.decode(full)
    # Two characters first seen well into the text: the cut and the stop must come late, not by chance early.
    at = next(i for i in range(6, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text.index(text[i:i + 2]) == i)
    stop = text[at:at + 2]
    k = next(k for k in range(len(full) + 1) if stop in lm.decode(full[:k]))
    ran = []
    chunks = lm.generator._chunks

    def spy(*args):
        for state, n, rows in chunks(*args):
            ran.append(n)
            yield state, n, rows

    monkeypatch.setattr(completions, "STOP_CHECK_EVERY", 4)
    monkeypatch.setattr(lm.generator, "_chunks", spy)
    ids, logprobs = lm.generate_ids(prompt, max_new_tokens=30, eos_ids=(), stop_strings=[stop], logprobs=True)
    assert ids == full[:k] and len(logprobs) == k
    assert ran[-1] < 30 and ran[-1] >= k  # decoding stopped at the check after the stop string
    expected = text[: text.index(stop)]
    assert lm.generate(prompt, max_new_tokens=30, eos_ids=(), stop_strings=stop) == expected
    assert "".join(lm.stream(prompt, chunk=3, max_new_tokens=30, eos_ids=(), stop_strings=[stop])) == expected


def _cli_json(capsys, *args):
    assert cli_main(["generate", *args, "--json"]) == 0
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines()], out.err


def test_cli_flags_equal_the_api_and_only_samples_report_a_seed(text_dirs, lm, capsys):
    base = ["--model", text_dirs["greedy"], "--prompt", "Hello", "--prompt", "Once upon", "--max-new-tokens", "10"]
    for extra in ([], ["--num-beams", "2"]):
        rows, err = _cli_json(capsys, *base, *extra)
        assert all("seed" not in r for r in rows) and "seed" not in err, extra
    rows, _ = _cli_json(capsys, *base, "--temperature", "0.8", "--top-k", "20", "--min-p", "0.05",
                        "--repetition-penalty", "1.2", "--num-return-sequences", "2", "--seed", "3", "--logprobs",
                        "--stop", "e")
    gen = lm.config_for(max_new_tokens=10, temperature=0.8, top_k=20, min_p=0.05, repetition_penalty=1.2,
                        num_return_sequences=2, seed=3, logprobs=True, stop_strings=("e",))
    ref = lm.complete([lm.encode("Hello"), lm.encode("Once upon")], gen)
    assert [(r["prompt"], r["sequence"], r["seed"]) for r in rows] == [("Hello", 0, 3), ("Hello", 1, 3),
                                                                       ("Once upon", 0, 3), ("Once upon", 1, 3)]
    assert [(r["text"], r["token_ids"], r["logprobs"]) for r in rows] == [(c.text, c.ids, c.logprobs) for c in ref]
    assert all("e" not in r["text"] for r in rows)
    assert any("e" in c.text for c in lm.complete([lm.encode("Hello"), lm.encode("Once upon")],
                                                  gen.replace(stop_strings=())))  # the stop string did cut
    rows, _ = _cli_json(capsys, "--model", text_dirs["sampled"], "--prompt", "Hi", "--max-new-tokens", "4")
    assert isinstance(rows[0]["seed"], int)  # the model's generation_config.json samples
