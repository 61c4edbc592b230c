"""AdamW with warmup + cosine decay to a floor, global-norm clipping and a non-finite guard (optax)."""

from __future__ import annotations

import jax
import optax

from aigc_jax.train.config import TrainConfig

# Effectively "never give up" inside optax: the training loop halts on its own, earlier, after
# TrainConfig.halt_after_nonfinite consecutive bad steps, so the last good checkpoint stays intact.
_OPTAX_MAX_ERRORS = 2**30


def schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_decay_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
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
