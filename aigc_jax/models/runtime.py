"""How a model RUNS, apart from what it IS.

A family's config describes an architecture: what the weights are, saved with them and exported to HF. A few of its
keys only say how those weights run here — compute and parameter dtype, attention kernel, scanned or unrolled
layers, rematerialisation, dropout — and may differ between training, evaluation, generation and serving of the
same weights. `Runtime` is those keys as one object, and the one place they are checked, overridden and applied:

    runtime = Runtime.of(config)                      # what a config runs with now
    runtime = runtime.with_overrides({"dtype": "bfloat16"})
    config = runtime.apply(config)                    # the architecture untouched, these settings in place
    Runtime.of(config).for_decoding().apply(config)   # what every decoder (generate, beam search, serving) runs

`check_overrides(config, overrides)` is the one check of `key=value` overrides given for existing weights (fine-tune,
`aj.load`, `generate --set`, `serve --set`): runtime keys may change, architecture keys only to the value they have.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aigc_jax.dictconfig import with_overrides
from aigc_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("auto", *DTYPES)  # auto = bfloat16 on GPU/TPU, float32 on CPU
ATTENTION_BACKENDS = ("auto", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The runtime keys every family's config carries, with the families' defaults."""

    dtype: str = "auto"  # compute dtype (auto: bf16 on GPU/TPU, fp32 on CPU); logits and softmax stay fp32
    param_dtype: str = "float32"  # the stored weights (fp32 master weights for training)
    attention: str = "auto"  # auto = cuDNN on GPU with bf16/fp16, XLA otherwise
    scan_layers: bool = False  # nn.scan over the blocks: flat compile time; params get a leading layer axis
    remat: str = "none"  # rematerialise each block in the backward pass: none | full | dots | dots_no_batch
    dropout: float = 0.0  # embedding and residual dropout (training only)
    attn_dropout: float = 0.0  # dropout on attention probabilities (training only; forces the XLA kernel)

    def __post_init__(self):
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {value!r}")
        check_choice("model.dtype", self.dtype, COMPUTE_DTYPES)
        check_choice("model.param_dtype", self.param_dtype, DTYPES)
        check_choice("model.attention", self.attention, ATTENTION_BACKENDS)
        check_choice("model.remat", self.remat, REMAT_POLICIES)

    @classmethod
    def of(cls, config) -> "Runtime":
        return cls(**{key: getattr(config, key) for key in KEYS})

    def apply(self, config):
        """`config` running with these settings (its architecture unchanged)."""
        return config.replace(**dataclasses.asdict(self))

    def replace(self, **changes) -> "Runtime":
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: dict[str, Any]) -> "Runtime":
        """These settings with `key=value` overrides (strings from the command line are parsed)."""
        return with_overrides(self, overrides, "model.")

    def compute_dtype(self):
        """The concrete compute dtype: "auto" is bfloat16 where matmuls want it (GPU/TPU), float32 on CPU
        (XLA's CPU bf16 matmuls are slower than fp32, see benchmarks/NOTES.md)."""
        import jax  # here, not at the top: parsing flags and configs should not load JAX
        import jax.numpy as jnp

        if self.dtype == "auto":
            return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
        return jnp.dtype(self.dtype)

    def resolved(self) -> "Runtime":
        """"auto" replaced by the concrete dtype of this machine (what a run records)."""
        return self if self.dtype != "auto" else self.replace(dtype=self.compute_dtype().name)

    def for_decoding(self, cast_params: bool = True) -> "Runtime":
        """What every decoder runs: unrolled layers (with scanned ones every token slices each layer's weights and
        cache out of the stacked arrays, measured 2x slower on CPU), no dropout, and (cast_params) weights stored in
        the compute dtype: serving needs no fp32 master weights, and the cast halves the bytes each token reads
        (Dense and Embed cast to the compute dtype before use anyway)."""
        runtime = self.resolved().replace(scan_layers=False, remat="none", dropout=0.0, attn_dropout=0.0)
        return runtime.replace(param_dtype=runtime.dtype) if cast_params else runtime

    def describe(self) -> str:
        """One line of `key=value`s, "auto" shown with what it resolved to."""
        dtype = self.compute_dtype().name + (" (auto)" if self.dtype == "auto" else "")
        return " ".join(f"{key}={dtype if key == 'dtype' else getattr(self, key)}" for key in KEYS)


KEYS = tuple(field.name for field in dataclasses.fields(Runtime))


def check_overrides(config, overrides: dict[str, Any], what: str = "the model being loaded") -> dict[str, Any]:
    """The runtime part of `overrides` for existing weights; an architecture key is an error unless it names the
    value the weights already have (a config file written for the same model may repeat it)."""
    for key, value in overrides.items():
        if key in KEYS:
            continue
        if not hasattr(config, key):
            raise ConfigError(f"unknown model key {key!r}; runtime keys that may be set: {', '.join(KEYS)}")
        if str(getattr(config, key)).lower() != str(value).lower():
            raise ConfigError(f"cannot change model.{key} of {what} (it is {getattr(config, key)!r}): it is part of "
                              f"what the weights are; runtime keys that may be set: {', '.join(KEYS)}")
    return {key: value for key, value in overrides.items() if key in KEYS}


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
