"""What the mesh-decoding scripts share (test_mesh_decode): the tiny models, prompts and generation settings."""

import jax
import numpy as np

from aigc_jax import configs, model
from aigc_jax.decode import GenerationConfig
from aigc_jax.errors import UserError

assert jax.device_count() == 8


def tiny(family, **changes):
    if family == "gpt2":  # 8 heads, so that tensor=8 divides them
        cfg = configs.get_preset("tiny").replace(vocab_size=61, n_positions=64, n_head=8, n_embd=64)
    else:  # grouped-query attention: 16 query heads share 8 key/value heads
        cfg = configs.get_preset("llama-tiny").replace(vocab_size=61, n_positions=64, n_head=16, n_kv_head=8,
                                                      n_embd=64, head_dim=8)
    cfg = cfg.replace(**changes)
    params = jax.tree.map(lambda x: x * 3, jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0)))
    return cfg, params  # weights x3: next-token choices far from ties


def error(fn):
    try:
        fn()
    except UserError as e:
        return str(e)


rng = np.random.default_rng(0)
PROMPTS = [rng.integers(0, 61, n).tolist() for n in (3, 7, 1, 12, 5)]  # 5 rows: padded to a multiple of data x fsdp
GREEDY = GenerationConfig(max_new_tokens=20, temperature=0, eos_ids=(7,))
BEAM = GenerationConfig(max_new_tokens=20, num_beams=2, length_penalty=0.7, eos_ids=(7,))
SAMPLE = GenerationConfig(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9, seed=4, eos_ids=(7,))
