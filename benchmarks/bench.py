"""Worker: runs benchmark cases one after another in this process and prints one JSON line per case.

    python benchmarks/bench.py train ours --preset gpt2 --dtype bfloat16 --batch 16 --seq-len 1024
    python benchmarks/bench.py train hf_compile --preset gpt2 --dtype bfloat16 --batch 16 --seq-len 1024
    python benchmarks/bench.py decode ours --preset gpt2 --dtype bfloat16 --batch 1 --set attention=xla
    python benchmarks/bench.py peak jax --dtype bfloat16 --opt n=8192
    python benchmarks/bench.py --cases cases.json --deadline 1767225600      # what suite.py runs

A case is a dict: bench (peak | bandwidth | train | plan | decode), impl (see IMPLS), preset, dtype, model (ModelConfig
overrides), batch, seq_len / prompt_len, new_tokens, opts (keyword arguments of the harness function), label and
section (for the report), peak_flops / peak_bw (the ceilings measured earlier in the run, for MFU and bandwidth
fractions). A failing case prints {"ok": false, "error": ...} and the next case still runs; a case that would
start after --deadline prints {"skipped": ...}. The first line is the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `aigc_jax` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

IMPLS = {
    "peak": ("jax", "torch"),
    "bandwidth": ("jax",),
    "train": ("ours", "hf_eager", "hf_compile", "hf_compile_regional"),
    "plan": ("ours",),
    "decode": ("ours", "hf_dynamic", "hf_static", "hf_static_eager"),
}
# The fields that identify a case in the output (the report groups and compares by them).
CASE_KEYS = ("bench", "impl", "label", "section", "preset", "dtype", "model", "batch", "seq_len", "prompt_len",
             "new_tokens", "opts")


def run_case(case: dict) -> dict:
    """Runs one case; returns its results (raises on failure)."""
    bench, impl = case["bench"], case["impl"]
    if impl not in IMPLS.get(bench, ()):
        raise ValueError(f"unknown case {bench}/{impl}; known: {IMPLS}")
    opts = dict(case.get("opts") or {})
    if bench == "peak":
        if impl == "jax":
            return common.jax_matmul_peak(case.get("dtype", "float32"), **opts)
        from benchmarks import peer_torch

        return peer_torch.matmul_peak(case.get("dtype", "float32"), **opts)
    if bench == "bandwidth":
        return common.jax_copy_bandwidth(**opts)

    cfg = common.model_config(case["preset"], case.get("dtype", "float32"), case.get("model"))
    if bench == "plan":
        from benchmarks import train_speed

        return train_speed.plan(cfg, case["batch"], case["seq_len"], **opts)
    if bench == "train":
        shape = (cfg, case["batch"], case["seq_len"])
        opts.setdefault("peak_flops", case.get("peak_flops"))
        if impl == "ours":
            from benchmarks import train_speed

            return train_speed.measure(*shape, **opts)
        from benchmarks import peer_torch

        compile = {"hf_eager": None, "hf_compile": "full", "hf_compile_regional": "regional"}[impl]
        return peer_torch.train(*shape, compile=compile, **opts)

    shape = (cfg, case["batch"], case["prompt_len"], case["new_tokens"])
    opts.setdefault("peak_bw", case.get("peak_bw"))
    if impl == "ours":
        from benchmarks import decode_speed

        return decode_speed.measure(*shape, **opts)
    from benchmarks import peer_torch

    cache = "dynamic" if impl == "hf_dynamic" else "static"
    return peer_torch.generate(*shape, cache=cache, compile=impl == "hf_static", **opts)


def run_cases(cases: list[dict], deadline: float | None = None, group: str | None = None) -> list[dict]:
    """Runs `cases` in order, printing (and returning) one record per case; the environment record first."""
    records = [{"bench": "env", "group": group, **common.environment()}]
    common.emit(records[0])
    ceilings: dict = {}  # measured by an earlier case of this process, unless the driver passed them
    for case in cases:
        case = {**ceilings, **case}
        record = {k: case[k] for k in CASE_KEYS if k in case}
        record["group"] = group
        record["xla_flags"] = os.environ.get("XLA_FLAGS", "")
        if deadline is not None and time.time() > deadline:
            record["skipped"] = "time budget of its section spent before it started"
        else:
            start = time.perf_counter()
            try:
                record.update(run_case(case), ok=True)
            except Exception as e:  # one failing case must not cost the rest of a one-shot GPU run
                record.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
                traceback.print_exc(file=sys.stderr)
            record["wall_s"] = time.perf_counter() - start
        common.emit(record)
        records.append(record)
        ceilings = {**common.ceilings_from(record), **ceilings}
    return records


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def assignments(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {item!r}")
        out[key] = _parse_value(value)
    return out


def add_shape_args(p: argparse.ArgumentParser, preset: str = "gpt2") -> None:
    """--preset --dtype --batch --seq-len --prompt-len --new-tokens --set: one case's model and shape."""
    p.add_argument("--preset", default=preset, help="model preset (aigc_jax/configs.py)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument("--batch", type=int, default=8, help="rows per step (train) or per decode call")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    p.add_argument("--prompt-len", type=int, default=16, help="decode: prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=256, help="decode: tokens generated per row")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig override, repeatable")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("bench", nargs="?", choices=sorted(IMPLS), help="what to measure")
    p.add_argument("impl", nargs="?",
                   help="whose code: " + "; ".join(f"{b}: {', '.join(i)}" for b, i in IMPLS.items()))
    add_shape_args(p)
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="harness keyword argument (e.g. repeats=3, windows=5), repeatable")
    p.add_argument("--label", default="baseline", help="name recorded with the case (the report's lever name)")
    p.add_argument("--cases", metavar="FILE", help="a JSON list of cases ('-' = stdin) instead of one case")
    p.add_argument("--deadline", type=float, help="unix time after which remaining cases are skipped")
    p.add_argument("--group", help="name recorded with every line")
    args = p.parse_args(argv)
    if args.cases:
        cases = json.load(sys.stdin if args.cases == "-" else open(args.cases))
    elif args.bench and args.impl:
        case = {"bench": args.bench, "impl": args.impl, "label": args.label, "dtype": args.dtype,
                "opts": assignments(args.opt)}
        if args.bench in ("train", "plan", "decode"):
            case.update(preset=args.preset, model=assignments(args.set), batch=args.batch)
            case.update({"seq_len": args.seq_len} if args.bench in ("train", "plan")
                        else {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens})
        cases = [case]
    else:
        p.error("give BENCH IMPL or --cases")
    run_cases(cases, args.deadline, args.group)


if __name__ == "__main__":
    main()
