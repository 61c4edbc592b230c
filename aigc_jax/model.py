"""Family-independent entry points over the decoders in aigc_jax/models/: init, forward, layer layouts, sizes.

Each family's record in aigc_jax/models/registry.py names its decoder, layer stack and lookup-only parameters; the
config picks the record.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from aigc_jax.models import registry
from aigc_jax.models.cache import KVCache, attention_mask
from aigc_jax.models.gpt2 import Decoder  # the GPT-2 decoder, the public name from before families existed
from aigc_jax.models.layers import mask_padded_vocab

Params = Any  # a nested dict of arrays

__all__ = ["KVCache", "attention_mask", "mask_padded_vocab", "Decoder", "family", "init_params", "forward",
           "stack_layers", "unstack_layers", "match_layout", "count_params", "param_count", "flops_per_token"]

def family(config) -> registry.Family:
    """`config`'s family record."""
    return registry.for_config(config)


def init_params(config, rng: jax.Array) -> Params:
    """The family's initialisation (GPT-2: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), zero biases)."""
    tokens = jnp.zeros((1, min(8, config.n_positions)), jnp.int32)
    return family(config).decoder(config).init({"params": rng}, tokens)["params"]


def forward(params: Params, tokens_BxT: jax.Array, config, *, positions_BxT: jax.Array | None = None,
            cache: KVCache | None = None, mask_BxT: jax.Array | None = None, train: bool = False,
            dropout_rng: jax.Array | None = None, dropout_rows: jax.Array | None = None,
            segment_ids_BxT: jax.Array | None = None):
    """`(logits_BxTxV, cache)`; a plain function so it can be jitted, pmapped or differentiated directly.
    Dropout (train=True) draws row b's masks from (dropout_rng, dropout_rows[b]): pass each row's place in the
    global batch and every batch layout draws the same masks (default: 0..B-1).
    `segment_ids_BxT` packs several examples into a row (no cache): a token attends only to tokens of its own
    segment; pass positions_BxT restarting at 0 for each example, and each gets the logits it would get alone."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return family(config).decoder(config).apply(
        {"params": params}, tokens_BxT, positions_BxT, cache, mask_BxT, train, dropout_rows, segment_ids_BxT,
        rngs=rngs
    )


def stack_layers(params: Params, n_layer: int, prefix: str) -> Params:
    """Unrolled layout ({"h_0": …, "h_1": …}) -> scanned layout ({"h": leaves with a leading layer axis})."""
    params = dict(params)
    layers = [params.pop(f"{prefix}_{i}") for i in range(n_layer)]
    params[prefix] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params


def unstack_layers(params: Params, prefix: str) -> Params:
    """Scanned layout -> unrolled layout."""
    params = dict(params)
    stacked = params.pop(prefix)
    n_layer = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n_layer):
        params[f"{prefix}_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return params


def match_layout(params: Params, config) -> Params:
    """Returns params in the layout `config.scan_layers` asks for, whichever layout they arrive in."""
    prefix = family(config).layer_prefix
    scanned = prefix in params
    if config.scan_layers and not scanned:
        return stack_layers(params, config.n_layer, prefix)
    if not config.scan_layers and scanned:
        return unstack_layers(params, prefix)
    return params


def count_params(params: Params, config) -> int:
    """Parameters as HF counts them: the vocabulary padding rows (of the embedding and any untied head) are not."""
    total = sum(x.size for x in jax.tree.leaves(params))
    padded_rows = config.padded_vocab_size - config.vocab_size
    return total - padded_rows * config.n_embd * (1 if config.tie_word_embeddings else 2)


def param_count(config) -> int:
    """`count_params` without materialising the weights."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return count_params(shapes, config)


def flops_per_token(config, seq_len: int) -> int:
    """Training FLOPs per token, 6N + 12·L·(H·Dh)·T (PaLM appendix B / nanoGPT), N excluding lookup-only tables.

    A tied LM head is counted through N (its matmul is real work); the attention term counts the full T×T score
    matrix although causal kernels skip half, as nanoGPT and PaLM do, so MFU is comparable.
    """
    n = param_count(config) - family(config).lookup_params(config)
    return 6 * n + 12 * config.n_layer * config.n_head * config.head_dim * seq_len
