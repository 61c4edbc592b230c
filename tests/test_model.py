"""GPT-2's decoder on its own: sizes, init, padded vocabulary, dtypes, attention backends, config errors (what every
family must do is tests/test_families.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_one_line_error, requires_gpu, run_cli, run_module

from aigc_jax import configs, model
from aigc_jax.attention import resolve_backend, xla_attention
from aigc_jax.errors import ConfigError, UserError
from aigc_jax.models import layers

# Jitted once per shape: eager op-by-op dispatch is ~10x slower on these tiny models.
forward = jax.jit(model.forward, static_argnames=("config", "train"))
TINY = configs.get_preset("tiny").replace(vocab_size=101, n_layer=3, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def params():
    return model.init_params(TINY, jax.random.key(0))


def rand_tokens(key, shape, vocab=TINY.vocab_size):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab)


@pytest.mark.parametrize(
    "name,expected",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_param_counts_equal_hf(name, expected):
    cfg = configs.get_preset(name)
    assert cfg.padded_vocab_size == 50304
    assert model.param_count(cfg) == expected


def test_small_preset_shapes():
    baby = configs.get_preset("baby")
    assert (baby.n_layer, baby.n_head, baby.n_embd, baby.n_positions, baby.dropout) == (6, 6, 384, 256, 0.2)
    # Analytic count: embeddings + per layer (2 LN + qkv + proj + fc + proj) + final LN.
    d, L, V, P = baby.n_embd, baby.n_layer, baby.vocab_size, baby.n_positions
    per_layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert model.param_count(baby) == V * d + P * d + L * per_layer + 2 * d


def test_flops_per_token_formula():
    cfg = configs.get_preset("gpt2")
    n = 124_439_808 - 1024 * 768
    assert model.flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_init_follows_gpt2(params):
    cfg = configs.get_preset("tiny").replace(n_layer=8, n_embd=256, n_head=4)
    p = model.init_params(cfg, jax.random.key(1))
    np.testing.assert_allclose(np.std(p["h_0"]["attn"]["c_attn"]["kernel"]), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(p["h_0"]["mlp"]["c_proj"]["kernel"]), 0.02 / np.sqrt(16), rtol=0.05)
    np.testing.assert_allclose(np.std(p["h_0"]["attn"]["c_proj"]["kernel"]), 0.02 / np.sqrt(16), rtol=0.05)
    assert not np.any(p["h_0"]["mlp"]["c_fc"]["bias"])
    assert np.all(p["ln_f"]["scale"] == 1)
    assert "lm_head" not in p  # tied to wte


def test_scanned_layout_keeps_the_fused_qkv_heads(params):
    stacked = model.match_layout(params, TINY.replace(scan_layers=True))
    assert stacked["h"]["attn"]["c_attn"]["kernel"].shape == (3, 32, 3, 4, 8)  # [L, D, q|k|v, H, Dh]


def test_padded_vocab_never_wins(params):
    assert TINY.padded_vocab_size == 128
    # Push the padded rows of the embedding to be huge: their logits must still be masked.
    wte = params["wte"]["embedding"].at[101:].set(100.0)
    p = {**params, "wte": {"embedding": wte}}
    logits, _ = forward(p, rand_tokens(5, (4, 16)), TINY)
    assert logits.shape[-1] == 128
    assert np.all(np.asarray(jnp.argmax(logits, -1)) < 101)
    assert np.all(logits[..., 101:] == jnp.finfo(jnp.float32).min)
    assert np.all(np.isfinite(jax.nn.log_softmax(logits)))


def test_bf16_compute_returns_fp32_logits(params):
    cfg = TINY.replace(dtype="bfloat16")
    tokens = rand_tokens(6, (2, 16))
    logits, _ = forward(params, tokens, cfg)
    ref, _ = forward(params, tokens, TINY)
    assert logits.dtype == jnp.float32
    assert params["wte"]["embedding"].dtype == jnp.float32
    # bf16 rounding moves these logits by at most 0.0033 (measured over 6 random batches, 2026-12-01); 0.008 leaves
    # a 2.5x margin and still rejects a real error such as dropping one layer's MLP (0.08, checked below).
    np.testing.assert_allclose(logits[..., :101], ref[..., :101], atol=0.008)
    broken = jax.tree.map(lambda x: x, params)
    broken["h_1"]["mlp"]["c_proj"] = jax.tree.map(jnp.zeros_like, broken["h_1"]["mlp"]["c_proj"])
    dropped, _ = forward(broken, tokens, TINY)
    assert np.max(np.abs(dropped - ref)[..., :101]) > 0.008
    cache = model.KVCache.init(cfg, 2, 16)
    assert cache.k.dtype == jnp.bfloat16 and cache.v.dtype == jnp.bfloat16
    out, _ = forward(params, tokens, cfg, cache=cache)
    assert out.dtype == jnp.float32


def test_auto_backend_exists_here():
    backend = resolve_backend("auto", jnp.bfloat16, 64)
    assert backend == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert resolve_backend("auto", jnp.float32, 64) == "xla"
    assert resolve_backend("auto", jnp.bfloat16, 64, needs_mask=True) == "xla"
    if jax.default_backend() != "gpu":
        with pytest.raises(ConfigError, match="cudnn needs a CUDA GPU"):
            resolve_backend("cudnn", jnp.bfloat16, 64)
    # The model runs with whatever "auto" resolved to, in both dtypes.
    for dtype in ("float32", "bfloat16"):
        cfg = TINY.replace(dtype=dtype, attention="auto", n_head=2)
        p = model.init_params(cfg, jax.random.key(0))
        logits, _ = forward(p, rand_tokens(8, (1, 8)), cfg)
        assert np.all(np.isfinite(logits))


def test_xla_attention_matches_jax_reference():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 4, 8)) for i in range(3))
    head_major = lambda x: x.transpose(0, 2, 1, 3)  # the KV cache's layouts: v [B, H, S, D], k [B, H, D, S]
    ours = xla_attention(q, k.transpose(0, 2, 3, 1), head_major(v), None)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.gpu
@requires_gpu
def test_cudnn_matches_xla_attention_bf16():
    cfg = configs.get_preset("gpt2").replace(n_layer=2, dtype="bfloat16")
    p = model.init_params(cfg, jax.random.key(0))
    tokens = rand_tokens(9, (4, 512), cfg.vocab_size)
    xla, _ = jax.jit(lambda p, t: forward(p, t, cfg.replace(attention="xla")))(p, tokens)
    cud, _ = jax.jit(lambda p, t: forward(p, t, cfg.replace(attention="cudnn")))(p, tokens)
    q, k, v = (jax.random.normal(jax.random.key(i), (4, 1024, 12, 64), jnp.bfloat16) for i in range(3))
    a = xla_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), None).astype(jnp.float32)
    b = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn").astype(jnp.float32)
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 1e-2
    rel = float(jnp.linalg.norm(xla - cud) / jnp.linalg.norm(xla))
    assert rel < 2e-2, rel


# ---------------------------------------------------------------------------------------------------------- configs


def test_config_errors():
    with pytest.raises(ConfigError, match="n_head=5 must divide model.n_embd=32"):
        TINY.replace(n_head=5)
    with pytest.raises(ConfigError, match="unknown model key"):
        configs.with_overrides(TINY, {"n_heads": 2}, "model.")
    with pytest.raises(ConfigError, match="model.dtype must be one of"):
        TINY.replace(dtype="float8")
    with pytest.raises(ConfigError, match="model.n_layer must be an integer"):
        configs.with_overrides(TINY, {"n_layer": "two"}, "model.")
    with pytest.raises(ConfigError, match="dropout must be in"):
        TINY.replace(dropout=1.5)
    with pytest.raises(ConfigError, match="unknown model preset"):
        configs.get_preset("gpt5")
    with pytest.raises(ConfigError, match="expects key=value"):
        configs.parse_assignments(["n_layer"])


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"model": {"n_layer": 3, "dtype": "bfloat16"}}')
    cfg = configs.model_config("tiny", str(path), configs.parse_assignments(["n_embd=64", "scan_layers=true"]))
    assert (cfg.n_layer, cfg.dtype, cfg.n_embd, cfg.scan_layers) == (3, "bfloat16", 64, True)
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nn_layer = 4\n")
    assert configs.model_config("tiny", str(toml)).n_layer == 4
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        configs.model_config("tiny", str(tmp_path / "bad.json"))


def test_cli_config_errors_are_one_line(tmp_path):
    assert_one_line_error(run_cli("info", "--model", "tiny", "--set", "n_head=3"), "must divide")
    assert_one_line_error(run_cli("info", "--model", "nope"), "unknown model preset")
    assert_one_line_error(run_cli("info", "--model", "tiny", "--set", "bogus=1"), "--set bogus: unknown key")
    assert_one_line_error(run_cli("info", "--config", str(tmp_path / "missing.json")), "does not exist")
    proc = run_cli("info", "--model", "tiny", "--forward")
    assert proc.returncode == 0, proc.stderr


def test_import_does_not_pull_tensorflow_datasets():
    out = run_module("import_purity")
    assert out == {"tfds": False, "tf": False}


def test_bias_free_variant_matches_nanogpt_size():
    """nanoGPT's shakespeare_char model has no biases: 10.65M parameters without position embeddings."""
    cfg = configs.get_preset("baby").replace(vocab_size=65, bias=False)
    assert model.param_count(cfg) - cfg.n_positions * cfg.n_embd == 10_646_784
    p = model.init_params(cfg.replace(n_layer=1), jax.random.key(0))
    assert "bias" not in p["h_0"]["attn"]["c_attn"] and "bias" not in p["ln_f"]
    with pytest.raises(UserError, match="no biases"):
        from aigc_jax.interop import hf

        hf.to_hf_state_dict(p, cfg.replace(n_layer=1))


@pytest.mark.parametrize("lhs_shape,rhs_shape,contract", [
    ((2, 5, 8), (8, 3, 4), 1),      # q_proj-like: one input axis, two feature axes
    ((2, 5, 3, 4), (3, 4, 8), 2),   # o_proj-like: two contracted axes
    ((2, 1, 8), (8, 6), 1),         # a decode step (T = 1): the unfolded path
    ((5, 8), (8, 6), 1),            # 2-D input
])
def test_dense_dot_equals_dot_general_with_gradients(lhs_shape, rhs_shape, contract):
    """layers.dense_dot (the Dense layers' dot: [B, T, K] folded to [B·T, K] when T > 1) against lax.dot_general,
    values and both gradients."""
    nl = len(lhs_shape)
    dims = ((tuple(range(nl - contract, nl)), tuple(range(contract))), ((), ()))
    dot = layers.dense_dot(["mlp", "c_fc"], {}, "h_")
    x = jax.random.normal(jax.random.key(1), lhs_shape)
    w = jax.random.normal(jax.random.key(2), rhs_shape)
    cot = jax.random.normal(jax.random.key(3), jax.eval_shape(lambda: jax.lax.dot_general(x, w, dims)).shape)

    def loss(d):
        return lambda x, w: jnp.sum(d(x, w, dims) * cot)

    ours, ref = jax.jit(dot, static_argnums=2)(x, w, dims), jax.lax.dot_general(x, w, dims)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    for g_ours, g_ref in zip(jax.grad(loss(dot), (0, 1))(x, w), jax.grad(loss(jax.lax.dot_general), (0, 1))(x, w)):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)
