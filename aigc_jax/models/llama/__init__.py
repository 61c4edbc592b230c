"""The Llama family (Llama 1-3, Qwen2/2.5, Mistral): config.py (config and presets), model.py (the decoder), hf.py
(HF LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM both ways)."""

from aigc_jax.models.llama import hf
from aigc_jax.models.llama.config import HF_LLAMA_TYPES, LAYER_TYPES, PRESETS, ROPE_TYPES, LlamaConfig
from aigc_jax.models.llama.model import (LAYER_PREFIX, MLP, PARAM_AXES, Attention, Block, Decoder, LMHead, RMSNorm,
                                         apply_rope, inverse_frequencies, lookup_params, rope_tables)
from aigc_jax.models.registry import Family, HFConversion, register

FAMILY = register(Family(
    name="llama",
    config_class=LlamaConfig,
    decoder=Decoder,
    layer_prefix=LAYER_PREFIX,
    param_axes=PARAM_AXES,
    lookup_params=lookup_params,
    presets=PRESETS,
    hf=HFConversion(
        model_types=HF_LLAMA_TYPES,
        config_from_hf=hf.config_from_hf,
        config_to_hf=hf.export_config,
        architecture=hf.architecture,
        weight_name=hf.hf_name,
        import_state=hf.untie,
        weight_from_hf=hf.from_hf,
        ignored=hf.ignored,
        missing_hint=hf.missing_hint,
        export_state=hf.to_hf_state,
        save_tokenizer=hf.save_tokenizer,
    ),
))

__all__ = ["FAMILY", "HF_LLAMA_TYPES", "LAYER_PREFIX", "LAYER_TYPES", "MLP", "PARAM_AXES", "PRESETS", "ROPE_TYPES",
           "Attention", "Block", "Decoder", "LMHead", "LlamaConfig", "RMSNorm", "apply_rope", "hf",
           "inverse_frequencies", "lookup_params", "rope_tables"]
