"""What every layer of one forward reads besides its activations and its own slice of the KV cache."""

from __future__ import annotations

import flax
import jax


@flax.struct.dataclass
class LayerInputs:
    """Built once per forward by a family's decoder and handed unchanged to every layer (`layers.run_blocks`).

    A pytree of arrays only: nn.scan broadcasts it to every layer and nn.remat traces it like any argument. What
    is static (the attention backend, the train flag, a layer's window) stays a module attribute.
    """

    positions_BxT: jax.Array  # [B, T] int32: each token's position (restarting at 0 per packed example)
    segment_ids_BxT: jax.Array | None  # [B, T] int: which packed example a token belongs to; None = one per row
    cache_index: jax.Array | None  # [] or [B] int32: the slot the T new keys are written at; None without a cache
    rows_B: jax.Array | None  # each row's place in the global batch (dropout masks); None = its index here
    # [B, T, S] bool "query t may see key s" (models/cache.attention_mask) for full-attention layers; None = plain
    # causal, which the cuDNN backend serves.
    mask_BxTxS: jax.Array | None
    # The same for sliding-window layers; None where there are none, or where cuDNN applies the window itself.
    window_mask_BxTxS: jax.Array | None = None
    rope: tuple[jax.Array, jax.Array] | None = None  # Llama: RoPE's (cos, sin) [B, T, head_dim]

    def mask_for(self, window: int | None) -> jax.Array | None:
        """The mask of a layer attending within `window` positions (None: full causal attention)."""
        return self.mask_BxTxS if window is None else self.window_mask_BxTxS
