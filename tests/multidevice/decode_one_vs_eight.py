"""test_decode: beam, sampled and streamed ids of the same Generator with no sharding, pmap and shard_map on 8
devices."""

import json
import sys

import jax
import numpy as np

from aigc_jax import configs, model
from aigc_jax.decode import GenerationConfig, Generator


def main(argv=None):
    assert jax.device_count() == 8
    cfg = configs.get_preset("tiny").replace(vocab_size=61, n_positions=48)
    params = jax.tree.map(lambda x: x * 3, jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 61, n).tolist() for n in (3, 7, 1, 12, 5)]  # 5 rows: padded to 8, one per device
    sample = GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=4, eos_ids=(7,))
    beam = GenerationConfig(max_new_tokens=10, num_beams=2, length_penalty=0.7, eos_ids=(7,))
    out = {}
    for mode in ("none", "pmap", "shard_map"):
        gen = Generator(cfg, params, mode=mode)
        out[mode] = {"beam": gen.generate(prompts, beam)}
        if mode != "pmap":  # pmap's wrapping of the one-call program is covered by beam (saves a compile)
            out[mode]["sample"] = gen.generate(prompts, sample)
        if mode != "none":  # streamed chunks, joined, must equal the single-device one-call result
            chunks = list(gen.stream(prompts, sample, chunk=4))
            out[mode]["stream"] = [sum((c[i] for c in chunks), []) for i in range(len(prompts))]
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
