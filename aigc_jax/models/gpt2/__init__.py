"""GPT-2: config.py (config and presets), model.py (the decoder), hf.py (HF GPT2LMHeadModel both ways)."""

from aigc_jax.models.gpt2 import hf, model
from aigc_jax.models.gpt2.config import ACTIVATIONS, PRESETS, ModelConfig
from aigc_jax.models.gpt2.model import LAYER_PREFIX, MLP, PARAM_AXES, Block, CausalSelfAttention, Decoder, lookup_params
from aigc_jax.models.registry import Family, register

FAMILY = register(Family.from_modules(ModelConfig, PRESETS, model, hf))

__all__ = ["ACTIVATIONS", "FAMILY", "LAYER_PREFIX", "MLP", "PARAM_AXES", "PRESETS", "Block", "CausalSelfAttention",
           "Decoder", "ModelConfig", "hf", "lookup_params"]
