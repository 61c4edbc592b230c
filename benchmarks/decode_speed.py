"""Our decoding speed: aigc_jax.decode.Generator (prefill in one call + lax.while_loop on device), greedy, EOS
disabled so every row runs all steps, random weights and prompts.

ms/token is the decode step alone: (time of prefill + N tokens - time of prefill + 1 token) / (N - 1), both
through the same compiled executable (`Generator.compiled_call`), medians of `repeats` calls. The same
definition is used for HF (peer_torch.py); the end-to-end time per token is reported too. Achieved bandwidth =
the bytes a step must read (common.decode_step_bytes) / step time.
"""

from __future__ import annotations

import time

from benchmarks import common


def measure(cfg, batch: int, prompt_len: int, new_tokens: int, *, repeats: int = 5, cast_params: bool = True,
            peak_bw: float | None = None, seed: int = 0) -> dict:
    """Times greedy generation of `new_tokens` after random `prompt_len`-token prompts, `batch` rows."""
    import jax
    import numpy as np

    from aigc_jax.decode import GenerationConfig, Generator
    from aigc_jax.decode.config import bucket
    from aigc_jax.model import init_params

    params = init_params(cfg, jax.random.key(seed))
    # cast_params: serve in the compute dtype (the Generator's default), as HF's model.to(bfloat16) does.
    generator = Generator(cfg, params, cast_params=cast_params)
    cfg = generator.config
    prompts = common.synthetic_tokens(batch, prompt_len, cfg.vocab_size, seed).tolist()
    call = generator.compiled_call(prompts, GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, eos_ids=()))

    start = time.perf_counter()
    ids = np.asarray(call())
    compile_s = time.perf_counter() - start
    if ids.shape[0] < batch or ids.shape[1] < new_tokens:
        raise RuntimeError(f"generated ids have shape {ids.shape}, expected at least ({batch}, {new_tokens})")
    return {
        **common.time_decode(lambda: call().block_until_ready(), lambda: call(1).block_until_ready(), repeats, cfg,
                             batch, prompt_len, new_tokens, weight_dtype=cfg.param_dtype, padded_vocab=True,
                             peak_bw=peak_bw),
        "compile_s": compile_s,
        # KV slots the implementation allocates (bucketed P + N); every step's attention reads all of them.
        "cache_slots": bucket(prompt_len, cfg.n_positions) + bucket(new_tokens, cfg.n_positions),
        "process_peak_bytes": common.jax_memory_peak(),
        **common.jax_device_info(),
    }
