"""The Llama family (Llama, Qwen2, Mistral) against transformers itself: logits, configs in both forms, weights in
and out, generation, and the presets' shapes.

Every HF model is random and then perturbed everywhere (HF initialises biases to 0 and RMSNorms to 1, which would
hide a swapped or dropped bias/scale), saved with `save_pretrained`, and compared in fp32.
"""

import json
import re
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from aigc_jax import configs, model
from aigc_jax.decode import GenerationConfig, Generator
from aigc_jax.errors import UserError
from aigc_jax.interop import hf
from aigc_jax.models import llama
from helpers.hf_models import make_hf, transformers_or_skip

forward = jax.jit(model.forward, static_argnames=("config", "train"))

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# (HF class, config kwargs): MHA / GQA / MQA per family; tied and untied; llama3 RoPE with a short original
# context (24 tokens > 16: scaling is exercised); linear RoPE; biases; windows shorter than the sequence.
CASES = {
    "llama-mha": ("Llama", dict(num_key_value_heads=4, rms_norm_eps=1e-5)),
    "llama-gqa-llama3-tied-bias": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                                                 mlp_bias=True, rope_parameters=LLAMA3_ROPE)),
    "llama-mqa-linear-head_dim": ("Llama", dict(num_key_value_heads=1, head_dim=16, rope_parameters={
        "rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0})),
    "qwen2-gqa-window": ("Qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                                       max_window_layers=1)),
    "qwen2-mha-tied": ("Qwen2", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2-mqa": ("Qwen2", dict(num_key_value_heads=1, rope_parameters={"rope_type": "default",
                                                                        "rope_theta": 1e6})),
    "mistral-gqa-window": ("Mistral", dict(num_key_value_heads=2, sliding_window=6)),
    "mistral-mha-nowindow": ("Mistral", dict(num_key_value_heads=4, sliding_window=None)),
    "mistral-mqa-tied": ("Mistral", dict(num_key_value_heads=1, sliding_window=7, tie_word_embeddings=True,
                                         head_dim=4)),
}


def hf_logits(m, tokens, mask=None, positions=None):
    import torch

    kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask.astype(np.int64)),
                                      "position_ids": torch.tensor(positions)}
    with torch.no_grad():
        return m(torch.tensor(tokens), **kwargs).logits.numpy()


def ours(params, config, tokens, **kwargs):
    return np.asarray(forward(params, tokens, config, **kwargs)[0])[..., : config.vocab_size]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    kind, kwargs = CASES[request.param]
    return directory, make_hf(directory, kind, **kwargs)


def test_logits_match_transformers_incl_left_padding(case):
    directory, m = case
    config, params, _ = hf.load_hf_dir(directory)
    assert config.hf_model_type == m.config.model_type
    assert model.count_params(params, config) == sum(p.numel() for p in m.parameters())
    tokens = np.random.default_rng(1).integers(0, 101, (2, 24))  # longer than every window and llama3's 16
    assert np.abs(ours(params, config, tokens) - hf_logits(m, tokens)).max() <= 1e-4
    # Left-padded rows (positions count real tokens only, as generate passes them to HF).
    mask = np.ones_like(tokens, bool)
    mask[0, :7] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    got = ours(params, config, tokens, positions_BxT=positions, mask_BxT=mask)
    ref = hf_logits(m, tokens, mask, positions)
    assert np.abs(got[mask] - ref[mask]).max() <= 1e-4
    np.testing.assert_allclose(got[1], ours(params, config, tokens[1:])[0], atol=1e-5)
    np.testing.assert_allclose(got[0, 7:], ours(params, config, tokens[:1, 7:])[0], atol=1e-5)


def test_export_reloads_in_transformers_with_identical_logits_and_round_trips(case, tmp_path):
    transformers = transformers_or_skip()
    directory, m = case
    config, params, _ = hf.load_hf_dir(directory)
    hf.save_hf_dir(tmp_path / "a", config, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
    assert type(reloaded) is type(m)
    original = m.state_dict()
    for name, w in reloaded.state_dict().items():
        assert (w == original[name]).all(), name
    tokens = np.random.default_rng(2).integers(0, 101, (2, 24))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(m, tokens))
    # export -> import -> export: the same files' tensors and the same config.
    config2, params2, _ = hf.load_hf_dir(tmp_path / "a")
    assert config2 == config
    hf.save_hf_dir(tmp_path / "b", config2, params2)
    first, second = hf._read_weights(str(tmp_path / "a"))[0], hf._read_weights(str(tmp_path / "b"))[0]
    assert first.keys() == second.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], second[k], err_msg=k)
    assert json.loads((tmp_path / "a/config.json").read_text()) == json.loads((tmp_path / "b/config.json").read_text())


def test_older_config_form_loads_the_same(tmp_path):
    """config.json with top-level rope_theta + rope_scaling ("type" or "rope_type"), as transformers 4.x wrote it."""
    transformers = transformers_or_skip()
    m = make_hf(tmp_path / "v5", "Llama", num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)
    v5 = json.loads((tmp_path / "v5/config.json").read_text())
    assert "rope_parameters" in v5 and "rope_theta" not in v5
    config = hf.load_hf_dir(tmp_path / "v5")[0]
    assert (config.rope_type, config.rope_theta, config.rope_original_max_positions) == ("llama3", 500000.0, 16)
    tokens = np.random.default_rng(3).integers(0, 101, (1, 24))
    for key in ("type", "rope_type"):
        old = {k: v for k, v in v5.items() if k != "rope_parameters"}
        scaling = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
        old.update(rope_theta=500000.0, rope_scaling={key: "llama3", **scaling})
        shutil.copytree(tmp_path / "v5", tmp_path / key)
        (tmp_path / key / "config.json").write_text(json.dumps(old))
        got_config, params, _ = hf.load_hf_dir(tmp_path / key)
        assert got_config == config
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / key)).eval()
        np.testing.assert_array_equal(hf_logits(theirs, tokens), hf_logits(m, tokens))  # HF reads it alike
        assert np.abs(ours(params, got_config, tokens) - hf_logits(m, tokens)).max() <= 1e-4


@pytest.mark.parametrize("kind", ["Llama", "Qwen2", "Mistral"])
def test_config_json_may_omit_defaults(kind):
    transformers = transformers_or_skip()
    model_type = kind.lower()
    full = getattr(transformers, f"{kind}Config")().to_dict()
    assert hf.config_from_hf({"model_type": model_type}) == hf.config_from_hf(full)


UNSUPPORTED = {
    "rope_scaling": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
    "dynamic": dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
    "hidden_act": dict(hidden_act="gelu"),
    "partial_rotary_factor": dict(partial_rotary_factor=0.5),
    "quantization_config": dict(quantization_config={"quant_method": "gptq"}),
    "pretraining_tp": dict(pretraining_tp=2),
    "model_type": dict(model_type="gemma"),
}


@pytest.mark.parametrize("key", list(UNSUPPORTED))
def test_unsupported_settings_are_refused_by_name(key, tmp_path, capsys):
    from helpers.cli import cli_in_process

    make_hf(tmp_path / "src", "Llama", num_hidden_layers=1)
    config = json.loads((tmp_path / "src/config.json").read_text())
    config.pop("rope_parameters")
    config.update(UNSUPPORTED[key])
    (tmp_path / "src/config.json").write_text(json.dumps(config))
    proc = cli_in_process(capsys, "convert", "--from-hf", tmp_path / "src", "--out", tmp_path / "out")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "config.json" in proc.stderr and key in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_sharded_and_bf16_checkpoints_in_and_out(tmp_path):
    import torch

    transformers = transformers_or_skip()
    m = make_hf(tmp_path / "src", "Qwen2", num_key_value_heads=2)
    _, reference, _ = hf.load_hf_dir(tmp_path / "src")
    m.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / hf.SAFETENSORS_INDEX).is_file()
    m.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    flat = lambda p: traverse_util.flatten_dict(p, sep="/")
    for name, atol in (("sharded", 0.0), ("bf16", 1e-2)):
        config, params, _ = hf.load_hf_dir(tmp_path / name)
        for k, v in flat(params).items():
            np.testing.assert_allclose(v, flat(reference)[k], atol=atol, rtol=0, err_msg=f"{name} {k}")
    # Our export, sharded: transformers reads the index; a smaller re-export leaves no stale shard behind.
    config, params, _ = hf.load_hf_dir(tmp_path / "bf16")
    hf.save_hf_dir(tmp_path / "out", config, params, dtype="bfloat16", max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / hf.SAFETENSORS_INDEX).is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert reloaded.dtype == torch.bfloat16
    for k, w in reloaded.state_dict().items():
        assert torch.equal(w, m.state_dict()[k]), k
    hf.save_hf_dir(tmp_path / "out", config, params, dtype="bfloat16")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_missing_untied_and_unexpected_weights_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    make_hf(tmp_path, "Llama", tie_word_embeddings=True)
    path = tmp_path / hf.SAFETENSORS_FILE
    state = load_file(path)
    assert "lm_head.weight" not in state  # tied: stored once
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"] + 1}, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match="lm_head.weight differs"):
        hf.load_hf_dir(tmp_path)
    save_file({k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model.layers.1.mlp.up_proj.weight is missing"):
        hf.load_hf_dir(tmp_path)
    save_file({**state, "model.layers.2.mlp.up_proj.weight": state["model.layers.1.mlp.up_proj.weight"]}, path,
              metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"unexpected weight model.layers.2.*LlamaForCausalLM"):
        hf.load_hf_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------- presets


PUBLISHED = {"llama-3.2-1b": 1_235_814_400, "llama-3-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shape_presets_count_as_transformers(name):
    import torch

    transformers = transformers_or_skip()
    config = configs.get_preset(name)
    assert model.param_count(config) == PUBLISHED[name]
    hf_config = transformers.AutoConfig.for_model(**llama.hf.config_to_hf(config, None, (), "float32"))
    with torch.device("meta"):  # shapes only
        m = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in m.parameters()) == PUBLISHED[name]
    assert hf.config_from_hf(hf_config.to_dict()) == config


@pytest.mark.parametrize("name", [n for n, c in configs.PRESETS.items() if c.family == "llama"])
def test_every_leaf_has_exactly_one_axes_rule(name):
    config = configs.get_preset(name).replace(qkv_bias=True, o_bias=True, mlp_bias=True)
    for cfg in (config, config.replace(tie_word_embeddings=not config.tie_word_embeddings)):
        shapes = jax.eval_shape(lambda c=cfg: model.init_params(c, jax.random.key(0)))
        for path, leaf in traverse_util.flatten_dict(shapes, sep="/").items():
            rules = [axes for pattern, axes in llama.PARAM_AXES.items() if re.fullmatch(pattern, path)]
            assert len(rules) == 1, (path, rules)
            assert len(rules[0]) == leaf.ndim, (path, rules[0], leaf.shape)


# ---------------------------------------------------------------------------------------------------- the model


TINY = configs.get_preset("llama-tiny").replace(vocab_size=97, n_positions=48, sliding_window=5,
                                                layer_types=("full_attention", "sliding_attention"))


@pytest.fixture(scope="module")
def tiny_params():
    return jax.tree.map(lambda x: x * 3, model.init_params(TINY, jax.random.key(0)))


@pytest.mark.parametrize("per_row", [False, True])
def test_cached_decode_equals_full_forward(tiny_params, per_row):
    """Prefill 9 tokens then decode 11 one at a time (past the window of 5): the same logits as one forward."""
    tokens = np.random.default_rng(4).integers(0, 97, (2, 20))
    full = ours(tiny_params, TINY, tokens)
    cache = model.KVCache.init(TINY, 2, 24, per_row=per_row)
    assert cache.k.shape == (2, 2, TINY.n_kv_head, TINY.head_dim, 24)  # KV heads only, never repeated
    step = jax.jit(lambda p, t, c: model.forward(p, t, TINY, cache=c))
    logits, cache = step(tiny_params, tokens[:, :9], cache)
    got = [np.asarray(logits)]
    for t in range(9, 20):
        logits, cache = step(tiny_params, tokens[:, t:t + 1], cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1)[..., :97], full, atol=1e-5)


def test_scan_layers_equals_unrolled_and_mixed_windows_refuse_scan(tiny_params):
    uniform = TINY.replace(layer_types=())  # both layers slide: scannable
    params = model.init_params(uniform, jax.random.key(1))
    tokens = np.random.default_rng(5).integers(0, 97, (2, 16))
    scanned_cfg = uniform.replace(scan_layers=True)
    scanned = model.match_layout(params, scanned_cfg)
    assert scanned["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 32, 2, 8)
    np.testing.assert_allclose(ours(scanned, scanned_cfg, tokens), ours(params, uniform, tokens), atol=1e-5)
    with pytest.raises(configs.ConfigError, match="scan_layers"):
        TINY.replace(scan_layers=True)


def test_bf16_compute_keeps_hf_rmsnorm_order(tiny_params):
    """RMSNorm casts to the compute dtype before the scale (as HF): with bf16, the product is a bf16 product."""
    x = jax.random.normal(jax.random.key(2), (1, 3, 32), jax.numpy.bfloat16)
    norm = llama.RMSNorm(TINY.replace(dtype="bfloat16"))
    scale = {"params": {"scale": jax.random.uniform(jax.random.key(3), (32,)) + 0.5}}
    got = norm.apply(scale, x)
    x32 = x.astype(np.float32)
    normed = (x32 * jax.lax.rsqrt((x32 ** 2).mean(-1, keepdims=True) + TINY.rms_norm_eps)).astype(jax.numpy.bfloat16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(scale["params"]["scale"].astype(normed.dtype) * normed))
    assert got.dtype == jax.numpy.bfloat16


# ---------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", ["llama-gqa-llama3-tied-bias", "qwen2-gqa-window", "mistral-gqa-window"])
def test_greedy_and_beam_ids_equal_hf_generate(name, tmp_path):
    """Left-padded prompts, two EOS ids the model really emits, decoding well past the sliding windows (5, 6)."""
    from helpers.hf_models import hf_generate

    kind, kwargs = CASES[name]
    m = make_hf(tmp_path, kind, seed=1, noise=0.3, **kwargs)
    config, params, _ = hf.load_hf_dir(tmp_path)
    gen = Generator(config, params)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 101, n).tolist() for n in (3, 9, 1, 6)]
    free = hf_generate(m, prompts, 16, [100], do_sample=False)
    values, counts = np.unique(free, return_counts=True)
    eos = [int(v) for v in values[np.argsort(-counts)][:2]]
    refs = []
    for kw in (dict(), dict(num_beams=3, length_penalty=1.3)):
        refs.append(hf_generate(m, prompts, 16, eos, do_sample=False, **kw))
        got, _ = gen.generate_padded(prompts, GenerationConfig(max_new_tokens=16, temperature=0, eos_ids=tuple(eos),
                                                               **kw))
        np.testing.assert_array_equal(got, refs[-1], err_msg=str(kw))
    ends = [np.argmax(row) if row.any() else 16 for row in np.isin(refs[0], eos)]
    assert min(ends) < 15 and len(set(ends)) > 1, ends  # rows finish at different steps, then emit padding
