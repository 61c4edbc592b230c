"""GPT-2: config.py (config and presets), model.py (the decoder), hf.py (HF GPT2LMHeadModel both ways)."""

from aigc_jax.models.gpt2 import hf
from aigc_jax.models.gpt2.config import ACTIVATIONS, PRESETS, ModelConfig
from aigc_jax.models.gpt2.model import LAYER_PREFIX, MLP, PARAM_AXES, Block, CausalSelfAttention, Decoder, lookup_params
from aigc_jax.models.registry import Family, HFConversion, register

FAMILY = register(Family(
    name="gpt2",
    config_class=ModelConfig,
    decoder=Decoder,
    layer_prefix=LAYER_PREFIX,
    param_axes=PARAM_AXES,
    lookup_params=lookup_params,
    presets=PRESETS,
    hf=HFConversion(
        model_types=("gpt2",),
        config_from_hf=hf.config_from_hf,
        config_to_hf=hf.export_config,
        architecture=lambda config: hf.ARCHITECTURE,
        weight_name=hf.hf_name,
        import_state=hf.import_state,
        weight_from_hf=hf.from_hf,
        ignored=hf.ignored,
        missing_hint=lambda config: f"n_layer={config.n_layer}",
        export_state=hf.to_hf_state,
        save_tokenizer=hf.save_tokenizer,
    ),
))

__all__ = ["ACTIVATIONS", "FAMILY", "LAYER_PREFIX", "MLP", "PARAM_AXES", "PRESETS", "Block", "CausalSelfAttention",
           "Decoder", "ModelConfig", "hf", "lookup_params"]
