"""What every decoder family must do, written once and run for each registered family: causality, the KV cache (one
write index or one per row, left padding) giving the full forward's logits, scanned layers equal to unrolled ones,
rematerialisation that keeps gradients, and dropout only in training.

A new family gets these by adding a tiny config of it to FAMILIES (the test below fails until it does)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax import configs, model
from aigc_jax.models import registry

forward = jax.jit(model.forward, static_argnames=("config", "train"))

# Tiny configs with everything each family can vary at work: GPT-2's learned positions; Llama's grouped-query
# heads, untied head and a sliding window (5) shorter than the sequences below.
FAMILIES = {
    "gpt2": configs.get_preset("tiny").replace(vocab_size=101, n_layer=3, n_head=4, n_embd=32),
    "llama": configs.get_preset("llama-tiny").replace(vocab_size=97, n_positions=48, sliding_window=5),
}


def test_every_registered_family_is_covered():
    assert set(FAMILIES) == {family.name for family in registry.families()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    """(config, params): random weights scaled up so that every layer changes the logits visibly."""
    config = FAMILIES[request.param]
    return config, jax.tree.map(lambda x: x * 3, model.init_params(config, jax.random.key(0)))


def rand_tokens(seed, shape, config):
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, config.vocab_size))


def test_causality(fam):
    cfg, params = fam
    tokens = rand_tokens(1, (2, 16), cfg)
    base, _ = forward(params, tokens, cfg)
    for t in (0, 7, 15):
        changed = tokens.copy()
        changed[:, t] = (tokens[:, t] + 1) % cfg.vocab_size
        logits, _ = forward(params, changed, cfg)
        np.testing.assert_array_equal(logits[:, :t], base[:, :t])
        assert not np.allclose(logits[:, t:], base[:, t:])


def test_cache_prefill_then_decode_equals_full_forward(fam):
    cfg, params = fam
    V = cfg.vocab_size
    tokens = rand_tokens(2, (3, 20), cfg)
    full, _ = forward(params, tokens, cfg)
    cache = model.KVCache.init(cfg, 3, max_len=32)
    assert cache.k.shape == (cfg.n_layer, 3, cfg.n_kv_head, cfg.head_dim, 32)  # key/value heads only
    logits, cache = forward(params, tokens[:, :8], cfg, cache=cache)
    steps = [logits]
    for t in range(8, 20):
        logits, cache = forward(params, tokens[:, t : t + 1], cfg, cache=cache)
        steps.append(logits)
    assert int(cache.index) == 20
    np.testing.assert_allclose(jnp.concatenate(steps, 1)[..., :V], full[..., :V], atol=1e-5, rtol=0)


def test_left_padded_batch_matches_unpadded_rows(fam):
    cfg, params = fam
    V, lengths, new = cfg.vocab_size, [5, 9, 2], 6
    T = max(lengths)
    rows = [rand_tokens(10 + i, (1, n + new), cfg)[0] for i, n in enumerate(lengths)]
    tokens = np.zeros((3, T), np.int32)
    mask = np.zeros((3, T), bool)
    for i, n in enumerate(lengths):
        tokens[i, T - n :] = rows[i][:n]
        mask[i, T - n :] = True
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    cache = model.KVCache.init(cfg, 3, max_len=T + new)
    logits, cache = forward(params, tokens, cfg, positions_BxT=positions, cache=cache, mask_BxT=mask)
    # Also the cache-free forward with the same mask gives the same prefill logits.
    nocache, _ = forward(params, tokens, cfg, positions_BxT=positions, mask_BxT=mask)
    np.testing.assert_allclose(nocache[mask], logits[mask], atol=1e-5)
    per_step = [logits[:, -1]]
    pos = positions[:, -1]
    for s in range(new - 1):
        pos = pos + 1
        step_tokens = np.stack([rows[i][lengths[i] + s] for i in range(3)])[:, None]
        out, cache = forward(params, step_tokens, cfg, positions_BxT=pos[:, None], cache=cache)
        per_step.append(out[:, 0])
    for i, n in enumerate(lengths):
        ref, _ = forward(params, rows[i][None, : n + new - 1], cfg)
        got = jnp.stack([step[i] for step in per_step])
        np.testing.assert_allclose(got[:, :V], ref[0, n - 1 :, :V], atol=1e-5, rtol=0)


def test_scan_layers_equals_unrolled(fam):
    cfg, params = fam
    prefix = registry.for_config(cfg).layer_prefix
    scan_cfg = cfg.replace(scan_layers=True)
    stacked = model.match_layout(params, scan_cfg)
    assert set(stacked) == {k for k in params if not k.startswith(f"{prefix}_")} | {prefix}
    assert all(x.shape[0] == cfg.n_layer for x in jax.tree.leaves(stacked[prefix]))
    tokens = rand_tokens(3, (2, 12), cfg)
    a, _ = forward(params, tokens, cfg)
    b, _ = forward(stacked, tokens, scan_cfg)
    np.testing.assert_allclose(a, b, atol=1e-5)
    cache = model.KVCache.init(scan_cfg, 2, 16)
    c, cache = forward(stacked, tokens[:, :7], scan_cfg, cache=cache)
    d, _ = forward(stacked, tokens[:, 7:], scan_cfg, cache=cache)
    np.testing.assert_allclose(jnp.concatenate([c, d], 1), a, atol=1e-5)
    back = model.match_layout(stacked, cfg)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), back, dict(params)))


@pytest.mark.parametrize("scan", [False, True])
def test_per_row_cache_rows_at_different_lengths_equal_full_forward(fam, scan):
    """A cache with one write index per row (what a serving engine keeps: each slot at its own length): rows
    prefilled to different lengths and then decoded together give each row's own full-forward logits."""
    cfg, params = fam
    cfg = cfg.replace(scan_layers=scan)
    p = model.match_layout(params, cfg)
    lengths, new = [3, 7], 5
    rows = [rand_tokens(30 + i, (1, n + new), cfg)[0] for i, n in enumerate(lengths)]
    cache = model.KVCache.init(cfg, 2, 16, per_row=True)
    for i, n in enumerate(lengths):  # prefill each row alone, writing only into its own slot
        one = jax.tree.map(lambda x: x[:, i:i + 1] if x.ndim == 5 else x[i:i + 1], cache)
        _, one = forward(p, rows[i][None, :n], cfg, cache=one)
        cache = jax.tree.map(lambda full, part: full.at[:, i:i + 1].set(part) if full.ndim == 5
                             else full.at[i:i + 1].set(part), cache, one)
    assert cache.index.tolist() == lengths
    got = []
    for s in range(new):
        step = np.stack([rows[i][lengths[i] + s] for i in range(2)])[:, None]
        out, cache = forward(p, step, cfg, cache=cache)
        got.append(out[:, 0])
    for i, n in enumerate(lengths):
        ref, _ = forward(p, rows[i][None], cfg)
        np.testing.assert_allclose(jnp.stack([g[i] for g in got]), ref[0, n:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_keeps_gradients(fam, remat, scan):
    cfg, params = fam
    tokens = rand_tokens(4, (2, 10), cfg)

    def loss(p, c):
        logits, _ = model.forward(p, tokens, c)
        return jnp.mean(jax.nn.logsumexp(logits[..., : c.vocab_size], -1))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    cfg = cfg.replace(scan_layers=scan)
    p = model.match_layout(params, cfg)
    ref = grad(p, cfg)
    got = grad(p, cfg.replace(remat=remat))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), ref, got)


def test_dropout_only_in_training(fam):
    cfg, params = fam
    drop = cfg.replace(dropout=0.3, attn_dropout=0.3)
    tokens = rand_tokens(7, (2, 16), cfg)
    ref, _ = forward(params, tokens, cfg)
    eval_logits, _ = forward(params, tokens, drop)
    np.testing.assert_array_equal(eval_logits, ref)
    a, _ = forward(params, tokens, drop, train=True, dropout_rng=jax.random.key(1))
    b, _ = forward(params, tokens, drop, train=True, dropout_rng=jax.random.key(1))
    c, _ = forward(params, tokens, drop, train=True, dropout_rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, ref)
