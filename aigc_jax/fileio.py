"""Small file helpers every on-disk format shares: JSON objects read with one-line errors, atomic writes, and
output-directory checks. The lowest layer of the formats: imports nothing of aigc_jax but errors."""

from __future__ import annotations

import json
import os

from aigc_jax.errors import UserError


def read_json(path: str, missing_hint: str) -> dict:
    """A JSON object from `path`, or a one-line UserError naming the file (missing, corrupt, not an object)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {missing_hint}") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path} is corrupt ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is corrupt (expected a JSON object)")
    return data


def atomic_write_text(path: str, text: str) -> None:
    """Writes `path` so that a reader (or a process killed mid-write) sees the old file or the new one, never half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: str, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_save(path: str, save) -> None:
    """`save(tmp_path)` writes a whole file (safetensors, tokenizer.json, …); it then replaces `path` atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_temporary(name: str) -> bool:
    """Names our atomic writes leave behind when killed mid-write (never a user's file)."""
    return ".tmp-" in name or name.endswith(".tmp")


def check_output_dir(path: str, flag: str) -> None:
    """An output directory must not be a file or lie under one (makedirs would fail after work was done)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, not a directory; choose another {flag}")
