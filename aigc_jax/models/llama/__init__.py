"""The Llama family (Llama 1-3, Qwen2/2.5, Mistral): config.py (config and presets), model.py (the decoder), hf.py
(HF LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM both ways)."""

from aigc_jax.models.llama import hf, model
from aigc_jax.models.llama.config import HF_LLAMA_TYPES, LAYER_TYPES, PRESETS, ROPE_TYPES, LlamaConfig
from aigc_jax.models.llama.model import (LAYER_PREFIX, MLP, PARAM_AXES, Attention, Block, Decoder, LMHead, RMSNorm,
                                         apply_rope, inverse_frequencies, lookup_params, rope_tables)
from aigc_jax.models.registry import Family, register

FAMILY = register(Family.from_modules(LlamaConfig, PRESETS, model, hf))

__all__ = ["FAMILY", "HF_LLAMA_TYPES", "LAYER_PREFIX", "LAYER_TYPES", "MLP", "PARAM_AXES", "PRESETS", "ROPE_TYPES",
           "Attention", "Block", "Decoder", "LMHead", "LlamaConfig", "RMSNorm", "apply_rope", "hf",
           "inverse_frequencies", "lookup_params", "rope_tables"]
