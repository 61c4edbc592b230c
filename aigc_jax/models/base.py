"""What every family's config shares: the padded vocabulary, model.json's dict, the checks of its fields, and its
runtime keys (models/runtime.py: how a model runs, not what it is)."""

from __future__ import annotations

import dataclasses
import math

from aigc_jax.errors import ConfigError
from aigc_jax.models.runtime import KEYS, Runtime, check_choice

# Keys that change how a model RUNS, not what it IS (models/runtime.py): a fine-tune or a load may set them without
# touching the architecture the weights were trained with. Everything else is architecture and comes with the weights.
RUNTIME_KEYS = KEYS

__all__ = ["RUNTIME_KEYS", "BaseConfig", "check_choice", "check_positive", "check_runtime", "compute_dtype",
           "nearest_divisor", "resolve_dtype"]


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
    """The concrete compute dtype `config` runs in (Runtime.compute_dtype)."""
    return Runtime.of(config).compute_dtype()


def resolve_dtype(config):
    """`config` with "auto" replaced by the concrete dtype of this machine (what a run records)."""
    return Runtime.of(config).resolved().apply(config)


def nearest_divisor(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


def check_positive(config, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")


def check_runtime(config) -> None:
    """The runtime keys every family shares (models/runtime.py checks them)."""
    Runtime.of(config)
