"""Model configuration: one frozen dataclass per decoder family (GPT-2, Llama), named presets, loading from
files and `key=value` overrides.

The override/file helpers (`from_dict`, `with_overrides`, `load_file`) work for any dataclass, so the
training config reuses them instead of growing its own parser.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, ClassVar, TypeVar

from aigc_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("auto", *DTYPES)  # auto = bfloat16 on GPU/TPU, float32 on CPU
ATTENTION_BACKENDS = ("auto", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu")


class _Config:
    """What every family's config shares: the padded vocabulary, `replace`, and model.json's dict."""

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {"family": self.family, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Config):
    """A GPT-2-family decoder. Field names follow HF's GPT2Config where one exists."""

    family: ClassVar[str] = "gpt2"
    vocab_size: int = 50257  # real token ids; logits for ids >= vocab_size are masked out
    vocab_multiple: int = 128  # the embedding is padded to a multiple of this (50257 -> 50304): faster matmuls
    n_positions: int = 1024  # context length (learned position embeddings)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embedding and residual dropout (HF embd_pdrop / resid_pdrop)
    attn_dropout: float = 0.0  # dropout on attention probabilities (HF attn_pdrop); forces the XLA backend in training
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"  # HF activation_function; GPT-2 uses the tanh approximation
    bias: bool = True  # biases in Dense and LayerNorm layers (GPT-2: True; nanoGPT's shakespeare_char: False)
    dtype: str = "auto"  # compute dtype (auto: bf16 on GPU/TPU, fp32 on CPU); params stay in param_dtype; logits fp32
    param_dtype: str = "float32"
    attention: str = "auto"  # auto = cuDNN on GPU with bf16/fp16, XLA otherwise
    scan_layers: bool = False  # nn.scan over blocks: flat compile time; params get a leading layer axis
    remat: str = "none"  # rematerialize each block in the backward pass: none | full | dots | dots_no_batch

    def __post_init__(self):
        _check_positive(self, ("vocab_size", "vocab_multiple", "n_positions", "n_layer", "n_head", "n_embd"))
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_head={self.n_head} must divide model.n_embd={self.n_embd} "
                f"(e.g. n_head={_nearest_divisor(self.n_embd, self.n_head)})"
            )
        _check_runtime(self)
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"model.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        _check_choice("model.activation", self.activation, ACTIVATIONS)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:  # heads of the KV cache (GPT-2: every head has its own keys and values)
        return self.n_head

    @property
    def tie_word_embeddings(self) -> bool:  # GPT-2's LM head is the token embedding
        return True


HF_LLAMA_TYPES = ("llama", "qwen2", "mistral")  # HF model_type values one LlamaConfig describes
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(_Config):
    """A Llama-family decoder (Llama 1-3, Qwen2/2.5, Mistral): RMSNorm, RoPE, SwiGLU, grouped-query attention.

    The common field names are GPT-2's (what the rest of the code reads); each comment gives the HF name.
    """

    family: ClassVar[str] = "llama"
    hf_model_type: str = "llama"  # HF model_type export writes: llama (LlamaForCausalLM) | qwen2 | mistral
    vocab_size: int = 32000  # vocab_size; logits for ids >= vocab_size are masked out
    vocab_multiple: int = 128  # the embedding (and an untied head) are padded to a multiple of this
    n_positions: int = 2048  # max_position_embeddings (the context; RoPE itself has no table)
    n_layer: int = 16  # num_hidden_layers
    n_head: int = 32  # num_attention_heads
    n_kv_head: int = 8  # num_key_value_heads: = n_head is MHA, 1 is MQA, in between GQA
    head_dim: int | None = None  # head_dim; None = n_embd // n_head
    n_embd: int = 2048  # hidden_size
    n_inner: int = 8192  # intermediate_size (the SwiGLU width)
    rms_norm_eps: float = 1e-5  # rms_norm_eps
    rope_theta: float = 10000.0  # rope_theta (rope_parameters["rope_theta"] in transformers v5)
    rope_type: str = "default"  # rope_type (older configs: rope_scaling["type"]): default | linear | llama3
    rope_factor: float = 1.0  # factor (linear, llama3)
    rope_low_freq_factor: float = 1.0  # low_freq_factor (llama3)
    rope_high_freq_factor: float = 4.0  # high_freq_factor (llama3)
    rope_original_max_positions: int = 8192  # original_max_position_embeddings (llama3)
    tie_word_embeddings: bool = False  # tie_word_embeddings: the LM head is the token embedding
    qkv_bias: bool = False  # biases on q/k/v (Llama attention_bias; Qwen2: always)
    o_bias: bool = False  # bias on o_proj (Llama attention_bias; Qwen2: never)
    mlp_bias: bool = False  # mlp_bias: biases on gate/up/down
    sliding_window: int | None = None  # sliding_window: a query sees the last W positions (itself included)
    layer_types: tuple[str, ...] = ()  # layer_types: full_attention | sliding_attention per layer; () = all
    #   sliding when sliding_window is set (Mistral), else all full
    dropout: float = 0.0  # residual dropout (not in HF's Llama, which has none: keep 0 for parity)
    attn_dropout: float = 0.0  # attention_dropout; forces the XLA backend in training
    dtype: str = "auto"  # as ModelConfig's runtime knobs
    param_dtype: str = "float32"
    attention: str = "auto"
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.n_embd // max(self.n_head, 1))
        _check_positive(self, ("vocab_size", "vocab_multiple", "n_positions", "n_layer", "n_head", "n_kv_head",
                               "head_dim", "n_embd", "n_inner", "rope_original_max_positions"))
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} "
                              "(query head n uses key/value head n // (n_head / n_kv_head))")
        _check_runtime(self)
        _check_choice("model.hf_model_type", self.hf_model_type, HF_LLAMA_TYPES)
        _check_choice("model.rope_type", self.rope_type, ROPE_TYPES)
        for name in ("rms_norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)!r}")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ConfigError("model.rope_high_freq_factor must exceed model.rope_low_freq_factor for llama3 RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window must be a positive integer or none, got {self.sliding_window!r}")
        if self.layer_types:
            if len(self.layer_types) != self.n_layer:
                raise ConfigError(f"model.layer_types has {len(self.layer_types)} entries for n_layer={self.n_layer}")
            for t in self.layer_types:
                _check_choice("model.layer_types", t, LAYER_TYPES)
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError("model.layer_types has sliding_attention layers but model.sliding_window is none")
        if self.scan_layers and len(set(self.windows)) > 1:
            raise ConfigError("model.scan_layers needs every layer to attend alike; this model mixes full and "
                              "sliding-window layers (layer_types): use scan_layers=false")

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window (None = full causal attention)."""
        if not self.layer_types:
            return (self.sliding_window,) * self.n_layer
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)


# Keys that change how a model RUNS, not what it IS: a fine-tune or a load may set them without touching the
# architecture the weights were trained with. Everything else is architecture and comes with the weights.
RUNTIME_KEYS = ("dtype", "param_dtype", "attention", "scan_layers", "remat", "dropout", "attn_dropout")

FAMILIES: dict[str, type] = {"gpt2": ModelConfig, "llama": LlamaConfig}


def config_from_dict(data: dict, prefix: str = "model.") -> ModelConfig:
    """A model config from its dict (model.json): "family" names the class (absent: gpt2, the first family)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')} must be a mapping, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("family", "gpt2")
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return from_dict(FAMILIES[name], data, prefix)


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


def _nearest_divisor(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(config, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")


def _check_runtime(config) -> None:
    """The RUNTIME_KEYS every family shares."""
    for name in ("dropout", "attn_dropout"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"model.{name} must be in [0, 1), got {value!r}")
    _check_choice("model.dtype", config.dtype, COMPUTE_DTYPES)
    _check_choice("model.param_dtype", config.param_dtype, DTYPES)
    _check_choice("model.attention", config.attention, ATTENTION_BACKENDS)
    _check_choice("model.remat", config.remat, REMAT_POLICIES)


PRESETS: dict[str, ModelConfig] = {
    # The four OpenAI GPT-2 sizes (HF's GPT2Config defaults, with their layer/head/width).
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": ModelConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": ModelConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": ModelConfig(n_layer=48, n_head=25, n_embd=1600),
    # nanoGPT's shakespeare_char "baby GPT"; vocab_size is replaced by the tokenizer's at training time.
    "baby": ModelConfig(
        vocab_size=257, n_positions=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, attn_dropout=0.2
    ),
    # For tests: compiles in about a second on a CPU.
    "tiny": ModelConfig(vocab_size=257, n_positions=64, n_layer=2, n_head=2, n_embd=32),
    # The Llama family. llama-tiny: for tests (GQA, untied head). llama-baby: the baby's size in Llama form
    # (SwiGLU width ~8/3 d, 2 KV heads), for CPU training and benchmarks.
    "llama-tiny": LlamaConfig(vocab_size=257, n_positions=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                              n_inner=64),
    "llama-baby": LlamaConfig(vocab_size=257, n_positions=256, n_layer=6, n_head=6, n_kv_head=2, n_embd=384,
                              n_inner=1024),
    # Shapes of published checkpoints (config.json of each), for `aigc-jax info` and GPU benchmarks; weights come
    # from their HF directories (--init-from, convert --from-hf).
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, n_positions=131072, n_layer=16, n_head=32, n_kv_head=8,
                                head_dim=64, n_embd=2048, n_inner=8192, rope_theta=500000.0, rope_type="llama3",
                                rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                                rope_original_max_positions=8192, tie_word_embeddings=True),
    "llama-3-8b": LlamaConfig(vocab_size=128256, n_positions=8192, n_layer=32, n_head=32, n_kv_head=8,
                              n_embd=4096, n_inner=14336, rope_theta=500000.0),
    "qwen2.5-7b": LlamaConfig(hf_model_type="qwen2", vocab_size=152064, n_positions=131072, n_layer=28, n_head=28,
                              n_kv_head=4, n_embd=3584, n_inner=18944, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              qkv_bias=True),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_is_not_weights(name: str, how: str) -> ConfigError:
    """The error for a preset name given where trained weights are expected. Presets share names with hub ids
    ("gpt2"), so running one silently would hand back random weights to someone who asked for OpenAI's."""
    return ConfigError(f"{name!r} is a preset (an architecture with random weights), not trained weights: pass a "
                       f"model dir, training workdir or HF dir, or {how}")


# ---------------------------------------------------------------------------------------------------------
# Generic dataclass helpers: dict -> dataclass with type checks, "key=value" overrides, JSON/TOML files.

T = TypeVar("T")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Builds `cls` from a dict, rejecting unknown keys and values of the wrong type with one-line errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"unknown {section} key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    return cls(**values)


def with_overrides(obj: T, overrides: dict[str, Any], prefix: str = "") -> T:
    """`dataclasses.replace` with the same key and type checks as `from_dict`."""
    merged = {**dataclasses.asdict(obj), **overrides}
    merged.pop("family", None)  # a model config's class already says it
    return from_dict(type(obj), merged, prefix)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """["a=1", "b.c=x"] -> {"a": "1", "b.c": "x"} (values stay strings; `from_dict` coerces them)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def load_file(path: str | os.PathLike) -> dict:
    """Reads a JSON or TOML config file: an object whose "model"/"train" sections, if present, are objects."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory; pass a JSON or TOML file")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.endswith(".toml"):
            import tomllib  # Python >= 3.11

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path) as f:
                data = json.load(f)
    except ImportError:
        raise ConfigError(f"{path}: TOML configs need Python >= 3.11; use JSON instead") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold an object with 'model'/'train' sections (or model keys), "
                          f"got a {type(data).__name__}")
    for section in ("model", "train"):
        if section in data and not isinstance(data[section], dict):
            raise ConfigError(f"{path}: '{section}' must be an object of key/value pairs, "
                              f"got a {type(data[section]).__name__}")
    return data


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Converts `value` (possibly a string from the command line) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in typing.get_args(tp):
                return None
        errors = []
        for arg in args:
            try:
                return _coerce(arg, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin in (tuple, list):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return origin(_coerce(item_tp, v, name) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(number):  # inf passes every "> 0" check and then trains to NaN
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


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
    return {f.name for cls in FAMILIES.values() for f in dataclasses.fields(cls)}
