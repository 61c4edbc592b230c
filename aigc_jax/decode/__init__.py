"""Text generation: prefill + on-device KV-cache decode loop (greedy, sampling, beam search), HF-identical.

`Generator` (generate.py) compiles and runs decoding for one model; `GenerationConfig` (config.py) holds HF's
knobs; sampling.py and beam.py are the pure per-step functions. The notebook API is `aigc_jax.api`.
"""

from aigc_jax.decode.config import GenerationConfig
from aigc_jax.decode.generate import Generator, time_decode, trim

__all__ = ["GenerationConfig", "Generator", "time_decode", "trim"]
