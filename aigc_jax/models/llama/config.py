"""The Llama family's config (Llama 1-3, Qwen2/2.5, Mistral) and presets."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from aigc_jax.errors import ConfigError
from aigc_jax.models.base import BaseConfig, check_choice, check_positive, check_runtime

HF_LLAMA_TYPES = ("llama", "qwen2", "mistral")  # HF model_type values one LlamaConfig describes
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(BaseConfig):
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
        check_positive(self, ("vocab_size", "vocab_multiple", "n_positions", "n_layer", "n_head", "n_kv_head",
                               "head_dim", "n_embd", "n_inner", "rope_original_max_positions"))
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} "
                              "(query head n uses key/value head n // (n_head / n_kv_head))")
        check_runtime(self)
        check_choice("model.hf_model_type", self.hf_model_type, HF_LLAMA_TYPES)
        check_choice("model.rope_type", self.rope_type, ROPE_TYPES)
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
                check_choice("model.layer_types", t, LAYER_TYPES)
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


PRESETS: dict[str, LlamaConfig] = {
    # llama-tiny: for tests (GQA, untied head). llama-baby: the baby's size in Llama form
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
