"""Serving speed, ours (`aigc-jax serve`) vs HF `transformers serve --continuous-batching`, same model, same run.

    PYTHONPATH=. python benchmarks/serve_speed.py                          # baby GPT-2, concurrency 1, 8, 32, both
    PYTHONPATH=. python benchmarks/serve_speed.py --preset gpt2 --impls ours,hf --out DIR
    PYTHONPATH=. python benchmarks/serve_speed.py --quick                  # tiny model, a few requests (smoke test)

One server at a time on a free loopback port; `c` clients (the official async `openai` client) each send
streaming /v1/completions requests one after another. Per (impl, concurrency): output tokens/s over the phase
(all tokens / wall time), time to first token (request sent → first text), inter-token latency as vLLM's
benchmark measures it (the gap between successive streamed chunks that carry text) and TPOT ((latency − TTFT) /
(tokens − 1)), p50 and p99. The model has random weights with the rows of every non-ASCII byte and of EOS zeroed
in its (tied) embedding: greedy text is ASCII, one character per token, and never ends early, so both servers
generate exactly `--new-tokens` tokens for every request without any server-specific knob. One JSON line per
result (and an "env" line); `--out` also writes them to results.jsonl there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

IMPLS = ("ours", "hf")


def build_model(path: Path, preset: str, seed: int = 0) -> Path:
    import jax

    from aigc_jax import configs, model
    from aigc_jax import tokenizers as tok
    from aigc_jax.interop import hf

    cfg = configs.get_preset(preset).replace(vocab_size=257, dropout=0.0, attn_dropout=0.0)
    params = model.init_params(cfg, jax.random.key(seed))
    wte = params["wte"]["embedding"]
    params = {**params, "wte": {"embedding": wte.at[128:].set(0.0)}}  # ASCII-only greedy text, never EOS
    hf.save_hf_dir(path, cfg, params, tok.byte_level())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(impl: str, model_dir: Path, port: int, max_batch: int, chunk: int) -> list[str]:
    if impl == "ours":
        return [sys.executable, "-m", "aigc_jax", "serve", "--model", str(model_dir), "--port", str(port),
                "--max-batch", str(max_batch), "--chunk", str(chunk), "--max-queue", "4096"]
    transformers = Path(sys.executable).with_name("transformers")
    return [str(transformers), "serve", str(model_dir), "--continuous-batching", "--host", "127.0.0.1",
            "--port", str(port), "--device", "auto", "--log-level", "error"]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


async def one_request(client, model: str, prompt: str, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                             stream=True)
    times, tokens = [], 0
    async for chunk in stream:
        text = "".join(c.text or "" for c in chunk.choices)
        if text:
            times.append(time.perf_counter())
            tokens += len(text)  # ASCII: one character per token
    end = time.perf_counter()
    if not times:
        return {"tokens": 0, "latency": end - t0}
    return {"tokens": tokens, "ttft": times[0] - t0, "latency": end - t0,
            "gaps": [b - a for a, b in zip(times, times[1:])]}


async def phase(url: str, model: str, concurrency: int, requests: int, prompts: list[str], new_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    queue = list(range(requests))

    async def worker():
        out = []
        while queue:
            i = queue.pop()
            try:
                out.append(await one_request(client, model, prompts[i % len(prompts)], new_tokens))
            except Exception as e:  # a failed request is counted, not fatal
                out.append({"error": f"{type(e).__name__}: {e}"})
        return out

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in rs]
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if "error" not in r and r["tokens"]]
    gaps = [g for r in ok for g in r["gaps"]]
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    ms = lambda xs: {"p50": 1000 * percentile(xs, 50), "p99": 1000 * percentile(xs, 99)} if xs else None
    return {
        "concurrency": concurrency, "requests": requests, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if "error" in r})[:3],
        "output_tokens": sum(r["tokens"] for r in ok), "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_ms": ms([r["ttft"] for r in ok]), "itl_ms": ms(gaps),
        "tpot_ms_mean": 1000 * statistics.mean(tpot) if tpot else None,
        "tokens_per_chunk": sum(r["tokens"] for r in ok) / max(len(gaps) + len(ok), 1),
        "short_outputs": sum(1 for r in ok if r["tokens"] != new_tokens),
    }


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_impl(impl: str, model_dir: Path, args, emit) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = server_command(impl, model_dir, port, max(args.concurrency), args.chunk)
    log = open(Path(args.log_dir) / f"server-{impl}.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=common.ROOT,
                            start_new_session=True)
    try:
        wait_ready(url, proc, args.ready_timeout)
        startup = time.perf_counter() - t0
        prompts = [("".join(chr(33 + (7 * i + 13 * j) % 90) for j in range(args.prompt_len))) for i in range(64)]
        # Warm-up: the peer compiles/allocates on first use; ours compiled before listening (counted in startup).
        asyncio.run(phase(url, str(model_dir), 2, 4, prompts, args.new_tokens))
        for c in args.concurrency:
            requests = max(args.min_requests, args.requests_per_client * c)
            result = asyncio.run(phase(url, str(model_dir), c, requests, prompts, args.new_tokens))
            emit({"bench": "serve", "impl": "ours" if impl == "ours" else "hf_serve_cb", "label": "baseline", "ok": True,
                  "preset": args.preset, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                  "startup_s": startup, "server": " ".join(cmd[1:] if impl == "ours" else cmd), **result})
    except Exception as e:
        emit({"bench": "serve", "impl": impl, "preset": args.preset, "skipped": f"{type(e).__name__}: {e}"})
    finally:
        stop(proc)
        log.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--preset", default="baby", help="model preset (random weights)")
    p.add_argument("--impls", default="ours,hf", help="servers to measure, comma-separated: ours, hf")
    p.add_argument("--concurrency", default="1,8,32", help="concurrent clients per phase, comma-separated")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in a phase")
    p.add_argument("--min-requests", type=int, default=8, help="at least this many requests per phase")
    p.add_argument("--chunk", type=int, default=4, help="ours: decode steps per device call")
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for a server to be ready")
    p.add_argument("--quick", action="store_true", help="tiny model, concurrency 1 and 4, 8 new tokens")
    p.add_argument("--out", help="directory for results.jsonl and the server logs")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.concurrency, args.new_tokens, args.prompt_len = "tiny", "1,4", 8, 8
        args.min_requests, args.requests_per_client = 4, 1
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    impls = [i for i in args.impls.split(",") if i]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        p.error(f"unknown --impls {bad[0]}; choose from {', '.join(IMPLS)}")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results = open(out / "results.jsonl", "a") if out else None

    def emit(record):
        common.emit({**record, "load_avg_1m": os.getloadavg()[0]}, results)

    emit({"bench": "env", **common.environment()})
    with tempfile.TemporaryDirectory() as tmp:
        args.log_dir = str(out or tmp)
        model_dir = build_model(Path(tmp) / f"{args.preset}-gpt2", args.preset)
        for impl in impls:
            run_impl(impl, model_dir, args, emit)
    if results:
        results.close()


if __name__ == "__main__":
    main()
