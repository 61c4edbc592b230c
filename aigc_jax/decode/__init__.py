"""Text generation: prefill + on-device KV-cache decode loop (greedy, sampling, beam search), HF-identical.

`Generator` (generate.py) compiles and runs decoding for one model; `GenerationConfig` (config.py) holds HF's
knobs; sampling.py and beam.py are the pure per-step functions; mesh.py places weights and the KV cache on a
(data, fsdp, tensor) mesh, and plan.py's `memory_report` plans per-device memory from the compiled programs.
The notebook API is `aigc_jax.api`.
"""

from aigc_jax.decode.config import GenerationConfig
from aigc_jax.decode.generate import Generator, time_decode, trim
from aigc_jax.decode.plan import memory_report

__all__ = ["GenerationConfig", "Generator", "memory_report", "time_decode", "trim"]
