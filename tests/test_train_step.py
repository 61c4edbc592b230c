"""The per-device train step: 1 vs 8 devices, pmap vs shard_map, gradient accumulation, the non-finite guard."""

import functools

import jax
import numpy as np
import pytest
from conftest import run_module

from aigc_jax import model, parallel, sharding
from aigc_jax.train import optimizer as optim
from aigc_jax.train.config import TrainConfig
from aigc_jax.train.step import init_state, train_step
from helpers.train_step import TINY, batch, our_step, run_steps, torch_adamw_step

def test_decay_mask_by_name():
    cfg = TINY.replace(scan_layers=True)
    mask = optim.decay_mask(model.init_params(cfg, jax.random.key(0)))
    assert mask["wte"]["embedding"] and mask["h"]["attn"]["c_attn"]["kernel"]
    assert not mask["h"]["attn"]["c_attn"]["bias"] and not mask["h"]["ln_1"]["scale"] and not mask["ln_f"]["bias"]


def test_gradient_accumulation_equals_full_batch():
    cfg = TrainConfig(steps=3, batch_size=8, seq_len=16, lr=1e-3, warmup_steps=1)
    batches = [batch(s, 8) for s in range(3)]
    full, l_full = run_steps("shard_map", jax.devices()[:1], 3, cfg, batches)
    acc, l_acc = run_steps("shard_map", jax.devices()[:1], 3, cfg.__class__(**{**cfg.to_dict(), "grad_accum": 4}), batches)
    np.testing.assert_allclose(l_acc, l_full, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), acc.params, full.params)  # ≤ 1e-5, the bar


def test_nonfinite_step_is_skipped_and_counted():
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    opt = optim.make(cfg)
    fn = jax.jit(parallel.wrap(functools.partial(train_step, model_config=TINY, train_config=cfg, optimizer=opt),
                               "shard_map", mesh, ("rep", "data"), ("rep", "rep")))
    state = init_state(model.init_params(TINY, jax.random.key(0)), opt, 0)
    good = batch(0, 4)
    bad = {**good, "loss_mask": good["loss_mask"].copy()}
    bad["loss_mask"][0, 0] = np.nan
    s1, m1 = fn(state, bad)
    assert not np.isfinite(float(m1["loss"])) and int(m1["skipped"]) == 1 and int(m1["nonfinite_streak"]) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), s1.params, state.params)
    s2, m2 = fn(s1, bad)
    assert int(m2["nonfinite_streak"]) == 2
    s3, m3 = fn(s2, good)
    assert np.isfinite(float(m3["loss"])) and int(m3["nonfinite_streak"]) == 0 and int(s3.step) == 3
    assert not np.allclose(s3.params["wte"]["embedding"], state.params["wte"]["embedding"])
    # The learning rate schedule only advances on applied updates: step 3 uses lr(0) like a fresh step 1.
    _, fresh = fn(state, good)
    np.testing.assert_allclose(float(m3["lr"]), float(fresh["lr"]))
    np.testing.assert_allclose(float(m3["loss"]), float(fresh["loss"]), rtol=1e-6)


def test_schedule_warmup_cosine_floor():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    sched = optim.schedule(cfg)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 1e-4, rtol=1e-5)
    assert float(sched(55)) < float(sched(20))


def test_one_vs_eight_devices_pmap_and_shard_map():
    out = run_module("train_step_devices", devices=8)
    ref = out["shard_map1"]
    for key, got in out.items():
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(got["params"], ref["params"], rtol=1e-5, atol=1e-6, err_msg=key)
    assert ref["losses"][-1] < ref["losses"][0]


def test_one_adamw_step_on_hf_weights_equals_torch(tmp_path):
    """Imported HF weights, one batch: our step (clipping active, decay on matrices only) equals
    transformers + torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW with the same parameter groups."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from helpers.hf_models import make_hf_model

    from aigc_jax.interop import hf

    hf_model = make_hf_model(tmp_path, seed=3, vocab_size=103, n_positions=16, n_layer=2, n_head=2, n_embd=16,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config, params, _ = hf.load_hf_dir(str(tmp_path))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 103, (4, 17), dtype=np.int32)
    tc = TrainConfig(steps=10, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0,
                     weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=0.5)
    loss, norm, _, expected = torch_adamw_step(hf_model, tokens, tc)
    assert norm > tc.grad_clip  # clipping is exercised

    got, metrics = our_step(config, params, tokens, tc)
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    d = config.n_embd
    for key, value in got.items():
        want = expected[key]
        if key.endswith("attn.c_attn.bias"):
            # The key bias adds q·b to every score of a query, which softmax ignores: its true gradient is 0,
            # both frameworks compute rounding noise, and Adam normalises that noise to a ±lr-sized step.
            np.testing.assert_array_less(np.abs(value[d:2 * d] - want[d:2 * d]), 2 * tc.lr)
            value, want = np.delete(value, np.s_[d:2 * d]), np.delete(want, np.s_[d:2 * d])
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_new_objective_gets_accumulation_and_the_global_mean_from_the_step():
    """An objective reading its own batch field ("row_weight"), run with grad_accum=2, takes the step that a
    plain jax.grad of its global mean (summed loss / summed weight over the whole batch) gives to the optimizer."""
    import jax.numpy as jnp
    import optax

    from aigc_jax.train.step import loss_sums

    def weighted_rows(params, b, config, train=False, dropout_rng=None):
        nll, _ = loss_sums(params, {**b, "loss_mask": b["loss_mask"] * b["row_weight"][:, None]}, config)
        return nll, jnp.sum(b["row_weight"])

    # Adam's eps=1: an update of ~lr·g rather than ~lr·sign(g), which rounding flips where g is ~0.
    cfg = TrainConfig(steps=1, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0, grad_accum=2, grad_clip=0.0, eps=1.0)
    opt = optim.make(cfg)
    step = jax.jit(functools.partial(train_step, model_config=TINY, train_config=cfg, optimizer=opt, axis=None,
                                     objective=weighted_rows))
    params = model.init_params(TINY, jax.random.key(0))
    b = {**batch(0, 4), "row_weight": np.array([1.0, 0.0, 2.0, 0.5], np.float32)}
    new, metrics = step(init_state(params, opt, 0), b)

    def global_mean(p):
        nll, w = weighted_rows(p, b, TINY)
        return nll / w

    loss, grads = jax.jit(jax.value_and_grad(global_mean))(params)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-5)
    expected, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    jax.tree.map(lambda a, p, u: np.testing.assert_allclose(a, p + u, rtol=1e-4, atol=1e-6), new.params, params,
                 expected)
