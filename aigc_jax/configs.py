"""Model configuration as the commands see it: every family's presets, model.json's dict, config files and
`key=value` overrides. Each family's config class and presets live in its folder (aigc_jax/models/<family>/) and
are found through aigc_jax/models/registry.py; the classes are re-exported here for the code that names them.

The override/file helpers (`from_dict`, `with_overrides`, `load_file`) are aigc_jax/dictconfig.py's and work for
any dataclass, so the training config reuses them instead of growing its own parser.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aigc_jax.dictconfig import from_dict, load_file, parse_assignments, with_overrides
from aigc_jax.errors import ConfigError
from aigc_jax.models import registry
from aigc_jax.models.base import RUNTIME_KEYS, BaseConfig, compute_dtype, resolve_dtype
from aigc_jax.models.runtime import ATTENTION_BACKENDS, COMPUTE_DTYPES, DTYPES, REMAT_POLICIES, Runtime, check_overrides
from aigc_jax.models.gpt2 import ModelConfig
from aigc_jax.models.llama import LlamaConfig

__all__ = ["ATTENTION_BACKENDS", "COMPUTE_DTYPES", "DTYPES", "FIRST_FAMILY", "PRESETS", "REMAT_POLICIES",
           "RUNTIME_KEYS", "BaseConfig", "Runtime", "check_overrides", "LlamaConfig", "ModelConfig", "add_model_args", "compute_dtype",
           "config_from_dict", "from_dict", "get_preset", "load_file", "model_config", "model_keys", "model_section",
           "parse_assignments", "preset_is_not_weights", "resolve_dtype", "with_overrides"]

# model.json files written before there were families have no "family" key: they are GPT-2's.
FIRST_FAMILY = "gpt2"


def config_from_dict(data: dict, prefix: str = "model."):
    """A model config from its dict (model.json): "family" names the class (absent: the first family)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')} must be a mapping, got {type(data).__name__}")
    data = dict(data)
    return from_dict(registry.get(data.pop("family", FIRST_FAMILY)).config_class, data, prefix)


PRESETS: dict[str, Any] = {name: c for family in registry.families() for name, c in family.presets.items()}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_is_not_weights(name: str, how: str) -> ConfigError:
    """The error for a preset name given where trained weights are expected. Presets share names with hub ids
    ("gpt2"), so running one silently would hand back random weights to someone who asked for OpenAI's."""
    return ConfigError(f"{name!r} is a preset (an architecture with random weights), not trained weights: pass a "
                       f"model dir, training workdir or HF dir, or {how}")


def model_config(
    preset: str = "gpt2", file: str | None = None, overrides: dict[str, Any] | None = None
) -> ModelConfig:
    """Preset, then the file's "model" section (or the whole file), then overrides, in that order."""
    config = get_preset(preset)
    if file:
        config = with_overrides(config, model_section(load_file(file)), "model.")
    if overrides:
        config = with_overrides(config, overrides, "model.")
    return config


def model_section(data: dict) -> dict:
    """A config file's model keys: a whole-run file has a "model" section (and others, e.g. "train"); a model
    file holds bare model keys."""
    return data.get("model", {}) if {"model", "train", "data"} & set(data) else data


def add_model_args(p, default: str | None = "gpt2", shown_default: str | None = None) -> None:
    """--model / --config / --set on an argparse parser: every command that builds a model from a preset.
    `shown_default`: what --help says --model defaults to, where that is not `default` itself."""
    shown = shown_default or default
    p.add_argument("--model", default=default, help=f"preset name: {', '.join(PRESETS)}"
                   + (f" (default: {shown})" if shown else ""))
    p.add_argument("--config", metavar="FILE",
                   help="JSON/TOML file with a 'model' section (or model keys at the top) (default: none)")
    p.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[],
        help="override a config key (repeatable; default: none)"
    )


def model_keys() -> set[str]:
    """Every model config key of every family (what --set may name without a "model." prefix)."""
    return {f.name for family in registry.families() for f in dataclasses.fields(family.config_class)}
