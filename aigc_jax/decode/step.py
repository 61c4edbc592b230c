"""The decode step every decoder shares, and the config and params they all run.

    tokens_B, positions_B ─▶ step (model.forward on one token per row, against the KV cache) ─▶ logits_BxV
                         ─▶ sampling.select (or beam search's expansion) ─▶ the next tokens

Offline generation and beam search (generate.Program's loop) and the serving engine's decode chunk
(serve/programs.py) differ only in how they schedule rows: which rows feed which token at which position, and when
a row stops. The model call and the token choice are these functions, so every decoder computes a token the same way.
"""

from __future__ import annotations

import jax

from aigc_jax import configs, model
from aigc_jax.configs import ModelConfig


def step(params, tokens_B: jax.Array, positions_B: jax.Array, cache: model.KVCache, config: ModelConfig):
    """Feeds each row's token at its position: (the next-token logits [B, vocab_size] in fp32, the updated cache)."""
    logits_Bx1xV, cache = model.forward(params, tokens_B[:, None], config, positions_BxT=positions_B[:, None],
                                        cache=cache)
    # The model's vocabulary may be padded (matmul-friendly sizes): the padding ids are never candidates.
    return logits_Bx1xV[:, 0, : config.vocab_size], cache


def decoding_config(config: ModelConfig, cast_params: bool = True) -> ModelConfig:
    """The config every decoder runs: its runtime settings for decoding (models/runtime.py Runtime.for_decoding:
    unrolled layers, no dropout, weights in the compute dtype unless cast_params=False), its architecture as is."""
    return configs.Runtime.of(config).for_decoding(cast_params).apply(config)


def for_decoding(config: ModelConfig, params, cast_params: bool = True):
    """(config, params) as every decoder (the offline Generator, the serving engine) runs them."""
    before = config.param_dtype
    config = decoding_config(config, cast_params)
    params = model.match_layout(params, config)
    if config.param_dtype != before:
        params = jax.tree.map(lambda x: x.astype(config.param_dtype), params)
    return config, params
