"""Shared test helpers. Multi-device tests run in their own subprocess (see `run_module`: the modules of
tests/multidevice/), never here: forcing 8 host devices for the whole suite would slow every single-device test.
Builders, constants and oracles shared by test modules live in tests/helpers/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.env import with_test_flags

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# Every test process (this one, its workers and what they start) compiles with the same XLA flags (helpers/env.py).
os.environ.update(with_test_flags(dict(os.environ)))


def _without_persistent_cache_here() -> None:
    """The pytest processes compile for themselves (their in-memory jit caches are shared by their tests); only the
    processes they start share JAX's persistent compile cache. A worker reading an entry of that cache that other
    processes were writing at the same time crashed once (a segfault inside JAX's cache read), taking every test
    left on that worker with it."""
    from aigc_jax import compile_cache

    compile_cache.enable(disabled=True)


_without_persistent_cache_here()


def python_module(name: str, *args, env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment of `python -m NAME ARGS…` for a module under tests/ (multidevice.*,
    isolated.*): tests/ and the checkout are on its path."""
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return [sys.executable, "-m", name, *map(str, args)], with_test_flags({**os.environ, **(env or {}),
                                                                            "PYTHONPATH": path})


def run_module(name: str, *args, devices: int = 1, timeout: float = 600, env: dict | None = None, cwd=None,
               with_stderr: bool = False):
    """Runs `python -m multidevice.NAME ARGS…` (tests/multidevice/NAME.py) in a fresh process with `devices` fake CPU
    devices; returns its stdout's last JSON line (and its stderr, with_stderr=True)."""
    argv, full_env = python_module(f"multidevice.{name}", *args, env={
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu", **(env or {})})
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"multidevice.{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return (out, proc.stderr) if with_stderr else out


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Runs `python -m aigc_jax ARGS…` and returns the completed process (never raises on failure)."""
    full_env = with_test_flags({**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    return subprocess.run([sys.executable, "-m", "aigc_jax", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


def cli_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """`aigc-jax ARGS…` in this process: no start-up cost, and programs compiled by earlier calls are reused."""
    from aigc_jax.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: non-zero exit, one line on stderr, no traceback, naming what went wrong."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def shakespeare_path() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is absent (only present beside the developers' checkout)")
    return SHAKESPEARE


def has_gpu() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


requires_gpu = pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------------------ serving


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory) -> Path:
    """A tiny GPT-2 in HF's directory format (byte-level tokenizer), shared by the serving tests."""
    from serve_util import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("serve_model") / "tiny-gpt2")


@pytest.fixture(scope="session")
def served(serve_model, tmp_path_factory):
    """`aigc-jax serve` on that model (warmed up, 16 slots, a chat template), for the whole session."""
    from serve_util import CHAT_TEMPLATE, ServerProcess

    d = tmp_path_factory.mktemp("served")
    (d / "chat.jinja").write_text(CHAT_TEMPLATE)
    server = ServerProcess(serve_model, "--chat-template", d / "chat.jinja", "--max-batch", "16",
                           "--max-prefill", "2", log=d / "server.log")
    try:
        server.ready = server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A ~200 KB text corpus (this package's own sources) and a data dir its token cache is built in once."""
    root = tmp_path_factory.mktemp("corpus")
    text = "\n".join(p.read_text() for p in sorted((ROOT / "aigc_jax").rglob("*.py")))
    (root / "corpus.txt").write_text(text)
    return {"data": str(root / "corpus.txt"), "data_dir": str(root / "data")}
