"""How long `aigc-jax serve` takes from launch to serving (/health 200), with an empty compile cache (cold: the first
start on a machine) and with the cache that start filled (warm: every later start).

    python benchmarks/serve_cold_start.py [--preset llama-tiny] [--n-positions 256] [--max-batch 4] [--repeats 3]
        [--checkout DIR …] [--out FILE]

Saves a random-weight model dir of `--preset`, then starts the server `--repeats` times per setting and per
checkout: each `--checkout` is another source tree of this project (say, a `git worktree` of an older commit) run
with the same Python, so an old and a new server are timed in the same run, alternating. Prints one JSON line
per start (seconds to ready, the programs the server reports compiling, the 1-minute load average) and a summary
line per (checkout, setting) with the median.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common


def _save_model(preset: str, n_positions: int, directory: str) -> None:
    import jax

    from aigc_jax import configs, model, modeldir, tokenizers

    config = configs.get_preset(preset).replace(n_positions=n_positions, dtype="float32")
    modeldir.save_model_dir(directory, config, model.init_params(config, jax.random.key(0)), tokenizers.byte_level())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return json.loads(r.read())
    except OSError:  # not listening yet, or 503 while warming
        return None


def start_once(checkout: str, model_dir: str, cache: str, max_batch: int, timeout: float = 900) -> dict:
    port = _free_port()
    env = {**os.environ, "AIGC_COMPILE_CACHE": cache, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "PYTHONPATH": checkout}
    cmd = [sys.executable, "-m", "aigc_jax", "serve", "--model", model_dir, "--port", str(port), "--max-batch",
           str(max_batch)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            health = _health(port)
            if health is not None and health.get("status") == "ok":
                return {"ready_s": time.perf_counter() - start, "programs": health["compiles"],
                        "load_1min": os.getloadavg()[0]}
            time.sleep(0.25)
        raise RuntimeError(f"not ready after {timeout} s")
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--preset", default="llama-tiny", help="model preset (random weights)")
    p.add_argument("--n-positions", type=int, default=256, help="the model's context length")
    p.add_argument("--max-batch", type=int, default=4, help="the server's --max-batch (decode slots)")
    p.add_argument("--repeats", type=int, default=3, help="server starts per setting and checkout")
    p.add_argument("--checkout", action="append", default=[],
                   help="another source tree of this project to time as well (default: this one only)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    checkouts = [str(common.ROOT)] + [str(Path(c).resolve()) for c in args.checkout]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        _save_model(args.preset, args.n_positions, model_dir)
        caches = {c: os.path.join(tmp, f"cache{i}") for i, c in enumerate(checkouts)}
        for setting in ("cold", "warm"):
            for r in range(args.repeats):
                for checkout in checkouts:  # alternating, so load drifts hit every checkout alike
                    cache = caches[checkout] if setting == "warm" else os.path.join(tmp, f"empty-{setting}-{r}-{len(rows)}")
                    row = {"checkout": checkout, "setting": setting, "preset": args.preset,
                           "n_positions": args.n_positions, "max_batch": args.max_batch, "repeat": r,
                           **start_once(checkout, model_dir, cache, args.max_batch)}
                    if setting == "cold" and r == 0:  # fill the warm cache from one cold start
                        start_once(checkout, model_dir, caches[checkout], args.max_batch)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    for checkout in checkouts:
        for setting in ("cold", "warm"):
            mine = [r for r in rows if r["checkout"] == checkout and r["setting"] == setting]
            print(json.dumps({"summary": True, "checkout": checkout, "setting": setting, "median_ready_s":
                              statistics.median(r["ready_s"] for r in mine), "programs": mine[0]["programs"]}))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
