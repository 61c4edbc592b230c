"""JAX's persistent compilation cache, on by default, so a new process does not recompile what an earlier one did.

Every `aigc-jax` command (and `aigc_jax.api.load`) turns it on before compiling anything: XLA executables are
written to `$AIGC_COMPILE_CACHE` (default `~/.cache/aigc_jax/jax-cache`, under $XDG_CACHE_HOME if set) and a
later process with the same program, JAX version and device reads them back instead of compiling (measured in
benchmarks/RESULTS.md, "compile cache"). `AIGC_COMPILE_CACHE=0` (or `--no-compile-cache`) turns it off; a cache
directory the user configured in JAX already (`jax_compilation_cache_dir`) is left alone. Programs that compile
in under 0.2 s are not written (reading them back is no faster); `AIGC_COMPILE_CACHE_MIN_SECONDS` changes that
threshold (0: cache every program, which makes what a process writes independent of how busy the machine is).
"""

from __future__ import annotations

import os

ENV = "AIGC_COMPILE_CACHE"
OFF = ("0", "off", "false", "no", "none")
MIN_COMPILE_SECONDS = 0.2  # smaller programs compile faster than the cache reads them back
MIN_ENV = "AIGC_COMPILE_CACHE_MIN_SECONDS"
_refused = False


def directory() -> str | None:
    """Where executables are cached, or None when the cache is turned off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return os.path.expanduser(value)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "aigc_jax", "jax-cache")


def enable(disabled: bool = False) -> str | None:
    """Turns the cache on (unless `disabled`, the env var says off, or JAX already has a directory); returns the
    directory in use."""
    import jax

    global _refused
    _refused = _refused or disabled  # `--no-compile-cache` holds for the whole process (api.load asks again)
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = None if _refused else directory()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _min_seconds())
    return path


def _min_seconds() -> float:
    value = os.environ.get(MIN_ENV, "").strip()
    try:
        return float(value) if value else MIN_COMPILE_SECONDS
    except ValueError:
        return MIN_COMPILE_SECONDS  # a malformed tuning knob must not stop a generate or a training run
