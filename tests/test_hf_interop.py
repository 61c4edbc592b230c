"""HF transformers GPT-2 checkpoints in and out, with transformers itself as the oracle.

Every HF model here is random and then perturbed everywhere (HF initialises biases to 0 and LayerNorms to 1,
which would hide a swapped or dropped bias/scale), saved with `save_pretrained`, and compared in fp32.
"""

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from helpers.cli import cli_in_process
from helpers.hf_models import make_hf_model
from helpers.text import TEXTS
from helpers.tokenizer_styles import hf_gpt2_tokenizer, write_bpe_files

from aigc_jax import configs, model
from aigc_jax import tokenizers as tok
from aigc_jax.errors import UserError
from aigc_jax.interop import hf
from aigc_jax.models import gpt2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

NOISE = 0.1  # large enough that exact vs tanh GELU differ by > 1e-4 in the logits
forward = jax.jit(model.forward, static_argnames=("config", "train"))

# Odd vocabularies (one exactly GPT-2's), 1-4 layers, 1-8 heads, non-default eps and activations.
SHAPES = {
    "v97-L1-H1": dict(vocab_size=97, n_positions=8, n_layer=1, n_head=1, n_embd=16,
                      activation_function="gelu_pytorch_tanh"),
    "v1000-L2-H4": dict(vocab_size=1000, n_positions=24, n_layer=2, n_head=4, n_embd=32,
                        layer_norm_epsilon=1e-3, activation_function="gelu"),
    "v50257-L3-H2": dict(vocab_size=50257, n_positions=16, n_layer=3, n_head=2, n_embd=8),
    "v301-L4-H8": dict(vocab_size=301, n_positions=32, n_layer=4, n_head=8, n_embd=64,
                       resid_pdrop=0.2, attn_pdrop=0.0),
}


def hf_logits(hf_model, tokens, labels=False):
    with torch.no_grad():
        out = hf_model(torch.tensor(np.asarray(tokens)), labels=torch.tensor(np.asarray(tokens)) if labels else None)
    return (out.logits.numpy(), out.loss.item()) if labels else out.logits.numpy()


def our_logits(params, tokens, config):
    logits, _ = forward(params, tokens, config)
    return np.asarray(logits)[..., : config.vocab_size]  # the padded-vocab columns are ours alone


def flat(params):
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_model(directory, **SHAPES[request.param])
    shape = SHAPES[request.param]
    tokens = np.random.default_rng(1).integers(0, shape["vocab_size"], (2, shape["n_positions"]))
    return directory, hf_model, tokens


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One small HF dir for the tests that are about files, not numerics."""
    directory = tmp_path_factory.mktemp("small")
    return directory, make_hf_model(directory, vocab_size=300, n_positions=8, n_layer=2, n_head=2, n_embd=16)


def test_import_matches_transformers_logits_and_loss(case):
    directory, hf_model, tokens = case
    config, params, tokenizer = hf.load_hf_dir(directory)
    assert tokenizer is None
    assert config.vocab_size == hf_model.config.vocab_size
    assert config.layer_norm_epsilon == hf_model.config.layer_norm_epsilon
    assert (config.dropout, config.attn_dropout) == (hf_model.config.resid_pdrop, hf_model.config.attn_pdrop)
    assert model.count_params(params, config) == sum(p.numel() for p in hf_model.parameters())
    ours = our_logits(params, tokens, config)
    eager, hf_loss = hf_logits(hf_model, tokens, labels=True)
    assert np.abs(ours - eager).max() <= 1e-4
    sdpa = transformers.GPT2LMHeadModel.from_pretrained(str(directory), attn_implementation="sdpa").eval()
    assert np.abs(ours - hf_logits(sdpa, tokens)).max() <= 1e-4
    logp = jax.nn.log_softmax(ours[:, :-1], axis=-1)
    our_loss = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1).mean()
    assert abs(our_loss - hf_loss) <= 1e-5


def test_config_mapping_of_transformers_defaults():
    # GPT2Config() is OpenAI's 124M GPT-2; a config.json may omit any key left at its default.
    full = hf.config_from_hf(transformers.GPT2Config().to_dict())
    assert full == hf.config_from_hf({"model_type": "gpt2"})
    assert model.param_count(full) == 124_439_808
    assert full.replace(dropout=0.0, attn_dropout=0.0) == configs.get_preset("gpt2")
    # One `dropout` serves HF's embd_pdrop and resid_pdrop: resid_pdrop wins.
    mixed = hf.config_from_hf({"model_type": "gpt2", "embd_pdrop": 0.3, "resid_pdrop": 0.2, "attn_pdrop": 0.05})
    assert (mixed.dropout, mixed.attn_dropout) == (0.2, 0.05)
    assert hf.config_from_hf({"model_type": "gpt2", "activation_function": "swish"}).activation == "silu"
    exported = gpt2.hf.config_to_hf(full, eot_id=50256)
    assert hf.config_from_hf(exported) == full
    for key, value in transformers.GPT2Config(**exported).to_dict().items():
        if key in exported and key != "torch_dtype":
            assert exported[key] == value, key


def test_export_reloads_in_transformers_unchanged(case, tmp_path):
    directory, hf_model, tokens = case
    config, params, _ = hf.load_hf_dir(directory)
    hf.save_hf_dir(tmp_path, config, params)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()  # still tied
    original = hf_model.state_dict()
    for name, w in reloaded.state_dict().items():
        assert torch.equal(w, original[name]), name
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))


def test_scan_layers_import_equals_unrolled(small):
    directory, _ = small
    config, params, _ = hf.load_hf_dir(directory)
    state = hf.to_hf_state_dict(params, config)
    scanned = hf.params_from_hf(state, config.replace(scan_layers=True))
    assert scanned["h"]["attn"]["c_attn"]["kernel"].shape[0] == config.n_layer
    assert flat(model.match_layout(scanned, config)).keys() == flat(params).keys()
    for k, v in flat(model.match_layout(scanned, config)).items():
        np.testing.assert_array_equal(v, flat(params)[k], err_msg=k)
    tokens = np.arange(16).reshape(2, 8) % config.vocab_size
    scan_cfg = config.replace(scan_layers=True)
    np.testing.assert_allclose(our_logits(scanned, tokens, scan_cfg), our_logits(params, tokens, config), atol=1e-5)


def test_bin_and_sharded_and_bf16_checkpoints_import_the_same_weights(small, tmp_path):
    directory, hf_model = small
    _, reference, _ = hf.load_hf_dir(directory)
    reference = flat(reference)

    def check(d, atol=0.0):
        got = flat(hf.load_hf_dir(d)[1])
        assert got.keys() == reference.keys()
        for k in got:
            np.testing.assert_allclose(got[k], reference[k], atol=atol, rtol=0, err_msg=k)

    # pytorch_model.bin, as torch.save writes it (tied lm_head included)...
    (tmp_path / "bin").mkdir()
    shutil.copy(directory / "config.json", tmp_path / "bin")
    torch.save(hf_model.state_dict(), tmp_path / "bin" / hf.TORCH_FILE)
    check(tmp_path / "bin")
    # ...and as OpenAI's original GPT-2 files are: no "transformer." prefix, causal-mask buffers inside.
    legacy = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    legacy.update({f"h.{i}.attn.bias": torch.ones(1, 1, 8, 8) for i in range(2)})
    torch.save(legacy, tmp_path / "bin" / hf.TORCH_FILE)
    check(tmp_path / "bin")
    # Sharded safetensors with an index.
    hf_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="4KB")
    assert (tmp_path / "sharded" / hf.SAFETENSORS_INDEX).is_file()
    check(tmp_path / "sharded")
    # bf16 weights (numpy has no bf16: a separate read path) are widened to fp32 params.
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))  # .to() is in place
    check(tmp_path / "bf16", atol=1e-2)


def test_untied_head_and_wrong_shapes_are_refused(small, tmp_path):
    directory, hf_model = small
    shutil.copy(directory / "config.json", tmp_path)
    state = dict(hf_model.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, tmp_path / hf.TORCH_FILE)
    with pytest.raises(UserError, match="lm_head.weight differs"):
        hf.load_hf_dir(tmp_path)
    state = {k: v for k, v in hf_model.state_dict().items() if k != "transformer.h.1.mlp.c_fc.bias"}
    torch.save(state, tmp_path / hf.TORCH_FILE)
    with pytest.raises(UserError, match=r"pytorch_model.bin: weight h.1.mlp.c_fc.bias is missing"):
        hf.load_hf_dir(tmp_path)
    _edit_config(tmp_path, n_layer=1)
    torch.save(hf_model.state_dict(), tmp_path / hf.TORCH_FILE)
    with pytest.raises(UserError, match=r"unexpected weight h\.1\."):
        hf.load_hf_dir(tmp_path)
    _edit_config(tmp_path, n_layer=2, vocab_size=301)
    with pytest.raises(UserError, match=r"weight wte.weight has shape \(300, 16\), config.json implies \(301, 16\)"):
        hf.load_hf_dir(tmp_path)
    _edit_config(tmp_path, vocab_size=300, n_embd=32)
    with pytest.raises(UserError, match=r"weight \S+ has shape \(\d+,.*\), config.json implies"):
        hf.load_hf_dir(tmp_path)


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


UNSUPPORTED = {
    "scale_attn_by_inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "reorder_and_upcast_attn": dict(reorder_and_upcast_attn=True),
    "scale_attn_weights": dict(scale_attn_weights=False),
    "n_inner": dict(n_inner=48),
    "tie_word_embeddings": dict(tie_word_embeddings=False),
    "add_cross_attention": dict(add_cross_attention=True),
    "activation_function": dict(activation_function="quick_gelu"),
    "model_type": dict(model_type="gpt_neox"),
}


@pytest.mark.parametrize("key", list(UNSUPPORTED))
def test_unsupported_configs_are_one_line_cli_errors(key, small, tmp_path, capsys):
    directory, _ = small
    shutil.copytree(directory, tmp_path / "src")
    _edit_config(tmp_path / "src", **UNSUPPORTED[key])
    proc = cli_in_process(capsys, "convert", "--from-hf", tmp_path / "src", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert_one_line_error(proc, "config.json", key)
    assert not (tmp_path / "out").exists()


def test_n_inner_of_four_times_width_is_accepted(small, tmp_path):
    directory, _ = small
    shutil.copytree(directory, tmp_path / "src")
    _edit_config(tmp_path / "src", n_inner=64)
    assert hf.load_hf_dir(tmp_path / "src")[0].n_embd == 16


def test_missing_and_corrupt_files_are_named(small, tmp_path):
    directory, _ = small
    src = tmp_path / "src"

    def expect(needle):
        with pytest.raises(UserError, match=needle) as e:
            hf.load_hf_dir(src)
        assert "\n" not in str(e.value)

    expect("does not exist")
    shutil.copytree(directory, src)
    (src / "config.json").write_text("{oops")
    expect(r"config.json is corrupt")
    os.remove(src / "config.json")
    expect(r"config.json is missing")
    shutil.copy(directory / "config.json", src)
    (src / hf.SAFETENSORS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    expect(r"model.safetensors is corrupt")
    os.remove(src / hf.SAFETENSORS_FILE)
    expect("no weights in .*expected model.safetensors")
    (src / hf.TORCH_FILE).write_bytes(b"PK\x03\x04 truncated zip")
    expect(r"pytorch_model.bin is corrupt")
    os.remove(src / hf.TORCH_FILE)
    shutil.copy(directory / hf.SAFETENSORS_FILE, src)
    (src / "tokenizer.json").write_text("{")
    expect(r"tokenizer.json")
    # The same through the CLI: exit 2, one line, the file named.
    proc = run_cli("convert", "--from-hf", src, "--out", tmp_path / "out")
    assert_one_line_error(proc, "tokenizer.json")


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_bin_is_never_unpickled_beyond_weights_only(small, tmp_path):
    import pickle

    directory, _ = small
    shutil.copy(directory / "config.json", tmp_path)
    with open(tmp_path / hf.TORCH_FILE, "wb") as f:
        pickle.dump({"x": _Boom()}, f, protocol=2)
    proc = run_cli("convert", "--from-hf", tmp_path, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(proc, "pytorch_model.bin", "weights_only=True) refused it", "posix.system")
    assert not (tmp_path / "pwned").exists()


def test_bin_without_torch_asks_for_torch_or_safetensors(small, tmp_path):
    directory, hf_model = small
    (tmp_path / "src").mkdir()
    shutil.copy(directory / "config.json", tmp_path / "src")
    torch.save(hf_model.state_dict(), tmp_path / "src" / hf.TORCH_FILE)
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "torch.py").write_text("raise ImportError('torch is hidden by this test')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli("convert", "--from-hf", tmp_path / "src", "--out", tmp_path / "out", env=env)
    assert_one_line_error(proc, "pytorch_model.bin", "pip install torch", "model.safetensors")


def test_cli_round_trip_through_both_formats(small, tmp_path, capsys):
    directory, hf_model = small
    src = tmp_path / "hf_in"
    shutil.copytree(directory, src)
    write_bpe_files(src, vocab_size=300, gpt2_layout=True)  # HF-style vocab.json + merges.txt beside the weights
    oracle = hf_gpt2_tokenizer(src)
    model_dir, hf_out = tmp_path / "ours", tmp_path / "hf_out"

    proc = run_cli("convert", "--from-hf", src, "--out", model_dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokenizer"] is True
    proc = run_cli("convert", "--to-hf", model_dir, "--out", hf_out)
    assert proc.returncode == 0, proc.stderr

    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(hf_out)).eval()
    tokens = np.random.default_rng(3).integers(0, 300, (2, 8))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))
    with open(hf_out / "config.json") as f:
        assert json.load(f)["eos_token_id"] == oracle.eos_token_id == 299
    exported = transformers.AutoTokenizer.from_pretrained(str(hf_out))
    assert exported.eos_token_id == oracle.eos_token_id
    for text in TEXTS:
        assert exported.encode(text) == oracle.encode(text), repr(text)

    # Our own model dir loads back to the same numbers.
    from aigc_jax import modeldir

    config, params, tokenizer = modeldir.load_any(str(model_dir))
    assert tokenizer.encode(TEXTS[4]) == oracle.encode(TEXTS[4])
    np.testing.assert_allclose(our_logits(params, tokens, config), hf_logits(hf_model, tokens), atol=1e-4)

    # Outputs are only written over the same kind of output, never over the source.
    proc = cli_in_process(capsys, "convert", "--from-hf", src, "--out", hf_out)
    assert_one_line_error(proc, "not empty", "refusing")
    proc = cli_in_process(capsys, "convert", "--to-hf", model_dir, "--out", model_dir)
    assert_one_line_error(proc, "source directory")


def test_dtype_flag(small, tmp_path, capsys):
    directory, hf_model = small
    from aigc_jax import modeldir

    proc = cli_in_process(capsys, "convert", "--from-hf", directory, "--out", tmp_path / "ours", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    config, params, _ = modeldir.load_any(str(tmp_path / "ours"))
    assert (config.dtype, config.param_dtype) == ("bfloat16", "float32")  # bf16 compute, fp32 master weights
    proc = cli_in_process(capsys, "convert", "--to-hf", tmp_path / "ours", "--out", tmp_path / "hf", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"))
    assert reloaded.dtype == torch.bfloat16
    for name, w in reloaded.state_dict().items():
        assert torch.equal(w, hf_model.state_dict()[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("kind", ["byte_level", "char_level", "train_bpe"])
def test_exported_tokenizers_load_in_transformers(kind, small, tmp_path):
    directory, _ = small
    text = " ".join(TEXTS)
    tokenizer = {
        "byte_level": tok.byte_level,
        "char_level": lambda: tok.char_level(text),
        "train_bpe": lambda: tok.train_bpe([text] * 5, 320, min_frequency=1),
    }[kind]()
    config, params, _ = hf.load_hf_dir(directory)
    hf.save_hf_dir(tmp_path, config.replace(vocab_size=tokenizer.vocab_size), _resize(params, tokenizer.vocab_size),
                   tokenizer)
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert exported.eos_token_id == tokenizer.eot_id
    for sample in TEXTS:
        assert exported.encode(sample) == tokenizer.encode(sample), repr(sample)
        assert exported.decode(tokenizer.encode(sample)) == sample


def _resize(params, vocab_size):
    """The small model's weights with an embedding of `vocab_size` rows (padded like the model pads)."""
    rows = -(-vocab_size // 128) * 128
    wte = np.asarray(params["wte"]["embedding"])
    return {**params, "wte": {"embedding": np.resize(wte, (rows, wte.shape[1]))}}
