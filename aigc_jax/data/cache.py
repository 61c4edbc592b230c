"""A directory of raw arrays plus `meta.json`, built once and then memory-mapped.

The build runs in a private temporary directory that is renamed into place only when complete, so a killed
run never leaves a half-written cache. Concurrent processes take turns on a lock file, so one builds and
the others then read; where the file system ignores locks, each builds privately and the first rename wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aigc_jax.errors import UserError

META = "meta.json"


def cached(directory: Path, build: Callable[[Path], dict]) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) from `directory`, first running `build(tmp_dir)` if it is not there yet.

    `build` writes each array as raw bytes to `tmp_dir/NAME.bin` and returns a JSON-able meta dict whose
    "arrays" entry maps NAME to {"dtype": str, "shape": list}.
    """
    directory = Path(directory)
    if not (directory / META).is_file():
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {directory.parent} ({e.strerror}): pass a writable --data-dir") from None
        with _lock(directory.parent / f".{directory.name}.lock"):
            if not (directory / META).is_file():  # another process may have built it while we waited
                _build(directory, build)
    return read(directory)


def _build(directory: Path, build: Callable[[Path], dict]) -> None:
    tmp = directory.parent / f".{directory.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = build(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / META).is_file():  # not a lost race (a file system without locks): a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path):
    # Processes sharing a data dir (several per host, or hosts on a shared disk) build once; the others wait.
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    return read_arrays(directory, json.loads((Path(directory) / META).read_text()))


def read_arrays(directory: Path, meta: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """The arrays `meta` lists, memory-mapped from `directory` (a finished cache or a build in progress)."""
    arrays = {}
    for name, spec in meta["arrays"].items():
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        path = Path(directory) / f"{name}.bin"
        # np.memmap cannot map an empty file; read-only maps keep the page cache shared between processes.
        arrays[name] = np.memmap(path, dtype, mode="r", shape=shape) if np.prod(shape) else np.zeros(shape, dtype)
    return meta, arrays


def array_spec(array: np.ndarray) -> dict:
    return {"dtype": np.dtype(array.dtype).name, "shape": list(array.shape)}


def write_array(directory: Path, name: str, array: np.ndarray) -> dict:
    """Writes one whole array for `cached`; returns its meta entry."""
    np.ascontiguousarray(array).tofile(Path(directory) / f"{name}.bin")
    return array_spec(array)
