"""Scaled dot-product attention backends: "xla" (plain einsums, any device/dtype) and "cudnn" (fused kernel).

Measured on an H200 (see ../shared/DESIGN.md): cuDNN causal attention is ~7-10x faster than XLA's, but it
needs fp16/bf16 inputs and head_dim % 8 == 0 (<= 256), raises instead of falling back, and has no dropout.
So "auto" picks cuDNN only where it is known to work and the XLA path stays the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aigc_jax.errors import ConfigError


def resolve_backend(name: str, dtype, head_dim: int, *, needs_mask: bool = False, dropout: bool = False) -> str:
    """Maps "auto" to a backend that exists on this device for these inputs; validates explicit choices.

    `needs_mask`: the call needs an arbitrary mask (left padding, KV cache); `dropout`: attention dropout is
    active. cuDNN here only serves the plain causal, unmasked, dropout-free case (training and scoring on
    packed sequences without segment ids, whose mask it cannot take), which is where its speed matters.
    """
    dtype = jnp.dtype(dtype)
    cudnn_ok = (
        jax.default_backend() == "gpu"
        and dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 256
    )
    if name == "auto":
        return "cudnn" if cudnn_ok and not needs_mask and not dropout else "xla"
    if name == "cudnn":
        if not cudnn_ok:
            raise ConfigError(
                "attention=cudnn needs a CUDA GPU, dtype bfloat16/float16 and head_dim a multiple of 8 (<= 256); "
                f"have backend={jax.default_backend()}, dtype={dtype.name}, head_dim={head_dim}. Use attention=auto"
            )
        # Masked/cached/dropout calls fall back to XLA: cuDNN has no dropout and decode is bandwidth-bound anyway.
        return "xla" if needs_mask or dropout else "cudnn"
    if name == "xla":
        return "xla"
    raise ConfigError(f"unknown attention backend {name!r}; use auto, xla or cudnn")


def attention(
    q_BxTxHxD: jax.Array,
    k_BxHxDxS: jax.Array,
    v_BxHxSxD: jax.Array,
    mask_BxTxS: jax.Array | None,
    *,
    backend: str,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    window: int | None = None,
    rows_B: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention. Keys and values come in the KV cache's layouts (head-major, keys transposed), with
    H_kv <= H heads: query head n uses key/value head n // (H / H_kv) (grouped-query attention, HF's repeat_kv).
    `mask_BxTxS` True = may attend; None means plain causal with T == S, within the last `window` positions
    when one is given (a given mask already holds the window: see models/cache.attention_mask). Dropout masks are
    drawn per row from (dropout_rng, rows_B[b]) (see models/layers.row_dropout)."""
    if backend == "cudnn":
        assert mask_BxTxS is None and dropout_rate == 0.0
        # XLA folds these transposes into the ones that made k and v head-major: no copy. cuDNN takes fewer KV
        # heads than query heads natively; its window (left, right) counts keys before the query.
        k_BxSxHxD, v_BxSxHxD = k_BxHxDxS.transpose(0, 3, 1, 2), v_BxHxSxD.transpose(0, 2, 1, 3)
        return jax.nn.dot_product_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, is_causal=True, implementation="cudnn",
                                            local_window_size=None if window is None else (window - 1, 0))
    return xla_attention(q_BxTxHxD, k_BxHxDxS, v_BxHxSxD, mask_BxTxS, dropout_rate, dropout_rng, window, rows_B)


def xla_attention(q_BxTxHxD, k_BxHxDxS, v_BxHxSxD, mask_BxTxS, dropout_rate=0.0, dropout_rng=None, window=None,
                  rows_B=None):
    B, T, H, D = q_BxTxHxD.shape
    Hkv, S = k_BxHxDxS.shape[1], k_BxHxDxS.shape[3]
    if mask_BxTxS is None:
        mask_BxTxS = jnp.tril(jnp.ones((T, S), bool), k=S - T)[None]
        if window is not None:
            mask_BxTxS &= ~jnp.tril(jnp.ones((T, S), bool), k=S - T - window)[None]
    G = H // Hkv
    if G > 1:
        # Grouped heads: query head n = k * G + g reads KV head k. The G query heads of a KV head become G·T rows
        # of one matmul per (batch, KV head), so K/V are never repeated in memory.
        q_BxKxMxD = q_BxTxHxD.reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
        scores = jnp.einsum("bkmd,bkds->bkms", q_BxKxMxD, k_BxHxDxS,
                            preferred_element_type=jnp.float32).reshape(B, H, T, S)
    else:
        # Scores and softmax in fp32 whatever the compute dtype: bf16 softmax loses too much for long contexts.
        scores = jnp.einsum("bthd,bhds->bhts", q_BxTxHxD, k_BxHxDxS, preferred_element_type=jnp.float32)
    scores_BxHxTxS = scores / jnp.sqrt(jnp.float32(D))
    # A large finite negative (not -inf) so fully masked rows (left-padding queries) give a uniform, NaN-free softmax.
    scores_BxHxTxS = jnp.where(mask_BxTxS[:, None], scores_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    if dropout_rate > 0.0:
        rows_B = jnp.arange(B) if rows_B is None else rows_B
        keep = jax.vmap(lambda r: jax.random.bernoulli(jax.random.fold_in(dropout_rng, r), 1.0 - dropout_rate,
                                                       probs_BxHxTxS.shape[1:]))(rows_B)
        probs_BxHxTxS = jnp.where(keep, probs_BxHxTxS / (1.0 - dropout_rate), 0.0)
    probs_BxHxTxS = probs_BxHxTxS.astype(v_BxHxSxD.dtype)
    if G > 1:
        out_BxKxMxD = jnp.einsum("bkms,bksd->bkmd", probs_BxHxTxS.reshape(B, Hkv, G * T, S), v_BxHxSxD)
        return out_BxKxMxD.reshape(B, Hkv, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
    return jnp.einsum("bhts,bhsd->bthd", probs_BxHxTxS, v_BxHxSxD)
