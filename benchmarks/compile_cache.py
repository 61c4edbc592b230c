"""First-call latency of a new process, with and without JAX's persistent compilation cache (aigc_jax/compile_cache.py).

    python benchmarks/compile_cache.py [--preset baby] [--repeats 2] [--out FILE]

Saves a random-weight model dir of `--preset`, then starts fresh Python processes that each `aigc_jax.api.load` it
and run one greedy `generate` (prompt 16 tokens, 32 new), timing load and the first call inside the process and
the whole process from outside. Three settings, `--repeats` processes each: cache off (`AIGC_COMPILE_CACHE=0`:
what every process paid before the cache), cache cold (a new empty cache directory: the first process ever) and
cache warm (the same directory again: every later process). Prints one JSON line per process, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

CHILD = """
import json, sys, time
start = time.perf_counter()
import aigc_jax.api as aj
imported = time.perf_counter()
lm = aj.load(sys.argv[1])
loaded = time.perf_counter()
lm.generate([0] * 16, max_new_tokens=32, temperature=0)
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "first_generate_s": done - loaded}))
"""


def _save_model(preset: str, directory: str) -> None:
    import jax

    from aigc_jax import configs, model, modeldir, tokenizers

    config = configs.get_preset(preset).replace(dtype="float32")
    modeldir.save_model_dir(directory, config, model.init_params(config, jax.random.key(0)), tokenizers.byte_level())


def _child(model_dir: str, cache: str) -> dict:
    env = {**os.environ, "AIGC_COMPILE_CACHE": cache, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, model_dir], capture_output=True, text=True, env=env,
                          cwd=common.ROOT, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--preset", default="baby", help="model preset (random weights)")
    p.add_argument("--repeats", type=int, default=2, help="processes per setting (off, cold, warm)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    records = [{"bench": "env", **common.environment()}]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        _save_model(args.preset, model_dir)
        cache = os.path.join(tmp, "cache")
        settings = [("off", "0")] * args.repeats + [("cold", cache)] + [("warm", cache)] * args.repeats
        for setting, value in settings:
            if setting == "cold":  # every cold process starts from an empty directory
                os.makedirs(cache, exist_ok=False)
            records.append({"bench": "compile_cache", "preset": args.preset, "setting": setting, **_child(model_dir,
                                                                                                          value)})
    summary = {"bench": "compile_cache_summary", "preset": args.preset}
    for setting in ("off", "cold", "warm"):
        rows = [r for r in records[1:] if r["setting"] == setting]
        summary[f"{setting}_first_call_s"] = statistics.median(r["load_s"] + r["first_generate_s"] for r in rows)
        summary[f"{setting}_process_s"] = statistics.median(r["process_s"] for r in rows)
    summary["speedup_first_call"] = summary["off_first_call_s"] / summary["warm_first_call_s"]
    records.append(summary)
    for r in records:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
