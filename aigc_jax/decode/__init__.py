"""Text generation: prefill + on-device KV-cache decode loop (greedy, sampling, beam search), HF-identical.

`Generator` (generate.py) compiles and runs decoding for one model; `GenerationConfig` (config.py) holds HF's
knobs. The pieces every decoder shares, the serving engine (aigc_jax/serve) included: step.py (one decode step),
sampling.py (the token choice), executables.py (the bounded cache of compiled programs). search.py and beam.py are
the offline loop's strategies; mesh.py places weights and the KV cache on a (data, fsdp, tensor) mesh, and
plan.py's `memory_report` plans per-device memory from the compiled programs; timing.py times a compiled decode.
The notebook API is `aigc_jax.api`.
"""

from aigc_jax.decode.config import GenerationConfig
from aigc_jax.decode.generate import Generator, trim
from aigc_jax.decode.plan import memory_report
from aigc_jax.decode.timing import time_decode

__all__ = ["GenerationConfig", "Generator", "memory_report", "time_decode", "trim"]
