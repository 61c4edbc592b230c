"""Decoding against HF transformers' `generate` (greedy, beam search, min_new_tokens, padding), plus buckets,
streaming, the debug path, 1 vs 8 devices, the CLI and the Python API."""

import json

import jax
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, run_module
from helpers.cli import generate_error
from helpers.hf_models import build_hf_gpt2, hf_generate, load_hf_model, save_random_hf_gpt2, torch_or_skip

from aigc_jax import api, configs, model
from aigc_jax import tokenizers as tok
from aigc_jax.cli import main as cli_main
from aigc_jax.decode import GenerationConfig, Generator, time_decode

from aigc_jax.interop import hf as hf_interop


N = 20  # new tokens in the HF comparisons
PROMPT_LENGTHS = (5, 11, 2, 8)


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    torch, _ = torch_or_skip()
    path = tmp_path_factory.mktemp("hf_gpt2")
    m = build_hf_gpt2(path, vocab_size=97)
    config, params, _ = hf_interop.load_hf_dir(path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 97, n).tolist() for n in PROMPT_LENGTHS]
    # EOS ids the model really emits (the two most frequent greedy tokens) and one it never emits.
    free = hf_generate(m, prompts, N, eos_ids=[96], do_sample=False)
    values, counts = np.unique(free, return_counts=True)
    common = [int(v) for v in values[np.argsort(-counts)][:2]]
    with torch.no_grad():  # the id whose best logit anywhere along these sequences is lowest: never chosen
        logits = m(torch.tensor([p + list(f) for p, f in zip(prompts, free)][1:2])).logits[0].numpy()
    unused = int(np.argmin(logits.max(axis=0)))
    return m, Generator(config, params), prompts, common, unused


def test_greedy_matches_hf_on_left_padded_batch(hf_setup):
    m, gen, prompts, common, unused = hf_setup
    for eos in ([unused], [common[0]], common):
        ref = hf_generate(m, prompts, N, eos, do_sample=False)
        got, _ = gen.generate_padded(prompts, GenerationConfig(max_new_tokens=N, temperature=0, eos_ids=tuple(eos)))
        np.testing.assert_array_equal(got, ref, err_msg=f"eos={eos}")
        hit = np.isin(ref, eos).any(axis=1)
        assert hit.any() == (eos != [unused]), hit  # the premise of each case holds


def test_context_limit_is_hfs(hf_setup):
    """HF never feeds the last new token back, so prompt + max_new_tokens - 1 positions may fill the context
    exactly (here 64), and a prompt as long as the context still yields one token."""
    m, gen, _, _, unused = hf_setup
    rng = np.random.default_rng(2)
    long, short, full = (rng.integers(0, 97, n).tolist() for n in (60, 7, 64))
    for kwargs in (dict(), dict(num_beams=2)):
        ref = hf_generate(m, [long, short], 5, [unused], do_sample=False, **kwargs)
        got, _ = gen.generate_padded([long, short], GenerationConfig(max_new_tokens=5, temperature=0,
                                                                     eos_ids=(unused,), **kwargs))
        np.testing.assert_array_equal(got, ref, err_msg=str(kwargs))
    got, _ = gen.generate_padded([full], GenerationConfig(max_new_tokens=1, temperature=0, eos_ids=(unused,)))
    np.testing.assert_array_equal(got, hf_generate(m, [full], 1, [unused], do_sample=False))
    with pytest.raises(api.UserError, match="use at most 5 new tokens"):
        gen.generate([long], GenerationConfig(max_new_tokens=6, eos_ids=(unused,)))


def test_finished_rows_emit_pad_like_hf(hf_setup):
    m, gen, prompts, common, _ = hf_setup
    pad = next(i for i in range(97) if i not in common)
    ref = hf_generate(m, prompts, N, [common[0]], pad_id=pad, do_sample=False)
    got, _ = gen.generate_padded(prompts, GenerationConfig(max_new_tokens=N, temperature=0, eos_ids=(common[0],),
                                                           pad_id=pad))
    np.testing.assert_array_equal(got, ref)
    finished = 0
    for row in got:
        (at,) = np.nonzero(row == common[0])
        if len(at):
            finished += 1
            assert np.all(row[at[0] + 1:] == pad)
    assert finished >= 1


def test_min_new_tokens_matches_hf(hf_setup):
    m, gen, prompts, common, _ = hf_setup
    eos = [common[0]]
    base = GenerationConfig(max_new_tokens=N, temperature=0, eos_ids=tuple(eos))
    without, _ = gen.generate_padded(prompts, base)
    first_eos = [np.argmax(r == eos[0]) if (r == eos[0]).any() else N for r in without]
    k = int(max(first_eos[i] for i in range(len(prompts)) if first_eos[i] < N)) + 2
    ref = hf_generate(m, prompts, N, eos, do_sample=False, min_new_tokens=k)
    got, _ = gen.generate_padded(prompts, base.replace(min_new_tokens=k))
    np.testing.assert_array_equal(got, ref)
    assert not np.isin(got[:, :k], eos).any()
    assert not np.array_equal(got, without)


# (early_stopping, length_penalty, which EOS) — EOS hit and not hit, length_penalty on both sides of 1.
BEAM_CASES = [
    (False, 1.0, "common"),
    (False, 2.0, "common"),
    (False, -1.0, "common"),
    (True, 1.0, "common"),
    (True, 0.5, "common"),
    ("never", 2.0, "common"),
    ("never", 1.0, "unused"),
    (False, 1.0, "unused"),
    (True, 2.0, "unused"),
]


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_hf(hf_setup, num_beams):
    m, gen, prompts, common, unused = hf_setup
    outcomes, hits = {}, []
    for early_stopping, length_penalty, which in BEAM_CASES:
        eos = [common[0]] if which == "common" else [unused]
        kwargs = dict(num_beams=num_beams, early_stopping=early_stopping, length_penalty=length_penalty)
        ref = hf_generate(m, prompts, N, eos, do_sample=False, **kwargs)
        got, _ = gen.generate_padded(prompts, GenerationConfig(max_new_tokens=N, temperature=0, eos_ids=tuple(eos),
                                                               **kwargs))
        np.testing.assert_array_equal(got, ref, err_msg=f"{kwargs} eos={which}")
        if which == "unused":
            assert not np.isin(ref, eos).any()
        else:
            hits.append(np.isin(ref, eos).any(axis=1).mean())
        outcomes[(early_stopping, length_penalty, which)] = got
    assert sum(h > 0 for h in hits) >= 3 and min(hits) < 1, hits  # EOS ends some beams, not all
    # The knobs change the answer here, so equality above is evidence for each rule, not a coincidence.
    assert not np.array_equal(outcomes[(False, 1.0, "common")], outcomes[(False, 2.0, "common")])
    assert len({o.tobytes() for o in outcomes.values()}) >= 4


def test_beam_search_with_two_eos_ids_matches_hf(hf_setup):
    m, gen, prompts, common, _ = hf_setup
    kwargs = dict(num_beams=3, early_stopping=True, length_penalty=1.5)
    ref = hf_generate(m, prompts, N, common, do_sample=False, **kwargs)
    got, _ = gen.generate_padded(prompts, GenerationConfig(max_new_tokens=N, eos_ids=tuple(common), temperature=0,
                                                           **kwargs))
    np.testing.assert_array_equal(got, ref)


# -------------------------------------------------------------------------------------- buckets, stream, debug


@pytest.fixture(scope="module")
def tiny():
    cfg = configs.get_preset("tiny").replace(vocab_size=61, n_positions=48)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    return cfg, jax.tree.map(lambda x: x * 3, params)  # far from uniform next-token distributions


def test_one_compile_per_bucket(tiny):
    gen = Generator(*tiny)
    g = GenerationConfig(max_new_tokens=5, temperature=0, eos_ids=(7,))
    a = gen.generate([[1, 2, 3]], g)
    compiled = gen.traces()  # programs are shared between Generators: another test may have compiled this one
    assert compiled > 0
    # Other prompt lengths (<= 16), max_new_tokens (<= 16), EOS ids and batch sizes in the same bucket: no compile.
    gen.generate([[4] * 9], g.replace(max_new_tokens=16, eos_ids=(9,)))
    gen.generate([[5] * 16], g.replace(max_new_tokens=1, eos_ids=()))
    assert Generator(*tiny).generate([[1, 2, 3]], g) == a  # a new Generator for the same model: no compile either
    # The benchmark hook times the same executable (no compile inside its timed calls).
    timing = time_decode(gen, batch_size=1, prompt_len=5, new_tokens=12, repeats=1)
    assert gen.traces() == compiled
    assert {"ms_per_token", "tokens_per_s", "prefill_s", "total_s", "first_call_s"} <= set(timing)
    assert timing["total_s"] > 0 and np.isfinite(timing["ms_per_token"])
    gen.generate([[5] * 17], g)  # prompt bucket 32: a new executable
    assert gen.traces() > compiled


def test_stream_chunks_equal_one_call(tiny):
    # Greedy here, sampling in the sharded test below.
    gen = Generator(*tiny)
    prompts = [[1, 2, 3]]
    g = GenerationConfig(max_new_tokens=13, temperature=0, eos_ids=(7,))
    whole = gen.generate(prompts, g)
    chunks = list(gen.stream(prompts, g, chunk=4))
    assert [c[0] for c in chunks] == [whole[0][i:i + 4] for i in range(0, len(whole[0]), 4)]
    assert len(chunks) > 1


def test_debug_python_loop_equals_compiled(tiny):
    prompts = [[1, 2, 3]]
    g = GenerationConfig(max_new_tokens=4, temperature=0, eos_ids=(7,))
    fast, slow = Generator(*tiny), Generator(*tiny, debug=True)
    np.testing.assert_array_equal(fast.generate_padded(prompts, g)[0], slow.generate_padded(prompts, g)[0])


def test_one_vs_eight_devices_identical():
    # Faster XLA compiles in the subprocess: all three runs share the flags, so the comparison is unaffected.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    out = run_module("decode_one_vs_eight", devices=8, env={"XLA_FLAGS": flags})
    none = out["none"]
    assert out["shard_map"] == {**none, "stream": none["sample"]}
    assert out["pmap"] == {"beam": none["beam"], "stream": none["sample"]}
    assert none["sample"] != none["beam"]


# ------------------------------------------------------------------------------------------------- CLI and API


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return save_random_hf_gpt2(tmp_path_factory.mktemp("hf_text"))


def test_cli_json_equals_hf_generate(text_model):
    path, m = text_model, load_hf_model(text_model)
    prompts = ["Hello", "Once upon a time"]
    args = ["generate", "--model", path, "--max-new-tokens", "12", "--temperature", "0", "--json"]
    proc = run_cli(*args, *sum((["--prompt", p] for p in prompts), []))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    t = tok.byte_level()
    ref = hf_generate(m, [t.encode(p) for p in prompts], 12, [t.eot_id], do_sample=False)
    for row, prompt, ids in zip(rows, prompts, ref, strict=True):
        expected = [int(i) for i in ids]
        if t.eot_id in expected:
            expected = expected[: expected.index(t.eot_id) + 1]
        assert row["prompt"] == prompt
        assert row["token_ids"] == expected
        assert row["text"] == t.decode([i for i in expected if i != t.eot_id])


def test_cli_missing_model_is_one_line_error(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"), "does not exist")


def test_cli_errors(text_model, capsys, tmp_path):
    path = text_model
    base = ["--model", path, "--prompt", "hi"]
    assert "prompt 0 is empty" in generate_error(capsys, "--model", path, "--prompt", "")
    assert "context of 48" in generate_error(capsys, *base, "--max-new-tokens", "48")
    assert "--top-p" in generate_error(capsys, *base, "--top-p", "0")
    assert "--top-p" in generate_error(capsys, *base, "--top-p", "1.01")
    assert "--top-k" in generate_error(capsys, *base, "--top-k", "-1")
    assert "--temperature" in generate_error(capsys, *base, "--temperature", "-1")
    assert "--num-beams" in generate_error(capsys, *base, "--num-beams", "0")
    assert "cannot change model.n_layer" in generate_error(capsys, *base, "--set", "n_layer=3")
    assert "beam search" in generate_error(capsys, *base, "--num-beams", "2", "--stream")
    assert "--prompts-file" in generate_error(capsys, "--model", path, "--prompts-file", str(tmp_path / "none.txt"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    assert "config.json" in generate_error(capsys, "--model", str(tmp_path / "corrupt"), "--prompt", "hi")
    untokenized = save_random_hf_gpt2(tmp_path / "no_tokenizer", with_tokenizer=False)
    assert "no tokenizer" in generate_error(capsys, "--model", untokenized, "--prompt", "hi")


def test_cli_prompts_file_and_stream(text_model, capsys, tmp_path):
    path = text_model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n\nworld\n")
    assert cli_main(["generate", "--model", path, "--prompts-file", str(prompts), "--max-new-tokens", "9",
                     "--temperature", "0", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "world"]
    assert cli_main(["generate", "--model", path, "--prompt", "Hello", "--max-new-tokens", "9", "--temperature", "0",
                     "--stream", "--chunk", "2"]) == 0
    assert capsys.readouterr().out == "Hello" + rows[0]["text"] + "\n"


def test_python_api_equals_hf(text_model):
    lm, m = api.load(text_model), load_hf_model(text_model)
    ids = lm.encode("Once upon a time")
    out_ids = lm.generate_ids(ids, max_new_tokens=10, temperature=0)
    ref = hf_generate(m, [ids], 10, [lm.tokenizer.eot_id], do_sample=False)[0].tolist()
    assert out_ids == ref[: len(out_ids)] and len(out_ids) >= 1


def test_python_api(text_model):
    lm = api.load(text_model)
    ids = lm.encode("Once upon a time")
    assert lm.decode(ids) == "Once upon a time"
    out_ids = lm.generate_ids(ids, max_new_tokens=10, temperature=0)
    text = lm.generate("Once upon a time", max_new_tokens=10, temperature=0)
    assert text == lm.decode(lm.strip_eos(out_ids, [lm.tokenizer.eot_id]))
    batch = lm.generate(["Once upon a time", "Hi"], max_new_tokens=10, temperature=0)
    assert batch[0] == text and isinstance(batch[1], str)
    assert "".join(lm.stream("Once upon a time", chunk=3, max_new_tokens=10, temperature=0)) == text
    with pytest.raises(api.UserError, match="no tokenizer"):
        api.LM(lm.config, lm.params, None).encode("x")
