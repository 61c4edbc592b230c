"""Decoder families, one folder each: gpt2/ (GPT-2), llama/ (Llama, Qwen2, Mistral), each registering itself with
registry.py. They share base.py (what every config shares), cache.py (the KV cache and the attention mask it
implies) and layers.py (the layer stack, positions, vocab padding); aigc_jax/model.py holds the family-independent
entry points (init, forward, layouts, sizes).

Every sub-package is imported here, so a family is registered as soon as anything under aigc_jax.models is, and a
new family needs only its folder.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:  # sorted by name: the order families (and their presets) are listed in
        importlib.import_module(f"{__name__}.{_module.name}")
