"""GPT-2's config and presets."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from aigc_jax.errors import ConfigError
from aigc_jax.models.base import BaseConfig, check_choice, check_positive, check_runtime, nearest_divisor

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu")


@dataclasses.dataclass(frozen=True)
class ModelConfig(BaseConfig):
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
        check_positive(self, ("vocab_size", "vocab_multiple", "n_positions", "n_layer", "n_head", "n_embd"))
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_head={self.n_head} must divide model.n_embd={self.n_embd} "
                f"(e.g. n_head={nearest_divisor(self.n_embd, self.n_head)})"
            )
        check_runtime(self)
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"model.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        check_choice("model.activation", self.activation, ACTIVATIONS)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:  # heads of the KV cache (GPT-2: every head has its own keys and values)
        return self.n_head

    @property
    def tie_word_embeddings(self) -> bool:  # GPT-2's LM head is the token embedding
        return True


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
}
