"""AdamW with warmup + cosine / warmup-stable-decay / constant schedules, global-norm clipping and a non-finite guard (optax)."""

from __future__ import annotations

import jax
import optax

from aigc_jax.train.config import TrainConfig

# Effectively "never give up" inside optax: the training loop halts on its own, earlier, after
# TrainConfig.halt_after_nonfinite consecutive bad steps, so the last good checkpoint stays intact.
_OPTAX_MAX_ERRORS = 2**30


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then (over `total_decay_steps` in all):
    cosine  — cosine decay to lr·min_lr_ratio (nanoGPT/GPT-3); the length is the run's, so extending a run moves it;
    wsd     — warmup–stable–decay: constant lr, then a linear decay to the floor over the last `decay_fraction`
              (MiniCPM, DeepSeek): a run resumed with more steps before its decay began never sees the lr jump;
    constant — lr after warmup, forever."""
    total = max(cfg.total_decay_steps, cfg.warmup_steps + 1)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, total, floor)
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        return optax.join_schedules([warmup, optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    decay = max(1, round(cfg.decay_fraction * total))
    stable_end = max(cfg.warmup_steps, total - decay)
    return optax.join_schedules(
        [warmup, optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, floor, total - stable_end)],
        [cfg.warmup_steps, stable_end],
    )


def decay_mask(params):
    """Weight decay on matrices only, decided by name, not ndim: "kernel" and "embedding" leaves decay
    (as in GPT-2/nanoGPT), biases and LayerNorm scales don't. By name because with scan_layers a bias has
    ndim 2 and would be misclassified by an ndim rule."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params
    )


def make(cfg: TrainConfig) -> optax.GradientTransformation:
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )
    # Skips (does not apply) any update whose gradients contain NaN/inf and counts consecutive skips.
    return optax.apply_if_finite(inner, _OPTAX_MAX_ERRORS)


def consecutive_nonfinite(opt_state) -> jax.Array:
    return opt_state.notfinite_count
