"""The decoder families, one record each, through which every generic module (model.py, configs.py, sharding
users, interop/hf.py) dispatches: nothing outside a family's folder asks which family a config belongs to.

A new family (say Qwen3) is a folder `aigc_jax/models/<name>/` whose `__init__.py` calls `register(Family(...))`;
`aigc_jax/models/__init__.py` imports every sub-package, so no generic module is edited. It must provide:

- `name`: the "family" key of model.json, equal to `config_class.family`.
- `config_class`: a frozen dataclass deriving from `models.base.BaseConfig`, with a `ClassVar` `family`, the
  common fields the generic code reads (`vocab_size`, `vocab_multiple`, `n_positions`, `n_layer`, `n_head`,
  `n_kv_head`, `head_dim`, `n_embd`, `tie_word_embeddings`) and the runtime keys of `models.base.RUNTIME_KEYS`,
  checked in `__post_init__` (`models.base.check_runtime`).
- `decoder`: a Flax module class, `decoder(config)(tokens_BxT, positions_BxT=None, cache=None, mask_BxT=None,
  train=False, rows_B=None, segment_ids_BxT=None) -> (fp32 logits [B, T, padded_vocab_size], cache)`, where
  segment ids (no cache) keep the examples packed into a row from attending to each other; its layers named
  `{layer_prefix}_{i}` (unrolled) or `{layer_prefix}` (scanned, a leading layer axis), run by
  `layers.run_blocks` with one `models.inputs.LayerInputs` built per call.
- `param_axes`: one regex (over the "/"-joined unrolled path) -> logical axes per parameter (aigc_jax/sharding.py).
- `lookup_params(config)`: parameters used by lookup, not matmul (left out of the 6N FLOPs).
- `presets`: name -> config; names must not collide with another family's.
- `hf`: an `HFConversion` (below): config translation both ways with refusals by name, the weight name map and
  layouts, and how a tokenizer is written beside the weights (special tokens, chat template, generation config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from aigc_jax.errors import ConfigError

Config = Any  # a family's config dataclass
Path = tuple[str, ...]  # a parameter's path in the unrolled tree, e.g. ("h_0", "attn", "c_attn", "kernel")


@dataclasses.dataclass(frozen=True)
class HFConversion:
    """A family's HF transformers checkpoints. The generic reader (interop/hf.py) walks the parameters the decoder
    itself creates, so a name map cannot drift from the model: a checkpoint weight nobody asked for is an error
    unless `ignored`, a parameter the checkpoint lacks is one too. A family's hf.py defines each field under its
    name (`model_types` as MODEL_TYPES), and `from_module` collects them."""

    model_types: tuple[str, ...]  # config.json model_type values this family reads
    config_from_hf: Callable[[dict], Config]  # UserError naming any setting the family does not implement
    # (config, tokenizer or None, storage dtype) -> config.json; raises before any file is written, naming what
    # the HF class cannot represent.
    export_config: Callable[[Config, Any, str], dict]
    architecture: Callable[[Config], str]  # the HF class name, for messages
    hf_name: Callable[[Path], str]  # our path -> the HF state-dict key
    import_state: Callable[[dict, Config], dict]  # whole-checkpoint fixes first: name prefixes, a tied LM head
    from_hf: Callable[[Path, Any, tuple, Config], Any]  # one HF tensor (numpy) -> our layout `shape`
    ignored: Callable[[str], bool]  # checkpoint keys that are not weights (stale buffers)
    missing_hint: Callable[[Config], str]  # what config.json says, for a missing weight's error
    to_hf_state: Callable[[dict, Config], dict]  # flat unrolled params -> HF state dict (numpy, our dtype)
    save_tokenizer: Callable[[str, Any, int], set]  # (dir, tokenizer, max_length) -> the files written

    @classmethod
    def from_module(cls, module) -> "HFConversion":
        names = {f.name: "MODEL_TYPES" if f.name == "model_types" else f.name for f in dataclasses.fields(cls)}
        missing = [attr for attr in names.values() if not hasattr(module, attr)]
        if missing:
            raise ValueError(f"{module.__name__} lacks {', '.join(missing)} (see models/registry.py HFConversion)")
        return cls(**{field: getattr(module, attr) for field, attr in names.items()})


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    decoder: type
    layer_prefix: str
    param_axes: Mapping[str, tuple]
    lookup_params: Callable[[Config], int]
    presets: Mapping[str, Config]
    hf: HFConversion

    @classmethod
    def from_modules(cls, config_class: type, presets: Mapping[str, Config], model_module, hf_module) -> "Family":
        """The record of a family folder laid out as gpt2/ and llama/ are: model.py defines Decoder, LAYER_PREFIX,
        PARAM_AXES and lookup_params; hf.py every HFConversion field."""
        return cls(name=config_class.family, config_class=config_class, decoder=model_module.Decoder,
                   layer_prefix=model_module.LAYER_PREFIX, param_axes=model_module.PARAM_AXES,
                   lookup_params=model_module.lookup_params, presets=presets, hf=HFConversion.from_module(hf_module))


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds `family`; its name, presets and HF model types must be new."""
    if family.name != family.config_class.family:
        raise ValueError(f"family {family.name!r} has a config class of family {family.config_class.family!r}")
    for other in _FAMILIES.values():
        clashes = ((other.name == family.name, "name"), (set(other.presets) & set(family.presets), "presets"),
                   (set(other.hf.model_types) & set(family.hf.model_types), "HF model types"))
        for clash, what in clashes:
            if clash:
                raise ValueError(f"family {family.name!r} repeats family {other.name!r}'s {what}")
    _FAMILIES[family.name] = family
    return family


def families() -> tuple[Family, ...]:
    """Every family, in registration order (the order presets are listed in)."""
    return tuple(_FAMILIES.values())


def get(name: str) -> Family:
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def for_config(config) -> Family:
    return get(config.family)


def for_hf(model_type) -> Family | None:
    """The family reading config.json's `model_type`, or None."""
    return next((f for f in _FAMILIES.values() if model_type in f.hf.model_types), None)


def hf_model_types() -> tuple[str, ...]:
    return tuple(t for f in _FAMILIES.values() for t in f.hf.model_types)
