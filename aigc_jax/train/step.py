"""The per-device train and eval steps: pure functions of (state, batch), reducing across devices by axis name.

They run unchanged under `jax.pmap` and under `jax.jit(jax.shard_map(...))` (see aigc_jax/parallel.py);
a single device is the 1-device mesh. Batches are dicts: `tokens` int32 [B, T+1] and `loss_mask`
float32 [B, T], where loss_mask[b, t] weights the prediction of tokens[b, t+1].

Loss rule: the global mean over every weighted token of the step, sum(nll·w) / sum(w), with both sums
taken over micro-batches and devices (psum). This is exact for uneven masks (prompt→completion data),
where a mean of per-device means would not be, and makes 1 device and N devices compute the same number.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from aigc_jax.configs import ModelConfig
from aigc_jax.model import forward
from aigc_jax.parallel import AXIS
from aigc_jax.train.config import TrainConfig
from aigc_jax.train.optimizer import schedule


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer steps taken (including skipped non-finite ones)
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2]: raw PRNG key; per-step, per-device, per-micro-batch keys are folded from it


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
    )


def loss_sums(params, batch: dict, config: ModelConfig, train: bool = False, dropout_rng=None):
    """(sum of weighted next-token NLL, sum of weights) for one batch."""
    tokens_BxT1 = batch["tokens"]
    logits_BxTxV, _ = forward(params, tokens_BxT1[:, :-1], config, train=train, dropout_rng=dropout_rng)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV)
    nll_BxT = -jnp.take_along_axis(logp_BxTxV, tokens_BxT1[:, 1:, None], axis=-1)[..., 0]
    w_BxT = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll_BxT * w_BxT), jnp.sum(w_BxT)


def train_step(state: TrainState, batch: dict, *, model_config: ModelConfig, train_config: TrainConfig,
               optimizer: optax.GradientTransformation):
    """One optimizer step on this device's rows; returns (new state, replicated metrics)."""
    accum = train_config.grad_accum
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
                             lax.axis_index(AXIS))

    # Differentiate this device's own ("varying") copy of the params. Without the cast, shard_map's
    # transpose rule already sums gradients of replicated inputs over devices, and the explicit psum
    # below would count them n_devices times.
    local_params = jax.tree.map(lambda p: lax.pcast(p, AXIS, to="varying"), state.params)

    def grads_and_sums(i, mb):
        loss_fn = lambda p: loss_sums(p, mb, model_config, True, jax.random.fold_in(key, i))
        (nll, w), g = jax.value_and_grad(loss_fn, has_aux=True)(local_params)
        return g, nll, w

    def micro_step(carry, i_and_batch):
        return jax.tree.map(jnp.add, carry, grads_and_sums(*i_and_batch)), None

    # The first micro-batch seeds the sums (no zero-filled carry, and no loop at all when accum == 1).
    first = grads_and_sums(0, jax.tree.map(lambda x: x[0], micro))
    rest = (jnp.arange(1, accum), jax.tree.map(lambda x: x[1:], micro))
    (g_sum, nll_sum, w_sum), _ = lax.scan(micro_step, first, rest) if accum > 1 else (first, None)
    g_sum, nll_sum, w_sum = lax.psum((g_sum, nll_sum, w_sum), AXIS)

    denom = jnp.maximum(w_sum, 1.0)
    loss = nll_sum / denom
    # A non-finite loss poisons the gradients so apply_if_finite skips the update even if they looked finite.
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g / denom, jnp.nan), g_sum)
    skipped_before = state.opt_state.total_notfinite
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "lr": schedule(train_config)(state.step - skipped_before),
        "tokens": w_sum,
        "nonfinite_streak": opt_state.notfinite_count,
        "skipped": opt_state.total_notfinite - skipped_before,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, model_config: ModelConfig):
    """Replicated {"nll": sum, "tokens": sum of weights} over every device's rows."""
    nll, w = loss_sums(params, batch, model_config)
    nll, w = lax.psum((nll, w), AXIS)
    return {"nll": nll, "tokens": w}
