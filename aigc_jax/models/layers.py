"""Pieces every decoder family shares: the Dense layers' dot, default positions, the layer stack (unrolled or
nn.scan, with remat; every layer reads one `LayerInputs`, models/inputs.py), and the padded-vocabulary logit mask."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aigc_jax.models.cache import KVCache
from aigc_jax.models.inputs import LayerInputs
from aigc_jax.sharding import gathering_dot

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dense_dot(path, family_axes, layer_prefix: str):
    """The `dot_general` of a family's Dense layers: the kernel in its compute layout on a mesh
    (`sharding.gathering_dot`), and the rows of a [B, T, ...] input with T > 1 folded into one [B·T, ...] dim.

    Why the fold: with two row dims the weight gradient contracts over both, and XLA CPU then writes the activation
    gradient transposed *inside* the elementwise backward that produces it (SwiGLU's: ~31 ms per layer of a 1.25 s
    llama-baby step, 24% of it); over one row dim that disappears (+21% llama-baby tokens/s; GPT-2, without a gated
    MLP, within noise; benchmarks/NOTES.md). The kernel keeps its shape, so its sharding rules apply as written.
    Decode steps (T = 1) keep the 3-D form, whose matvec XLA CPU runs on a faster path than the folded one."""
    dot = gathering_dot(path, family_axes, layer_prefix)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        (lhs_contract, rhs_contract), batch = dimension_numbers
        rows = lhs.shape[:lhs.ndim - len(lhs_contract)]
        if any(batch) or len(rows) < 2 or rows[-1] == 1 or tuple(lhs_contract) != tuple(range(len(rows), lhs.ndim)):
            return dot(lhs, rhs, dimension_numbers, precision, preferred_element_type)
        folded = lhs.reshape(-1, *lhs.shape[len(rows):])
        contract = tuple(range(1, folded.ndim))
        out = dot(folded, rhs, ((contract, rhs_contract), ((), ())), precision, preferred_element_type)
        return out.reshape(*rows, *out.shape[1:])

    return dot_general


def default_positions(tokens_BxT: jax.Array, positions_BxT: jax.Array | None, cache: KVCache | None) -> jax.Array:
    """positions_BxT as given, else cache.index + 0..T-1 (per row when the cache has per-row indices)."""
    if positions_BxT is not None:
        return jnp.asarray(positions_BxT, jnp.int32)
    B, T = tokens_BxT.shape
    start = jnp.zeros((), jnp.int32) if cache is None else cache.index
    start_Bx1 = jnp.broadcast_to(jnp.reshape(start, (-1, 1)), (B, 1))
    return start_Bx1 + jnp.arange(T, dtype=jnp.int32)[None]


def open_cache(cache: KVCache | None, positions_BxT: jax.Array, mask_BxT: jax.Array | None):
    """(every layer's (k, v) as read before this call, the index the new keys are written at, the cache with these
    positions recorded) — or Nones without a cache."""
    if cache is None:
        return None, None, None
    return (cache.k, cache.v), cache.index, cache.with_positions(positions_BxT, mask_BxT)


def row_dropout(module: nn.Module, x_BxN: jax.Array, rate: float, rows_B: jax.Array | None,
                deterministic: bool) -> jax.Array:
    """Dropout whose mask for row b depends only on this call site's dropout key and rows_B[b], the row's place in
    the global batch: any device count, mesh or micro-batching draws the same masks (nn.Dropout draws one mask for
    the array it sees, so a device's rows would get masks that depend on how the batch was split)."""
    if deterministic or rate == 0.0:
        return x_BxN
    key = module.make_rng("dropout")
    rows_B = jnp.arange(x_BxN.shape[0]) if rows_B is None else rows_B
    keep = jax.vmap(lambda r: jax.random.bernoulli(jax.random.fold_in(key, r), 1.0 - rate, x_BxN.shape[1:]))(rows_B)
    return jnp.where(keep, x_BxN / (1.0 - rate), 0).astype(x_BxN.dtype)


def run_blocks(block_cls, config, prefix: str, block_args: tuple, x_BxTxD, kv, inputs: LayerInputs,
               layer_args=None):
    """Applies config.n_layer blocks: `block_cls(*block_args)(x, layer_kv, inputs) -> (x, new layer kv)`, every
    layer reading the same `inputs` (positions, masks, cache index, dropout rows, family extras).

    Unrolled (params `{prefix}_0`, `{prefix}_1`, …; each layer writes into the stacked cache in place) or, with
    `scan_layers`, one nn.scan (params under `prefix` with a leading layer axis; compile time flat in depth).
    `layer_args(i)`, if given, appends per-layer static arguments to `block_args` (e.g. a layer's attention
    window); a scan needs them equal for every layer and uses layer 0's.
    Returns (x, the stacked (k, v) cache or None)."""
    if layer_args is not None:
        per_layer = [block_args + tuple(layer_args(i)) for i in range(config.n_layer)]
        block_args = per_layer[0]
    else:
        per_layer = [block_args] * config.n_layer
    if config.remat != "none":
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers)
    if config.scan_layers:
        blocks = nn.scan(
            block_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast),  # the cache is sliced per layer; the inputs are every layer's
            length=config.n_layer,
        )(*block_args, name=prefix)
        scanned_kv = None if kv is None else (*kv, None)
        x_BxTxD, kv = blocks(x_BxTxD, scanned_kv, inputs)
        return x_BxTxD, kv
    for i in range(config.n_layer):
        layer_kv = None if kv is None else (*kv, i)
        x_BxTxD, new_kv = block_cls(*per_layer[i], name=f"{prefix}_{i}")(x_BxTxD, layer_kv, inputs)
        kv = kv if new_kv is None else new_kv
    return x_BxTxD, kv


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
    """Gives ids >= vocab_size the most negative fp32 value: never chosen, and unlike -inf never a NaN source."""
    if logits.shape[-1] == vocab_size:
        return logits
    keep = jnp.arange(logits.shape[-1]) < vocab_size
    return jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
