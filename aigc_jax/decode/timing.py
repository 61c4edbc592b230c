"""Decode timings of a Generator's compiled program: the benchmark hook (`aigc_jax.decode.time_decode`)."""

from __future__ import annotations

import time

import jax
import numpy as np

from aigc_jax.decode.config import GenerationConfig


def time_decode(generator, batch_size: int, prompt_len: int, new_tokens: int, repeats: int = 3, seed: int = 0) -> dict:
    """Greedy decode timings on random prompts, EOS disabled so every row runs all `new_tokens` steps.

    Returns the first call's time (compile + one run, unless this bucket was compiled before), the
    best-of-`repeats` wall time of prefill + decode, of the prefill alone (same
    executable with max_new_tokens=1), ms per decoded token (decode steps only, i.e. (total - prefill) /
    (new_tokens - 1)) and generated tokens/s over the whole call (batch * new_tokens / total).
    """
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, generator.config.vocab_size, (batch_size, prompt_len)).tolist()
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, eos_ids=())
    call = generator.compiled_call(prompts, gen)

    def best(n_new):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call(n_new).block_until_ready()
            times.append(time.perf_counter() - t0)
        return min(times)

    t0 = time.perf_counter()
    call().block_until_ready()
    first_call_s = time.perf_counter() - t0
    total_s, prefill_s = best(new_tokens), best(1)
    return {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "first_call_s": first_call_s,
        "total_s": total_s,
        "prefill_s": prefill_s,
        "ms_per_token": 1000 * (total_s - prefill_s) / max(new_tokens - 1, 1),
        "tokens_per_s": batch_size * new_tokens / total_s,
        "parallel": generator.mode,
        "devices": generator.n_devices,
        "backend": jax.default_backend(),
    }
