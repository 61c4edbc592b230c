"""Interoperability with HF transformers: GPT-2 and Llama-family checkpoints and tokenizers (see hf.py)."""

from aigc_jax.interop.hf import config_from_hf, load_hf_dir, params_from_hf, save_hf_dir, to_hf_state_dict

__all__ = ["config_from_hf", "load_hf_dir", "params_from_hf", "save_hf_dir", "to_hf_state_dict"]
