"""What every harness shares: timing, shapes, FLOP and byte counts, the measured ceilings, the environment.

Nothing here imports jax or torch at module level: a torch worker must never initialise JAX's GPU backend
(it would take 75% of the device's memory), so the JAX helpers import it inside the function.

Timing rule (every harness): warm up, synchronise, time `repeats` independent windows with a host clock after
a device sync, report the median (and min/max as the spread); compile time is reported separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help for every harness: the module docstring as written, and each option's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if ("default" not in help_text and action.option_strings and default is not argparse.SUPPRESS
                and default not in (None, False, [], "")):
            help_text += " (default: %(default)s)"
        return help_text

# Versions recorded with every run.
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "numpy", "torch",
            "transformers", "tokenizers")


# ------------------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn`, which must return only after the device finished (it syncs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def spread(times: list[float], per: float = 1.0) -> dict:
    """Median, min and max of `times` divided by `per` (e.g. steps per window), in seconds."""
    return {"median": statistics.median(times) / per, "min": min(times) / per, "max": max(times) / per,
            "n": len(times)}


# ------------------------------------------------------------------------------------------------ shapes and counts


def model_config(preset: str, dtype: str = "float32", overrides: dict | None = None):
    """The preset with the benchmark conventions: no dropout (both sides), compute dtype, then `overrides`.

    Dropout is off because HF and we draw different random masks; it is not what these numbers compare.
    """
    from aigc_jax import configs

    config = configs.get_preset(preset).replace(dropout=0.0, attn_dropout=0.0, dtype=dtype)
    return configs.with_overrides(config, overrides or {}, "model.")


def param_count(cfg) -> int:
    """Parameters as HF counts them (unpadded vocabulary, GPT-2's position embeddings included), from the shapes.

    Equals aigc_jax.model.param_count (tests/test_benchmarks.py checks it) without importing jax.
    """
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    if cfg.family == "llama":
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv) * cfg.qkv_bias + d * cfg.o_bias
        mlp = 3 * d * cfg.n_inner + (2 * cfg.n_inner + d) * cfg.mlp_bias
        return V * d * (1 if cfg.tie_word_embeddings else 2) + L * (attn + mlp + 2 * d) + d
    per_layer = 12 * d * d + 13 * d  # c_attn, attn c_proj, c_fc, mlp c_proj (+ biases), ln_1, ln_2
    return V * d + cfg.n_positions * d + L * per_layer + 2 * d


def lookup_params(cfg) -> int:
    """Parameters read by lookup, not matmul: GPT-2's position table, a Llama's untied token embedding."""
    if cfg.family == "llama":
        return 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.n_embd
    return cfg.n_positions * cfg.n_embd


def flops_per_token(cfg, seq_len: int) -> int:
    """Training FLOPs per token, 6N + 12·L·(H·Dh)·T with N excluding lookup-only tables (= aigc_jax.model's)."""
    n = param_count(cfg) - lookup_params(cfg)
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def decode_step_bytes(cfg, batch: int, prompt_len: int, new_tokens: int, weight_bytes: int, kv_bytes: int,
                      padded_vocab: bool = True) -> dict:
    """The bytes one decode step must read from device memory, averaged over the steps of a generate call.

    weights: every parameter once except the lookup-only tables (one row is read); the LM head (a tied embedding
    counts once) is read whole, padded rows included where the model pads. KV cache: keys and values of every
    earlier token of every layer's n_kv_head heads, prompt + t at step t, averaged over t = 1 … new_tokens - 1.
    An implementation that reads all preallocated slots moves more than this; the count is the useful minimum.
    """
    vocab = cfg.padded_vocab_size if padded_vocab else cfg.vocab_size
    n = param_count(cfg) - lookup_params(cfg) + (vocab - cfg.vocab_size) * cfg.n_embd
    avg_len = prompt_len + new_tokens / 2
    kv = 2 * cfg.n_layer * batch * avg_len * cfg.n_kv_head * cfg.head_dim * kv_bytes
    return {"weight_bytes": n * weight_bytes, "kv_bytes": int(kv), "total_bytes": int(n * weight_bytes + kv)}


def time_decode(full: Callable[[], object], prefill: Callable[[], object], repeats: int, cfg, batch: int,
                prompt_len: int, new_tokens: int, *, weight_dtype: str, padded_vocab: bool,
                peak_bw: float | None) -> dict:
    """The decode measures both sides report. `full()` generates new_tokens, `prefill()` one token, each
    synced and already compiled; ms/token = (median full - median prefill) / (new_tokens - 1)."""
    prefill()  # warm-up
    full_s = spread(timed(full, repeats))
    prefill_s = spread(timed(prefill, repeats))
    step_s = max(full_s["median"] - prefill_s["median"], 0.0) / max(new_tokens - 1, 1)
    moved = decode_step_bytes(cfg, batch, prompt_len, new_tokens, dtype_bytes(weight_dtype), dtype_bytes(cfg.dtype),
                              padded_vocab)
    bandwidth = moved["total_bytes"] / step_s if step_s else None
    return {
        "ms_per_token": 1000 * step_s,
        "ms_per_token_e2e": 1000 * full_s["median"] / new_tokens,
        "tokens_per_s": batch * new_tokens / full_s["median"],
        "total_ms": 1000 * full_s["median"],
        "total_ms_min": 1000 * full_s["min"],
        "total_ms_max": 1000 * full_s["max"],
        "prefill_ms": 1000 * prefill_s["median"],
        **moved,
        "achieved_gbps": bandwidth / 1e9 if bandwidth else None,
        "bandwidth_fraction": bandwidth / peak_bw if bandwidth and peak_bw else None,
        "params": param_count(cfg),
        "param_dtype": weight_dtype,
    }


def dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def synthetic_tokens(batch: int, length: int, vocab_size: int, seed: int = 0):
    """Uniform random token ids [batch, length] (int32 numpy): never zeros, which can time faster than data."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length), dtype=np.int32)


# ------------------------------------------------------------------------------------------------ ceilings (JAX)


def rate(run_once: Callable[[], object], sync: Callable[[object], None], work: float, inner: int = 10,
         repeats: int = 5) -> dict:
    """work/s of `run_once` (e.g. FLOPs of one matmul): windows of `inner` back-to-back calls, then `sync`."""

    def window():
        out = None
        for _ in range(inner):
            out = run_once()
        sync(out)

    window()  # warm-up (the first call compiles)
    s = spread(timed(window, repeats), per=inner)
    return {"per_s": work / s["median"], "time_s": s}


def jax_matmul_peak(dtype: str, n: int, repeats: int = 5, inner: int = 10) -> dict:
    """FLOP/s of an n×n×n matmul in `dtype` on JAX's default device: the MFU denominator measured in this run."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    r = rate(lambda: f(a, b), jax.block_until_ready, 2 * n**3, inner, repeats)
    return {"flops_per_s": r["per_s"], "n": n, "dtype": dtype, "time_s": r["time_s"]}


def jax_copy_bandwidth(megabytes: int, repeats: int = 5, inner: int = 10) -> dict:
    """Bytes/s (read + write) of an elementwise pass over a float32 array: the memory-bandwidth ceiling."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(2), (megabytes * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    r = rate(lambda: f(x), jax.block_until_ready, 2 * x.nbytes, inner, repeats)
    return {"bytes_per_s": r["per_s"], "megabytes": megabytes, "time_s": r["time_s"]}


def ceilings_from(record: dict) -> dict:
    """{"peak_flops": …} from a JAX matmul-peak record, {"peak_bw": …} from a bandwidth record, else {}."""
    if not record.get("ok") or record.get("label", "baseline") != "baseline":
        return {}
    if record.get("bench") == "peak" and record.get("impl") == "jax":
        return {"peak_flops": record["flops_per_s"]}
    if record.get("bench") == "bandwidth":
        return {"peak_bw": record["bytes_per_s"]}
    return {}


def jax_device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": d.device_kind, "device_count": jax.device_count()}


def jax_memory_peak() -> int | None:
    """The process's peak device bytes so far (GPU/TPU); None where the backend keeps no statistics (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


# ------------------------------------------------------------------------------------------------ environment


def environment() -> dict:
    """Host, software versions, git commit and XLA flags: recorded with every run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": _gpu_name(),
        "versions": versions,
        "git": _git_commit(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------ output


def emit(record: dict, file=None) -> None:
    """One JSON line on stdout (and `file`), flushed: the driver streams worker output line by line."""
    line = json.dumps(record, default=_plain)
    print(line, flush=True)
    if file is not None:
        file.write(line + "\n")
        file.flush()


def _plain(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_records(paths) -> list[dict]:
    """JSON lines from files (non-JSON lines, e.g. a log line, are skipped)."""
    records = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    return records
