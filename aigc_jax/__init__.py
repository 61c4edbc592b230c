"""aigc_jax: GPT-2- and Llama-family language models in JAX/Flax.

Importing the package is cheap and never imports tensorflow_datasets (the data layer imports it lazily).
"""

from aigc_jax.configs import PRESETS, LlamaConfig, ModelConfig, get_preset
from aigc_jax.errors import ConfigError, UserError
from aigc_jax.model import Decoder, KVCache, count_params, flops_per_token, forward, init_params, param_count

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ConfigError",
    "Decoder",
    "KVCache",
    "LlamaConfig",
    "ModelConfig",
    "UserError",
    "count_params",
    "flops_per_token",
    "forward",
    "get_preset",
    "init_params",
    "param_count",
]
