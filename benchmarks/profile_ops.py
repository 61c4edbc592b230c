"""Where the time goes: runs one of our cases under jax.profiler and prints the ops (XLA thunks on the CPU, kernels
on the GPU) with the most time, summed over the timed part, grouped by kind and one by one.

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true JAX_PLATFORMS=cpu \\
        python benchmarks/profile_ops.py train --preset baby --batch 8 --seq-len 256
    python benchmarks/profile_ops.py decode --preset gpt2 --dtype bfloat16 --batch 64     # on a GPU

On the CPU, per-op events exist only with --xla_cpu_enable_xprof_traceme=true. The traced region includes the
harness's warm-up and compile; compile work runs on other threads and is not counted (only XLA's execution
threads on the CPU, the device planes on a GPU).
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench, common


def op_times(xplane_path: str) -> collections.Counter:
    """Total ns per op name on XLA's CPU execution threads and on every device plane."""
    from jax._src.lib import _profile_data

    totals: collections.Counter = collections.Counter()
    for plane in _profile_data.ProfileData.from_file(xplane_path).planes:
        device = plane.name.startswith("/device:")
        for line in plane.lines:
            if not (device or line.name.startswith("tf_XLAEigen")):
                continue
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "end:", "Threadpool")):
                    totals[event.name] += event.duration_ns
    return totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("bench", choices=("train", "decode"), help="which of our cases to profile")
    bench.add_shape_args(p, preset="baby")
    p.add_argument("--top", type=int, default=30, help="ops to list")
    args = p.parse_args()
    import jax

    from benchmarks import decode_speed, train_speed

    cfg = common.model_config(args.preset, args.dtype, bench.assignments(args.set))
    with tempfile.TemporaryDirectory() as out:
        with jax.profiler.trace(out):
            if args.bench == "train":
                r = train_speed.measure(cfg, args.batch, args.seq_len, warmup=0, windows=1, steps_per_window=3)
                per, unit = 4, "step"  # the first step + one window of 3
            else:
                r = decode_speed.measure(cfg, args.batch, args.prompt_len, args.new_tokens, repeats=1)
                per, unit = 3 * args.new_tokens, "token"  # first call + one full + one warm-up prefill-only call
        totals = op_times(glob.glob(f"{out}/**/*.xplane.pb", recursive=True)[0])
    kinds: collections.Counter = collections.Counter()
    for name, ns in totals.items():
        kinds[re.sub(r"[.\d]+$", "", name)] += ns
    scale = 1e6 * per
    print(f"{args.bench} {args.preset} B{args.batch}: {r.get('step_ms') or r.get('ms_per_token'):.3f} ms per {unit} "
          f"(harness); op time per {unit} (approximate, ms):")
    print("by kind: " + ", ".join(f"{k} {v / scale:.3f}" for k, v in kinds.most_common(12)))
    for name, ns in totals.most_common(args.top):
        print(f"  {ns / scale:8.3f}  {name}")


if __name__ == "__main__":
    main()
