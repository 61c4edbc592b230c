"""The train and eval steps: one body for every layout, pure functions of (state, batch).

`axis` says how a step is mapped. Under `jax.pmap` / `jax.jit(jax.shard_map(...))` (aigc_jax/parallel.py) it is the
data axis: the step sees its device's rows and reduces across devices by name. Under a global-view `jax.jit` on a
(data, fsdp, tensor) mesh it is None: the step sees the whole batch and XLA partitions it by the shardings. A single
device is the 1-device case of either. Batches are dicts: `tokens` int32 [B, T+1] and `loss_mask` float32 [B, T],
where loss_mask[b, t] weights the prediction of tokens[b, t+1]; optional `stop` int32 [B] (a host's preemption flag,
reduced so every host sees it at the same step); optional `positions` and `segment_ids` int32 [B, T] for rows that
pack several examples.

The objective is a function `(params, batch, config, train, dropout_rng) -> (summed loss, summed weight)`
(`Objective`; `loss_sums`, next-token cross-entropy, by default). The step splits every batch field into
micro-batches, sums both numbers over micro-batches and devices and divides once, so a new objective (a preference
loss, say) gets gradient accumulation, every parallel layout, the non-finite guard and exact global means without
touching this file: it names the batch fields it reads, and the data pipeline provides them.

Loss rule: the global mean over every weighted token of the step, sum(nll·w) / sum(w), with both sums
taken over micro-batches and devices. This is exact for uneven masks (prompt→completion data),
where a mean of per-device means would not be, and makes 1 device and N devices compute the same number.
Dropout masks are drawn per row from (seed, step, the row's place in the global batch), so any device count, mesh
or micro-batching gives the same numbers with dropout on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from aigc_jax.model import forward
from aigc_jax.parallel import AXIS
from aigc_jax.train.config import TrainConfig
from aigc_jax.train.optimizer import schedule


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer steps taken (including skipped non-finite ones)
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2]: raw PRNG key; each step's key is folded from it (rows are folded in by dropout)


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
    )


# (params, batch, config, train, dropout_rng) -> (summed loss, summed weight); see the module docstring.
Objective = Callable[..., tuple[jax.Array, jax.Array]]


def loss_sums(params, batch: dict, config, train: bool = False, dropout_rng=None):
    """The next-token objective: (sum of weighted next-token NLL, sum of weights) for one batch (`rows`: its rows'
    global places)."""
    tokens_BxT1 = batch["tokens"]
    # Packed rows (several examples per row) carry "positions" and "segment_ids" [B, T] for the input tokens: each
    # example then sees only itself, and its loss_mask leaves out the predictions across example boundaries.
    logits_BxTxV, _ = forward(params, tokens_BxT1[:, :-1], config, train=train, dropout_rng=dropout_rng,
                              dropout_rows=batch.get("rows"), positions_BxT=batch.get("positions"),
                              segment_ids_BxT=batch.get("segment_ids"))
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV)
    nll_BxT = -jnp.take_along_axis(logp_BxTxV, tokens_BxT1[:, 1:, None], axis=-1)[..., 0]
    w_BxT = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll_BxT * w_BxT), jnp.sum(w_BxT)


def _reducer(axis: str | None):
    """Sum over the mapped axis (pmap / shard_map), or nothing: a global-view step already sees every row."""
    return (lambda x: lax.psum(x, axis)) if axis else (lambda x: x)


def train_step(state: TrainState, batch: dict, *, model_config, train_config: TrainConfig,
               optimizer: optax.GradientTransformation, axis: str | None = AXIS, objective: Objective = loss_sums):
    """One optimizer step; returns (new state, replicated metrics)."""
    accum = train_config.grad_accum
    B = batch["tokens"].shape[0]
    first_row = lax.axis_index(axis) * B if axis else 0
    rows = {**{k: v for k, v in batch.items() if k != "stop"}, "rows": first_row + jnp.arange(B, dtype=jnp.int32)}
    # Strided micro-batches (rows i, i + accum, …): a batch dimension split over devices stays split in each.
    micro = jax.tree.map(lambda x: x.reshape(B // accum, accum, *x.shape[1:]).swapaxes(0, 1), rows)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    # Mapped: differentiate this device's own ("varying") copy of the params. Without the cast, shard_map's
    # transpose rule already sums gradients of replicated inputs over devices, and the explicit psum
    # below would count them n_devices times.
    local_params = state.params if axis is None else jax.tree.map(lambda p: lax.pcast(p, axis, to="varying"),
                                                                    state.params)

    def grads_and_sums(mb):
        loss_fn = lambda p: objective(p, mb, model_config, True, key)
        (nll, w), g = jax.value_and_grad(loss_fn, has_aux=True)(local_params)
        return g, nll, w

    def micro_step(carry, mb):
        return jax.tree.map(jnp.add, carry, grads_and_sums(mb)), None

    # The first micro-batch seeds the sums (no zero-filled carry, and no loop at all when accum == 1).
    first = grads_and_sums(jax.tree.map(lambda x: x[0], micro))
    rest = jax.tree.map(lambda x: x[1:], micro)
    (g_sum, nll_sum, w_sum), _ = lax.scan(micro_step, first, rest) if accum > 1 else (first, None)
    g_sum, nll_sum, w_sum = _reducer(axis)((g_sum, nll_sum, w_sum))

    denom = jnp.maximum(w_sum, 1.0)
    loss = nll_sum / denom
    # A non-finite loss poisons the gradients so apply_if_finite skips the update even if they looked finite.
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g / denom, jnp.nan), g_sum)
    skipped_before = state.opt_state.total_notfinite
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    stop = jnp.max(batch["stop"]) if "stop" in batch else jnp.zeros((), jnp.int32)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "lr": schedule(train_config)(state.step - skipped_before),
        "tokens": w_sum,
        "nonfinite_streak": opt_state.notfinite_count,
        "skipped": opt_state.total_notfinite - skipped_before,
        "stop": lax.pmax(stop, axis) if axis else stop,  # any host asked to stop: all stop at this step
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, model_config, axis: str | None = AXIS, objective: Objective = loss_sums):
    """{"nll": sum, "tokens": sum of weights} over every device's rows (replicated)."""
    nll, w = _reducer(axis)(objective(params, batch, model_config))
    return {"nll": nll, "tokens": w}
