"""Helpers for the serving tests: a tiny GPT-2 directory in HF's format and `aigc-jax serve` in a subprocess.

Servers bind 127.0.0.1 on a free port, every wait is bounded in time, and `ServerProcess.stop` always ends the
process (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]

# A ChatML-like template: GPT-2 has none, so chat needs --chat-template FILE.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model_dir(path: Path, n_positions: int = 128, seed: int = 0) -> Path:
    """A tiny random GPT-2 (2 layers, width 32, byte-level tokenizer: 257 ids) saved as an HF directory that
    transformers, lm-eval and `aigc-jax serve` all load. Weights ×3 keep next-token choices far from ties."""
    import jax

    from aigc_jax import configs, model
    from aigc_jax import tokenizers as tok
    from aigc_jax.interop import hf

    cfg = configs.get_preset("tiny").replace(n_positions=n_positions)
    params = jax.tree.map(lambda x: x * 3, model.init_params(cfg, jax.random.key(seed)))
    hf.save_hf_dir(path, cfg, params, tok.byte_level())
    return path


class Reply:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def _encode(body, headers):
    headers = {"Content-Type": "application/json", **(headers or {})}
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return body, headers


def call(url: str, method: str, path: str, body=None, headers=None, timeout: float = 60) -> Reply:
    """One HTTP request with the standard library (`body`: bytes as they are, anything else as JSON)."""
    body, headers = _encode(body, headers)
    conn = _connection(url, timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


@contextlib.contextmanager
def stream(url: str, path: str, body, headers=None, timeout: float = 120):
    """(status, an iterator of the non-empty response lines); leaving the block closes the connection."""
    body, headers = _encode(body, headers)
    conn = _connection(url, timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()

        def lines():
            for raw in r:
                line = raw.decode().rstrip("\r\n")
                if line:
                    yield line

        yield r.status, lines()
    finally:
        conn.close()


class ServerProcess:
    """`python -m aigc_jax serve --model DIR ARGS…` on a free loopback port, its output in a log file."""

    def __init__(self, model_dir, *args: str, log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "aigc_jax", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), *map(str, args)]
        full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                r = call(self.url, "GET", "/health", timeout=5)
                if r.status == 200:
                    return r.json()
            except OSError:  # not listening yet, or still loading
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()[-3000:]}")

    def health(self) -> dict:
        return call(self.url, "GET", "/health", timeout=10).json()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def wait_until(self, predicate, timeout: float = 30, what: str = "condition") -> dict:
        """Polls /health until predicate(health) holds (bounded)."""
        deadline = time.monotonic() + timeout
        health = self.health()
        while not predicate(health):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached in {timeout} s: {health}")
            time.sleep(0.1)
            health = self.health()
        return health

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode
