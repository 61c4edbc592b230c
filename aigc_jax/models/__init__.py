"""Decoder families, one file each: gpt2.py (GPT-2), llama.py (Llama, Qwen2, Mistral). They share cache.py (the
KV cache and the attention mask it implies) and layers.py (the layer stack, positions, vocab padding); aigc_jax/model.py holds the family-independent
entry points (init, forward, layouts, sizes) and picks the family from the config."""
