"""Claims: what a model IS and how it RUNS are separate. `Runtime` reads and applies exactly the runtime keys of
every family's config, leaves the architecture untouched, checks its values with one wording, and the overrides
given for existing weights may change runtime keys only."""

import dataclasses
import re

import pytest

from aigc_jax import configs
from aigc_jax.errors import ConfigError
from aigc_jax.models import registry
from aigc_jax.models.runtime import KEYS, Runtime, check_overrides

FAMILY_PRESETS = [next(iter(family.presets.values())) for family in registry.families()]


@pytest.mark.parametrize("config", FAMILY_PRESETS, ids=lambda c: c.family)
def test_apply_changes_runtime_keys_and_nothing_else(config):
    runtime = Runtime(dtype="bfloat16", param_dtype="bfloat16", attention="xla", scan_layers=True, remat="dots",
                      dropout=0.1, attn_dropout=0.2)
    applied = runtime.apply(config)
    assert Runtime.of(applied) == runtime
    architecture = [f.name for f in dataclasses.fields(config) if f.name not in KEYS]
    assert architecture and all(getattr(applied, k) == getattr(config, k) for k in architecture)
    assert Runtime.of(config).apply(applied) == config


@pytest.mark.parametrize("config", FAMILY_PRESETS, ids=lambda c: c.family)
def test_every_family_carries_every_runtime_key(config):
    assert set(KEYS) <= {f.name for f in dataclasses.fields(config)}


@pytest.mark.parametrize("key,value,message", [
    ("dtype", "int8", "model.dtype must be one of auto, float32"),
    ("remat", "some", "model.remat must be one of none, full"),
    ("dropout", 1.0, "model.dropout must be in [0, 1)"),
])
def test_bad_runtime_values_are_one_line_errors_from_config_and_runtime_alike(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Runtime(**{key: value})
    with pytest.raises(ConfigError, match=re.escape(message)):
        configs.get_preset("baby").replace(**{key: value})


def test_overrides_for_existing_weights_change_runtime_keys_only():
    config = configs.get_preset("baby")
    assert check_overrides(config, {"dtype": "bfloat16", "n_layer": str(config.n_layer)}) == {"dtype": "bfloat16"}
    with pytest.raises(ConfigError, match="cannot change model.n_layer of the model being loaded"):
        check_overrides(config, {"n_layer": config.n_layer + 1})
    with pytest.raises(ConfigError, match="unknown model key 'n_layers'"):
        check_overrides(config, {"n_layers": 3})
    assert Runtime.of(config).with_overrides({"scan_layers": "true"}).scan_layers is True


def test_decoding_runtime_is_unrolled_inference_in_the_compute_dtype():
    runtime = Runtime(dtype="bfloat16", scan_layers=True, remat="full", dropout=0.1).for_decoding()
    assert runtime == Runtime(dtype="bfloat16", param_dtype="bfloat16", attention="auto")
    kept = Runtime(dtype="auto").for_decoding(cast_params=False)
    assert kept.dtype == Runtime().compute_dtype().name and kept.param_dtype == "float32"
