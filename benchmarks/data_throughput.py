"""Host-side input throughput: batches/s and tokens/s of `aigc_jax.data.Batches` from the cached token stream.

    python benchmarks/data_throughput.py                          # default corpus, byte-level tokenizer
    python benchmarks/data_throughput.py --data PATH --tokenizer DIR --shapes 8x1024,64x1024
    python benchmarks/data_throughput.py --synthetic 100000000    # random uint16 tokens, no tfds needed

Prints one JSON line per setting (plus one for the load). tokens/s counts trained positions (B * T).
Goal: >= 5M tokens/s on a 2-core CPU, 10x what a GPU trains a small GPT-2 at.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aigc_jax import data, tokenizers
from benchmarks import common


def stream(args) -> tuple[str, np.ndarray]:
    if args.synthetic:  # in memory: the same as a memmap whose pages are cached
        return f"synthetic({args.synthetic})", np.random.default_rng(0).integers(0, 50257, args.synthetic, np.uint16)
    tok = tokenizers.byte_level() if args.tokenizer == "byte" else tokenizers.load(args.tokenizer)
    start = time.perf_counter()
    ds = data.load(args.data, tok, data_dir=args.data_dir)
    print(json.dumps({"bench": "data_load", "source": ds.name, "key": ds.key, "train_tokens": len(ds.train),
                      "seconds": round(time.perf_counter() - start, 3), "built": ds.stats.get("seconds")}), flush=True)
    return ds.name, ds.train


def measure(tokens: np.ndarray, batch: int, seq_len: int, seconds: float) -> dict:
    sampler = data.Batches(tokens, seq_len, batch, seed=0)
    sampler.batch(0)  # the epoch permutation is built once per epoch: not per-batch cost
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        sampler.batch(1 + steps % max(sampler.steps_per_epoch - 1, 1))
        steps += 1
    return {"batches_per_s": round(steps / elapsed, 1), "tokens_per_s": round(steps * batch * seq_len / elapsed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    data.add_data_args(p)
    p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer directory")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="benchmark N random tokens instead")
    p.add_argument("--shapes", default="8x1024,32x1024,64x1024,16x2048,64x256",
                   help="batch×length shapes, BxT,BxT,…")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per setting")
    args = p.parse_args()
    name, tokens = stream(args)
    for shape in args.shapes.split(","):
        batch, seq_len = map(int, shape.lower().split("x"))
        result = measure(tokens, batch, seq_len, args.seconds)
        print(json.dumps({"bench": "data_throughput", "source": name, "batch": batch, "seq_len": seq_len, **result}),
              flush=True)


if __name__ == "__main__":
    main()
