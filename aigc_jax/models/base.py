"""What every family's config shares: the runtime knobs (how a model runs, not what it is), their checks, the
padded vocabulary and model.json's dict, and the concrete compute dtype."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from aigc_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("auto", *DTYPES)  # auto = bfloat16 on GPU/TPU, float32 on CPU
ATTENTION_BACKENDS = ("auto", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

# Keys that change how a model RUNS, not what it IS: a fine-tune or a load may set them without touching the
# architecture the weights were trained with. Everything else is architecture and comes with the weights.
RUNTIME_KEYS = ("dtype", "param_dtype", "attention", "scan_layers", "remat", "dropout", "attn_dropout")


class BaseConfig:
    """What every family's config shares: the padded vocabulary, `replace`, and model.json's dict."""

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {"family": self.family, **dataclasses.asdict(self)}


def compute_dtype(config):
    """The concrete compute dtype of `config`: "auto" is bfloat16 where matmuls want it (GPU/TPU), float32 on CPU
    (XLA's CPU bf16 matmuls are slower than fp32, see benchmarks/NOTES.md)."""
    import jax  # here, not at the top: parsing flags and configs should not load JAX
    import jax.numpy as jnp

    if config.dtype == "auto":
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
    return jnp.dtype(config.dtype)


def resolve_dtype(config):
    """`config` with "auto" replaced by the concrete dtype of this machine (what a run records)."""
    return config if config.dtype != "auto" else config.replace(dtype=compute_dtype(config).name)


def nearest_divisor(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_positive(config, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")


def check_runtime(config) -> None:
    """The RUNTIME_KEYS every family shares."""
    for name in ("dropout", "attn_dropout"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"model.{name} must be in [0, 1), got {value!r}")
    check_choice("model.dtype", config.dtype, COMPUTE_DTYPES)
    check_choice("model.param_dtype", config.param_dtype, DTYPES)
    check_choice("model.attention", config.attention, ATTENTION_BACKENDS)
    check_choice("model.remat", config.remat, REMAT_POLICIES)
