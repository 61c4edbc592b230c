"""The KV cache every decoder family carries explicitly through its call, and the attention mask it implies.

A cache is a pytree, not Flax's mutable "cache" collection, so `lax.scan`/`while_loop` can carry it, beam search
can reorder its rows with a gather, and a serving engine can swap one row (slot) for another request.

Slots are not positions. Each slot remembers the position of the token written there (`pos`, -1 = empty), and
attention is decided by positions alone: query at position p may see slot s iff 0 <= pos[s] <= p (and, with a
sliding window W, p - pos[s] < W). So left-padded batches (pad slots stay -1), rows at different lengths
(continuous batching: each row writes at its own `index`) and sliding windows all use the same mask.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from jax import lax

from aigc_jax.models.base import compute_dtype
from aigc_jax.sharding import constrain

# Logical axes of the cache's arrays (sharding.py maps them to mesh axes): rows over the batch axes, keys and values
# over their heads (tensor parallelism keeps a head's attention on one device), slots whole.
K_AXES = ("layers", "batch", "kv_heads", "head_dim", None)
V_AXES = ("layers", "batch", "kv_heads", None, "head_dim")
POS_AXES = ("batch", None)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_len` slots per row.

    `index` is the next slot to write: one scalar for the whole batch (rows aligned by left padding, as in
    offline generation) or one per row [B] (rows at their own lengths, as in a serving engine).
    """

    # Head-major, keys stored transposed: q·kᵀ and p·v then read the cache where it lies. With a [.., S, H, D]
    # cache XLA copied every layer's keys and values into these layouts on every decoded token. (Per-layer
    # buffers instead of one stacked array would also save slicing the layer out, but XLA's copy insertion
    # then copies every loop-carried buffer per token: measured slower on CPU.)
    k: jax.Array  # [L, B, Hkv, D, S]
    v: jax.Array  # [L, B, Hkv, S, D]
    pos: jax.Array  # [B, S] int32: position of the token in each slot, -1 = empty
    index: jax.Array  # [] or [B] int32: next slot to write

    @classmethod
    def init(cls, config, batch_size: int, max_len: int | None = None, dtype=None, per_row: bool = False) -> "KVCache":
        """An empty cache. `config` is any family's config (n_layer, n_kv_head, head_dim, n_positions, dtype)."""
        max_len = max_len or config.n_positions
        L, B, H, D = config.n_layer, batch_size, config.n_kv_head, config.head_dim
        dtype = jnp.dtype(dtype) if dtype is not None else compute_dtype(config)
        # Created in place on a mesh (constrain is a no-op without active rules): never whole on one device.
        return cls(
            k=constrain(jnp.zeros((L, B, H, D, max_len), dtype), K_AXES),
            v=constrain(jnp.zeros((L, B, H, max_len, D), dtype), V_AXES),
            pos=constrain(jnp.full((B, max_len), -1, jnp.int32), POS_AXES),
            index=jnp.zeros((B,) if per_row else (), jnp.int32),
        )

    @staticmethod
    def logical_axes(per_row: bool = False) -> "KVCache":
        """The logical axes of each field, as a KVCache of tuples (for shardings of a cache crossing a jit)."""
        return KVCache(k=K_AXES, v=V_AXES, pos=POS_AXES, index=("batch",) if per_row else ())

    @property
    def max_len(self) -> int:
        return self.pos.shape[1]

    def gather(self, rows_B: jax.Array) -> "KVCache":
        """Reorders/duplicates batch rows by global row number (with the rows split over devices this moves the
        cache between them: beam search uses gather_groups)."""
        index = self.index if self.index.ndim == 0 else self.index[rows_B]
        return self.replace(k=self.k[:, rows_B], v=self.v[:, rows_B], pos=self.pos[rows_B], index=index)

    def gather_groups(self, idx_GxJ: jax.Array) -> "KVCache":
        """Rows in G contiguous groups (rows = G * R): new row g*J + j is old row g*R + idx[g, j]. Beam search
        reorders (R = J = beams) or repeats (R = 1) the rows of each prompt this way: with the rows split over
        devices, every group stays on its device, so the reorder is local where `gather` would move the cache."""
        G, J = idx_GxJ.shape

        def take(x, axis):
            grouped = x.reshape(*x.shape[:axis], G, x.shape[axis] // G, *x.shape[axis + 1:])
            idx = idx_GxJ.reshape((1,) * axis + (G, J) + (1,) * (x.ndim - axis - 1))
            out = jnp.take_along_axis(grouped, idx, axis=axis + 1, mode="clip")
            return out.reshape(*x.shape[:axis], G * J, *x.shape[axis + 1:])

        index = self.index if self.index.ndim == 0 else take(self.index, 0)
        return self.replace(k=take(self.k, 1), v=take(self.v, 1), pos=take(self.pos, 0), index=index)

    def with_positions(self, positions_BxT: jax.Array, mask_BxT: jax.Array | None) -> "KVCache":
        """Records the positions of T new tokens at slots [index, index + T) (padding, mask False, stays -1)."""
        new_BxT = positions_BxT.astype(jnp.int32)
        if mask_BxT is not None:
            new_BxT = jnp.where(mask_BxT, new_BxT, -1)
        return self.replace(pos=write_slots(self.pos, new_BxT, self.index, slot_axis=1))

    def advanced(self, T: int) -> "KVCache":
        return self.replace(index=self.index + T)


def write_slots(buffer: jax.Array, new: jax.Array, index: jax.Array, slot_axis: int) -> jax.Array:
    """Writes `new` into `buffer` ([B, …]) at `index` along `slot_axis`: one offset for all rows, or one per row."""
    new = new.astype(buffer.dtype)
    if index.ndim == 0:
        at = [0] * buffer.ndim
        at[slot_axis] = index
        return lax.dynamic_update_slice(buffer, new, at)
    # Per-row offsets: the same update vmapped over rows (XLA makes it a scatter).
    return jax.vmap(lambda b, n, i: write_slots(b, n, i, slot_axis - 1))(buffer, new, index)


def write_layer(cache_kv: tuple, layer: int | None, k_BxHxDxT: jax.Array, v_BxHxTxD: jax.Array, index: jax.Array):
    """Writes one layer's new keys/values. `cache_kv` is (k, v) of this layer alone (nn.scan hands out slices;
    layer=None) or of all layers stacked (layer = its index). Returns (updated cache_kv, this layer's (k, v))."""
    k_cache, v_cache = cache_kv
    if layer is None:
        k_cache, v_cache = write_slots(k_cache, k_BxHxDxT, index, 3), write_slots(v_cache, v_BxHxTxD, index, 2)
        return (k_cache, v_cache), (k_cache, v_cache)
    if index.ndim == 0:
        # Straight into the stacked cache: re-stacking per-layer results would copy every layer's cache per token.
        k_cache = lax.dynamic_update_slice(k_cache, k_BxHxDxT[None].astype(k_cache.dtype), (layer, 0, 0, 0, index))
        v_cache = lax.dynamic_update_slice(v_cache, v_BxHxTxD[None].astype(v_cache.dtype), (layer, 0, 0, index, 0))
    elif k_BxHxDxT.shape[-1] == 1:
        # One token per row at its own slot (a serving engine's decode step): one scatter into the stacked cache,
        # which XLA does in place. Writing the layer's slice and setting it back copied the whole cache per layer
        # (measured: 150 ms instead of 11 ms per step for the baby model with 32 rows of 256 slots on CPU).
        rows_B = jnp.arange(index.shape[0])
        k_cache = k_cache.at[layer, rows_B, :, :, index].set(k_BxHxDxT[..., 0].astype(k_cache.dtype))
        v_cache = v_cache.at[layer, rows_B, :, index, :].set(v_BxHxTxD[:, :, 0].astype(v_cache.dtype))
    else:
        k_cache = k_cache.at[layer].set(write_slots(k_cache[layer], k_BxHxDxT, index, 3))
        v_cache = v_cache.at[layer].set(write_slots(v_cache[layer], v_BxHxTxD, index, 2))
    return (k_cache, v_cache), (k_cache[layer], v_cache[layer])


def update_layer(layer_kv, k_BxHxDxT: jax.Array, v_BxHxTxD: jax.Array, index: jax.Array, dtype):
    """An attention layer's use of its cache: `layer_kv` is None (no cache) or (k, v, layer) as run_blocks hands it
    out. Returns (the updated cache or None, the keys and values to attend to, in `dtype`)."""
    if layer_kv is None:
        return None, (k_BxHxDxT, v_BxHxTxD)
    *kv, layer = layer_kv
    new_kv, (k_BxHxDxS, v_BxHxSxD) = write_layer(tuple(kv), layer, k_BxHxDxT, v_BxHxTxD, index)
    return new_kv, (k_BxHxDxS.astype(dtype), v_BxHxSxD.astype(dtype))


def attention_mask(positions_BxT: jax.Array, mask_BxT: jax.Array | None, cache: KVCache | None,
                   window: int | None = None, segment_ids_BxT: jax.Array | None = None) -> jax.Array | None:
    """[B, T, S] bool "query t may see key s", or None for the plain causal case (which cuDNN serves).

    With a cache, `cache.pos` already holds the T new tokens. Without one, keys are the T tokens themselves.
    `segment_ids_BxT` packs several examples into a row: a query sees only keys of its own segment, so with
    positions restarting at 0 per example each one attends as if it were alone.
    """
    if segment_ids_BxT is not None and cache is not None:
        # The cache records positions, not segments: earlier examples' keys would stay visible to later ones.
        raise ValueError("segment_ids_BxT packs examples for a cache-free forward (training, scoring); "
                         "a KV cache holds one sequence per row: pass segment_ids_BxT=None with a cache")
    if cache is None:
        if mask_BxT is None and window is None and segment_ids_BxT is None:
            return None
        kv_pos_BxS = positions_BxT if mask_BxT is None else jnp.where(mask_BxT, positions_BxT, -1)
    else:
        kv_pos_BxS = cache.pos
    q_BxTx1, kv_Bx1xS = positions_BxT[:, :, None], kv_pos_BxS[:, None, :]
    allowed = (kv_Bx1xS >= 0) & (kv_Bx1xS <= q_BxTx1)
    if window is not None:
        allowed &= q_BxTx1 - kv_Bx1xS < window
    if segment_ids_BxT is not None:
        allowed &= segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return allowed
